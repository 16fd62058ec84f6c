"""Qwen-Image's VAE on one image, diffusers' causal 3D convolutions against ``qwennb.vae``'s 2D path, on a GPU.

    python benchmarks/vae2d.py            # writes benchmarks/results/vae2d-<card>.{json,md}
    python benchmarks/vae2d.py --smoke    # on a CPU: the tiny VAE at 64x64, the same rows (vae2d-cpu-smoke)

The full-size VAE (Qwen-Image's shipped config, random weights, bf16 as the plan loads it) decodes a latent and
encodes an image at each size (``--sizes``), stock first, then the same module with
``qwennb.vae.use_image_convolutions`` applied. Timed with CUDA events around each call, the median of ``--runs``
after ``--warmup`` calls; the output of the 2D path is compared with stock's (relative error, the same input).
On the CPU the 2D path decoded the toy's 256x256 image 4.3x faster (``benchmarks/NOTES.md``, session 15); the
plan applies it on CPUs only until this says what it does on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def timed(fn, runs: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn()`` over ``runs`` calls after ``warmup`` (CUDA events on a GPU), and its last
    output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def profile_tiled(stock, two_d, size: int, device: str, dtype) -> dict:
    """One tiled decode of each path under torch.profiler: kernel (device) time, kernels launched, operators
    dispatched on the host and the wall time, to tell a decode that waits on the host from one that computes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    z = torch.randn(1, stock.config.z_dim, 1, size // 8, size // 8, device=device, dtype=dtype)
    out = {"size": size}
    for name, m in (("stock", stock), ("image_convolutions", two_d)):
        m.enable_tiling()
        m.decode(z)  # warm
        if device == "cuda":
            torch.cuda.synchronize()
        with torch.inference_mode(), profile(activities=activities) as prof:
            t0 = time.perf_counter()
            m.decode(z)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        rows = prof.key_averages()

        def dev(r):
            return getattr(r, "self_device_time_total", None) or getattr(r, "self_cuda_time_total", 0) or 0

        out[name] = {
            "wall_s": wall,
            "kernel_ms": sum(dev(r) for r in rows) / 1000,
            "kernels": sum(r.count for r in rows if dev(r) > 0),
            "aten_ops": sum(r.count for r in rows if r.key.startswith("aten::")),
            "top_ops": sorted(
                ((r.key, r.count) for r in rows if r.key.startswith("aten::")), key=lambda kv: -kv[1]
            )[:8],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,1328", help="square image sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tiled", action="store_true", help="also the largest size with the VAE tiled")
    ap.add_argument(
        "--profile", action="store_true", help="profile one tiled decode of each path at the largest size"
    )
    ap.add_argument("--smoke", action="store_true", help="on a CPU: the tiny VAE config at 64x64, float32")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.dtype, args.runs, args.warmup, args.tiled = "64", "float32", 2, 1, True
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (--smoke checks the script on a CPU)")
    device = "cuda" if not args.smoke else "cpu"
    from diffusers import AutoencoderKLQwenImage

    from qwennb.stand_ins import load_component_config
    from qwennb.vae import image_convolutions, use_image_convolutions

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    stock = AutoencoderKLQwenImage.from_config(
        load_component_config("tiny" if args.smoke else "qwen-image", "vae")
    )
    stock = stock.to(device, dtype).eval()
    two_d = copy.deepcopy(stock)
    n2d = use_image_convolutions(two_d)
    # The rounding floor: both paths against stock in float32 (TF32 off), on the same input.
    reference = copy.deepcopy(stock).float()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    card = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    # untiled at every size; then tiled (what the plan turns on for small cards) at the largest
    passes = [(size, False) for size in sizes] + ([(max(sizes), True)] if args.tiled else [])
    with torch.inference_mode():
        for size, tiled in passes:
            for m in (stock, two_d, reference):
                m.enable_tiling() if tiled else m.disable_tiling()
            g = torch.Generator(device).manual_seed(size)
            z = torch.randn(
                1, stock.config.z_dim, 1, size // 8, size // 8, device=device, dtype=dtype, generator=g
            )
            x = torch.rand(1, 3, 1, size, size, device=device, dtype=dtype, generator=g) * 2 - 1
            for op, fn_of in (
                ("decode", lambda m, v=z: m.decode(v).sample),
                ("encode", lambda m, v=x: m.encode(v).latent_dist.mode()),
            ):
                s_stock, y_stock = timed(lambda fn_of=fn_of: fn_of(stock), args.runs, args.warmup)
                s_2d, y_2d = timed(lambda fn_of=fn_of: fn_of(two_d), args.runs, args.warmup)
                s_again, y_again = timed(lambda fn_of=fn_of: fn_of(stock), args.runs, args.warmup)
                y_ref = fn_of(reference, z.float()) if op == "decode" else fn_of(reference, x.float())
                rows.append(
                    {
                        "op": op + (" (tiled)" if tiled else ""),
                        "size": size,
                        "stock_s": s_stock,
                        "stock_again_s": s_again,
                        "image_convolutions_s": s_2d,
                        "speedup": min(s_stock, s_again) / s_2d,
                        "rel_err": rel_err(y_2d, y_stock),
                        "stock_rerun_rel_err": rel_err(y_again, y_stock),
                        "stock_vs_float32": rel_err(y_stock, y_ref),
                        "image_convolutions_vs_float32": rel_err(y_2d, y_ref),
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    profile = {}
    if args.profile:
        profile = profile_tiled(stock, two_d, max(sizes), device, dtype)
        print(json.dumps(profile), flush=True)
    result = {
        "profile_tiled_decode": profile,
        "card": card,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "runs": args.runs,
        "warmup": args.warmup,
        "image_convolutions": n2d,
        "convolutions_left": image_convolutions(stock),
        "rows": rows,
    }
    name = "cpu-smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"vae2d-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Qwen-Image VAE, one image: diffusers' causal 3D convolutions against qwennb's 2D path ({card})",
        "",
        f"torch {result['torch']}, diffusers {result['diffusers']}, {args.dtype}, median of {args.runs} after "
        f"{args.warmup} warm-up calls ({'CUDA events' if device == 'cuda' else 'wall clock'}); {n2d} convolutions take the 2D path. Rerun: "
        "`python benchmarks/vae2d.py`.",
        "",
        "Relative errors: the 2D path against stock (same dtype), stock against itself on a rerun, and each against "
        "stock in float32 (TF32 off): the rounding floor of the dtype.",
        "",
        "| op | size | stock s | stock again s | 2D path s | speed-up | 2D vs stock | stock vs itself | stock vs fp32 "
        "| 2D vs fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['size']}² | {r['stock_s']:.4f} | {r['stock_again_s']:.4f} | "
            f"{r['image_convolutions_s']:.4f} | {r['speedup']:.2f}x | {r['rel_err']:.2e} | "
            f"{r['stock_rerun_rel_err']:.2e} | {r['stock_vs_float32']:.2e} | {r['image_convolutions_vs_float32']:.2e} |"
        )
    (out / f"vae2d-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
