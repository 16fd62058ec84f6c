"""The ``qwennb`` command: detect, models, plan, generate.

Every user error exits with status 2 and one line on stderr (no traceback).

Example:
    $ qwennb plan --model qwen-image --gpu-memory 24GB --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import QwennbError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (argparse's own convention)
        self.exit(2, f"qwennb: error: {message}\n")


def _cmd_detect(args: argparse.Namespace) -> int:
    from .hardware import detect
    from .models import find_local_models

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
        print("models: no Qwen-Image snapshot found locally (the tiny stand-in will be used)")
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
    print(f"{'name':<22}{'hub id':<30}{'params':>16}  {'bf16 GiB':>9}  task")
    for r in rows:
        gib = r["total_params"] * 2 / 1024**3
        print(f"{r['name']:<22}{r['hub_id'] or '-':<30}{r['total_params']:>16,}  {gib:>9.2f}  {r['task']}")
    return 0


def _machine_from_args(args: argparse.Namespace) -> Any:
    from .hardware import detect
    from .plan import describe_machine, parse_memory

    if args.gpu_memory is None and args.gpu_name is None and not args.no_bf16 and args.host_ram is None:
        return detect()
    host = parse_memory(args.host_ram) if args.host_ram else 64.0
    if args.gpu_memory is None:
        if args.gpu_name or args.no_bf16:
            raise QwennbError("--gpu-name and --no-bf16 describe a card: give its --gpu-memory too")
        hw = detect()
        hw.host_ram_gb = hw.host_ram_available_gb = host
        return hw
    return describe_machine(
        gpu_memory_gb=parse_memory(args.gpu_memory),
        gpu_name=args.gpu_name,
        bf16=not args.no_bf16,
        host_ram_gb=host,
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import OptimizationConfig, make_plan

    overrides = OptimizationConfig(force=args.force, dtype="float32" if args.fp32 else None, mode=args.mode)
    plan = make_plan(_machine_from_args(args), args.model, overrides)
    print(plan.to_json() if args.json else plan.table())
    return 0


def add_mode_argument(parser: argparse.ArgumentParser) -> None:
    """``--mode`` with the modes of :data:`qwennb.plan.MODES` and what each trades."""
    from .plan import MODES

    parser.add_argument(
        "--mode",
        choices=list(MODES),
        help="; ".join(f"{name}: {text}" for name, (_, text) in MODES.items()).replace("%", "%%"),
    )


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
    b.add_argument("--negative", help="negative prompt for lines that give none")
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
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.summary())
    return 130 if result.interrupted else (1 if result.failed else 0)


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
    pl.add_argument("--model", default="qwen-image")
    pl.add_argument("--gpu-memory", help="plan for a card with this much memory, e.g. 24GB")
    pl.add_argument("--gpu-name", help="name of the described card")
    pl.add_argument("--no-bf16", action="store_true", help="the described card has no bf16 (pre-Ampere)")
    pl.add_argument("--host-ram", help="host RAM of the described machine, e.g. 64GB")
    pl.add_argument("--fp32", action="store_true", help="run in float32 (twice the memory)")
    pl.add_argument(
        "--force", action="store_true", help="plan even where it would be very slow (CPU, no bf16)"
    )
    add_mode_argument(pl)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plan)

    try:
        from .generation import add_generate_parser
    except ImportError:  # pragma: no cover - while generate is being written
        pass
    else:
        add_generate_parser(sub)
    from .enhance import add_enhance_parser

    add_enhance_parser(sub)
    from .download import add_download_parser

    add_download_parser(sub)

    b = sub.add_parser(
        "batch", help="many images from a prompt file, resumable, on every GPU or a Ray cluster"
    )
    add_batch_arguments(b)
    add_mode_argument(b)
    b.set_defaults(func=_cmd_batch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwennb`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
