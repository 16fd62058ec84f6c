"""GPU memory of each phase of one image: text encoding, denoising, VAE decode (and the decode in tiles).

The plan sizes a model's memory as weights plus each phase's working memory (``qwennb.plan``: activations a
token, VAE decode a megapixel, text encoding). This measures those working memories for one model, whole on one
GPU: the peak above what was allocated when each phase began (``max_memory_allocated``, reset at the start of
the phase), from forward hooks on the text encoder and transformer and a wrapper around ``vae.decode``.

    python benchmarks/phase_memory.py --model qwen-image-2.1-synthetic [--size 1024] [--steps 3] [--tuned]
    python benchmarks/phase_memory.py --smoke            # CPU, the tiny model: checks the script runs

Writes ``benchmarks/results/phase-memory-<model>-<card>.json`` (``--out`` for another folder): ``card``,
``model``, ``size``, ``cfg``, ``weights_gb`` (allocated after loading), ``phases`` (name -> peak GiB above the
phase's start), ``plan`` (the plan's own figures for the same phases).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from stock_steps import card_slug as slug  # benchmarks/ is the script's folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(
    model: str, size: int, steps: int, cfg: float, tuned: bool, smoke: bool, compiled: bool = False
) -> dict[str, Any]:
    import torch

    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import build
    from qwennb.plan import make_plan

    cuda = torch.cuda.is_available() and not smoke
    gib = 1024**3
    overrides: dict[str, Any] = (
        {"enable_vae_tiling": False} if compiled else {"compile": False, "enable_vae_tiling": False}
    )
    if not cuda:
        overrides["device"] = "cpu"
    plan = make_plan(detect(), model, overrides, width=size, height=size)
    pipe = build(plan)
    if tuned and cuda and type(pipe.transformer).__name__ == "QwenImage21Transformer2DModel":
        from qwennb.speed21 import enable_fast_path_21

        enable_fast_path_21(pipe.transformer, compile=False)
    phases: dict[str, float] = {}
    start: dict[str, float] = {}

    def begin(name: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            start[name] = torch.cuda.memory_allocated() / gib
            torch.cuda.reset_peak_memory_stats()

    def end(name: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / gib - start[name]
            phases[name] = round(max(phases.get(name, 0.0), peak), 3)

    def hooks(module: Any, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: begin(name))
        module.register_forward_hook(lambda *_: end(name))

    hooks(pipe.text_encoder, "text_encoding")
    hooks(pipe.transformer, "denoise_step")
    decode = pipe.vae.decode

    def timed_decode(*a: Any, **k: Any) -> Any:
        begin("vae_decode")
        out = decode(*a, **k)
        end("vae_decode")
        return out

    pipe.vae.decode = timed_decode
    weights = torch.cuda.memory_allocated() / gib if cuda else 0.0
    t0 = time.perf_counter()
    generate(pipe, "a red fox reading a newspaper", steps=steps, width=size, height=size, cfg=cfg, seed=0)
    pipe.vae.enable_tiling()
    phases_untiled = dict(phases)
    phases.pop("vae_decode", None)
    generate(pipe, "a red fox reading a newspaper", steps=2, width=size, height=size, cfg=cfg, seed=0)
    tiled = phases.get("vae_decode")
    from qwennb import plan as P

    tokens = P.image_tokens(size, size)
    return {
        "model": model,
        "size": size,
        "cfg": cfg,
        "steps": steps,
        "tuned_path_eager": tuned,
        "compiled": compiled,
        "weights_gb": round(weights, 2),
        "phases": {**phases_untiled, "vae_decode_tiled": tiled},
        "plan": {
            "activations_gb": round(P.ACT_BASE_GIB + P.ACT_PER_TOKEN_GIB * tokens * (2 if cfg > 1 else 1), 3),
            "vae_decode_gb": round(P.VAE_DECODE_GIB_PER_MP * size * size / 1e6, 3),
            "vae_decode_tiled_gb": P.VAE_TILED_GIB,
            "text_encoding_gb": P.TEXT_ACT_GIB,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen-image-2.1-synthetic")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument(
        "--tuned", action="store_true", help="Qwen-Image-2.1: its tuned path (eager) for the steps"
    )
    ap.add_argument(
        "--compiled", action="store_true", help="the plan's default path (compiled), as users run it"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny model, 64x64: checks the script runs")
    args = ap.parse_args()
    import torch

    if args.smoke:
        args.model, args.size, args.steps = "tiny", 64, 2
    if not args.smoke and not torch.cuda.is_available():
        print(
            "no CUDA GPU: nothing to measure (run with --smoke to check the script on a CPU)", file=sys.stderr
        )
        return 2
    card = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    row = measure(args.model, args.size, args.steps, args.cfg, args.tuned, args.smoke, args.compiled)
    row = {"card": card, "torch": torch.__version__, **row}
    out = Path(args.out or ("/tmp/qwennb-phase-memory" if args.smoke else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"phase-memory-{slug(args.model)}{'-compiled' if args.compiled else ''}-{slug(card)}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
