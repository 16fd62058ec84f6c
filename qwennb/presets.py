"""Named trade-offs between speed and quality, and Qwen-Image's official sizes.

Explicit options always win over a preset's values.

Example:
    >>> from qwennb.presets import get_preset, ASPECT_RATIOS
    >>> get_preset("balanced").steps
    20
    >>> ASPECT_RATIOS["16:9"]
    (1664, 928)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import GenerationError


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    cfg: float
    description: str
    official_sizes: bool = False  # use the official aspect-ratio table for the default size
    positive_magic: bool = False  # append the official "positive magic" suffix
    lora: str | None = None  # a few-step LoRA the preset loads for the model (see LIGHTNING_LORAS)
    scheduler: dict[str, Any] | None = None  # scheduler settings used while the preset runs


# The FlowMatchEulerDiscreteScheduler the Lightning LoRAs were distilled for, from ModelTC/Qwen-Image-Lightning's
# generate_with_diffusers.py: shift 3 (as log 3 with exponential time shift, at every resolution) and no
# terminal stretch. These keys replace the model's own scheduler config while the preset runs.
LIGHTNING_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("ultra-fast", 12, 3.0, "10-15 steps, CFG 2.5-3.0: drafts and exploring prompts"),
        Preset("balanced", 20, 3.5, "20-25 steps, CFG 3.5: the everyday default"),
        Preset("high-quality", 35, 4.0, "30-40 steps, CFG 4.0-4.5: finals"),
        Preset(
            "official",
            50,
            4.0,
            "the model card's settings: 50 steps, CFG 4.0, official sizes; positive-magic suffix on request",
            official_sizes=True,
        ),
        Preset(
            "lightning-8",
            8,
            1.0,
            "8 steps, CFG 1 with the model's Lightning LoRA (ModelTC/Qwen-Image-Lightning) and its scheduler",
            lora="lightning-8",
            scheduler=LIGHTNING_SCHEDULER,
        ),
        Preset(
            "lightning-4",
            4,
            1.0,
            "4 steps, CFG 1 with the model's 4-step Lightning LoRA and its scheduler",
            lora="lightning-4",
            scheduler=LIGHTNING_SCHEDULER,
        ),
    ]
}

# The Lightning LoRA published for each checkpoint and step count: (hub repository, file). bf16 files where
# the release has both fp32 and bf16 (the model computes in bf16; half the download).
LIGHTNING_LORAS: dict[str, dict[int, tuple[str, str]]] = {
    "qwen-image": {
        8: ("lightx2v/Qwen-Image-Lightning", "Qwen-Image-Lightning-8steps-V2.0.safetensors"),
        4: ("lightx2v/Qwen-Image-Lightning", "Qwen-Image-Lightning-4steps-V2.0.safetensors"),
    },
    "qwen-image-2512": {
        4: ("lightx2v/Qwen-Image-2512-Lightning", "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors"),
    },
    "qwen-image-edit": {
        8: ("lightx2v/Qwen-Image-Lightning", "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors"),
        4: ("lightx2v/Qwen-Image-Lightning", "Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors"),
    },
    "qwen-image-edit-2509": {
        8: (
            "lightx2v/Qwen-Image-Lightning",
            "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors",
        ),
        4: (
            "lightx2v/Qwen-Image-Lightning",
            "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",
        ),
    },
    "qwen-image-edit-2511": {
        4: (
            "lightx2v/Qwen-Image-Edit-2511-Lightning",
            "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
        ),
    },
}
# Stand-ins have no Lightning LoRA; the synthetic one measures with a random LoRA of Lightning's shape.
LIGHTNING_RANK, LIGHTNING_ALPHA = 64, 8.0


def lightning_lora(model: str, preset: str) -> tuple[str, str]:
    """The (hub repository, file) of the Lightning LoRA a preset uses on a model; a clear error where none is
    published.

    Example:
        >>> lightning_lora("qwen-image", "lightning-8")
        ('lightx2v/Qwen-Image-Lightning', 'Qwen-Image-Lightning-8steps-V2.0.safetensors')
        >>> lightning_lora("qwen-image-2512", "lightning-8")
        Traceback (most recent call last):
        qwennb.errors.GenerationError: no 8-step Lightning LoRA is published for qwen-image-2512; use lightning-4
    """
    steps = get_preset(preset).steps
    table = LIGHTNING_LORAS.get(model)
    if not table:
        known = ", ".join(LIGHTNING_LORAS)
        raise GenerationError(f"no Lightning LoRA is published for {model}; there are LoRAs for {known}")
    if steps not in table:
        other = ", ".join(f"lightning-{s}" for s in sorted(table, reverse=True))
        raise GenerationError(f"no {steps}-step Lightning LoRA is published for {model}; use {other}")
    return table[steps]


# Official Qwen-Image sizes by aspect ratio (width, height).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

POSITIVE_MAGIC = {"en": ", Ultra HD, 4K, cinematic composition.", "zh": ", 超清，4K，电影级构图."}


def get_preset(name: str) -> Preset:
    """A preset by name; a clear error names the known ones."""
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise GenerationError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]


def aspect_size(aspect: str, scale_to: int | None = None) -> tuple[int, int]:
    """Width and height for an official aspect ratio, optionally scaled so the long side is ``scale_to``.

    Example:
        >>> aspect_size("16:9", scale_to=256)
        (256, 144)
    """
    if aspect not in ASPECT_RATIOS:
        raise GenerationError(f"unknown aspect ratio {aspect!r}; choose one of: {', '.join(ASPECT_RATIOS)}")
    w, h = ASPECT_RATIOS[aspect]
    if scale_to:
        f = scale_to / max(w, h)
        w, h = round16(w * f), round16(h * f)
    return w, h


def round16(x: float) -> int:
    """The nearest multiple of 16 (at least 16)."""
    return max(16, int(round(x / 16)) * 16)


def is_chinese(text: str) -> bool:
    """True when the text has any CJK character."""
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)


def describe_presets() -> str:
    """A small table of the presets."""
    lines = [f"{'preset':<14}{'steps':>6}{'CFG':>6}  what"]
    lines += [f"{p.name:<14}{p.steps:>6}{p.cfg:>6.1f}  {p.description}" for p in PRESETS.values()]
    return "\n".join(lines)
