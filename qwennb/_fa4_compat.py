"""The ``flash_attn.cute.interface`` functions in the shape PyTorch's FA4 registration calls them.

PyTorch 2.10-2.12 unpack ``_flash_attn_fwd``'s result as ``(out, lse)``; flash-attn-4 betas from late 2026 return
more values (``out, lse, p, row_max, o_lo``). :mod:`qwennb.attention` registers this module in place of the
package's own (``register_flash_attention_fa4(module_path="qwennb._fa4_compat")``): it passes the first two on,
whatever the version. flash-attn-4 is imported at the first call, so this module imports anywhere.
"""

from __future__ import annotations

from typing import Any


def _interface() -> Any:
    from flash_attn.cute import interface

    return interface


def _flash_attn_fwd(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    res = _interface()._flash_attn_fwd(*args, **kwargs)
    return res[0], res[1]


def _flash_attn_bwd(*args: Any, **kwargs: Any) -> Any:
    return _interface()._flash_attn_bwd(*args, **kwargs)
