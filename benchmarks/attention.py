"""Attention alone at Qwen-Image's shapes: SDPA's cuDNN, flash (FA2) and memory-efficient kernels against
FlashAttention-4 (``qwennb.attention.enable_flash4``), speed and error.

Rerun on a CUDA machine (FA4 rows need ``pip install flash-attn-4`` and a card of compute capability 9.x or 10.x):

    python benchmarks/attention.py --out benchmarks/results

Cases (bf16, head dim 128, the CFG pair as a batch of 2): Qwen-Image at 1024² (24 heads, 4,096 image + 32 text
tokens) and 1328² (6,889 + 32), one edit at 1024² with one reference (8,192 image tokens + 320 text and vision),
and Qwen-Image-2.1's cached step at 1024² (32 heads, 4,096 queries against 4,160 keys). Each kernel is timed with
CUDA events (median of ``--repeats`` after warm-up, inputs laid out as the tuned path gives them: ``[B, S, H, D]``
transposed), and its output compared with a float32 reference of the same inputs (relative L2 error). One more row
per case runs FA4 inside ``torch.compile`` (as the tuned path calls attention) and checks that it matches eager
FA4. Writes ``attention-<card>.json`` and ``.md``. ``--smoke`` checks the flow on the CPU (math kernel only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from stock_steps import card_slug  # benchmarks/ is the script's folder
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, batch, heads, queries, keys)
CASES = [
    ("qwen-image 1024² CFG pair", 2, 24, 4096 + 32, 4096 + 32),
    ("qwen-image 1328² CFG pair", 2, 24, 6889 + 32, 6889 + 32),
    ("edit 1024², 1 reference, CFG pair", 2, 24, 8192 + 320, 8192 + 320),
    ("qwen-image-2.1 1024² cached step, CFG pair", 2, 32, 4096, 4096 + 64),
]
KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash (FA2)": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def inputs(b: int, h: int, sq: int, sk: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(b, sq, h, 128, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(b, sk, h, 128, device=device, dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(b, sk, h, 128, device=device, dtype=dtype, generator=g).transpose(1, 2)
    return q, k, v


def timed(fn, repeats: int, device: str) -> float:
    for _ in range(3):
        fn()
    if device != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def kernel_name(fn) -> str:
    """The name of the longest GPU kernel of one call (which kernel really ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    if not events:
        return "?"
    return max(events, key=lambda e: e.device_time_total).key[:90]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


def render(rec: dict) -> str:
    lines = [
        f"# Attention kernels alone — {rec['card']}",
        "",
        f"torch {rec['torch']}, flash-attn-4 {rec.get('flash_attn_4') or 'not installed'}; bf16, head dim 128, "
        f"median of {rec['repeats']} after warm-up. `rel_err`: relative L2 error of the output against float32.",
        "",
        "| case | kernel | ms | TFLOP/s | vs cuDNN | rel_err | GPU kernel |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rec["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['kernel']} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['kernel']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r.get('speedup_vs_cudnn', 1):.3f}× "
            f"| {r['rel_err']:.2e} | `{r.get('gpu_kernel', '')}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="the flow on the CPU, one small case, math kernel")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke on a CPU", file=sys.stderr)
        return 2
    from qwennb.attention import disable_flash4, enable_flash4, flash4_unavailable

    card = torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke"
    try:
        from importlib.metadata import version

        fa4_version = version("flash-attn-4")
    except Exception:
        fa4_version = None
    rec = {
        "card": card,
        "torch": torch.__version__,
        "flash_attn_4": fa4_version,
        "flash4_unavailable": flash4_unavailable() if device == "cuda" else "cpu",
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [],
    }
    cases = [("smoke", 1, 2, 64, 80)] if args.smoke else CASES
    kernels = {"math": SDPBackend.MATH} if args.smoke else KERNELS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = card_slug(card)

    def save() -> None:
        (out / f"attention-{slug}.json").write_text(json.dumps(rec, indent=2))
        (out / f"attention-{slug}.md").write_text(render(rec))

    for name, b, h, sq, sk in cases:
        q, k, v = inputs(b, h, sq, sk, device, torch.float32 if args.smoke else torch.bfloat16)
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * b * h * sq * sk * 128
        base = None
        runs = [(label, backend, False) for label, backend in kernels.items()]
        if rec["flash4_unavailable"] is None:
            runs += [("FA4", SDPBackend.FLASH_ATTENTION, True), ("FA4 compiled", None, True)]
        fn = None
        for label, backend, fa4 in runs:
            row = {"case": name, "kernel": label, "batch": b, "heads": h, "queries": sq, "keys": sk}
            try:
                if fa4:
                    enable_flash4()
                if backend is None:
                    fn_c = torch.compile(
                        lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c), dynamic=False
                    )

                    def fn(fn_c=fn_c, qkv=(q, k, v)):
                        return fn_c(*qkv)
                else:

                    def fn(backend=backend, qkv=(q, k, v)):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(*qkv)

                got = fn()
                s = timed(fn, args.repeats, device)
                row.update(ms=s * 1e3, tflops=flops / s / 1e12, rel_err=rel(got, ref))
                if device == "cuda":
                    row["gpu_kernel"] = kernel_name(fn)
                if label == "cudnn" or base is None and label == "math":
                    base = s
                if base:
                    row["speedup_vs_cudnn"] = base / s
                if label == "FA4 compiled":
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        eager = F.scaled_dot_product_attention(q, k, v)
                    row["rel_to_eager_fa4"] = rel(got, eager.float())
            except Exception as exc:  # a kernel that cannot run is a row that says why
                row["error"] = repr(exc)[:300]
            finally:
                if fa4:
                    disable_flash4()
            rec["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
        del q, k, v, ref, fn
        if device == "cuda":
            torch.cuda.empty_cache()
    print(render(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
