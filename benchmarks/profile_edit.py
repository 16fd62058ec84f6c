"""Kernel time by kind in one tuned edit step (1024², one reference, CFG 4), with SDPA's cuDNN attention and with
FlashAttention-4 (``--fa4``), to say where an edit step's time goes and what a faster attention kernel changes.

    python benchmarks/profile_edit.py --out benchmarks/results/profiles [--fa4]

Builds the synthetic Edit-2511 stand-in, plans and applies qwennb's tuned path, runs one edit to compile, then
profiles a 3-step edit with ``torch.profiler`` and writes ``edit-step-kernels-<card>[-fa4].txt``: GPU time per
kernel class (GEMM, attention, the rest) per step and the top kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from edit import INSTRUCTION, SEED, build, references  # benchmarks/ is the script's folder
from stock_steps import card_slug

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n:
        return "attention"
    if "gemm" in n or "sm90_xmma" in n or "cutlass" in n or "nvjet" in n or "cublas" in n:
        return "gemm"
    if "triton" in n:
        return "triton"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/profiles")
    ap.add_argument("--fa4", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this profile needs one", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from qwennb.edit import edit, plan_edit
    from qwennb.hardware import detect
    from qwennb.pipeline import apply_plan

    if args.fa4:
        from qwennb.attention import enable_flash4

        enable_flash4()
    pipe = build("2511", "cuda")
    plan = plan_edit(detect(), "qwen-image-edit-synthetic", references=1)
    pipe.qwennb = {"model": "qwen-image-edit-synthetic", "path": None, "plan": plan, "load_s": 0.0}
    apply_plan(pipe, plan)
    refs = references(1, 1024)

    def run(steps: int):
        return edit(
            pipe,
            refs,
            INSTRUCTION,
            steps=steps,
            cfg=4.0,
            seed=SEED,
            width=1024,
            height=1024,
            reference_area=1024 * 1024,
        )

    run(4)  # compiles
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run(args.steps)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        t = e.device_time_total / 1e3 / args.steps  # ms a step
        totals[kind(e.key)] = totals.get(kind(e.key), 0.0) + t
        rows.append((t, e.count // args.steps, e.key[:110]))
    rows.sort(reverse=True)
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fa4={args.fa4}; edit 1024², 1 reference, "
        f"CFG 4; GPU ms a step (steps {args.steps}, wall s/step {r.median_step_s:.4f})"
    ]
    lines += [f"{k:10s} {v:8.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines.append(f"{'sum':10s} {sum(totals.values()):8.1f}")
    lines += [f"{t:8.2f} ms x{c:<5d} {name}" for t, c, name in rows[:25]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (
        out / f"edit-step-kernels-{card_slug(torch.cuda.get_device_name())}{'-fa4' if args.fa4 else ''}.txt"
    ).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
