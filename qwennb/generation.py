"""One request in, one result out: images, seed, every parameter, per-step times, peak memory, the plan.

``generate`` is what the CLI, the magics and the widget panel all call.

Example:
    >>> from qwennb.plan import make_plan, describe_machine
    >>> from qwennb.pipeline import build
    >>> from qwennb.generation import generate
    >>> pipe = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
    >>> result = generate(pipe, "a lighthouse at dusk", steps=4, seed=7, width=128, height=128)
    >>> result.seed, len(result.step_times_s), result.images[0].size
    (7, 4, (128, 128))
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import GenerationError
from .options import MAX_SEED, parse_size, validate_generate_options  # noqa: F401 - parse_size re-exported
from .plan import Plan, with_size
from .presets import ASPECT_RATIOS, POSITIVE_MAGIC, PRESETS, aspect_size, get_preset, is_chinese, round16

log = logging.getLogger("qwennb")
PNG_KEY = "qwennb"


class StopSignal:
    """A flag that ends a running generation at its next step (the panel's Stop button, Ctrl-C).

    Example:
        >>> stop = StopSignal()
        >>> stop.set(); bool(stop)
        True
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def __bool__(self) -> bool:
        return self._event.is_set()


@dataclass
class StepInfo:
    """Passed to ``on_step`` after every denoising step."""

    step: int  # 1-based
    total: int
    step_s: float
    elapsed_s: float
    latents: Any = None  # the packed latents after this step (on the pipeline's device), e.g. for previews
    preview: Any = None  # a small PIL preview of the current estimate of the image (``preview=`` on), or None

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.step * (self.total - self.step)


@dataclass
class GenerationResult:
    """Everything about one generation. ``params()`` is enough to regenerate it exactly."""

    images: list[Any]
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    num_images: int
    preset: str | None
    model: str
    step_times_s: list[float]
    text_encoding_s: float
    decode_s: float
    total_s: float
    peak_gpu_memory_gb: float | None
    denoise_peak_gpu_memory_gb: float | None
    transformer_passes_per_step: int
    interrupted: bool = False
    notices: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    paths: list[str] = field(default_factory=list)
    original_prompt: str | None = None  # before enhancement or positive magic
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))
    loras: list[dict[str, Any]] = field(default_factory=list)  # name, source, sha256, scale of each LoRA on
    task: str = "text-to-image"  # or "edit", "img2img", "inpaint" (qwennb.edit)
    inputs: list[dict[str, Any]] = field(default_factory=list)  # input images: source, size, sha256
    strength: float | None = None  # img2img / inpainting

    @property
    def steps_completed(self) -> int:
        return len(self.step_times_s)

    @property
    def median_step_s(self) -> float | None:
        if not self.step_times_s:
            return None
        s = sorted(self.step_times_s)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2

    def params(self) -> dict[str, Any]:
        """The parameters that regenerate this image with ``generate(pipe, **result.params())``."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "cfg": self.cfg,
            "width": self.width,
            "height": self.height,
            "num_images": self.num_images,
            **self._lora_params(),
        }

    def _lora_params(self) -> dict[str, Any]:
        # Only when they matter, so results without LoRAs keep their parameters as before.
        out: dict[str, Any] = {}
        if self.loras:
            out["loras"] = [dict(r) for r in self.loras]
        # A few-step preset's scheduler shapes the image: regeneration needs the preset.
        if self.preset and get_preset(self.preset).scheduler:
            out["preset"] = self.preset
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("images")
        d["images"] = list(self.paths)
        d["steps_completed"] = self.steps_completed
        d["median_step_s"] = self.median_step_s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], images: list[Any] | None = None) -> GenerationResult:
        """The inverse of :meth:`to_dict` (images are given separately, e.g. read back from ``d["images"]``)."""
        names = {f.name for f in fields(cls)} - {"images"}
        required = [
            f.name
            for f in fields(cls)
            if f.name in names and f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [n for n in required if n not in d]
        if missing:  # a record of something else: say which fields, not the constructor's TypeError
            raise ValueError(f"no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        kept = {k: v for k, v in d.items() if k in names}
        kept["paths"] = list(d.get("images") or d.get("paths") or [])
        return cls(images=list(images or []), **kept)

    def caption(self) -> str:
        state = f" (stopped after {self.steps_completed}/{self.steps} steps)" if self.interrupted else ""
        return (
            f"seed {self.seed} · {self.steps} steps · CFG {self.cfg:g} · {self.width}×{self.height} · "
            f"{self.total_s:.1f} s{state}"
        )

    def __repr__(self) -> str:
        return f"<GenerationResult {self.model}: {self.caption()}; {self.prompt[:40]!r}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from . import _render  # the package root wires the presentation layer; the core never imports it

        return _render("mimebundle", self)

    def timing_figure(self) -> Any:
        """A matplotlib Figure of the per-step times (text encoding and decoding apart, median marked)."""
        from . import _render

        return _render("timing_figure", self)

    def save(self, out_dir: str | os.PathLike[str], embed_metadata: bool = True) -> list[str]:
        """Write the images as PNG (never overwriting a file); returns and records their paths."""
        self.paths = save_images(self, out_dir, embed_metadata)
        return self.paths


def _sync(device: Any) -> None:
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _sigint_stops(stop: StopSignal) -> Iterator[None]:
    """While generating, a first Ctrl-C (or the notebook's interrupt) stops at the next step; a second one
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not allowed here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def free_memory() -> None:
    """Collect garbage and return cached CUDA memory to the driver (after a stop, an error or an unload)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PipelineBusyError(GenerationError):
    """Another generation is running on this pipeline (raised only with ``wait=False``)."""


class _RunLock:
    """One generation at a time on a pipeline: diffusers keeps the scheduler's step state on the pipeline."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None


_LOCKS_GUARD = threading.Lock()


def _run_lock_of(pipe: Any) -> _RunLock:
    with _LOCKS_GUARD:
        lock = getattr(pipe, "_qwennb_run_lock", None)
        if lock is None:
            lock = _RunLock()
            pipe._qwennb_run_lock = lock
        return lock


def is_busy(pipe: Any) -> bool:
    """True while a generation runs on ``pipe``."""
    lock = getattr(pipe, "_qwennb_run_lock", None)
    return lock is not None and lock.lock.locked()


class _Run:
    def __init__(self, rl: _RunLock) -> None:
        self.rl = rl

    def release(self) -> None:
        if self.rl is not None:
            self.rl.owner = None
            self.rl.lock.release()
            self.rl = None  # type: ignore[assignment]


def acquire_run(pipe: Any, wait: bool = True, notices: list[str] | None = None) -> _Run:
    """Hold ``pipe`` for one generation (``.release()`` when done); waits for a running one, or with
    ``wait=False`` raises :class:`PipelineBusyError`.

    Example:
        >>> class Pipe: pass
        >>> pipe = Pipe()
        >>> run = acquire_run(pipe); is_busy(pipe)
        True
        >>> run.release(); is_busy(pipe)
        False
    """
    rl = _run_lock_of(pipe)
    if rl.owner == threading.get_ident():
        raise PipelineBusyError(
            "a generation is already running on this pipeline in this thread (a generate() inside on_step?)"
        )
    if not rl.lock.acquire(blocking=False):
        if not wait:
            raise PipelineBusyError(
                "the pipeline is busy with another generation; wait for it to end (or press Stop) and retry"
            )
        t0 = time.perf_counter()
        rl.lock.acquire()
        if notices is not None:
            notices.append(f"waited {time.perf_counter() - t0:.1f} s for another generation on this pipeline")
    rl.owner = threading.get_ident()
    return _Run(rl)


def largest_size_that_fits(plan: Plan, width: int, height: int, batch: int) -> tuple[int, int] | None:
    """The largest size of the same aspect ratio whose estimated peak fits the plan's budget."""
    if plan.budget_gb is None:
        return width, height
    for f in [x / 20 for x in range(20, 1, -1)]:
        w, h = round16(width * f), round16(height * f)
        if with_size(plan, w, h, batch) <= plan.budget_gb:
            return w, h
    return None


def _small_stand_in(plan: Plan | None) -> bool:
    """The tiny and toy stand-ins run at their own small size; official sizes would only cost time."""
    return plan is not None and plan.model in ("tiny", "toy", "toy-edit")


def resolve_options(
    pipe: Any,
    steps: int | None,
    cfg: float | None,
    width: int | None,
    height: int | None,
    aspect: str | None,
    preset: str | None,
    guidance_scale: float | None,
    notices: list[str],
) -> tuple[int, float, int, int]:
    """Explicit options > preset > plan defaults; sizes rounded to multiples of 16 with a notice."""
    info = getattr(pipe, "qwennb", {})
    plan: Plan | None = info.get("plan")
    defaults = dict(plan.defaults) if plan else {"steps": 20, "cfg": 4.0, "width": 1024, "height": 1024}
    p = get_preset(preset) if preset else None
    if guidance_scale is not None:
        if cfg is None:
            cfg = float(guidance_scale)
            notices.append(
                f"guidance_scale={guidance_scale:g} is used as true_cfg_scale={cfg:g}: Qwen-Image ignores "
                "guidance_scale; its CFG is true_cfg_scale (2.5-5 recommended)."
            )
        else:
            notices.append(
                f"guidance_scale={guidance_scale:g} ignored: true_cfg_scale={cfg:g} was given too."
            )
    steps = steps if steps is not None else (p.steps if p else defaults["steps"])
    cfg = cfg if cfg is not None else (p.cfg if p else defaults["cfg"])
    validate_generate_options({"aspect": aspect, "width": width, "height": height})
    if aspect is not None:
        # Official sizes on a real model; scaled to the plan's default long side on a small stand-in.
        small = _small_stand_in(plan)
        width, height = aspect_size(aspect, max(defaults["width"], defaults["height"]) if small else None)
        if small:
            ow, oh = ASPECT_RATIOS[aspect]
            notices.append(
                f"aspect {aspect} gives {width}x{height}, not the official {ow}x{oh}: the {plan.model} stand-in "
                f"is small and runs at its own {max(defaults['width'], defaults['height'])}-pixel scale"
            )
    elif p is not None and p.official_sizes and width is None and height is None:
        if _small_stand_in(plan):
            ow, oh = ASPECT_RATIOS["1:1"]
            notices.append(
                f"preset {p.name}: {defaults['width']}x{defaults['height']}, not the official {ow}x{oh}: the "
                f"{plan.model} stand-in is small and runs at its own default size (give --size to choose)"
            )
        else:
            width, height = ASPECT_RATIOS["1:1"]
    width = width if width is not None else defaults["width"]
    height = height if height is not None else defaults["height"]
    validate_generate_options({"width": width, "height": height})
    if width % 16 or height % 16:
        w2, h2 = round16(width), round16(height)
        notices.append(f"size {width}x{height} rounded to {w2}x{h2} (sizes must be multiples of 16).")
        width, height = w2, h2
    return int(steps), float(cfg), int(width), int(height)


def _encode(pipe: Any, text: str, n: int, device: Any) -> tuple[Any, Any]:
    import torch

    from .pipeline import input_device

    # A text encoder kept on the CPU encodes there; a hooked (streamed) one takes its inputs on the GPU.
    te_device = input_device(pipe.text_encoder, pipe) if pipe.text_encoder is not None else device
    # QwenImage21Pipeline also returns an image-position mask (all False for text): the first two are the same.
    embeds, mask = pipe.encode_prompt(text, device=te_device, num_images_per_prompt=n)[:2]
    if mask is None:  # all tokens valid: say so explicitly (diffusers warns on a missing mask)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds.to(device), mask.to(device)


TEXT_CACHE_SIZE = 8


def _encode_cached(cache: dict[Any, Any], pipe: Any, text: str, n: int, device: Any) -> tuple[Any, Any]:
    """:func:`_encode` through ``cache`` (the most recent ``TEXT_CACHE_SIZE`` texts of one pipeline).

    The embeddings depend only on the text and the text encoder (LoRAs here change the transformer), so an
    item whose negative prompt (or prompt) was just encoded reuses the same tensors instead of running the text
    encoder again. The cache is kept per text encoder object.
    """
    key = (text, n, str(device), id(pipe.text_encoder))
    hit = cache.pop(key, None)
    if hit is None:
        hit = _encode(pipe, text, n, device)
        while len(cache) >= TEXT_CACHE_SIZE:
            cache.pop(next(iter(cache)))
    cache[key] = hit  # most recent last
    return hit


def generate(
    pipe: Any,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    aspect: str | None = None,
    num_images: int = 1,
    preset: str | None = None,
    positive_magic: bool | None = None,
    guidance_scale: float | None = None,
    true_cfg_scale: float | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    stop: StopSignal | None = None,
    original_prompt: str | None = None,
    wait: bool = True,
    preview: bool | int = False,
    loras: list[dict[str, Any]] | None = None,
    init_image: Any = None,
    strength: float | None = None,
    mask: Any = None,
    keep_unmasked: bool = True,
    _job: Any = None,
    _notices: list[str] | None = None,
    _text_cache: dict[Any, Any] | None = None,
) -> GenerationResult:
    """Generate images with a loaded pipeline and return a :class:`GenerationResult`.

    Options: ``steps``, ``cfg`` (Qwen-Image's ``true_cfg_scale``; ``true_cfg_scale=`` and, for old code,
    ``guidance_scale=`` are accepted too), ``seed`` (drawn and recorded when omitted), ``width``/``height``
    or ``aspect`` (an official ratio such as "16:9"), ``num_images``, ``preset`` ("ultra-fast",
    "balanced", "high-quality", "official"); explicit options win over the preset, which wins over the
    plan's defaults. CFG > 1 always runs: a negative prompt of " " is supplied when none is given.

    ``on_step`` is called after each step with a :class:`StepInfo`; setting ``stop`` (or pressing Ctrl-C
    once) ends the run at the next step and decodes what exists. A KeyboardInterrupt raised inside a
    step also returns a partial result (without images). Bad options raise :class:`GenerationError`;
    CUDA out-of-memory and NaN outputs raise it too, after freeing memory, with what to change.

    ``preview=True`` (or a number of steps N) puts a small preview image of the current estimate in
    ``StepInfo.preview`` every 2 (N) steps, from a linear map of the latents (:mod:`qwennb.preview`).

    One pipeline runs one generation at a time: a second call (another thread, the panel while a cell
    runs) waits for the first to end, or with ``wait=False`` raises :class:`PipelineBusyError` at once.

    ``loras`` (records as in ``result.loras`` or a PNG's parameters: source, scale, sha256) makes the
    pipeline's LoRAs exactly these first (see :func:`qwennb.lora.ensure`); the few-step presets
    ("lightning-8", "lightning-4") load the model's Lightning LoRA and use its scheduler for the run.

    Image-to-image: ``init_image`` (PIL, numpy, path or bytes) and ``strength`` (0 < s <= 1, default 0.6);
    with ``mask`` (white: redraw) it inpaints, and ``keep_unmasked`` puts the unmasked pixels back exactly.
    The output size defaults to the init image's, rounded to multiples of 16 (a notice says so). These run
    ``QwenImageImg2ImgPipeline`` / ``QwenImageInpaintPipeline`` built from the loaded components. For edit
    models use :func:`qwennb.edit.edit`.
    """
    import torch

    validate_generate_options(
        {
            "prompt": ""
            if prompt is None
            else prompt,  # None is "not given" to the validator: here it is empty
            "negative_prompt": negative_prompt,
            "steps": steps,
            "cfg": cfg,
            "true_cfg_scale": true_cfg_scale,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "width": width,
            "height": height,
            "aspect": aspect,
            "num_images": num_images,
            "preset": preset,
            "positive_magic": positive_magic,
        }
    )
    notices: list[str] = list(_notices or [])
    if _job is None and (init_image is not None or strength is not None or mask is not None):
        from .edit import image_job

        _job, width, height = image_job(
            pipe, init_image, strength, mask, width, height, notices, keep_unmasked
        )
    elif _job is None and type(pipe).__name__ in ("QwenImageEditPlusPipeline", "QwenImageEditPipeline"):
        raise GenerationError(
            f"{getattr(pipe, 'qwennb', {}).get('model', 'this')} is an edit model: give it images with "
            "qwennb.edit(pipe, images, instruction) (%%qwen_edit, `qwennb edit`)"
        )
    if true_cfg_scale is not None:
        cfg = true_cfg_scale
    steps, cfg, width, height = resolve_options(
        pipe, steps, cfg, width, height, aspect, preset, guidance_scale, notices
    )
    # The preset's or the plan's values are checked too (a plan could hold anything).
    validate_generate_options({"steps": steps, "cfg": cfg, "seed": seed, "num_images": num_images})
    # img2img and inpainting skip the first (1 - strength) of the schedule: this many steps run.
    run_steps = _job.steps_run(steps) if _job is not None else steps
    info = getattr(pipe, "qwennb", {})
    plan: Plan | None = info.get("plan")
    model = info.get("model", "unknown")
    if plan is not None and plan.budget_gb is not None:
        if _job is not None and _job.extra_tokens:  # the sequence also holds the reference images' tokens
            from .edit import planning_size

            need = with_size(plan, *planning_size(width, height, _job.extra_tokens), num_images)
        else:
            need = with_size(plan, width, height, num_images)
        if need > plan.budget_gb:
            fit = largest_size_that_fits(plan, width, height, num_images)
            hint = f"; the largest size of this shape that fits is {fit[0]}x{fit[1]}" if fit else ""
            raise GenerationError(
                f"{width}x{height} x{num_images} needs about {need:.1f} GiB but the plan's budget is "
                f"{plan.budget_gb:.1f} GiB{hint}"
            )
    p = get_preset(preset) if preset else None
    text = prompt
    if positive_magic or (positive_magic is None and p is not None and p.positive_magic):
        text = prompt + POSITIVE_MAGIC["zh" if is_chinese(prompt) else "en"]
        original_prompt = original_prompt or prompt
    if cfg > 1 and not negative_prompt:
        negative_prompt = " "
    if seed is None:
        seed = random.SystemRandom().randrange(0, 2**32)
    notices += _prepare_loras(pipe, loras, p, model, steps, cfg)
    for n in notices:
        log.warning(n)

    device = pipe._execution_device
    stop = stop if stop is not None else StopSignal()
    stop.clear()
    cuda = device.type == "cuda"
    step_times: list[float] = []
    last: dict[str, Any] = {}
    passes = {"n": 0}
    run = acquire_run(pipe, wait, notices)  # one generation at a time on this pipeline: released below
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        hook = pipe.transformer.register_forward_pre_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))
    except BaseException:
        run.release()
        raise
    t_start = time.perf_counter()
    text_s = decode_s = 0.0
    images: list[Any] = []
    interrupted = out_of_memory = False
    denoise_peak = None

    previewer = None
    if preview and on_step is not None:
        from .preview import DEFAULT_EVERY, Previewer

        every = DEFAULT_EVERY if preview is True else int(preview)
        previewer = Previewer(pipe, width, height, every)

    def callback(p_: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal denoise_peak
        _sync(device)
        now = time.perf_counter()
        step_times.append(now - last["t"])
        last["t"] = now
        last["latents"] = kwargs["latents"]
        if cuda:
            denoise_peak = torch.cuda.max_memory_allocated() / 1024**3
        if on_step is not None:
            image = (
                previewer(len(step_times), run_steps, kwargs["latents"]) if previewer is not None else None
            )
            on_step(
                StepInfo(
                    len(step_times), run_steps, step_times[-1], now - last["t0"], kwargs["latents"], image
                )
            )
        if stop and len(step_times) < run_steps:
            p_._interrupt = True
        return {}

    try:
        from .lora import few_step_scheduler  # a few-step preset's scheduler, for this run only

        # no_grad, as diffusers' own __call__ (inference_mode tensors trip compiled graphs that are reused later).
        from .speed import expect_cfg  # tells the tuned path (if on) whether passes come in CFG pairs

        with (
            _sigint_stops(stop),
            torch.no_grad(),
            expect_cfg(pipe.transformer, cfg > 1),
            few_step_scheduler(pipe, p.scheduler if p is not None else None),
        ):
            _sync(device)
            t0 = time.perf_counter()
            if _job is not None:
                encode = _job.encode
            elif _text_cache is not None:  # a batch worker: the same negative prompt item after item
                encode = lambda t, n, d: _encode_cached(_text_cache, pipe, t, n, d)  # noqa: E731
            else:
                encode = lambda t, n, d: _encode(pipe, t, n, d)  # noqa: E731
            embeds, embeds_mask = encode(text, num_images, device)
            neg = encode(negative_prompt, num_images, device) if cfg > 1 else (None, None)
            _sync(device)
            text_s = time.perf_counter() - t0
            generator = torch.Generator(device="cpu").manual_seed(seed)
            last["t"] = last["t0"] = time.perf_counter()
            out = (_job.run if _job is not None else pipe)(
                prompt_embeds=embeds,
                prompt_embeds_mask=embeds_mask,
                negative_prompt_embeds=neg[0],
                negative_prompt_embeds_mask=neg[1],
                true_cfg_scale=cfg,
                num_inference_steps=steps,
                width=width,
                height=height,
                num_images_per_prompt=1,
                generator=generator,
                callback_on_step_end=callback,
                output_type="pil",
            )
            _sync(device)
            decode_s = time.perf_counter() - last["t"]
            images = _job.finish(list(out.images)) if _job is not None else list(out.images)
            interrupted = len(step_times) < run_steps
    except KeyboardInterrupt:
        interrupted = True
        images = []
        notices.append(f"interrupted after {len(step_times)} of {run_steps} steps")
    except torch.OutOfMemoryError:
        # Raised below, outside this block: an error raised here would keep the OOM as its context, and with
        # it the pipeline's frames and the step's tensors, for as long as the notebook keeps the traceback.
        out_of_memory = True
    finally:
        hook.remove()
        pipe._interrupt = False
        run.release()
    if out_of_memory:
        last.clear()
        free_memory()
        raise GenerationError(
            f"out of GPU memory at {width}x{height} x{num_images}; use a smaller size or fewer images, or load a "
            "plan that keeps less on the GPU (e.g. OptimizationConfig(transformer_placement='group_offload'))"
        )
    latents = last.pop("latents", None)
    if latents is not None and not bool(torch.isfinite(latents).all()):
        del latents
        free_memory()
        raise GenerationError(
            "the output has NaN or inf values (it would be a black image); the likely cause is fp16 weights or "
            "compute: Qwen-Image needs bf16 or fp32"
        )
    del latents
    last.clear()
    if interrupted:
        free_memory()
        if images:
            notices.append(
                f"stopped after {len(step_times)} of {run_steps} steps; the image is partly denoised"
            )
    peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else None
    steps_done = max(1, len(step_times))
    return GenerationResult(
        images=images,
        prompt=text,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        cfg=cfg,
        width=width,
        height=height,
        num_images=num_images,
        preset=preset,
        model=model,
        step_times_s=step_times,
        text_encoding_s=text_s,
        decode_s=decode_s,
        total_s=time.perf_counter() - t_start,
        peak_gpu_memory_gb=round(peak, 3) if peak is not None else None,
        denoise_peak_gpu_memory_gb=round(denoise_peak, 3) if denoise_peak is not None else None,
        transformer_passes_per_step=round(passes["n"] / steps_done),
        interrupted=interrupted,
        notices=notices,
        plan=plan.to_dict() if plan is not None else None,
        original_prompt=original_prompt,
        loras=_lora_records(pipe),
        task=_job.task if _job is not None else "text-to-image",
        inputs=[x.describe() for x in _job.inputs + ([_job.mask] if _job.mask else [])] if _job else [],
        strength=_job.strength if _job is not None else None,
    )


def _lora_records(pipe: Any) -> list[dict[str, Any]]:
    from .lora import lora_records

    return lora_records(pipe)


def _prepare_loras(pipe: Any, loras: Any, preset: Any, model: str, steps: int, cfg: float) -> list[str]:
    """Put the requested LoRAs (and a few-step preset's) on the pipeline; notices of what changed."""
    from . import lora as lora_mod
    from .models import REGISTRY

    notices: list[str] = []
    if loras is not None:
        notices += lora_mod.ensure(pipe, list(loras))
    if preset is not None and preset.lora:
        spec = REGISTRY.get(model)
        notices += lora_mod.ensure_preset_lora(pipe, preset, model, stand_in=spec is None or spec.unpublished)
    elif cfg > 1 or steps > 8:
        fast = [i.name for i in lora_mod.list_loras(pipe) if lora_mod.is_lightning(i)]
        if fast and not getattr(pipe, "qwennb", {}).get("loras_disabled"):
            notices.append(
                f"the few-step LoRA {fast[0]} is loaded: it is made for 4-8 steps at CFG 1 (preset lightning-8 or "
                f"lightning-4); remove it for {steps} steps at CFG {cfg:g}"
            )
    return notices


# --------------------------------------------------------------------------- saving with provenance


def _metadata(result: GenerationResult, index: int) -> dict[str, Any]:
    return {
        **result.params(),
        "index": index,
        "model": result.model,
        "preset": result.preset,
        "original_prompt": result.original_prompt,
        "qwennb_version": __version__,
        "created": result.created,
        "interrupted": result.interrupted,
        **({"task": result.task, "inputs": result.inputs} if result.inputs else {}),
        **({"strength": result.strength} if result.strength is not None else {}),
    }


def save_images(
    result: GenerationResult, out_dir: str | os.PathLike[str], embed_metadata: bool = True
) -> list[str]:
    """Save a result's images as PNG named by time and seed; never overwrites an existing file.

    With ``embed_metadata`` the PNG text chunks hold every parameter, the model and qwennb's version
    (``load_params`` reads them back); without it the files carry no text at all.
    """
    from PIL.PngImagePlugin import PngInfo

    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = []
    for i, image in enumerate(result.images):
        pnginfo = None
        if embed_metadata:
            pnginfo = PngInfo()
            meta = _metadata(result, i)
            pnginfo.add_text(PNG_KEY, json.dumps(meta, ensure_ascii=False))
            pnginfo.add_text("Software", f"qwennb {__version__}")
        base = f"qwen_{stamp}_s{result.seed}" + (f"_{i}" if len(result.images) > 1 else "")
        for k in range(1000):
            path = folder / (base + (f"-{k}" if k else "") + ".png")
            try:
                with open(path, "xb") as f:  # "x": fails instead of overwriting
                    image.save(f, format="PNG", pnginfo=pnginfo)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover
            raise GenerationError(f"could not find a free file name for {base} in {folder}")
        paths.append(str(path))
    return paths


def read_metadata(png: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything qwennb stored in a PNG it saved (one JSON object), or a one-line :class:`GenerationError`.

    Example:
        >>> read_metadata("missing.png")  # doctest: +SKIP
    """
    from PIL import Image

    try:
        with Image.open(png) as im:
            raw = im.info.get(PNG_KEY) or getattr(im, "text", {}).get(PNG_KEY)
    except OSError as exc:
        raise GenerationError(f"cannot read {png}: {exc}") from None
    if not raw:
        raise GenerationError(f"{png} carries no qwennb parameters (saved elsewhere, or with metadata off)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GenerationError(
            f"{png} has qwennb metadata that is not valid JSON (the file was edited?)"
        ) from None
    if not isinstance(meta, dict):
        raise GenerationError(f"{png} has qwennb metadata that is not a JSON object")
    return meta


def load_params(png: str | os.PathLike[str]) -> dict[str, Any]:
    """The generation parameters stored in a PNG saved by qwennb (``generate(pipe, **params)`` redoes it).

    Example:
        >>> load_params("missing.png")  # doctest: +SKIP
    """
    meta = read_metadata(png)
    keys = ("prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "num_images", "loras")
    out = {k: meta[k] for k in keys if k in meta}
    preset = meta.get("preset")
    if preset and preset in PRESETS and PRESETS[preset].scheduler:  # a few-step preset's scheduler
        out["preset"] = preset
    return out
