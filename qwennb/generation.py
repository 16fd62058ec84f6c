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

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import GenerationError
from .plan import Plan, with_size
from .presets import ASPECT_RATIOS, POSITIVE_MAGIC, aspect_size, get_preset, is_chinese, round16

log = logging.getLogger("qwennb")
MAX_SEED = 2**63 - 1
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
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("images")
        d["images"] = list(self.paths)
        d["steps_completed"] = self.steps_completed
        d["median_step_s"] = self.median_step_s
        return d

    def caption(self) -> str:
        state = f" (stopped after {self.steps_completed}/{self.steps} steps)" if self.interrupted else ""
        return (
            f"seed {self.seed} · {self.steps} steps · CFG {self.cfg:g} · {self.width}×{self.height} · "
            f"{self.total_s:.1f} s{state}"
        )

    def __repr__(self) -> str:
        return f"<GenerationResult {self.model}: {self.caption()}; {self.prompt[:40]!r}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from .display import result_html, result_text

        return {"text/plain": result_text(self), "text/html": result_html(self)}

    def timing_figure(self) -> Any:
        """A matplotlib Figure of the per-step times (text encoding and decoding apart, median marked)."""
        from .display import timing_figure

        return timing_figure(self)

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


def _check_options(steps: Any, cfg: Any, seed: Any, num_images: Any) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        # One step gives NaN: the scheduler stretches its sigmas to shift_terminal, which needs two points.
        raise GenerationError(f"steps must be a whole number of at least 2, got {steps!r}")
    if steps > 1000:
        raise GenerationError(f"steps must be at most 1000, got {steps}")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 1:
        raise GenerationError(f"CFG must be at least 1 (1 turns guidance off), got {cfg!r}")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed > MAX_SEED
    ):
        raise GenerationError(f"seed must be a whole number from 0 to 2**63-1, got {seed!r}")
    if not isinstance(num_images, int) or num_images < 1 or num_images > 16:
        raise GenerationError(f"number of images must be from 1 to 16, got {num_images!r}")


