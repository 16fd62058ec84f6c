"""The original project's names, as thin facades over qwennb's modules.

Code written for the original project runs after changing only its import line::

    from qwennb import ModelDetectionService, OptimizationConfig, PipelineOptimizer

Example:
    >>> from qwennb.compat import ModelDetectionService
    >>> svc = ModelDetectionService()
    >>> svc.detect_model_architecture("tiny")
    'MMDiT'
"""

from __future__ import annotations

import os
from typing import Any

from .errors import UnknownModelError
from .hardware import Hardware, detect
from .models import EMBEDDED_MODEL, LocalModel, architecture_of, find_local_models, get_model
from .plan import OptimizationConfig, Plan, make_plan


def _stand_in(name: str) -> LocalModel:
    spec = get_model(name)
    return LocalModel(
        name=spec.name,
        path=spec.name,
        hub_id=spec.hub_id,
        architecture=spec.architecture,
        pipeline_class=spec.pipeline_class,
        task=spec.task,
        complete=True,
    )


class ModelDetectionService:
    """Find Qwen-Image models on disk, tell their architecture, and estimate how they will run.

    Example:
        >>> svc = ModelDetectionService()
        >>> model = svc.detect_current_model()  # the embedded toy model when no weights are on disk
        >>> model.architecture
        'MMDiT'
    """

    def __init__(
        self, folder: str | os.PathLike[str] | None = None, hardware: Hardware | None = None
    ) -> None:
        self.folder = folder
        self._hardware = hardware

    @property
    def hardware(self) -> Hardware:
        if self._hardware is None:
            self._hardware = detect()
        return self._hardware

    def find_models(self) -> list[LocalModel]:
        """Every Qwen-family model found (the Hugging Face cache, or the folder given)."""
        return find_local_models(self.folder)

    def detect_current_model(self) -> LocalModel:
        """The model qwennb would load: a complete text-to-image snapshot first, else the embedded toy model."""
        models = self.find_models()
        for task in ("text-to-image", "image-edit"):
            for m in models:
                if m.task == task and m.complete and m.architecture == "MMDiT":
                    return m
        return _stand_in(EMBEDDED_MODEL)

    def detect_model_architecture(self, model: LocalModel | str | os.PathLike[str]) -> str:
        """'MMDiT', 'UNet', 'VL' or 'unknown', from ``model_index.json`` (or the registry for a name)."""
        if isinstance(model, LocalModel):
            if os.path.isdir(model.path):
                return architecture_of(model.path)
            return model.architecture
        if os.path.isdir(model):
            return architecture_of(model)
        try:
            return get_model(str(model)).architecture
        except UnknownModelError:
            return "unknown"

    def analyze_performance_characteristics(
        self, model: LocalModel | str | None = None, config: OptimizationConfig | None = None
    ) -> dict[str, Any]:
        """Expected time per step and per image, and the bottlenecks, computed from the plan for this card.

        Returns a dict with ``expected_generation_time`` (a sentence), ``expected_s_per_step``,
        ``expected_total_s``, ``bottlenecks`` (list of sentences), ``warnings`` and the ``plan``.
        """
        if model is None:
            model = self.detect_current_model()
        name = model.name if isinstance(model, LocalModel) else str(model)
        try:
            name = get_model(name).name
        except UnknownModelError:
            name = "qwen-image"
        plan: Plan = make_plan(self.hardware, name, config)
        steps = plan.defaults["steps"]
        s_step = plan.estimated_s_per_step
        bottlenecks: list[str] = []
        warnings = list(plan.warnings)
        if plan.device != "cuda":
            bottlenecks.append(f"runs on the {plan.device}: no CUDA GPU")
        t = plan.components.get("transformer") if plan.device == "cuda" else None
        if t is not None and t.placement != "gpu":
            bottlenecks.append(f"transformer {t.placement}: {t.reason}")
        if t is not None and (t.storage_dtype != plan.dtype or t.quantization):
            bottlenecks.append(
                f"transformer weights are converted on every use ({t.quantization or t.storage_dtype})"
            )
        te = plan.components.get("text_encoder") if plan.device == "cuda" else None
        if te is not None and te.placement != "gpu":
            bottlenecks.append(f"text encoder {te.placement}: adds time once per prompt")
        if plan.device == "cuda" and not bottlenecks:
            bottlenecks.append("compute-bound: the transformer's matrix products on the GPU")
        if isinstance(model, LocalModel) and model.task == "image-edit":
            warnings.append("Qwen-Image-Edit chosen for text-to-image: the wrong model type; use Qwen-Image")
        if s_step is None:
            sentence = "unknown on this device (no compute rate to estimate from)"
            total = None
        else:
            total = s_step * steps
            sentence = f"about {s_step:.2f} s per step, {total:.0f} s for {steps} steps at {plan.defaults['width']}x{plan.defaults['height']}"
        return {
            "model": name,
            "expected_generation_time": sentence,
            "expected_s_per_step": s_step,
            "expected_total_s": total,
            "bottlenecks": bottlenecks,
            "warnings": warnings,
            "plan": plan,
        }


class PipelineOptimizer:
    """Load a tuned pipeline from an ``OptimizationConfig`` (the original project's entry point).

    Example:
        >>> from qwennb import OptimizationConfig, PipelineOptimizer
        >>> optimizer = PipelineOptimizer(OptimizationConfig(architecture_type="MMDiT"))
        >>> pipe = optimizer.create_optimized_pipeline("tiny", "MMDiT")
        >>> optimizer.validate_optimization(pipe)["matches_plan"]
        True
    """

    def __init__(self, config: OptimizationConfig | None = None, hardware: Hardware | None = None) -> None:
        self.config = config or OptimizationConfig()
        self._hardware = hardware
        self.plan: Plan | None = None

    @property
    def hardware(self) -> Hardware:
        if self._hardware is None:
            self._hardware = detect()
        return self._hardware

    def create_optimized_pipeline(
        self, model_path: str | os.PathLike[str] | None = None, architecture: str = "MMDiT"
    ) -> Any:
        """Resolve the model (registry name, hub id or folder; default: the local Qwen-Image, else the toy), plan
        it for this machine with this config, load it and apply the plan."""
        from .errors import PlanError
        from .pipeline import build, resolve_model

        if architecture and architecture.upper() != "MMDIT":
            raise PlanError(
                f"architecture {architecture!r} is not supported: qwennb loads MMDiT (Qwen-Image) pipelines"
            )
        name, path, notice = resolve_model(str(model_path) if model_path else None)
        if notice:
            import logging

            logging.getLogger("qwennb").warning(notice)
        hw = self.hardware
        if name not in ("tiny", EMBEDDED_MODEL) and hw.best_gpu is None and not self.config.force:
            raise PlanError(
                f"no CUDA GPU for {name}; use {EMBEDDED_MODEL!r}, 'tiny' or OptimizationConfig(force=True)"
            )
        self.plan = make_plan(hw, name, self.config)
        return build(self.plan, path)

    def validate_optimization(self, pipeline: Any) -> dict[str, Any]:
        """What is really active on ``pipeline`` (see :func:`qwennb.pipeline.validate_optimization`)."""
        from .pipeline import validate_optimization

        return validate_optimization(pipeline)


__all__ = ["ModelDetectionService", "OptimizationConfig", "PipelineOptimizer"]
