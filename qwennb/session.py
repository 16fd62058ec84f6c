"""A loaded model and its history: what the magics, the widget panel and scripts share in one process.

Example:
    >>> from qwennb.session import Session
    >>> s = Session()
    >>> _ = s.load("tiny")
    >>> s.generate("a red fox", steps=2, width=64, height=64, seed=1).seed
    1
    >>> s.unload()
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import QwennbError
from .generation import GenerationResult, free_memory, generate
from .hardware import Hardware, detect
from .held_output import Held, hold
from .lora import LoraInfo
from .models import get_model
from .plan import OptimizationConfig, Plan, make_plan


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading bars off for a load in the background: a thread's output lands in
    whichever notebook cell runs at that moment (the banner has said that the model is loading, and the first
    command that needs it says when it ended)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.get_verbosity()  # sets up the library's log handler now, so that held_output.hold watches it
    was = [m.is_progress_bar_enabled() for m in (diffusers_logging, transformers_logging)]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, on in zip((diffusers_logging, transformers_logging), was, strict=True):
            if on:
                module.enable_progress_bar()


# What a model of the package (no real weights) is, said when it loads.
_STAND_IN_NOTICES = {
    "tiny": "the tiny stand-in: its images are noise (no real Qwen-Image weights).",
    "toy": "the embedded toy model: a toy world of flat shapes on plain backgrounds, not Qwen-Image.",
    "toy-edit": (
        "the embedded toy edit model: an early model of the toy world of flat shapes, not photos "
        "(the asked-for change shows in most edits; a moved or resized shape is sometimes redrawn as another)."
    ),
    "tiny-edit": "the tiny edit stand-in: its edits are noise (no real Qwen-Image-Edit weights).",
}


@dataclass
class _Prepared:
    """A load checked and planned, not yet done (:meth:`Session.prepare`)."""

    model: str
    path: str | None
    plan: Plan
    hardware: Hardware
    notice: str | None
    loras: list[tuple[str, float]] | None
    args: tuple[Any, Any]

    def report(self, seconds: float, background: bool = False) -> LoadReport:
        return LoadReport(self.model, self.path, self.plan, self.hardware, seconds, self.notice, background)


@dataclass
class LoadReport:
    """What ``Session.load`` did: the model, the plan, how long it took and any notice."""

    model: str
    path: str | None
    plan: Plan
    hardware: Hardware
    seconds: float
    notice: str | None = None
    background: bool = False  # the load was started on a thread and had not ended when this was made

    def text(self) -> str:
        g = self.hardware.best_gpu
        card = f"{g.name}, {g.total_memory_gb:.1f} GiB" if g else f"no GPU ({self.hardware.cpu_count} CPUs)"
        if self.background:
            done = f"loading {self.model} in the background (the next cells run meanwhile; qwennb's commands wait for it)"
        else:
            done = f"loaded {self.model} in {self.seconds:.1f} s"
        lines = [f"qwennb: {card}", f"{done}: {self.plan.arrangement}"]
        if self.notice:
            lines.append(f"NOTE: {self.notice}")
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from . import _render  # the package root wires the presentation layer; the core never imports it

        return _render("mimebundle", self)


@dataclass
class Session:
    """One loaded pipeline plus the results generated with it.

    ``pipe`` and ``report`` wait for a load started by :meth:`load_in_background` (``%load_ext qwennb`` starts one),
    so every use of the model, from any layer, finds it loaded or gets the load's error.
    """

    history: list[GenerationResult] = field(default_factory=list)
    max_history: int = 50
    _hardware: Hardware | None = None
    _pipe: Any = field(default=None, repr=False)
    _report: LoadReport | None = field(default=None, repr=False)
    # (future, thread, what it said) of the load running in the background, until someone has waited for it
    _loading: tuple[Future[LoadReport], threading.Thread, Held] | None = field(default=None, repr=False)

    @property
    def pipe(self) -> Any:
        """The loaded pipeline, or None (after waiting for a load running in the background)."""
        self.wait()
        return self._pipe

    @pipe.setter
    def pipe(self, value: Any) -> None:
        self._pipe = value

    @property
    def report(self) -> LoadReport | None:
        """What the last load did, or None (after waiting for a load running in the background)."""
        self.wait()
        return self._report

    @report.setter
    def report(self, value: LoadReport | None) -> None:
        self._report = value

    @property
    def loading(self) -> bool:
        """Whether a load started by :meth:`load_in_background` has not been waited for yet (it may have ended)."""
        return self._loading is not None

    def _settle(self) -> None:
        """Wait for a load running in the background; if it failed, nothing was loaded, and what follows (a new
        load, an unload) replaces it: its error is not raised here."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the failed load left no model; the caller loads or frees anyway
            pass

    def wait(self, timeout: float | None = None) -> LoadReport | None:
        """Wait for the load running in the background (if any) and return its report; its error, if it failed,
        is raised here, once. ``timeout``: seconds, then ``TimeoutError`` (the load goes on). The warnings the load
        gave (Python's, and the log records of diffusers, transformers...) are held while it runs and said here,
        in the waiting thread: a notebook would otherwise show them in whichever cell ran at that moment.

        Example:
            >>> s = Session()
            >>> _ = s.load_in_background("tiny")
            >>> s.wait().model
            'tiny'
        """
        loading = self._loading
        if loading is None or threading.current_thread() is loading[1]:
            return self._report
        future, _, held = loading
        try:
            future.result(timeout)
        finally:
            if future.done():
                self._loading = None
                held.replay()
        return self._report

    @property
    def hardware(self) -> Hardware:
        if self._hardware is None:
            self._hardware = detect()
        return self._hardware

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def plan_for(
        self, model: str | None = None, overrides: OptimizationConfig | dict[str, Any] | None = None
    ) -> Plan:
        from .pipeline import resolve_model

        name, path, _ = resolve_model(model)
        # A folder the user named is sized from its own configs (a small model saved there is not Qwen-Image).
        return _make_plan(self.hardware, path if model and path and os.path.isdir(model) else name, overrides)

    def load(
        self,
        model: str | None = None,
        overrides: OptimizationConfig | dict[str, Any] | None = None,
        loras: list[tuple[str, float]] | None = None,
    ) -> LoadReport:
        """Resolve, plan and load a model, replacing (and freeing) any loaded one; ``loras`` are
        ``(source, scale)`` pairs loaded with it (checked against the model before anything loads)."""
        self._settle()  # first: a failed background load is replaced, not raised by prepare
        return self.load_prepared(self.prepare(model, overrides, loras))

    def load_prepared(self, prepared: _Prepared) -> LoadReport:
        """Load what :meth:`prepare` checked and planned (a caller that shows the plan first plans once).

        Example:
            >>> s = Session()
            >>> ready = s.prepare("tiny")
            >>> s.load_prepared(ready).model
            'tiny'
        """
        self._settle()
        return self._build(prepared)

    def load_in_background(
        self,
        model: str | None = None,
        overrides: OptimizationConfig | dict[str, Any] | None = None,
        loras: list[tuple[str, float]] | None = None,
    ) -> LoadReport:
        """:meth:`load` with the slow part (importing torch, diffusers and transformers, reading the weights) on a
        thread: the model is resolved, planned and checked here (a bad name or LoRA is an error now), then this
        returns at once with what the load will be (``background`` True, ``seconds`` 0). Everything that uses the
        model waits for it (``pipe``, ``report``, ``generate``...; :meth:`wait` says how it ended).

        Example:
            >>> s = Session()
            >>> s.load_in_background("tiny").plan.model
            'tiny'
            >>> s.generate("a red fox", steps=2, width=64, height=64, seed=1).seed  # waits for the load
            1
        """
        self._settle()
        prepared = self.prepare(model, overrides, loras)
        self.unload()
        future: Future[LoadReport] = Future()
        held = Held()

        def run() -> None:
            t0 = time.perf_counter()  # the imports count: the user waits for them too
            try:
                with _quiet_loading(), hold(held):
                    report = self._build(prepared, t0)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits, as load() would raise it
                future.set_exception(exc)
            else:
                future.set_result(report)

        thread = threading.Thread(target=run, name="qwennb-load", daemon=True)
        self._loading = (future, thread, held)
        thread.start()
        return prepared.report(0.0, background=True)

    def prepare(
        self,
        model: str | None = None,
        overrides: OptimizationConfig | dict[str, Any] | None = None,
        loras: list[tuple[str, float]] | None = None,
    ) -> _Prepared:
        """What :meth:`load` would load (model, folder, plan, notice), checked, without loading anything."""
        from .lora import check_for_model
        from .pipeline import resolve_model

        name, path, notice = resolve_model(model)
        if notice is None:
            notice = _STAND_IN_NOTICES.get(name)
        plan = _make_plan(self.hardware, path if model and path and os.path.isdir(model) else name, overrides)
        licence = get_model(name).licence
        if licence:
            notice = f"{notice} {licence}" if notice else licence
        for source, _ in loras or []:
            check_for_model(source, name)
        if self.report is not None and self.report.model != name:
            from .edit import compare_models

            swap = compare_models(self.report.model, name, self.report.path, path)
            line = f"switching from {self.report.model}: {', '.join(swap.swapped)} swapped"
            if swap.shared:
                line += f"; {', '.join(swap.shared)} the same weights"
            if swap.unverified:
                line += f"; {', '.join(swap.unverified)} the same architecture (weights not compared)"
            gib = f"{swap.swap_gib:.1f}" if swap.swap_gib >= 1 else f"{swap.swap_gib:.3f}"
            line += f"; up to {gib} GiB of weights differ (qwennb reloads the whole pipeline)"
            notice = f"{notice} {line}" if notice else line
        return _Prepared(name, path, plan, self.hardware, notice, loras, (model, overrides))

    def _build(self, prepared: _Prepared, t0: float | None = None) -> LoadReport:
        """Load what :meth:`prepare` planned; the report's time counts from ``t0`` (default: now)."""
        from .pipeline import build

        self.unload()
        t0 = time.perf_counter() if t0 is None else t0
        self._pipe = build(prepared.plan, prepared.path, loras=prepared.loras)
        self._report = prepared.report(time.perf_counter() - t0)
        self._load_args = prepared.args
        return self._report

    def unload(self) -> None:
        """Drop the pipeline and free its GPU memory (after a load running in the background has ended)."""
        self._settle()
        if self._pipe is None:
            return
        self._pipe = None
        self._report = None
        free_memory()

    def require(self) -> Any:
        if self.pipe is None:
            raise QwennbError("no model is loaded: run %qwen load MODEL (or Session.load())")
        return self.pipe

    def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """``qwennb.generate`` on the loaded pipeline; the result joins the history."""
        self.require()
        if kwargs.get("loras") is not None and self._fused():
            from . import lora

            wanted = [(r["source"], float(r.get("scale", 1.0))) for r in kwargs["loras"]]
            if wanted != [(i.source, i.scale) for i in lora.list_loras(self.pipe)]:
                self._reload_with(wanted)
        preset = kwargs.get("preset")
        if preset and self._fused():
            # A few-step preset's LoRA on an fp8 plan: fused in by reloading, once.
            from . import lora
            from .presets import get_preset

            p = get_preset(preset)
            if p.lora and self.report is not None and not get_model(self.report.model).unpublished:
                source = lora.lightning_source(self.report.model, p.name)
                have = [(i.source, i.scale) for i in lora.list_loras(self.pipe)]
                if lora.adapter_name(source) not in {i.name for i in lora.list_loras(self.pipe)}:
                    self._reload_with([*have, (source, 1.0)])
        result = generate(self.require(), prompt, **kwargs)
        self.history.append(result)
        del self.history[: -self.max_history]
        return result

    def sweep(self, prompt: str, axes: dict[str, list[Any]], **options: Any) -> Any:
        """:func:`qwennb.sweep.run_sweep` on the loaded pipeline; every cell's result joins the history."""
        from .sweep import run_sweep

        return run_sweep(
            self.require(),
            prompt,
            axes,
            generate_fn=lambda _p, text, **kw: self.generate(text, **kw),
            **options,
        )

    def entry(self, index: int) -> GenerationResult:
        """History entry ``index`` (negative counts from the end), or a clear error."""
        n = len(self.history)
        if not self.history:
            raise QwennbError("the history is empty: generate something first")
        if not isinstance(index, int) or not -n <= index < n:
            raise QwennbError(f"no history entry {index}: entries are 0 to {n - 1}")
        return self.history[index]

    def regenerate(self, index: int, **changes: Any) -> GenerationResult:
        """Generate history entry ``index`` again from its parameters (``changes`` override some)."""
        params = self.entry(index).params()
        params.update(changes)
        prompt = params.pop("prompt")
        return self.generate(prompt, **params)

    def save_history(self, path: str | os.PathLike[str]) -> str:
        """Write the history as JSON Lines; images not yet saved go as PNGs into the file's folder."""
        return save_history(self.history, path)

    def load_history(self, path: str | os.PathLike[str]) -> int:
        """Add the entries of a JSON Lines history file (their PNGs are read back); returns how many."""
        loaded = load_history(path)
        self.history.extend(loaded)
        del self.history[: -self.max_history]
        return len(loaded)

    # ------------------------------------------------------------------ LoRAs

    def _reload_with(self, specs: list[tuple[str, float]]) -> None:
        """fp8 plans fuse LoRAs into the weights before quantising: a change reloads the model with them."""
        model, overrides = getattr(self, "_load_args", (None, None))
        self.load(
            model if model is not None else self.report.model if self.report else None, overrides, specs
        )

    def _fused(self) -> bool:
        from .pipeline import lora_needs_fusing

        return self.report is not None and lora_needs_fusing(self.report.plan)

    def lora_add(self, source: str, scale: float = 1.0, name: str | None = None) -> LoraInfo:
        """Add a LoRA (file, folder or hub id) at ``scale``; on an fp8 plan the model reloads with it fused.

        Example:
            >>> import tempfile, os
            >>> from qwennb import lora
            >>> s = Session(); _ = s.load("tiny")
            >>> path = os.path.join(tempfile.mkdtemp(), "ink.safetensors")
            >>> lora.save_random_lora(s.pipe.transformer, path, layout="lightning")
            >>> s.lora_add(path, 0.7).scale
            0.7
            >>> s.lora_scale("ink", 0.2).scale, [i.name for i in s.lora_list()]
            (0.2, ['ink'])
            >>> s.lora_remove("ink"); s.lora_list()
            []
        """
        from . import lora

        pipe = self.require()
        if self._fused():
            specs = [(i.source, i.scale) for i in lora.list_loras(pipe)] + [(source, float(scale))]
            self._reload_with(specs)
            return lora.list_loras(self.pipe)[-1]
        return lora.add(pipe, source, scale, name)

    def lora_scale(self, name: str, scale: float) -> LoraInfo:
        """Set one LoRA's scale (0 leaves the image as without it)."""
        from . import lora

        pipe = self.require()
        if self._fused():
            specs = [(i.source, float(scale) if i.name == name else i.scale) for i in lora.list_loras(pipe)]
            lora._get(pipe, name)
            self._reload_with(specs)
            return lora._get(self.pipe, name)
        return lora.set_scale(pipe, name, scale)

    def lora_remove(self, name: str | None = None) -> None:
        """Remove one LoRA, or all of them; the images are again exactly those without it."""
        from . import lora

        pipe = self.require()
        if self._fused():
            if name is not None:
                lora._get(pipe, name)
            self._reload_with([(i.source, i.scale) for i in lora.list_loras(pipe) if name and i.name != name])
            return
        lora.remove(pipe, name)

    def lora_use(self, specs: list[tuple[str, float]]) -> list[LoraInfo]:
        """Make sure each ``(source, scale)`` LoRA is loaded at that scale (``--lora PATH[:SCALE]``); others stay."""
        from . import lora

        pipe = self.require()
        current = {i.name: i for i in lora.list_loras(pipe)}
        wanted = [(lora.adapter_name(src), src, float(sc)) for src, sc in specs]
        if self._fused():
            merged = {n: (i.source, i.scale) for n, i in current.items()}
            merged.update({n: (src, sc) for n, src, sc in wanted})
            if merged != {n: (i.source, i.scale) for n, i in current.items()}:
                self._reload_with(list(merged.values()))
        else:
            for name, src, sc in wanted:
                if name in current:
                    if current[name].scale != sc:
                        lora.set_scale(pipe, name, sc)
                else:
                    lora.add(pipe, src, sc, name)
        reg = {i.name: i for i in lora.list_loras(self.pipe)}
        return [reg[n] for n, _, _ in wanted]

    def lora_list(self) -> list[LoraInfo]:
        """The loaded LoRAs with their scales and hashes."""
        from . import lora

        return lora.list_loras(self.pipe) if self.pipe is not None else []

    def lora_disable(self) -> None:
        """Turn the LoRAs off without removing them."""
        from . import lora

        lora.disable(self.require())

    def lora_enable(self) -> None:
        """Turn them back on."""
        from . import lora

        lora.enable(self.require())

    def edit(self, images: Any, instruction: str, **kwargs: Any) -> GenerationResult:
        """``qwennb.edit`` on the loaded (edit) pipeline; the result joins the history."""
        from .edit import edit

        result = edit(self.require(), images, instruction, **kwargs)
        self.history.append(result)
        del self.history[: -self.max_history]
        return result

    def info(self) -> dict[str, Any]:
        """Card, memory in use, plan and what is really active on the loaded pipeline."""
        from .pipeline import validate_optimization

        out: dict[str, Any] = {"hardware": self.hardware.to_dict(), "loaded": self.loaded}
        try:
            import torch

            if torch.cuda.is_available():
                out["gpu_memory_allocated_gb"] = round(torch.cuda.memory_allocated() / 1024**3, 2)
                out["gpu_memory_reserved_gb"] = round(torch.cuda.memory_reserved() / 1024**3, 2)
        except ImportError:  # pragma: no cover
            pass
        if self.report is not None:
            out["model"] = self.report.model
            out["plan"] = self.report.plan
            out["active"] = validate_optimization(self.pipe)
            out["loras"] = [i.to_dict() for i in self.lora_list()]
        return out


