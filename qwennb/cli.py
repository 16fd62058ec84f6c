"""The ``qwennb`` command: detect, models, plan, generate.

Every user error exits with status 2 and one line on stderr (no traceback).

Example:
    $ qwennb plan --model qwen-image --gpu-memory 24GB --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import QwennbError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (argparse's own convention)
        self.exit(2, f"qwennb: error: {message}\n")


def _cmd_detect(args: argparse.Namespace) -> int:
    from .hardware import detect
    from .models import find_local_models

    if args.dir and not os.path.isdir(args.dir):
        raise QwennbError(f"--dir {args.dir}: no such folder")
    hw = detect()
    models = find_local_models(args.dir) if args.dir else find_local_models()
    if args.json:
        out = hw.to_dict()
        out["models"] = [m.to_dict() for m in models]
        print(json.dumps(out, indent=2))
        return 0
    if hw.gpus:
        for g in hw.gpus:
            peak = f", ~{g.peak_bf16_tflops:.0f} TFLOP/s bf16" if g.peak_bf16_tflops else ""
            print(
                f"GPU {g.index}: {g.name}, {g.total_memory_gb:.1f} GiB ({g.free_memory_gb:.1f} free), "
                f"compute {g.compute_capability}, bf16 {'yes' if g.bf16 else 'no'}{peak}"
            )
    else:
        print("GPU: none")
    print(
        f"host: {hw.host_ram_gb:.1f} GiB RAM ({hw.host_ram_available_gb:.1f} available), {hw.cpu_count} CPUs"
    )
    print(f"front end: {hw.frontend}")
    for note in hw.notes:
        print(f"note: {note}")
    if models:
        for m in models:
            state = "complete" if m.complete else f"INCOMPLETE (missing {', '.join(m.missing[:3])})"
            print(f"model: {m.name} [{m.architecture}] at {m.path}: {state}")
    else:
        print("models: no Qwen-Image snapshot found locally (the embedded toy model will be used)")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import REGISTRY, component_sizes

    rows = []
    for spec in REGISTRY.values():
        sizes = component_sizes(spec.name)
        rows.append(
            {
                "name": spec.name,
                "hub_id": spec.hub_id,
                "task": spec.task,
                "architecture": spec.architecture,
                "stand_in": spec.stand_in,
                "description": spec.description,
                "components": {k: v.to_dict() for k, v in sizes.items()},
                "total_params": sum(v.params for v in sizes.values()),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<26}{'hub id':<30}{'params':>16}  {'bf16 GiB':>9}  task")
    for r in rows:
        gib = r["total_params"] * 2 / 1024**3
        print(f"{r['name']:<26}{r['hub_id'] or '-':<30}{r['total_params']:>16,}  {gib:>9.2f}  {r['task']}")
    return 0


DESCRIBED_DEFAULTS = {"host_ram": "64GB", "compute_capability": "8.9", "pcie_gen": 4, "pcie_width": 16}


def _machine_from_args(args: argparse.Namespace) -> Any:
    from .hardware import detect
    from .plan import describe_machine, parse_memory

    card = (args.gpu_name, args.compute_capability, args.pcie_gen, args.pcie_width, args.tflops)
    if args.gpu_memory is None:
        if args.no_bf16 or any(v is not None for v in card):
            raise QwennbError(
                "--gpu-name, --compute-capability, --pcie-*, --tflops and --no-bf16 describe a card: give its --gpu-memory too"
            )
        hw = detect()
        if args.host_ram is not None:
            hw.host_ram_gb = hw.host_ram_available_gb = parse_memory(args.host_ram)
        return hw
    return describe_machine(
        gpu_memory_gb=parse_memory(args.gpu_memory),
        gpu_name=args.gpu_name,
        bf16=not args.no_bf16,
        host_ram_gb=parse_memory(args.host_ram) if args.host_ram else None,
        compute_capability=args.compute_capability,
        pcie_gen=args.pcie_gen,
        pcie_width=args.pcie_width,
        tflops=args.tflops,
        gpu_count=max(1, args.gpus or 1),
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from .display import plan_text
    from .plan import OptimizationConfig, make_plan

    hw = _machine_from_args(args)
    model = args.model
    if not hw.gpus and not args.force and args.gpu_memory is None:
        from .models import EMBEDDED_MODEL

        if model is None:
            model = EMBEDDED_MODEL
            if not args.json:
                print(
                    f"no CUDA GPU here: planning the embedded model {model!r} (describe a card with --gpu-memory)"
                )
        elif not _is_dir(model) and _params(model) > 1e9:
            raise QwennbError(
                f"no CUDA GPU here to plan {model} for: describe the card, e.g. `qwennb plan --model {model} "
                "--gpu-memory 24GB --host-ram 64GB` (also --compute-capability, --pcie-gen, --pcie-width, --tflops), "
                "or --force to plan it on the CPU"
            )
    overrides = OptimizationConfig(
        force=args.force, dtype="float32" if args.fp32 else None, mode=args.mode, gpus=args.gpus
    )
    from .models import get_model

    plan_fn = make_plan
    if model and not _is_dir(model) and get_model(model).task == "image-edit":
        # the activations also hold the reference images' tokens
        from .edit import plan_for_model as plan_fn
    plan = plan_fn(hw, model or "qwen-image", overrides)
    print(plan.to_json() if args.json else plan_text(plan))
    return 0


def _params(model: str) -> int:
    from .models import component_sizes

    return sum(s.params for s in component_sizes(model).values())


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def add_mode_argument(parser: argparse.ArgumentParser) -> None:
    """``--mode`` with the modes of :data:`qwennb.plan.MODES`, one short clause each (the measured costs are
    in ``%qwen presets`` and the README)."""
    from .plan import MODES

    short = "; ".join(f"{name}: {text.split(':')[0]}" for name, (_, text) in MODES.items())
    parser.add_argument(
        "--mode",
        choices=list(MODES),
        help=(f"speed against exactness ({short}); default: the plan decides").replace("%", "%%"),
    )


def _typical_tflops() -> dict[str, float]:
    from .hardware import TYPICAL_BF16_TFLOPS

    return TYPICAL_BF16_TFLOPS


# --------------------------------------------------------------------------- generate


def _add_generation_options(g: argparse.ArgumentParser) -> None:
    """The options ``generate`` and ``sweep`` share (checked by :func:`qwennb.options.validate_generate_options`)."""
    from .presets import ASPECT_RATIOS, PRESETS

    g.add_argument(
        "--model",
        default=None,
        help="registry name, hub id or folder (default: QWENNB_MODEL, then local Qwen-Image, then the embedded toy)",
    )
    g.add_argument(
        "--steps", type=int, help="denoising steps, at least 2 (default: the preset's, else the plan's)"
    )
    g.add_argument("--cfg", type=float, help="true_cfg_scale, 1 to 100 (1 turns guidance off)")
    g.add_argument(
        "--seed",
        type=int,
        help="random seed, 0 to 2**63-1; the same seed gives the same image (default: drawn)",
    )
    g.add_argument("--size", help="WIDTHxHEIGHT, e.g. 1024x1024 (multiples of 16; others are rounded)")
    g.add_argument("--aspect", choices=list(ASPECT_RATIOS), help="an official aspect ratio and its size")
    g.add_argument(
        "--negative", "--negative-prompt", default=None, help="negative prompt (default ' ' when CFG > 1)"
    )
    presets = "; ".join(f"{p.name}: {p.steps} steps, CFG {p.cfg:g}" for p in PRESETS.values())
    g.add_argument("--preset", help=f"named steps and CFG ({presets}); explicit options win")
    g.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    add_mode_argument(g)


def add_generate_parser(sub: Any) -> None:
    """Add ``qwennb generate`` to the CLI."""
    g = sub.add_parser("generate", help="generate images (the embedded toy model when no weights are found)")
    g.add_argument("prompt", nargs="+", help="what to draw (quoted, or the words as they come)")
    _add_generation_options(g)
    g.add_argument("--n", type=int, default=1, help="number of images (1 to 16)")
    g.add_argument("--no-metadata", action="store_true", help="do not embed the parameters in the PNGs")
    g.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors file, folder or hub id) at SCALE (default 1); repeat for several",
    )
    g.add_argument(
        "--gpus", type=int, default=1, help="GPUs for the request: one worker process each (qwennb.parallel)"
    )
    g.add_argument("--init-image", help="image-to-image: start from this image file")
    g.add_argument(
        "--strength", type=float, help="img2img/inpainting: share of the image redrawn, 0 < s <= 1"
    )
    g.add_argument("--mask", help="inpainting: mask file (white redraws, black keeps), the init image's size")
    g.set_defaults(func=_cmd_generate)


def add_sweep_parser(sub: Any) -> None:
    """Add ``qwennb sweep`` to the CLI."""
    sw = sub.add_parser(
        "sweep",
        help="a grid of images over one or two of seed, cfg, steps, preset or a {placeholder} of the prompt",
        description="Example: qwennb sweep seed=1,2 cfg=1,4 --steps 20 --size 256x256 a red circle",
    )
    sw.add_argument("words", nargs="+", help="AXIS=v1,v2[,...] (one or two axes), then the prompt")
    _add_generation_options(sw)
    sw.set_defaults(func=_cmd_sweep)


def _options_from_args(args: argparse.Namespace, prompt: str, **more: Any) -> dict[str, Any]:
    from .options import validate_generate_options

    return validate_generate_options(
        {
            "prompt": prompt,
            "negative_prompt": args.negative,
            "steps": args.steps,
            "cfg": args.cfg,
            "seed": args.seed,
            "size": args.size,
            "aspect": args.aspect,
            "preset": args.preset,
            "mode": args.mode,
            "out": args.out,
            **more,
        }
    )


def _cli_loras(args: argparse.Namespace, model: str) -> list[tuple[str, float]] | None:
    """``--lora PATH[:SCALE]`` options, each checked against the model before anything loads."""
    if not getattr(args, "lora", None):
        return None
    from .lora import check_for_model, parse_spec

    specs = [parse_spec(x) for x in args.lora]
    for source, _ in specs:
        check_for_model(source, model)
    return specs


def _load_for_cli(args: argparse.Namespace) -> Any:
    import time

    from .hardware import detect
    from .pipeline import build, resolve_model
    from .plan import make_plan

    name, path, notice = resolve_model(args.model)
    if notice:
        print(f"qwennb: {notice}", file=sys.stderr)
    # A folder is sized from its own configs (a small model saved there is not Qwen-Image).
    source = path if args.model and path and os.path.isdir(args.model) else name
    from .models import get_model

    if get_model(name).licence:
        print(f"qwennb: licence: {get_model(name).licence}", file=sys.stderr)
    plan = make_plan(detect(), source, {"mode": args.mode} if args.mode else None)
    loras = _cli_loras(args, name)
    for w in plan.warnings:
        print(f"qwennb: {w}", file=sys.stderr)
    t0 = time.perf_counter()
    pipe = build(plan, path, loras=loras)
    print(f"qwennb: loaded {name} ({plan.arrangement}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import is_axis_word, parse_axes, plan_cells

    words = list(args.words)
    axis_words = []
    while words and is_axis_word(words[0]):
        axis_words.append(words.pop(0))
    prompt = " ".join(words).strip()
    if not prompt:
        raise QwennbError(
            "the sweep has no prompt: write it after the axes, e.g. qwennb sweep seed=1,2 a red circle"
        )
    axes = parse_axes(axis_words, prompt)
    opts = _options_from_args(args, prompt)
    for k in ("prompt", "out", "mode"):
        opts.pop(k, None)
    plan_cells(prompt, axes, opts)  # every cell is checked before the model loads
    pipe = _load_for_cli(args)
    from .sweep import run_sweep

    def on_cell(cell: Any, k: int, total: int) -> None:
        vals = ", ".join(f"{n}={v}" for n, v in cell.values.items())
        print(f"qwennb: cell {k}/{total} ({vals}): {cell.seconds:.1f} s", file=sys.stderr)

    sweep = run_sweep(pipe, prompt, axes, on_cell=on_cell, **opts)
    try:
        sweep.save(args.out)
    except OSError as exc:
        import tempfile

        rescue = sweep.save(tempfile.mkdtemp(prefix="qwennb-rescued-"))
        raise QwennbError(
            f"could not save to {args.out} ({exc.strerror or exc}); the grid was saved to {rescue}"
        ) from None
    if args.json:
        print(json.dumps(sweep.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(sweep.path)
        rows, cols = sweep.shape
        print(f"sweep {rows}x{cols}: {len(sweep.results)} images in {sweep.total_s:.1f} s")
    return 0


def _save_or_rescue(result: Any, out: str, embed_metadata: bool) -> None:
    """Save a result's PNGs; when that fails, save them in a temporary folder and say where (exit 2)."""
    import tempfile

    from .errors import GenerationError

    try:
        result.save(out, embed_metadata=embed_metadata)
    except (OSError, GenerationError) as exc:
        rescue = tempfile.mkdtemp(prefix="qwennb-rescued-")
        paths = result.save(rescue, embed_metadata=embed_metadata)
        raise QwennbError(
            f"could not save to {out} ({getattr(exc, 'strerror', None) or exc}); the image was saved to "
            f"{', '.join(paths)} instead: move it where you want it"
        ) from None


