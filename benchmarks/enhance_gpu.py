"""Prompt enhancement on a GPU with the full-size text encoder (Qwen2.5-VL-7B shapes, random weights).

Measures the latency of a 200-token rewrite through ``qwennb.enhance.enhance_prompt`` with the pipeline's own
text encoder (greedy), and the GPU memory it needs. With random weights the text is noise (and qwennb falls
back to the prompt), but the cost is the real one: it depends on shapes, not on weight values.

    python benchmarks/enhance_gpu.py --out benchmarks/results

Writes ``enhance-<card>.json`` and prints a line per run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from qwennb.enhance import enhance_prompt
    from qwennb.stand_ins import build_synthetic_pipeline

    card = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    pipe = build_synthetic_pipeline("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    base = torch.cuda.memory_allocated() / 1024**3
    runs = []
    for i in range(args.repeats + 1):
        torch.cuda.reset_peak_memory_stats()
        e = enhance_prompt("a red fox reading a newspaper in a cafe", pipe=pipe, max_new_tokens=args.tokens)
        torch.cuda.synchronize()
        row = {
            "seconds": round(e.seconds, 3),
            "new_tokens": e.new_tokens,
            "tokens_per_s": round(e.new_tokens / e.seconds, 1) if e.seconds else None,
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            "extra_over_weights_gb": round(torch.cuda.max_memory_allocated() / 1024**3 - base, 2),
            "fallback_reason": e.fallback_reason,
            "warmup": i == 0,
        }
        runs.append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in runs if not r["warmup"]]
    record = {
        "card": card,
        "torch": torch.__version__,
        "text_encoder": "Qwen2_5_VLForConditionalGeneration, Qwen2.5-VL-7B shapes, random weights, bf16",
        "max_new_tokens": args.tokens,
        "load_s": round(load_s, 1),
        "pipeline_weights_gpu_gb": round(base, 2),
        "text_encoder_gpu_gb": round(
            sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters()) / 1024**3, 2
        ),
        "median_seconds": statistics.median(r["seconds"] for r in timed),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gpu_gb": max(r["peak_gpu_gb"] for r in timed),
        "extra_over_weights_gb": max(r["extra_over_weights_gb"] for r in timed),
        "runs": runs,
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"enhance-{slug}.json").write_text(json.dumps(record, indent=2))
    print(
        f"{card}: {args.tokens}-token rewrite {record['median_seconds']:.2f} s "
        f"({record['median_tokens_per_s']:.0f} tokens/s); text encoder {record['text_encoder_gpu_gb']:.2f} GiB, "
        f"{record['extra_over_weights_gb']:.2f} GiB more while generating"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
