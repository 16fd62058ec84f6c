"""qwennb: run Qwen-Image from a notebook.

The library core has no IPython import; ``%load_ext qwennb`` reaches the magics through
``load_ipython_extension``. Heavy modules (torch, diffusers) load on first use.

Example:
    >>> import qwennb
    >>> qwennb.get_model("qwen-image").hub_id
    'Qwen/Qwen-Image'
"""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import Any

if "torch" not in _sys.modules:
    # MKL's CPU matrix products can round differently with the alignment of their buffers, so the same seed
    # could give pixels one level apart; STRICT makes CPU runs (the tiny model) reproduce exactly. Set
    # MKL_CBWR yourself to choose otherwise. No effect on GPU work.
    _os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

_LAZY = {
    "detect": "hardware",
    "Hardware": "hardware",
    "get_model": "models",
    "component_sizes": "models",
    "find_local_models": "models",
    "REGISTRY": "models",
    "make_plan": "plan",
    "describe_machine": "plan",
    "OptimizationConfig": "plan",
    "Plan": "plan",
    "ModelDetectionService": "compat",
    "PipelineOptimizer": "compat",
    "QwennbError": "errors",
    "generate": "generation",
    "enhance_prompt_with_qwen2vl": "enhance",
    "enhance_prompt": "enhance",
    "validate_generate_options": "options",
    "run_sweep": "sweep",
    "parse_axes": "sweep",
    "GenerationResult": "generation",
    "StopSignal": "generation",
    "load_params": "generation",
    "build": "pipeline",
    "validate_optimization": "pipeline",
    "resolve_model": "pipeline",
    "PRESETS": "presets",
    "Session": "session",
    "edit": "edit",
    "load_edit_pipeline": "edit",
    "compare_models": "edit",
    "batch": "batch",
    "check_batch": "batch",
    "BatchResult": "batch",
}


_EXTENSION: Any = None


def _render(kind: str, obj: Any, **kwargs: Any) -> Any:
    """Presentation of a core object (``mimebundle``, ``timing_figure``...): the core's ``_repr_mimebundle_``
    methods call this, so that the core modules never import the presentation layer (display)."""
    from . import display

    return getattr(display, kind)(obj, **kwargs)


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext qwennb``: register the magics, detect the GPU, plan and load the model."""
    global _EXTENSION
    from .magics import load_extension

    _EXTENSION = load_extension(ip)


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext qwennb`` (and ``%reload_ext``): free the model and its GPU memory."""
    global _EXTENSION
    if _EXTENSION is not None:
        _EXTENSION.session.unload()
        _EXTENSION = None


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwennb' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", *_LAZY]