def _image_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--init-image``, ``--strength``, ``--mask``: read and checked before anything loads."""
    if args.init_image is None and args.strength is None and args.mask is None:
        return {}
    from .edit import check_strength, read_image, read_mask

    if args.init_image is None:
        raise QwennbError("--strength and --mask need --init-image")
    images: dict[str, Any] = {"init_image": read_image(args.init_image, role="init image")}
    if args.strength is not None:
        images["strength"] = check_strength(args.strength)
    if args.mask is not None:
        images["mask"] = read_mask(args.mask, images["init_image"].size)
    return images


def _step_bar() -> tuple[Callable[[Any], None], list[Any]]:
    """A tqdm step bar on stderr made at the first step, when the total is known (no empty "0step" bar before
    it), closed at the last step (before the decode, so its time is the denoising's). Returns the ``on_step``
    callback and the list holding the bar, for closing it on an early exit."""
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def on_step(s: Any) -> None:
        if not bars:
            disable = os.environ.get("QWENNB_NO_PROGRESS") == "1"
            bars.append(tqdm(total=s.total, unit="step", file=sys.stderr, disable=disable))
        bars[0].update(1)
        if s.step == s.total:
            bars[0].close()

    return on_step, bars


def _report_result(result: Any, args: argparse.Namespace) -> int:
    """Notices to stderr, the PNGs saved (or rescued to a temporary folder), then the paths or one JSON object."""
    _print_notices(result.notices)
    _save_or_rescue(result, args.out, not args.no_metadata)
    if args.json:
        d = result.to_dict()
        d.pop("plan")
        print(json.dumps(d, indent=2, ensure_ascii=False))
    else:
        for p in result.paths:
            print(p)
        print(f"{result.caption()}; median {result.median_step_s or 0:.3f} s/step")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:

    # Every option is checked before anything heavy is imported or loaded (torch, diffusers, the weights).
    opts = _options_from_args(args, args.prompt, num_images=args.n)
    images = _image_options(args)
    from .models import get_model
    from .pipeline import resolve_model

    if args.model and not _is_dir(args.model) and get_model(args.model).task == "image-edit":
        # before loading 57 GB that generate would refuse
        name = resolve_model(args.model)[0]
        raise QwennbError(f'{name} is an edit model: use `qwennb edit IMAGE... "instruction" --model {name}`')
    from .generation import generate

    session = None
    if args.gpus != 1:  # worker processes, one per GPU
        from .parallel import session_for
        from .session import Session

        session = session_for(Session(), args.gpus)
        report = session.load(args.model, {"mode": args.mode} if args.mode else None)
        print(
            f"qwennb: loaded {report.model} ({report.plan.arrangement}) in {report.seconds:.1f} s",
            file=sys.stderr,
        )
    else:
        pipe = _load_for_cli(args)
    on_step, bars = _step_bar()

    run = session.generate if session is not None else lambda *a, **k: generate(pipe, *a, **k)
    try:
        result = run(
            args.prompt,
            negative_prompt=opts.get("negative_prompt"),
            steps=opts.get("steps"),
            cfg=opts.get("cfg"),
            seed=opts.get("seed"),
            width=opts.get("width"),
            height=opts.get("height"),
            aspect=opts.get("aspect"),
            num_images=opts["num_images"],
            preset=opts.get("preset"),
            on_step=on_step,
            **images,
        )
    finally:
        for bar in bars:
            bar.close()
        if session is not None:
            session.unload()
    return _report_result(result, args)


# --------------------------------------------------------------------------- enhance, describe


class _Echo(logging.Handler):
    """The ``qwennb`` logger's warnings on stderr as ``qwennb: ...`` lines while a command runs, each line once:
    a notice that the library logs and the CLI prints from a result's ``notices`` appears one time (without this
    handler Python's last-resort handler printed it unprefixed as well)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.said: set[str] = set()

    def say(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            print(f"qwennb: {message}", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.say(record.getMessage())


_ECHO: _Echo | None = None


def _print_notices(notices: list[str]) -> None:
    for n in notices:
        if _ECHO is not None:
            _ECHO.say(n)
        else:
            print(f"qwennb: {n}", file=sys.stderr)


def _cmd_enhance(args: argparse.Namespace) -> int:
    from . import enhance as en

    if not args.prompt.strip():  # refused before a model loads, as a bad --image is
        raise QwennbError("the prompt is empty")
    if args.image:
        en.load_image(args.image)
    chosen = en._cli_model(args.model, args.device)
    context = args.context
    if args.image:
        d = en.describe_image(args.image, "style", max_new_tokens=args.max_new_tokens, **chosen)
        _print_notices(d.notices)
        context = " ".join(x for x in (context, d.text) if x)
    e = en.enhance_prompt(
        args.prompt,
        context=context,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        positive_magic=not args.no_magic,
        **chosen,
    )
    _print_notices(e.notices)
    if args.json:
        print(json.dumps(e.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(e.enhanced)
        print(f"qwennb: {e.language} · {e.model} · {e.seconds:.1f} s", file=sys.stderr)
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from . import enhance as en

    en.load_image(args.image)  # refuse a URL or a missing file before loading a model
    chosen = en._cli_model(args.model, args.device)
    d = en.describe_image(args.image, args.focus, max_new_tokens=args.max_new_tokens, **chosen)
    _print_notices(d.notices)
    if args.json:
        print(json.dumps(d.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(d.text)
        print(f"qwennb: {d.focus} · {d.model} · {d.seconds:.1f} s", file=sys.stderr)
    return 0


def add_enhance_parser(sub: Any) -> None:
    """Add ``qwennb enhance`` and ``qwennb describe`` to the CLI."""
    from . import enhance as en

    model_help = (
        "an image model (its text encoder writes: tiny, qwen-image, a folder) or a VL model (qwen2.5-vl-7b, "
        "qwen2-vl-7b, tiny-vl, tiny-vl2); default: the model `qwennb generate` would load"
    )
    e = sub.add_parser("enhance", help="rewrite a short prompt into a detailed one with a Qwen VL model")
    e.add_argument("prompt", nargs="+", help="the prompt (quoted, or the words as they come)")
    e.add_argument("--model", default=None, help=model_help)
    e.add_argument("--context", default=None, help="extra context, e.g. a style to follow")
    e.add_argument("--image", default=None, help="a reference image whose style is added as context")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    e.add_argument("--temperature", type=float, default=0.7)
    e.add_argument("--top-p", type=float, default=0.9)
    e.add_argument("--seed", type=int, default=None, help="sampling seed")
    e.add_argument("--no-magic", action="store_true", help="do not append the positive-magic suffix")
    e.add_argument("--device", default=None, help="where to load a VL model (cpu to allow host RAM)")
    e.add_argument("--json", action="store_true", help="one JSON object")
    e.set_defaults(func=_cmd_enhance)

    d = sub.add_parser("describe", help="describe an image's style or content, for use in a prompt")
    d.add_argument("image", help="path of the image (URLs are not fetched)")
    d.add_argument("--focus", choices=en.FOCUSES, default="style")
    d.add_argument("--model", default=None, help=model_help)
    d.add_argument("--max-new-tokens", type=int, default=200)
    d.add_argument("--device", default=None, help="where to load a VL model (cpu to allow host RAM)")
    d.add_argument("--json", action="store_true", help="one JSON object")
    d.set_defaults(func=_cmd_describe)


# --------------------------------------------------------------------------- download


def _print_download(res: Any, args: argparse.Namespace, free_where: str) -> None:
    from . import download as dl

    files = len(res.files)
    if args.dry_run:
        print(f"{res.repo_id} ({res.model}) at {res.revision[:12]} -> {res.dir}")
        print(f"{'bytes':>14}  file")
        for f in res.files:
            print(f"{f.size:>14,}  {f.path}")
        fits = "fits" if res.fits else "does NOT fit"
        print(
            f"total {dl.human_bytes(res.total_bytes)} in {files} files: {dl.human_bytes(res.present_bytes)} already "
            f"here, {dl.human_bytes(res.needed_bytes)} to fetch; {dl.human_bytes(res.free_bytes)} free at "
            f"{free_where}: {fits}"
        )
        return
    state = "complete" if res.complete else "INCOMPLETE"
    print(
        f"{res.repo_id} ({res.model}): {state}, {files} files, {dl.human_bytes(res.total_bytes)}, at {res.dir}"
    )
    if not res.complete:
        return
    if res.in_cache:
        default = (
            " and `qwennb generate` loads it by default"
            if res.model in ("qwen-image", dl.OPTIMAL_MODEL)
            else ""
        )
        print(f"`qwennb detect` will find it in the Hugging Face cache{default}")
    elif dl.get_model(res.model).architecture == "VL":
        print(f"load it from {res.dir}")
    else:
        print(
            f"`qwennb detect --dir {Path(res.dir).parent}` will find it; "
            f"`qwennb generate --model {res.dir} PROMPT` loads it"
        )


def _cmd_download_lora(args: argparse.Namespace) -> int:
    from . import download as dl
    from .lora import file_sha256
    from .pipeline import resolve_model

    model = args.lora_model
    if model is None:
        found = resolve_model()[0]
        model = found if found not in ("tiny", "toy") else "qwen-image"  # LoRAs are for the real model
    model = dl.get_model(model).name
    source, path = dl.fetch_lora(args.lora, model)
    digest = file_sha256(path)
    if args.json:
        print(
            json.dumps({"lora": args.lora, "model": model, "source": source, "path": path, "sha256": digest})
        )
    else:
        print(f"{source} (for {model}): {path}, sha256 {digest[:16]}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from . import download as dl

    if getattr(args, "lora", None):
        return _cmd_download_lora(args)
    names = [dl.OPTIMAL_MODEL] if args.optimal else [args.model]
    if args.optimal:
        dl._notice(
            "--optimal: Qwen/Qwen-Image-2512, the newest Apache-2.0 text-to-image release (Dec 2025, the same "
            "architecture as Qwen-Image; every plan, bf16, fp8, offload or NF4, loads its bf16 weights: the same "
            "files for any GPU)"
        )
    if args.with_vl:
        names.append(args.with_vl)
    names = list(dict.fromkeys(dl.get_model(n).name for n in names))
    results = dl.download(names, args.dir, dry_run=args.dry_run, revision=args.revision)
    if args.json:
        out: Any = results[0].to_dict() if len(results) == 1 else {"models": [r.to_dict() for r in results]}
        print(json.dumps(out, indent=2))
    else:
        where = dl.free_disk_bytes(args.dir or dl._cache_root())[1]
        for res in results:
            _print_download(res, args, where)
        if args.dry_run:
            print("dry run: nothing was fetched")
    for res in results:
        if res.downloaded and not res.complete:
            raise dl.DownloadError(
                f"{res.repo_id} at {res.dir} is incomplete after the download ({'; '.join(res.problems[:3])}); "
                "run the same command again"
            )
    return 0


def add_download_parser(sub: Any) -> None:
    """Add ``qwennb download`` to the CLI.

    Example:
        $ qwennb download --optimal --dry-run
    """
    from . import download as dl

    vl = [s.name for s in dl.REGISTRY.values() if s.architecture == "VL" and s.hub_id]
    d = sub.add_parser("download", help="fetch Qwen-Image (or another registry model) from the hub, checked")
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--optimal",
        action="store_true",
        help="the newest Apache-2.0 text-to-image release, Qwen/Qwen-Image-2512 (any plan loads these files)",
    )
    what.add_argument(
        "--model", help="one registry model: " + ", ".join(s.name for s in dl.REGISTRY.values())
    )
    what.add_argument(
        "--lora",
        metavar="LORA",
        help="a LoRA: lightning-8 or lightning-4 (the Lightning LoRA for --for-model, default the local model "
        "or qwen-image), or owner/repo/FILE.safetensors",
    )
    d.add_argument("--for-model", dest="lora_model", help="with --lora: the model the Lightning LoRA is for")
    d.add_argument("--with-vl", choices=vl, help="also fetch this vision-language model")
    d.add_argument("--dir", help="put each model in DIR/<name> (default: the Hugging Face cache)")
    d.add_argument(
        "--dry-run", action="store_true", help="list files, sizes and free disk space; fetch nothing"
    )
    d.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=_cmd_download)


def add_batch_arguments(b: argparse.ArgumentParser, out_default: str | None = None) -> None:
    """The options of ``qwennb batch`` (and of ``%qwen batch``, where ``--out`` has a default)."""
    b.add_argument(
        "file", help="prompts: .jsonl (one object a line), .csv with a header, or text (one a line)"
    )
    b.add_argument(
        "--out",
        required=out_default is None,
        default=out_default,
        help="output folder (rerun on it to resume)",
    )
    b.add_argument("--model", default=None, help="registry name, hub id or folder (default as for generate)")
    b.add_argument("--steps", type=int, help="steps for lines that give none")
    b.add_argument("--cfg", type=float, help="true_cfg_scale for lines that give none")
    b.add_argument("--size", help="WIDTHxHEIGHT for lines that give none")
    b.add_argument("--aspect", help="official aspect ratio for lines that give none")
    b.add_argument("--preset", help="preset for lines that give none")
    b.add_argument("--negative", "--negative-prompt", help="negative prompt for lines that give none")
    b.add_argument(
        "--ray",
        metavar="auto|local|ADDRESS",
        help="run on Ray: auto (the running cluster), local (start one here) or an address",
    )
    b.add_argument("--workers", type=int, help="worker processes on CPU (or at most this many GPUs on Ray)")
    b.add_argument("--gpus", help="use at most N local GPUs, or these (e.g. 0,2); default every free GPU")
    b.add_argument("--strict", action="store_true", help="refuse the file if any line is bad")
    b.add_argument("--max-attempts", type=int, default=3, help="tries per item before it counts as failed")
    b.add_argument("--no-sheet", action="store_true", help="no contact sheet at the end")
    b.add_argument("--json", action="store_true", help="the last line of output is one JSON object")


def batch_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run_batch`` keyword arguments from parsed batch arguments (checked before anything loads)."""
    if args.workers is not None and args.workers < 1:
        raise QwennbError(f"--workers must be at least 1, got {args.workers}")
    if args.max_attempts < 1:
        raise QwennbError(f"--max-attempts must be at least 1, got {args.max_attempts}")
    if args.size and args.aspect:
        raise QwennbError("give --size or --aspect, not both")
    if args.aspect:
        from .presets import ASPECT_RATIOS

        if args.aspect not in ASPECT_RATIOS:
            raise QwennbError(
                f"unknown aspect ratio {args.aspect!r}; choose one of: {', '.join(ASPECT_RATIOS)}"
            )
    if args.preset:
        from .presets import get_preset

        get_preset(args.preset)
    gpus: Any = None
    if args.gpus:
        try:
            gpus = [int(x) for x in args.gpus.split(",")] if "," in args.gpus else int(args.gpus)
        except ValueError:
            raise QwennbError(f"--gpus must be a count or a list like 0,1; got {args.gpus!r}") from None
    size = None
    if args.size:
        from .generation import parse_size

        size = parse_size(args.size)
    return {
        "model": args.model,
        "steps": args.steps,
        "cfg": args.cfg,
        "size": size,
        "aspect": args.aspect,
        "preset": args.preset,
        "negative": args.negative,
        "strict": args.strict,
        "ray": args.ray,
        "workers": args.workers,
        "gpus": gpus,
        "max_attempts": args.max_attempts,
        "sheet": not args.no_sheet,
        "overrides": {"mode": args.mode} if getattr(args, "mode", None) else None,
    }


def _cmd_batch(args: argparse.Namespace) -> int:
    import os

    from tqdm.auto import tqdm

    from .batch import run_batch

    options = batch_options(args)
    bar: Any = None

    def on_event(e: Any) -> None:
        nonlocal bar
        if e.kind == "start":
            for p in e.problems:
                print(f"qwennb: skipped {p}", file=sys.stderr)
            bar = tqdm(
                total=e.total,
                initial=e.skipped,
                unit="img",
                file=sys.stderr,
                disable=os.environ.get("QWENNB_NO_PROGRESS") == "1",
            )
        elif bar is not None and e.kind in ("item_done", "item_failed"):
            bar.update(1)
            bar.set_postfix(failed=e.failed, refresh=False)
        elif e.kind in ("item_retry", "stopping"):
            print(f"qwennb: {e.item_id + ': ' if e.item_id else ''}{e.message}", file=sys.stderr)

    try:
        result = run_batch(args.file, args.out, on_event=on_event, **options)
    finally:
        if bar is not None:
            bar.close()
    # The run is over and its manifest written: a Ctrl-C now must not cost the summary (or the JSON line a script
    # reads), so it is held off while they print.
    held = _hold_sigint()
    try:
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            print(result.summary())
        sys.stdout.flush()
    finally:
        held()
    return 130 if result.interrupted else (1 if result.failed else 0)


def _hold_sigint() -> Callable[[], None]:
    """Ignore SIGINT until the returned function is called (a no-op outside the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    return lambda: signal.signal(signal.SIGINT, previous)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qwennb`` command."""
    p = _Parser(prog="qwennb", description="Run Qwen-Image from a notebook or the shell.")
    p.add_argument("--version", action="version", version=f"qwennb {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("detect", help="what GPU, memory, front end and local models this machine has")
    d.add_argument("--json", action="store_true", help="one JSON object")
    d.add_argument("--dir", help="look for models in this folder instead of the Hugging Face cache")
    d.set_defaults(func=_cmd_detect)

    m = sub.add_parser("models", help="the models qwennb knows, with parameter counts")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)

    pl = sub.add_parser("plan", help="how a model would be loaded on this (or a described) machine")
    pl.add_argument(
        "--model",
        help="a registry name or a model folder (default: qwen-image; the embedded model where there is no GPU)",
    )
    pl.add_argument("--gpu-memory", help="plan for a card with this much memory, e.g. 24GB")
    pl.add_argument("--gpu-name", help="name of the described card")
    pl.add_argument("--no-bf16", action="store_true", help="the described card has no bf16 (pre-Ampere)")
    pl.add_argument(
        "--host-ram",
        help=f"host RAM, e.g. 64GB (default: {DESCRIBED_DEFAULTS['host_ram']} for a described card, else this machine's)",
    )
    pl.add_argument(
        "--compute-capability",
        help=f"of the described card, e.g. 8.6 (default: {DESCRIBED_DEFAULTS['compute_capability']}; 7.5 with --no-bf16)",
    )
    pl.add_argument(
        "--pcie-gen",
        type=int,
        help=f"PCIe generation of the described card (default: {DESCRIBED_DEFAULTS['pcie_gen']})",
    )
    pl.add_argument(
        "--pcie-width",
        type=int,
        help=f"PCIe lanes of the described card (default: {DESCRIBED_DEFAULTS['pcie_width']})",
    )
    pl.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="spread one request over N identical GPUs (with --gpu-memory: the described machine has N); "
        "the plan says which parallel mode and why",
    )
    pl.add_argument(
        "--tflops",
        type=float,
        help="dense bf16 TFLOP/s of the described card (default: typical of its compute capability: "
        + ", ".join(f"{cc} {v:g}" for cc, v in _typical_tflops().items())
        + ")",
    )
    pl.add_argument("--fp32", action="store_true", help="run in float32 (twice the memory)")
    pl.add_argument(
        "--force", action="store_true", help="plan even where it would be very slow (CPU, no bf16)"
    )
    add_mode_argument(pl)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plan)

    add_generate_parser(sub)
    add_sweep_parser(sub)
    add_edit_parser(sub)
    add_enhance_parser(sub)
    add_download_parser(sub)

    b = sub.add_parser(
        "batch", help="many images from a prompt file, resumable, on every GPU or a Ray cluster"
    )
    add_batch_arguments(b)
    add_mode_argument(b)
    b.set_defaults(func=_cmd_batch)
    return p


def add_edit_parser(sub: Any) -> None:
    """``qwennb edit IMAGE [IMAGE...] "instruction"``."""
    e = sub.add_parser(
        "edit",
        help="edit images by an instruction (Qwen-Image-Edit; the embedded toy edit model when no weights are found)",
        usage="%(prog)s [options] IMAGE [IMAGE ...] INSTRUCTION",
    )
    e.add_argument(
        "inputs", nargs="+", metavar="IMAGE... INSTRUCTION", help="1 to 3 image files, then the instruction"
    )
    e.add_argument(
        "--model",
        default=None,
        help="edit model: registry name, hub id or folder (default: local 2511/2509/edit, else the embedded toy-edit)",
    )
    e.add_argument("--steps", type=int)
    e.add_argument("--cfg", type=float, help="true_cfg_scale (1 turns guidance off)")
    e.add_argument("--seed", type=int)
    e.add_argument(
        "--size", help="output WIDTHxHEIGHT (default: the first image's, rounded to multiples of 16)"
    )
    e.add_argument("--negative", "--negative-prompt", default=None, help="negative prompt")
    e.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    e.add_argument("--no-metadata", action="store_true", help="do not embed the parameters in the PNGs")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_mode_argument(e)
    e.set_defaults(func=_cmd_edit)


def _cmd_edit(args: argparse.Namespace) -> int:
    import time

    from .edit import check_edit_inputs, edit, plan_edit, resolve_edit_model
    from .generation import parse_size
    from .hardware import detect
    from .options import validate_generate_options
    from .pipeline import build

    if len(args.inputs) < 2:
        raise QwennbError('give at least one image and the instruction: qwennb edit IMAGE "instruction"')
    *paths, instruction = args.inputs
    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    name, path, notice = resolve_edit_model(args.model)
    images = check_edit_inputs(name, paths, instruction)  # before anything loads
    validate_generate_options(
        {"steps": args.steps, "cfg": args.cfg, "seed": args.seed, "negative_prompt": args.negative}
    )
    if notice:
        print(f"qwennb: {notice}", file=sys.stderr)
    plan = plan_edit(detect(), name, {"mode": args.mode} if args.mode else None, references=len(images))
    for w in plan.warnings:
        print(f"qwennb: {w}", file=sys.stderr)
    t0 = time.perf_counter()
    pipe = build(plan, path)
    print(f"qwennb: loaded {name} ({plan.arrangement}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    on_step, bars = _step_bar()
    try:
        result = edit(
            pipe,
            images,
            instruction,
            negative_prompt=args.negative,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            width=width,
            height=height,
            on_step=on_step,
        )
    finally:
        for bar in bars:
            bar.close()
    return _report_result(result, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwennb`` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `sweep` takes words after its options (the prompt follows them)
        if getattr(args, "command", None) != "sweep" or any(w.startswith("-") for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.words += extra
    if isinstance(getattr(args, "prompt", None), list):  # `qwennb generate a red fox` as `"a red fox"`
        args.prompt = " ".join(args.prompt)
    global _ECHO
    logger, _ECHO = logging.getLogger("qwennb"), _Echo()
    logger.addHandler(_ECHO)
    try:
        return int(args.func(args) or 0)
    except QwennbError as exc:
        print(f"qwennb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qwennb: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qwennb ... | head`
        sys.stderr.close()
        return 0
    finally:
        logger.removeHandler(_ECHO)
        _ECHO = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
