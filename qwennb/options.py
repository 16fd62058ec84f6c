"""One check of the generation options, shared by ``generate()``, the CLI, the magics and the panel.

Plain data in (a mapping of option names to values as a person gave them), plain data out (the same
options normalised: ``size="512x256"`` becomes ``width``/``height``, a preset name its canonical spelling),
a :class:`~qwennb.errors.GenerationError` with one line out on the first bad value. It imports neither torch
nor diffusers, so a bad option is refused before any model loads, in milliseconds.

Other options join by registering a check::

    @option("lora_scale")
    def _lora_scale(name, value, options):
        return {name: float(value)}

Example:
    >>> from qwennb.options import validate_generate_options
    >>> validate_generate_options({"prompt": "a fox", "size": "512x256", "steps": 8})
    {'prompt': 'a fox', 'width': 512, 'height': 256, 'steps': 8}
    >>> validate_generate_options({"prompt": "a fox", "steps": -3})
    Traceback (most recent call last):
    ...
    qwennb.errors.GenerationError: steps must be a whole number of at least 2, got -3
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import GenerationError
from .presets import ASPECT_RATIOS, get_preset

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIDE = 4096

# name -> check(name, value, all options) -> normalised {name: value} (may rename or split, e.g. size).
Check = Callable[[str, Any, Mapping[str, Any]], dict[str, Any]]
CHECKS: dict[str, Check] = {}
# Checks that look at several options together, run after the single ones on the normalised options.
CROSS_CHECKS: list[Callable[[dict[str, Any]], None]] = []


def option(*names: str) -> Callable[[Check], Check]:
    """Register the check of one or more option names (a decorator)."""

    def register(fn: Check) -> Check:
        for n in names:
            CHECKS[n] = fn
        return fn

    return register


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_steps(steps: Any) -> int:
    """Denoising steps: a whole number from 2 to 1000.

    One step gives NaN: the scheduler stretches its sigmas to ``shift_terminal``, which needs two points.
    """
    if not _whole(steps) or steps < 2:
        raise GenerationError(f"steps must be a whole number of at least 2, got {steps!r}")
    if steps > MAX_STEPS:
        raise GenerationError(f"steps must be at most {MAX_STEPS}, got {steps}")
    return int(steps)


# The largest CFG taken (ComfyUI's sampler stops at 100 too): far beyond any useful guidance (Qwen-Image's own is 4),
# and well below where the guided prediction overflows to inf and the image comes out black.
MAX_CFG = 100.0


def check_cfg(cfg: Any) -> float:
    """CFG (``true_cfg_scale``): a finite number from 1 (1 turns guidance off) to :data:`MAX_CFG`."""
    if (
        isinstance(cfg, bool)
        or not isinstance(cfg, (int, float))
        or not math.isfinite(cfg)
        or not 1 <= cfg <= MAX_CFG
    ):
        raise GenerationError(
            f"CFG must be at least 1 (1 turns guidance off) and at most {MAX_CFG:g}, got {cfg!r}"
        )
    return float(cfg)


def check_seed(seed: Any) -> int:
    if not _whole(seed) or seed < 0 or seed > MAX_SEED:
        raise GenerationError(f"seed must be a whole number from 0 to 2**63-1, got {seed!r}")
    return int(seed)


def check_num_images(n: Any) -> int:
    if not _whole(n) or n < 1 or n > MAX_IMAGES:
        raise GenerationError(f"number of images must be from 1 to {MAX_IMAGES}, got {n!r}")
    return int(n)


def check_side(name: str, v: Any) -> int:
    if not _whole(v) or v < 16 or v > MAX_SIDE:
        raise GenerationError(f"{name} must be a whole number from 16 to {MAX_SIDE}, got {v!r}")
    return int(v)


def parse_size(text: str) -> tuple[int, int]:
    """Parse "1024x768" into (1024, 768), each side from 16 to 4096.

    Example:
        >>> parse_size("1024x768")
        (1024, 768)
    """
    try:
        w, h = str(text).lower().replace("×", "x").split("x")
        width, height = int(w), int(h)
    except ValueError:
        raise GenerationError(f"size must look like 1024x1024, got {text!r}") from None
    return check_side("width", width), check_side("height", height)


def check_writable_folder(folder: str | os.PathLike[str]) -> Path:
    """Make sure PNGs can be written into ``folder`` (created if missing) before anything is generated.

    Example:
        >>> check_writable_folder("/proc/qwennb")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qwennb.errors.GenerationError: cannot write to the output folder /proc/qwennb: ...
    """
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".qwennb-check-", suffix=".png"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise GenerationError(f"cannot write to the output folder {folder}: {reason}") from None
    return path


@option("prompt")
def _prompt(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, str):
        several = isinstance(value, (list, tuple))
        raise GenerationError(
            f"the prompt must be text, got {type(value).__name__}"
            + ("; for several prompts, qwennb.batch.run_batch (or `qwennb batch FILE`)" if several else "")
        )
    if not value.strip():
        raise GenerationError("the prompt is empty")
    return {"prompt": value}


@option("negative_prompt")
def _negative(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, str):
        raise GenerationError(f"the negative prompt must be text, got {value!r}")
    return {"negative_prompt": value}


@option("steps")
def _steps(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {"steps": check_steps(value)}


@option("cfg", "true_cfg_scale", "guidance_scale")
def _cfg(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: check_cfg(value)}


@option("seed")
def _seed(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {"seed": check_seed(value)}


@option("num_images")
def _n(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_images": check_num_images(value)}


@option("width", "height")
def _side(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: check_side(name, value)}


@option("size")
def _size(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"width": check_side("width", value[0]), "height": check_side("height", value[1])}
    width, height = parse_size(value)
    return {"width": width, "height": height}


@option("aspect")
def _aspect(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if value not in ASPECT_RATIOS:
        raise GenerationError(f"unknown aspect ratio {value!r}; choose one of: {', '.join(ASPECT_RATIOS)}")
    return {"aspect": value}


@option("preset")
def _preset(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, str):
        raise GenerationError(f"the preset must be a name, got {value!r}")
    return {"preset": get_preset(value).name}


@option("mode")
def _mode(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    from .plan import MODES

    if value not in MODES:
        raise GenerationError(f"unknown mode {value!r}; choose one of: {', '.join(MODES)}")
    return {"mode": value}


@option("out")
def _out(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    check_writable_folder(value)
    return {"out": value}


@option("positive_magic", "preview")
def _flag(name: str, value: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, bool):
        raise GenerationError(f"{name} must be True or False, got {value!r}")
    return {name: value}


def _size_xor_aspect(opts: dict[str, Any]) -> None:
    if opts.get("aspect") is not None and (opts.get("width") is not None or opts.get("height") is not None):
        raise GenerationError("give either a size or an aspect ratio, not both")


def _one_cfg(opts: dict[str, Any]) -> None:
    cfg, true_cfg = opts.get("cfg"), opts.get("true_cfg_scale")
    if cfg is not None and true_cfg is not None and cfg != true_cfg:
        raise GenerationError("give cfg or true_cfg_scale, not both")


CROSS_CHECKS += [_size_xor_aspect, _one_cfg]


def validate_generate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise generation options; the first bad one raises :class:`GenerationError`.

    ``None`` means "not given" and is left out of the answer. Unknown names are refused (they are typos).
    No model, torch or diffusers is touched.
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        check = CHECKS.get(name)
        if check is None:
            raise GenerationError(f"unknown option {name!r}; known: {', '.join(sorted(CHECKS))}")
        out.update(check(name, value, options))
    for cross in CROSS_CHECKS:
        cross(out)
    return out
