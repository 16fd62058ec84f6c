"""The GEMMs of one Qwen-Image-2.1 cached-step block, timed alone: separate projections against packed ones.

Rerun on a CUDA machine:

    python benchmarks/gemm21.py --out benchmarks/results

A cached step of the 2.1 tuned path (``qwennb.speed21``) at 1024x1024 with CFG runs, per block, on ``M = 2 x 4096``
image tokens (the CFG pair) of width 4096: Q, K and V (three 4096->4096 GEMMs, or one 4096->12288 when packed),
the attention output (4096->4096), the SwiGLU's two inputs (two 4096->12288, or one 4096->24576 when packed) and
its output (12288->4096). The script times each with CUDA events (``F.linear``, bf16, random weights; median of
``--repeats`` after warm-up) and an 8192^3 GEMM for comparison, and writes
``gemm21-<card>.json`` and ``.md``: the per-block GEMM time and TFLOP/s, separate and packed. It explains the
``packed`` rows of ``benchmarks/speed21.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from stock_steps import card_slug  # benchmarks/ is the script's folder


def time_linear(m: int, k: int, n: int, repeats: int, device: str) -> float:
    """Median seconds of ``F.linear`` of ``[m, k]`` by ``[n, k]`` (bf16 on CUDA, fp32 on the CPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.nn.functional.linear(x, w)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokens", type=int, default=8192, help="rows: 2 x 4096 for a CFG pair at 1024x1024")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="small shapes on the CPU, to check the script")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gemm21.py times CUDA GEMMs: no GPU here (--smoke checks the script on the CPU)", file=sys.stderr
        )
        return 2
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.tokens, args.width, args.mlp, args.repeats = 64, 32, 96, 3
    m, c, f = args.tokens, args.width, args.mlp
    shapes = {  # name: (k, n, how many a block runs)
        "q, k, v": (c, c, 3),
        "qkv packed": (c, 3 * c, 1),
        "attention out": (c, c, 1),
        "mlp proj, gate": (c, f, 2),
        "mlp packed": (c, 2 * f, 1),
        "mlp out": (f, c, 1),
    }
    rows = []
    for name, (k, n, count) in shapes.items():
        s = time_linear(m, k, n, args.repeats, device)
        rows.append(
            {
                "gemm": name,
                "m": m,
                "k": k,
                "n": n,
                "per_block": count,
                "ms": s * 1e3,
                "tflops": 2 * m * k * n / s / 1e12,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    big = 8192 if not args.smoke else 64
    s = time_linear(big, big, big, args.repeats, device)
    ceiling = 2 * big**3 / s / 1e12
    by = {r["gemm"]: r for r in rows}

    def block(names: list[str]) -> tuple[float, float]:
        ms = sum(by[n]["ms"] * by[n]["per_block"] for n in names)
        flop = sum(2 * by[n]["m"] * by[n]["k"] * by[n]["n"] * by[n]["per_block"] for n in names)
        return ms, flop / (ms / 1e3) / 1e12

    separate = block(["q, k, v", "attention out", "mlp proj, gate", "mlp out"])
    packed = block(["qkv packed", "attention out", "mlp packed", "mlp out"])
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)"
    result = {
        "card": card,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device,
        "rows": rows,
        "square_ceiling_tflops": ceiling,
        "block_ms_separate": separate[0],
        "block_tflops_separate": separate[1],
        "block_ms_packed": packed[0],
        "block_tflops_packed": packed[1],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gemm21-{card_slug(card)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# 2.1 block GEMMs on {card} (M = {m}, bf16, median of {args.repeats}; torch {torch.__version__})",
        "",
        "| GEMM | k | n | per block | ms | TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['gemm']} | {r['k']} | {r['n']} | {r['per_block']} | {r['ms']:.3f} | {r['tflops']:.0f} |"
            for r in rows
        ],
        "",
        f"Per block: separate {separate[0]:.3f} ms ({separate[1]:.0f} TFLOP/s), packed {packed[0]:.3f} ms "
        f"({packed[1]:.0f} TFLOP/s); an {big}^3 GEMM runs at {ceiling:.0f} TFLOP/s.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.smoke:
        print("SMOKE RUN on the CPU: these numbers mean nothing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
