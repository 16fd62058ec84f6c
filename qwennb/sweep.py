"""Sweeps: one prompt over a grid of one or two axes (seed, cfg, steps, preset, or a ``{placeholder}`` of the
prompt), every cell generated with the same other options, then one labelled grid image.

Plain data in, plain data out: :func:`parse_axes` turns ``["seed=1,2", "cfg=1,4"]`` into axes,
:func:`run_sweep` returns a :class:`SweepResult` (each cell's parameters, result and time, the grid image).
The CLI (``qwennb sweep``), the magic (``%qwen sweep``) and scripts call these.

Example:
    >>> from qwennb.sweep import parse_axes
    >>> parse_axes(["seed=1,2", "animal=fox,cat"], "a {animal} in the snow")
    {'seed': [1, 2], 'animal': ['fox', 'cat']}
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import GenerationError, QwennbError
from .options import validate_generate_options

AXES = ("seed", "cfg", "steps", "preset")
MAX_AXES = 2
MAX_CELLS = 64
RUNTIME = frozenset(
    {"on_step", "stop", "wait", "original_prompt"}
)  # generate() arguments that are not options
AXIS_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class SweepError(QwennbError, ValueError):
    """A sweep that cannot run as written (unknown axis, bad value, too many cells)."""


def placeholders(prompt: str) -> list[str]:
    """The ``{name}`` fields of a prompt.

    Example:
        >>> placeholders("a {color} {shape}")
        ['color', 'shape']
    """
    return re.findall(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})", prompt)


def is_axis_word(word: str) -> bool:
    """True for an ``AXIS=v1,v2`` word (as opposed to an option or the prompt)."""
    return AXIS_RE.match(word) is not None and not word.startswith("-")


def _convert(axis: str, text: str) -> Any:
    text = text.strip()
    if not text:
        raise SweepError(f"axis {axis} has an empty value")
    try:
        if axis in ("seed", "steps"):
            return int(text)
        if axis == "cfg":
            return float(text)
    except ValueError:
        kind = "whole numbers" if axis != "cfg" else "numbers"
        raise SweepError(f"axis {axis} takes {kind}, got {text!r}") from None
    return text


def parse_axes(words: Sequence[str], prompt: str) -> dict[str, list[Any]]:
    """Parse ``AXIS=v1,v2[,...]`` words into ``{axis: [values]}`` (one or two axes), checking every value.

    Axes are ``seed``, ``cfg``, ``steps``, ``preset`` or the name of a ``{placeholder}`` in ``prompt``.
    """
    axes: dict[str, list[Any]] = {}
    fields = placeholders(prompt)
    for word in words:
        m = AXIS_RE.match(word)
        if m is None:
            raise SweepError(f"a sweep axis looks like seed=1,2,3, got {word!r}")
        name, raw = m.group(1), m.group(2)
        if name not in AXES and name not in fields:
            hint = f" or a {{placeholder}} of the prompt ({', '.join(fields)})" if fields else ""
            raise SweepError(
                f"unknown sweep axis {name!r}: use {', '.join(AXES)}{hint or ', or write {' + name + '} in the prompt'}"
            )
        if name in axes:
            raise SweepError(f"axis {name} is given twice")
        values = [_convert(name, v) for v in raw.split(",")]
        for v in values:
            key = {"cfg": "cfg", "seed": "seed", "steps": "steps", "preset": "preset"}.get(name)
            if key is not None:
                try:
                    validate_generate_options({key: v})
                except GenerationError as exc:
                    raise SweepError(f"axis {name}: {exc}") from None
        axes[name] = values
    if not axes:
        raise SweepError("a sweep needs at least one axis, e.g. seed=1,2,3")
    if len(axes) > MAX_AXES:
        raise SweepError(f"a sweep has one or two axes (a grid), got {len(axes)}: {', '.join(axes)}")
    missing = [f for f in fields if f not in axes]
    if missing:
        raise SweepError(f"the prompt's {{{missing[0]}}} has no values: add {missing[0]}=a,b")
    cells = 1
    for v in axes.values():
        cells *= len(v)
    if cells > MAX_CELLS:
        raise SweepError(f"the sweep has {cells} cells; at most {MAX_CELLS}")
    return axes


@dataclass
class SweepCell:
    """One cell: its row and column, the axis values it used, its result (or the error that stopped it)."""

    row: int
    col: int
    values: dict[str, Any]
    prompt: str
    result: Any = None  # GenerationResult
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "col": self.col,
            "values": self.values,
            "seconds": round(self.seconds, 3),
            "params": self.result.params() if self.result is not None else None,
            "steps_completed": self.result.steps_completed if self.result is not None else 0,
        }


@dataclass
class SweepResult:
    """A finished (or stopped) sweep: the axes, every cell, the grid image and where it was saved."""

    prompt: str
    axes: dict[str, list[Any]]
    cells: list[SweepCell]
    grid: Any = None  # PIL image
    total_s: float = 0.0
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))

    @property
    def results(self) -> list[Any]:
        return [c.result for c in self.cells if c.result is not None]

    @property
    def shape(self) -> tuple[int, int]:
        names = list(self.axes)
        rows = len(self.axes[names[0]]) if len(names) == 2 else 1
        cols = len(self.axes[names[-1]])
        return rows, cols

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "axes": self.axes,
            "options": self.options,
            "cells": [c.to_dict() for c in self.cells],
            "total_s": round(self.total_s, 3),
            "path": self.path,
            "qwennb_version": __version__,
            "created": self.created,
        }

    def save(self, out_dir: str | os.PathLike[str]) -> str:
        """Write the grid as a PNG whose ``qwennb-sweep`` text chunk holds every cell's parameters."""
        from PIL.PngImagePlugin import PngInfo

        folder = Path(out_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("qwennb-sweep", json.dumps(self.to_dict(), ensure_ascii=False))
        info.add_text("Software", f"qwennb {__version__}")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"qwen_sweep_{stamp}_" + "x".join(self.axes)
        for k in range(1000):
            path = folder / (base + (f"-{k}" if k else "") + ".png")
            try:
                with open(path, "xb") as f:
                    self.grid.save(f, format="PNG", pnginfo=info)
                break
            except FileExistsError:
                continue
        self.path = str(path)
        return self.path

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from . import _render  # the package root wires the presentation layer; the core never imports it

        return _render("mimebundle", self)

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (
            f"<SweepResult {rows}x{cols} over {', '.join(self.axes)}: {len(self.results)} images in "
            f"{self.total_s:.1f} s>"
        )


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell_values(axes: dict[str, list[Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    names = list(axes)
    if len(names) == 1:
        return [(0, j, {names[0]: v}) for j, v in enumerate(axes[names[0]])]
    return [
        (i, j, {names[0]: a, names[1]: b})
        for i, a in enumerate(axes[names[0]])
        for j, b in enumerate(axes[names[1]])
    ]


def plan_cells(prompt: str, axes: dict[str, list[Any]], options: dict[str, Any]) -> list[SweepCell]:
    """Every cell's prompt and values, each checked with :func:`qwennb.options.validate_generate_options`."""
    if not isinstance(axes, dict) or not axes:
        raise SweepError("a sweep needs at least one axis, e.g. {'seed': [1, 2, 3]}")
    if len(axes) > MAX_AXES:
        raise SweepError(f"a sweep has one or two axes (a grid), got {len(axes)}: {', '.join(axes)}")
    fields = placeholders(prompt)
    for name, values in axes.items():
        if name not in AXES and name not in fields:
            raise SweepError(
                f"unknown sweep axis {name!r}: use {', '.join(AXES)} or a {{placeholder}} of the prompt"
            )
        if not isinstance(values, (list, tuple)) or not values:
            raise SweepError(f"axis {name} needs a list of values, got {values!r}")
    missing = [f for f in fields if f not in axes]
    if missing:
        raise SweepError(f"the prompt's {{{missing[0]}}} has no values: add {missing[0]}=a,b")
    cells_n = math.prod(len(v) for v in axes.values())
    if cells_n > MAX_CELLS:
        raise SweepError(f"the sweep has {cells_n} cells; at most {MAX_CELLS}")
    cells = []
    for i, j, values in _cell_values(axes):
        text = prompt
        opts = dict(options)
        for name, v in values.items():
            if name in AXES:
                opts[name] = v
            else:
                text = text.replace("{" + name + "}", str(v))
        try:
            validate_generate_options({"prompt": text, **{k: v for k, v in opts.items() if k not in RUNTIME}})
        except GenerationError as exc:
            raise SweepError(f"cell {values}: {exc}") from None
        cells.append(SweepCell(i, j, values, text))
    return cells


def grid_image(sweep: SweepResult, max_side: int = 256) -> Any:
    """The labelled grid: column values on top, row values on the left, each cell's time under its image."""
    from PIL import Image, ImageDraw

    rows, cols = sweep.shape
    names = list(sweep.axes)
    images = [c.result.images[0] if c.result is not None and c.result.images else None for c in sweep.cells]
    w = max([min(max_side, im.width) for im in images if im is not None] or [max_side])
    h = max([min(max_side, im.height) for im in images if im is not None] or [max_side])
    head, left, foot = 18, (70 if len(names) == 2 else 0), 14
    grid = Image.new("RGB", (left + cols * (w + 4), head + rows * (h + foot + 4)), "white")
    draw = ImageDraw.Draw(grid)
    col_axis = names[-1]
    for j, v in enumerate(sweep.axes[col_axis]):
        draw.text((left + j * (w + 4) + 4, 3), f"{col_axis}={_label(v)}", fill="black")
    if len(names) == 2:
        for i, v in enumerate(sweep.axes[names[0]]):
            draw.text((4, head + i * (h + foot + 4) + h // 2 - 6), f"{names[0]}={_label(v)}", fill="black")
    for cell, im in zip(sweep.cells, images, strict=True):
        x, y = left + cell.col * (w + 4), head + cell.row * (h + foot + 4)
        if im is not None:
            thumb = im.copy()
            thumb.thumbnail((w, h))
            grid.paste(thumb, (x, y))
        else:
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline="gray")
            draw.text((x + 4, y + h // 2), "not run", fill="gray")
        draw.text((x + 2, y + h + 1), f"{cell.seconds:.1f} s", fill="black")
    return grid


def run_sweep(
    pipe: Any,
    prompt: str,
    axes: dict[str, list[Any]],
    *,
    on_cell: Callable[[SweepCell, int, int], None] | None = None,
    generate_fn: Callable[..., Any] | None = None,
    stop: Any = None,
    **options: Any,
) -> SweepResult:
    """Generate every cell of a sweep with ``pipe`` and return a :class:`SweepResult` with the grid image.

    ``options`` are ``generate()``'s (steps, cfg, seed, width, height, preset, negative_prompt...); an axis
    value wins over the same option. Every cell is checked before the first one runs. ``generate_fn``
    replaces ``qwennb.generate`` (a :class:`~qwennb.session.Session` passes its own, which keeps history).
    ``stop`` (a :class:`~qwennb.generation.StopSignal`) ends the sweep after the running cell.

    Example:
        >>> from qwennb.session import Session
        >>> s = Session(); _ = s.load("tiny")
        >>> sw = run_sweep(s.pipe, "a red circle", {"seed": [1, 2]}, steps=2, width=64, height=64)
        >>> [c.result.seed for c in sw.cells], sw.grid.size[0] > 128
        ([1, 2], True)
    """
    if generate_fn is None:
        from .generation import generate as generate_fn
    cells = plan_cells(prompt, axes, options)
    if "seed" not in axes and options.get("seed") is None:
        import random

        options["seed"] = random.SystemRandom().randrange(
            0, 2**32
        )  # one seed: cells differ by their axes only
    if stop is None:  # one signal for every cell: Ctrl-C in a cell ends the sweep, not only that cell
        from .generation import StopSignal

        stop = StopSignal()
    options["stop"] = stop
    plain = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None)))}
    sweep = SweepResult(prompt, axes, cells, options=plain)
    t0 = time.perf_counter()
    for k, cell in enumerate(cells):
        if stop:
            break
        opts = dict(options)
        opts.update({n: v for n, v in cell.values.items() if n in AXES})
        c0 = time.perf_counter()
        cell.result = generate_fn(pipe, cell.prompt, **opts)
        cell.seconds = time.perf_counter() - c0
        if on_cell is not None:
            on_cell(cell, k + 1, len(cells))
    sweep.total_s = time.perf_counter() - t0
    sweep.grid = grid_image(sweep)
    return sweep
