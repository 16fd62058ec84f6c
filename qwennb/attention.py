"""FlashAttention-4 as PyTorch's flash kernel, for Hopper and Blackwell cards.

PyTorch (2.10 and later) keeps a registry of flash-attention implementations that replace the kernels behind
``scaled_dot_product_attention``'s flash backend; its ``"FA4"`` entry routes them to the ``flash-attn-4`` package
(``pip install flash-attn-4``: CuTe DSL kernels compiled on first use, for compute capability 9.x and 10.x). On Hopper
SDPA otherwise picks cuDNN's attention. :func:`enable_flash4` activates FA4 and turns SDPA's cuDNN backend off, so
that SDPA's choice falls to flash, i.e. to FA4; :func:`disable_flash4` puts both back. These are process-wide
switches of PyTorch: every SDPA call of the process, compiled or not, traced after the switch.

Measured on an H200 (``benchmarks/results/attention-nvidia-h200.md``): FA4 1.03-1.05x cuDNN's speed at
text-to-image's 4,000-7,000 tokens, 1.16-1.22x at an edit's 8,500; end to end an edit step 1.37x -> 1.44x stock and a
Qwen-Image-2.1 step 1.28x -> 1.31x. A different attention kernel rounds differently: its output's error against
float32 equals cuDNN's (2.3e-3), and the final latents move from stock's as much as the tuned path's already do.

Example::

    >>> from qwennb.attention import flash4_unavailable
    >>> isinstance(flash4_unavailable(), (str, type(None)))  # None where FA4 can run
    True
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = [
    "PACKAGE",
    "disable_flash4",
    "enable_flash4",
    "flash4_active",
    "flash4_missing",
    "flash4_unavailable",
]

PACKAGE = "flash-attn-4"
# The registry entry enable_flash4 activates: PyTorch's FA4 registration, through qwennb._fa4_compat.
COMPAT_IMPL = "FA4-qwennb"
CACHE_TAG = "qwennb-fa4"  # added to torch.compile's cache key while FA4 is on
_state: dict[str, Any] = {}


def flash4_missing() -> str | None:
    """What this Python environment lacks for FlashAttention-4, in one line; ``None`` when PyTorch registers FA4
    and ``flash-attn-4`` is installed. Looks at the software only (no GPU needed, nothing imported from the
    kernels); :func:`flash4_unavailable` checks the card too.

    Example::

        >>> r = flash4_missing()
        >>> r is None or "FA4" in r or "flash-attn-4" in r or "flash-attention" in r
        True
    """
    import torch

    version = torch.__version__.split("+")[0]
    try:
        from torch.nn import attention as ta

        impls = ta.list_flash_attention_impls()
    except (ImportError, AttributeError):
        return f"PyTorch {version} has no registry of flash-attention implementations (2.10 and later have)"
    if "FA4" not in impls:
        return f"PyTorch {version} does not register FA4 (it has: {', '.join(impls) or 'none'})"
    if not _has_cute():
        return f"the {PACKAGE} package is not installed (pip install {PACKAGE})"
    return None


def _has_cute() -> bool:
    """Whether ``flash_attn.cute`` (flash-attn-4) is installed, found on disk without importing ``flash_attn``
    (``find_spec`` of a submodule imports its package: FA2's CUDA extension where that is installed)."""
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        return False
    places = (spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isdir(os.path.join(p, "cute")) for p in places)


def capability_supported(major: int) -> bool:
    """Whether FA4 has kernels for a card of this compute capability (9.x Hopper, 10.x Blackwell).

    Example::

        >>> capability_supported(9), capability_supported(8)
        (True, False)
    """
    return major in (9, 10)


def flash4_unavailable(device: Any = None) -> str | None:
    """Why FlashAttention-4 cannot run here, in one line; ``None`` when it can: :func:`flash4_missing`, then a
    CUDA card of compute capability 9.x or 10.x (``device``: a ``torch.device``, an index or ``None`` for the
    current one).

    Example::

        >>> r = flash4_unavailable()
        >>> r is None or isinstance(r, str)
        True
    """
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if not capability_supported(major):
        return f"FA4 runs on compute capability 9.x and 10.x; this card is {major}.{minor}"
    return flash4_missing()


def flash4_active() -> bool:
    """Whether :func:`enable_flash4` is in force.

    Example::

        >>> flash4_active()
        False
    """
    return bool(_state)


def enable_flash4(device: Any = None) -> None:
    """Route ``scaled_dot_product_attention`` to FlashAttention-4 for this process.

    Raises ``RuntimeError`` with :func:`flash4_unavailable`'s reason where FA4 cannot run. SDPA's kernel is
    chosen when a graph is traced, so this also adds ``"qwennb-fa4"`` to ``torch.compiler.config.cache_key_tag``:
    torch.compile's caches (inductor's FX graph cache, AOTAutograd's) key a graph without SDPA's backend flags,
    and would otherwise hand back a graph traced with cuDNN earlier (measured: an H200 run got cuDNN's kernel
    from the cache). Graphs compiled in this process before the call keep their kernel until they are traced
    again (``torch._dynamo.reset()``).

    Example::

        >>> from qwennb.attention import enable_flash4, flash4_unavailable
        >>> if flash4_unavailable() is None:
        ...     enable_flash4()
    """
    import torch

    why = flash4_unavailable(device)
    if why is not None:
        raise RuntimeError(f"FlashAttention-4 is not available: {why}")
    if _state:
        return
    _activate()
    _state["cudnn_sdp"] = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    _state["cache_key_tag"] = _tag_cache_key(True)


def _activate() -> None:
    """PyTorch's own FA4 registration, pointed at :mod:`qwennb._fa4_compat` (which takes flash-attn-4's result
    in the shape PyTorch 2.10-2.12 unpack it), under the registry name ``FA4-qwennb``."""
    import functools

    from torch.nn import attention as ta
    from torch.nn.attention import _fa4

    if COMPAT_IMPL not in ta.list_flash_attention_impls():
        ta.register_flash_attention_impl(
            COMPAT_IMPL,
            register_fn=functools.partial(_fa4.register_flash_attention_fa4, "qwennb._fa4_compat"),
        )
    ta.activate_flash_attention_impl(COMPAT_IMPL)


def _tag_cache_key(on: bool, before: str | None = None) -> str:
    """Add :data:`CACHE_TAG` to torch.compile's cache-key tag (``on``), or put back ``before``; returns the tag
    as it was."""
    from torch.compiler import config

    was = config.cache_key_tag
    if on:
        config.cache_key_tag = f"{was}+{CACHE_TAG}" if was else CACHE_TAG
    else:
        config.cache_key_tag = before or ""
    return was


def disable_flash4() -> None:
    """Undo :func:`enable_flash4`: PyTorch's own flash kernels again, SDPA's cuDNN backend and the compile
    caches' key as they were.

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
    torch.backends.cuda.enable_cudnn_sdp(_state.get("cudnn_sdp", True))
    _tag_cache_key(False, _state.get("cache_key_tag"))
    _state.clear()
