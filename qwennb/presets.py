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

from dataclasses import dataclass

from .errors import GenerationError


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    cfg: float
    description: str
    official_sizes: bool = False  # use the official aspect-ratio table for the default size
    positive_magic: bool = False  # append the official "positive magic" suffix


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
    ]
}

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
