"""What the benchmark scripts share: a stock diffusers pipeline call timed step by step, and the card's name as
it appears in results file names."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any


def timed_call(pipe: Any, sync: Callable[[], None], **kwargs: Any) -> tuple[list[float], float]:
    """Call ``pipe(**kwargs)`` with a step callback; returns the seconds between step ends (the first interval
    includes text encoding) and the whole call's seconds, with ``sync()`` (the device's synchronise) around
    every mark."""
    times: list[float] = []
    last: dict[str, float] = {}

    def cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        sync()
        now = time.perf_counter()
        times.append(now - last["t"])
        last["t"] = now
        return {}

    sync()
    t0 = last["t"] = time.perf_counter()
    pipe(**kwargs, callback_on_step_end=cb)
    sync()
    return times, time.perf_counter() - t0


def card_slug(name: str) -> str:
    """A card's name as results files carry it: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
