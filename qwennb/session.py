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

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import QwennbError
from .generation import GenerationResult, free_memory, generate
from .hardware import Hardware, detect
from .plan import OptimizationConfig, Plan


@dataclass
class LoadReport:
    """What ``Session.load`` did: the model, the plan, how long it took and any notice."""

    model: str
    path: str | None
    plan: Plan
    hardware: Hardware
    seconds: float
    notice: str | None = None

    def text(self) -> str:
        g = self.hardware.best_gpu
        card = f"{g.name}, {g.total_memory_gb:.1f} GiB" if g else f"no GPU ({self.hardware.cpu_count} CPUs)"
        lines = [f"qwennb: {card}", f"loaded {self.model} in {self.seconds:.1f} s: {self.plan.arrangement}"]
        if self.notice:
            lines.append(f"NOTE: {self.notice}")
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        import html

        from .display import plan_html

        note = (
            f'<div style="color:#a60;font-weight:bold">{html.escape(self.notice)}</div>'
            if self.notice
            else ""
        )
        g = self.hardware.best_gpu
        card = f"{g.name}, {g.total_memory_gb:.1f} GiB" if g else f"no GPU ({self.hardware.cpu_count} CPUs)"
        head = (
            f"<div><b>qwennb</b> · {html.escape(card)} · loaded <b>{html.escape(self.model)}</b> "
            f"in {self.seconds:.1f} s</div>"
        )
        return {"text/plain": self.text(), "text/html": head + note + plan_html(self.plan)}


@dataclass
class Session:
    """One loaded pipeline plus the results generated with it."""

    pipe: Any = None
    report: LoadReport | None = None
    history: list[GenerationResult] = field(default_factory=list)
    max_history: int = 50
    _hardware: Hardware | None = None

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

        name, _, _ = resolve_model(model)
        return _make_plan(self.hardware, name, overrides)

    def load(
        self, model: str | None = None, overrides: OptimizationConfig | dict[str, Any] | None = None
    ) -> LoadReport:
        """Resolve, plan and load a model, replacing (and freeing) any loaded one."""
        from .pipeline import build, resolve_model

        name, path, notice = resolve_model(model)
        if name == "tiny" and notice is None:
            notice = "the tiny stand-in is loaded: its images are noise (no real Qwen-Image weights)."
        if name == "tiny-edit" and notice is None:
            notice = (
                "the tiny edit stand-in is loaded: its edits are noise (no real Qwen-Image-Edit weights)."
            )
        plan = _make_plan(self.hardware, name, overrides)
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
        self.unload()
        t0 = time.perf_counter()
        self.pipe = build(plan, path)
        self.report = LoadReport(name, path, plan, self.hardware, time.perf_counter() - t0, notice)
        return self.report

    def unload(self) -> None:
        """Drop the pipeline and free its GPU memory."""
        if self.pipe is None:
            return
        self.pipe = None
        self.report = None
        free_memory()

    def require(self) -> Any:
        if self.pipe is None:
            raise QwennbError("no model is loaded: run %qwen load MODEL (or Session.load())")
        return self.pipe

    def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """``qwennb.generate`` on the loaded pipeline; the result joins the history."""
        result = generate(self.require(), prompt, **kwargs)
        self.history.append(result)
        del self.history[: -self.max_history]
        return result

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
        return out


def _make_plan(hardware: Hardware, name: str, overrides: OptimizationConfig | dict[str, Any] | None) -> Plan:
    from .edit import plan_for_model

    return plan_for_model(hardware, name, overrides)
