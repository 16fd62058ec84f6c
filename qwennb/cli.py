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
    overrides = OptimizationConfig(force=args.force, dtype="float32" if args.fp32 else None, mode=args.mode)
    plan = make_plan(hw, model or "qwen-image", overrides)
    print(plan.to_json() if args.json else plan_text(plan))
    return 0


def _params(model: str) -> int:
    from .models import component_sizes

    return sum(s.params for s in component_sizes(model).values())


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def add_mode_argument(parser: argparse.ArgumentParser) -> None:
    """``--mode`` with the modes of :data:`qwennb.plan.MODES` and what each trades."""
    from .plan import MODES

    parser.add_argument(
        "--mode",
        choices=list(MODES),
        help="; ".join(f"{name}: {text}" for name, (_, text) in MODES.items()).replace("%", "%%"),
    )


def _typical_tflops() -> dict[str, float]:
    from .hardware import TYPICAL_BF16_TFLOPS

    return TYPICAL_BF16_TFLOPS


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