def save_history(results: list[GenerationResult], path: str | os.PathLike[str]) -> str:
    """Write results as JSON Lines (one :meth:`GenerationResult.to_dict` a line, ``images`` the PNG paths);
    images that were never saved are saved first, as PNGs with their parameters, next to the file.

    Example:
        >>> import tempfile, os
        >>> s = Session(); _ = s.load("tiny")
        >>> _ = s.generate("a red circle", steps=2, width=64, height=64, seed=3)
        >>> d = tempfile.mkdtemp(); _ = s.save_history(os.path.join(d, "h.jsonl"))
        >>> [r.seed for r in load_history(os.path.join(d, "h.jsonl"))]
        [3]
    """
    from pathlib import Path

    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for r in results:
            if r.images and not r.paths:
                r.save(target.parent)
            lines.append(json.dumps(r.to_dict(), ensure_ascii=False, default=str))
        target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as exc:
        raise QwennbError(f"cannot write the history to {path}: {exc.strerror or exc}") from None
    return str(target)


def load_history(path: str | os.PathLike[str]) -> list[GenerationResult]:
    """Read a JSON Lines history written by :func:`save_history`; PNGs are loaded from their paths
    (relative paths are taken from the file's folder). A missing PNG leaves that entry without image."""
    from pathlib import Path

    from PIL import Image

    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise QwennbError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise QwennbError(
            f"{path} is not a qwennb history file (not text; %qwen history save writes one)"
        ) from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            images = []
            for p in d.get("images") or []:
                f = Path(p) if os.path.isabs(p) else source.parent / p
                if f.exists():
                    with Image.open(f) as im:
                        images.append(im.convert("RGB"))
            out.append(GenerationResult.from_dict(d, images))
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
            raise QwennbError(f"{path} line {n} is not a qwennb history entry ({exc})") from None
    return out


def _make_plan(hardware: Hardware, name: str, overrides: OptimizationConfig | dict[str, Any] | None) -> Plan:
    """``make_plan`` for a text-to-image model or a folder; an edit model's plan counts its reference images."""
    if os.path.isdir(name):
        return make_plan(hardware, name, overrides)
    from .edit import plan_for_model

    return plan_for_model(hardware, name, overrides)
