"""FlashAttention-4 as PyTorch's flash kernel, for Hopper and Blackwell cards.

PyTorch (2.10 and later) keeps a registry of flash-attention implementations that replace the kernels behind
``scaled_dot_product_attention``'s flash backend: ``torch.nn.attention.activate_flash_attention_impl("FA4")`` routes
them to the ``flash-attn-4`` package (``pip install flash-attn-4``: CuTe DSL kernels compiled on first use, for compute
capability 9.x and 10.x). On Hopper, SDPA otherwise picks cuDNN's attention; :func:`enable_flash4` activates FA4 and
turns SDPA's cuDNN backend off so that its choice falls to flash, i.e. to FA4. Both are process-wide switches of
PyTorch (every SDPA call of the process, compiled or not, as long as it is traced after the switch);
:func:`disable_flash4` puts both back.

A different attention kernel rounds differently: the outputs move at bf16's rounding level, not more (see
``benchmarks/attention.py`` for the relative error of each kernel against a float32 reference).

Example::

    >>> from qwennb.attention import flash4_unavailable
    >>> isinstance(flash4_unavailable(), (str, type(None)))  # None where FA4 can run
    True
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["disable_flash4", "enable_flash4", "flash4_active", "flash4_unavailable"]

PACKAGE = "flash-attn-4"
_state: dict[str, Any] = {}


def flash4_unavailable(device: Any = None) -> str | None:
    """Why FlashAttention-4 cannot run here, in one line; ``None`` when it can.

    Checks, without importing the kernels: a CUDA card of compute capability 9.x or 10.x (``device``: a
    ``torch.device``, an index or ``None`` for the current one), PyTorch's registry of flash implementations with
    ``"FA4"`` in it, and the ``flash_attn.cute`` package installed.

    Example::

        >>> r = flash4_unavailable()
        >>> r is None or isinstance(r, str)
        True
    """
    import torch

    try:
        from torch.nn import attention as ta

        impls = ta.list_flash_attention_impls()
    except (ImportError, AttributeError):
        return f"PyTorch {torch.__version__.split('+')[0]} has no registry of flash-attention implementations (2.10+)"
    if "FA4" not in impls:
        return f"PyTorch {torch.__version__.split('+')[0]} does not register FA4 (it has: {', '.join(impls) or 'none'})"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FA4 runs on compute capability 9.x and 10.x; this card is {major}.{minor}"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"the {PACKAGE} package is not installed (pip install {PACKAGE})"
    return None


def flash4_active() -> bool:
    """Whether :func:`enable_flash4` is in force (FA4 active and SDPA's cuDNN backend off).

    Example::

        >>> flash4_active()
        False
    """
    if not _state:
        return False
    from torch.nn import attention as ta

    return ta.current_flash_attention_impl() == "FA4"


def enable_flash4(device: Any = None) -> None:
    """Route ``scaled_dot_product_attention`` to FlashAttention-4 for this process.

    Raises ``RuntimeError`` with :func:`flash4_unavailable`'s reason where FA4 cannot run. Call it before anything
    is compiled: a graph traced earlier keeps the kernel it was traced with.

    Example::

        >>> from qwennb.attention import enable_flash4, flash4_unavailable
        >>> if flash4_unavailable() is None:
        ...     enable_flash4()
    """
    import torch
    from torch.nn import attention as ta

    why = flash4_unavailable(device)
    if why is not None:
        raise RuntimeError(f"FlashAttention-4 is not available: {why}")
    if flash4_active():
        return
    ta.activate_flash_attention_impl("FA4")
    _state["cudnn_sdp"] = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)


def disable_flash4() -> None:
    """Undo :func:`enable_flash4`: PyTorch's own flash kernels again, SDPA's cuDNN backend as it was.

    Example::

        >>> from qwennb.attention import disable_flash4
        >>> disable_flash4()  # nothing to undo: a no-op
    """
    if not _state:
        return
    import torch
    from torch.nn import attention as ta

    restore = getattr(ta, "restore_flash_attention_impl", None)
    if restore is not None:
        restore()
    torch.backends.cuda.enable_cudnn_sdp(_state.pop("cudnn_sdp", True))
    _state.clear()