def largest_size_that_fits(plan: Plan, width: int, height: int, batch: int) -> tuple[int, int] | None:
    """The largest size of the same aspect ratio whose estimated peak fits the plan's budget."""
    if plan.budget_gb is None:
        return width, height
    for f in [x / 20 for x in range(20, 1, -1)]:
        w, h = round16(width * f), round16(height * f)
        if with_size(plan, w, h, batch) <= plan.budget_gb:
            return w, h
    return None


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
    if aspect is not None:
        if width is not None or height is not None:
            raise GenerationError("give either a size or an aspect ratio, not both")
        if aspect not in ASPECT_RATIOS:
            raise GenerationError(
                f"unknown aspect ratio {aspect!r}; choose one of: {', '.join(ASPECT_RATIOS)}"
            )
        # Official sizes on a real model; scaled to the plan's default long side on a stand-in.
        official = not (plan and plan.model == "tiny")
        width, height = aspect_size(aspect, None if official else max(defaults["width"], defaults["height"]))
    elif (
        p is not None
        and p.official_sizes
        and width is None
        and height is None
        and not (plan and plan.model == "tiny")
    ):
        width, height = ASPECT_RATIOS["1:1"]
    width = width if width is not None else defaults["width"]
    height = height if height is not None else defaults["height"]
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v > 4096:
            raise GenerationError(f"{name} must be a whole number from 16 to 4096, got {v!r}")
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
    embeds, mask = pipe.encode_prompt(text, device=te_device, num_images_per_prompt=n)
    if mask is None:  # all tokens valid: say so explicitly (diffusers warns on a missing mask)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds.to(device), mask.to(device)


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
    """
    import torch

    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError("the prompt is empty")
    notices: list[str] = []
    if true_cfg_scale is not None:
        if cfg is not None and cfg != true_cfg_scale:
            raise GenerationError("give cfg or true_cfg_scale, not both")
        cfg = true_cfg_scale
    steps, cfg, width, height = resolve_options(
        pipe, steps, cfg, width, height, aspect, preset, guidance_scale, notices
    )
    _check_options(steps, cfg, seed, num_images)
    info = getattr(pipe, "qwennb", {})
    plan: Plan | None = info.get("plan")
    model = info.get("model", "unknown")
    if plan is not None and plan.budget_gb is not None:
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
    for n in notices:
        log.warning(n)

    device = pipe._execution_device
    stop = stop if stop is not None else StopSignal()
    stop.clear()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_times: list[float] = []
    last: dict[str, Any] = {}
    passes = {"n": 0}
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))
    t_start = time.perf_counter()
    text_s = decode_s = 0.0
    images: list[Any] = []
    interrupted = False
    denoise_peak = None

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
            on_step(StepInfo(len(step_times), steps, step_times[-1], now - last["t0"], kwargs["latents"]))
        if stop and len(step_times) < steps:
            p_._interrupt = True
        return {}

    try:
        # no_grad, as diffusers' own __call__ (inference_mode tensors trip compiled graphs that are reused later).
        from .speed import expect_cfg  # tells the tuned path (if on) whether passes come in CFG pairs

        with _sigint_stops(stop), torch.no_grad(), expect_cfg(pipe.transformer, cfg > 1):
            _sync(device)
            t0 = time.perf_counter()
            embeds, mask = _encode(pipe, text, num_images, device)
            neg = _encode(pipe, negative_prompt, num_images, device) if cfg > 1 else (None, None)
            _sync(device)
            text_s = time.perf_counter() - t0
            generator = torch.Generator(device="cpu").manual_seed(seed)
            last["t"] = last["t0"] = time.perf_counter()
            out = pipe(
                prompt_embeds=embeds,
                prompt_embeds_mask=mask,
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
            images = list(out.images)
            interrupted = len(step_times) < steps
    except KeyboardInterrupt:
        interrupted = True
        images = []
        notices.append(f"interrupted after {len(step_times)} of {steps} steps")
    except torch.OutOfMemoryError as exc:
        del exc
        last.clear()
        free_memory()
        raise GenerationError(
            f"out of GPU memory at {width}x{height} x{num_images}; use a smaller size or fewer images, or load a "
            "plan that keeps less on the GPU (e.g. OptimizationConfig(transformer_placement='group_offload'))"
        ) from None
    finally:
        hook.remove()
        pipe._interrupt = False
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
            notices.append(f"stopped after {len(step_times)} of {steps} steps; the image is partly denoised")
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
    )


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


def load_params(png: str | os.PathLike[str]) -> dict[str, Any]:
    """The generation parameters stored in a PNG saved by qwennb (``generate(pipe, **params)`` redoes it).

    Example:
        >>> load_params("missing.png")  # doctest: +SKIP
    """
    from PIL import Image

    try:
        with Image.open(png) as im:
            raw = im.info.get(PNG_KEY) or getattr(im, "text", {}).get(PNG_KEY)
    except OSError as exc:
        raise GenerationError(f"cannot read {png}: {exc}") from None
    if not raw:
        raise GenerationError(f"{png} carries no qwennb parameters (saved elsewhere, or with metadata off)")
    meta = json.loads(raw)
    keys = ("prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "num_images")
    return {k: meta[k] for k in keys if k in meta}


# --------------------------------------------------------------------------- CLI


def add_generate_parser(sub: Any) -> None:
    """Add ``qwennb generate`` to the CLI."""
    g = sub.add_parser("generate", help="generate images (the tiny stand-in when no weights are found)")
    g.add_argument("prompt")
    g.add_argument(
        "--model",
        default=None,
        help="registry name, hub id or folder (default: QWENNB_MODEL, then local Qwen-Image, then tiny)",
    )
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg", type=float, help="true_cfg_scale (1 turns guidance off)")
    g.add_argument("--seed", type=int)
    g.add_argument("--size", help="WIDTHxHEIGHT, e.g. 1024x1024")
    g.add_argument("--aspect", choices=list(ASPECT_RATIOS))
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--preset")
    g.add_argument("--n", type=int, default=1, help="number of images")
    g.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    g.add_argument("--no-metadata", action="store_true", help="do not embed the parameters in the PNGs")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument(
        "--gpus", type=int, default=1, help="GPUs for the request: one worker process each (qwennb.parallel)"
    )
    from .cli import add_mode_argument

    add_mode_argument(g)
    g.set_defaults(func=_cmd_generate)


def parse_size(text: str) -> tuple[int, int]:
    """Parse "1024x768" into (1024, 768).

    Example:
        >>> parse_size("1024x768")
        (1024, 768)
    """
    try:
        w, h = text.lower().replace("×", "x").split("x")
        return int(w), int(h)
    except ValueError:
        raise GenerationError(f"size must look like 1024x1024, got {text!r}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .hardware import detect
    from .pipeline import build, resolve_model
    from .plan import make_plan

    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    if args.preset:
        get_preset(args.preset)  # fail before loading anything
    name, path, notice = resolve_model(args.model)
    if notice:
        print(f"qwennb: {notice}", file=sys.stderr)
    overrides = {"mode": args.mode} if args.mode else None
    session = None
    if args.gpus != 1:  # worker processes, one per GPU
        from .parallel import session_for
        from .session import Session

        session = session_for(Session(), args.gpus)
        report = session.load(args.model, overrides)
        plan = report.plan
        print(f"qwennb: loaded {name} ({plan.arrangement}) in {report.seconds:.1f} s", file=sys.stderr)
    else:
        plan = make_plan(detect(), name, overrides)
        for w in plan.warnings:
            print(f"qwennb: {w}", file=sys.stderr)
        t0 = time.perf_counter()
        pipe = build(plan, path)
        print(
            f"qwennb: loaded {name} ({plan.arrangement}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
    bar = tqdm(total=None, unit="step", file=sys.stderr, disable=os.environ.get("QWENNB_NO_PROGRESS") == "1")

    def on_step(s: StepInfo) -> None:
        bar.total = s.total
        bar.update(1)

    run = session.generate if session is not None else lambda *a, **k: generate(pipe, *a, **k)
    try:
        result = run(
            args.prompt,
            negative_prompt=args.negative,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            width=width,
            height=height,
            aspect=args.aspect,
            num_images=args.n,
            preset=args.preset,
            on_step=on_step,
        )
    finally:
        bar.close()
        if session is not None:
            session.unload()
    for n in result.notices:
        print(f"qwennb: {n}", file=sys.stderr)
    result.save(args.out, embed_metadata=not args.no_metadata)
    if args.json:
        d = result.to_dict()
        d.pop("plan")
        print(json.dumps(d, indent=2, ensure_ascii=False))
    else:
        for p in result.paths:
            print(p)
        print(f"{result.caption()}; median {result.median_step_s or 0:.3f} s/step")
    return 0
