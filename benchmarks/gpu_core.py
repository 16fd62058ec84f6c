"""Core I/II on a real GPU: detection, the plan, loading full-size Qwen-Image (random weights) from the
plan, and 1024x1024 CFG generations timed step by step, beside stock diffusers on the same weights.

Rerun on any CUDA machine with qwennb installed:

    python benchmarks/gpu_core.py --out benchmarks/results

It writes ``core-<card>.json`` and ``core-<card>.md`` (and the raw ``detect``/``plan`` JSON) and prints
the table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from stock_steps import card_slug  # benchmarks/ is the script's folder


def run_cli(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "qwennb.cli", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def stock_run(pipe, steps: int, width: int, height: int, cfg: float, seed: int) -> dict:
    """Plain diffusers, as a hand-written script calls it: prompt strings, CFG with negative ' '."""
    times: list[float] = []
    last = {}

    def cb(p, i, t, kw):
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last["t"])
        last["t"] = now
        if i == steps - 1:
            last["latents"] = kw["latents"].detach().float().cpu()
        return {}

    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    last["t"] = t0
    pipe(
        prompt="a red fox reading a newspaper in a cafe, watercolor",
        negative_prompt=" ",
        true_cfg_scale=cfg,
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=cb,
    )
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    # The first interval includes text encoding; use the steps after it for the median.
    return {
        "total_s": total,
        "s_per_step": statistics.median(times[1:]),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3,
        "latents": last.get("latents"),
    }


def mode_run(args) -> int:
    """A named mode as shipped (``make_plan(..., overrides={"mode": ...})`` -> ``build`` -> ``generate``: for
    turbo, fp8 weights quantised while loading) beside stock diffusers on bf16 weights drawn from the same seed
    (``build_synthetic_pipeline``; the stand-in's loader draws identical bf16 weights), both on the card in one
    process. Records load time, s/step, peak memory and the final latents' relative error against stock."""
    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import build
    from qwennb.plan import make_plan
    from qwennb.stand_ins import build_synthetic_pipeline, build_tiny_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = detect()
    model = "qwen-image-synthetic"
    if args.smoke:  # the flow on the tiny model on the CPU: checks the script, its numbers mean nothing
        for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated", "memory_allocated"):
            setattr(torch.cuda, name, lambda *a, **k: 0)
        model, args.size, args.steps = "tiny", 64, 3
    card = hw.best_gpu.name if hw.best_gpu else "cpu-smoke"
    slug = card_slug(card)
    plan = make_plan(hw, model, overrides={"mode": args.mode})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe = build(plan)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights_gb = torch.cuda.memory_allocated() / 1024**3
    t0 = time.perf_counter()
    if args.smoke:
        stock = build_tiny_pipeline(seed=0, dtype=torch.float32)
    else:
        stock = build_synthetic_pipeline(device="cuda", dtype=torch.bfloat16)
    stock.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    stock_load_s = time.perf_counter() - t0
    size, steps = args.size, args.steps
    prompt = "a red fox reading a newspaper in a cafe, watercolor"
    generate(pipe, "warm up", steps=3, width=size, height=size, cfg=4.0, seed=0)
    stock_run(stock, 3, size, size, 4.0, 0)
    rows = []
    for r in range(args.repeats):
        got = {}

        def keep(s, got=got):
            if s.step == s.total:
                got["latents"] = s.latents.detach().float().cpu()

        torch.cuda.reset_peak_memory_stats()
        res = generate(
            pipe, prompt, steps=steps, width=size, height=size, cfg=4.0, seed=1234 + r, on_step=keep
        )
        q_peak = torch.cuda.max_memory_allocated() / 1024**3
        st = stock_run(stock, steps, size, size, 4.0, 1234 + r)
        a, b = got["latents"], st.pop("latents")
        rows.append(
            {
                "repeat": r,
                "qwennb_s_per_step": res.median_step_s,
                "qwennb_total_s": res.total_s,
                "qwennb_peak_gpu_gb": q_peak,
                "stock_s_per_step": st["s_per_step"],
                "stock_total_s": st["total_s"],
                "latent_rel_err": float((a - b).norm() / b.norm()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "repeat"}
    record = {
        "card": card,
        "smoke": bool(args.smoke),
        "mode": args.mode,
        "arrangement": plan.arrangement,
        "plan_estimated_peak_gpu_gb": plan.estimated_peak_gpu_gb,
        "plan_predicted_s_per_step": plan.predicted_s_per_step,
        "load_s": round(load_s, 1),
        "stock_load_s": round(stock_load_s, 1),
        "weights_gpu_gb": round(weights_gb, 2),
        "size": size,
        "steps": steps,
        "cfg": 4.0,
        "runs": rows,
        "median": med,
        "speedup_vs_stock": med["stock_s_per_step"] / med["qwennb_s_per_step"],
    }
    (out / f"core-{args.mode}-{slug}.json").write_text(json.dumps(record, indent=2))
    md = (
        f"# `mode={args.mode}` as shipped on {card}\n\n"
        f"Plan: {plan.arrangement} (estimated peak {plan.estimated_peak_gpu_gb:.1f} GiB, predicted "
        f"{plan.predicted_s_per_step} s/step). {size}x{size}, CFG 4, {steps} steps, medians of {args.repeats} "
        f"after warm-up; stock diffusers on bf16 weights of the same seed in the same process.\n\n"
        "| | s/step | image s | peak GiB | load s |\n| --- | --- | --- | --- | --- |\n"
        f"| stock | {med['stock_s_per_step']:.3f} | {med['stock_total_s']:.2f} | – | {stock_load_s:.1f} |\n"
        f"| qwennb {args.mode} | {med['qwennb_s_per_step']:.3f} | {med['qwennb_total_s']:.2f} | "
        f"{med['qwennb_peak_gpu_gb']:.2f} | {load_s:.1f} |\n\n"
        f"Speed-up {record['speedup_vs_stock']:.2f}x; final latents' relative error against stock "
        f"{med['latent_rel_err']:.2e}.\n"
    )
    (out / f"core-{args.mode}-{slug}.md").write_text(md)
    print(md)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="also time the plan with regional compile")
    ap.add_argument(
        "--mode", help="measure a named plan mode as shipped (e.g. turbo) against stock: core-<mode>-<card>.*"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="with --mode: the tiny model on the CPU (checks the script)"
    )
    args = ap.parse_args()
    if args.mode:
        return mode_run(args)
    if args.smoke:
        ap.error("--smoke goes with --mode")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from qwennb import __version__
    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import build, validate_optimization
    from qwennb.plan import make_plan

    hw = detect()
    gpu = hw.best_gpu
    assert gpu is not None, "no CUDA GPU"
    slug = card_slug(gpu.name)
    (out / f"detect-{slug}.json").write_text(json.dumps(run_cli("detect", "--json"), indent=2))
    (out / f"plan-{slug}.json").write_text(
        json.dumps(run_cli("plan", "--model", "qwen-image", "--json"), indent=2)
    )

    import diffusers
    import transformers

    record = {
        "card": gpu.name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "qwennb": __version__,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "runs": [],
    }
    plan = make_plan(hw, "qwen-image-synthetic")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe = build(plan)
    torch.cuda.synchronize()
    record["load_s"] = time.perf_counter() - t0
    record["weights_gpu_gb"] = torch.cuda.memory_allocated() / 1024**3
    record["plan"] = plan.to_dict()
    record["validate_optimization"] = validate_optimization(pipe)
    from qwennb.display import plan_text

    print(plan_text(plan), flush=True)

    kw = dict(steps=args.steps, width=args.size, height=args.size)
    # Warm-up: cuDNN autotuning, allocator growth, lazy inits.
    generate(pipe, "warm up", steps=3, width=args.size, height=args.size, cfg=4.0, seed=0)
    stock_run(pipe, 3, args.size, args.size, 4.0, 0)
    prompts = ["a red fox reading a newspaper in a cafe, watercolor", "a lighthouse on a cliff at dusk"]
    for cfg in (4.0, 1.0):
        for r in range(args.repeats):
            res = generate(pipe, prompts[r % 2], cfg=cfg, seed=1234 + r, **kw)
            record["runs"].append(
                {
                    "config": "qwennb",
                    "cfg": cfg,
                    "repeat": r,
                    "s_per_step": res.median_step_s,
                    "step_times_s": res.step_times_s,
                    "total_s": res.total_s,
                    "text_encoding_s": res.text_encoding_s,
                    "decode_s": res.decode_s,
                    "peak_gpu_gb": res.peak_gpu_memory_gb,
                    "denoise_peak_gpu_gb": res.denoise_peak_gpu_memory_gb,
                    "transformer_passes_per_step": res.transformer_passes_per_step,
                    "finite": True,  # generate raises on NaN/inf
                }
            )
            if cfg > 1:
                st = stock_run(pipe, args.steps, args.size, args.size, cfg, 1234 + r)
                st.pop("latents", None)
                record["runs"].append({"config": "stock", "cfg": cfg, "repeat": r, **st})
            print(record["runs"][-1]["config"], cfg, r, record["runs"][-1]["s_per_step"], flush=True)
    if args.compile:
        from qwennb.pipeline import apply_plan

        plan.compile = True
        t0 = time.perf_counter()
        apply_plan(pipe, plan)
        first = generate(pipe, prompts[0], cfg=4.0, seed=1, **kw)
        record["compile_first_image_s"] = time.perf_counter() - t0
        for r in range(args.repeats):
            res = generate(pipe, prompts[0], cfg=4.0, seed=1234 + r, **kw)
            record["runs"].append(
                {
                    "config": "qwennb+compile",
                    "cfg": 4.0,
                    "repeat": r,
                    "s_per_step": res.median_step_s,
                    "total_s": res.total_s,
                    "peak_gpu_gb": res.peak_gpu_memory_gb,
                }
            )
        other = generate(
            pipe,
            "a much longer prompt that has a different number of tokens than the first",
            cfg=4.0,
            seed=5,
            **kw,
        )
        record["compile_new_prompt_length_total_s"] = other.total_s
        del first

    def med(config: str, cfg: float, key: str) -> float | None:
        xs = [
            r[key]
            for r in record["runs"]
            if r["config"] == config and r["cfg"] == cfg and r.get(key) is not None
        ]
        return statistics.median(xs) if xs else None

    rows = []
    for config, cfg in [("stock", 4.0), ("qwennb", 4.0), ("qwennb+compile", 4.0), ("qwennb", 1.0)]:
        s = med(config, cfg, "s_per_step")
        if s is None:
            continue
        rows.append((config, cfg, s, med(config, cfg, "total_s"), med(config, cfg, "peak_gpu_gb")))
    record["summary"] = [
        dict(zip(["config", "cfg", "s_per_step", "total_s", "peak_gpu_gb"], r, strict=True)) for r in rows
    ]
    record["estimated_peak_gpu_gb"] = plan.estimated_peak_gpu_gb
    record["estimated_s_per_step"] = plan.estimated_s_per_step
    lines = [
        f"# Core run on {gpu.name}",
        "",
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
        f"full-size Qwen-Image with random weights (qwen-image-synthetic), bf16, {args.size}x{args.size}, "
        f"{args.steps} steps, medians of {args.repeats} runs after warm-up.",
        "",
        f"Plan: {plan.arrangement}. Estimated peak {plan.estimated_peak_gpu_gb:.2f} GiB, "
        f"estimated {plan.estimated_s_per_step} s/step (CFG). Load {record['load_s']:.1f} s; weights on GPU "
        f"{record['weights_gpu_gb']:.2f} GiB.",
        "",
        "| config | CFG | s/step (median) | total s | peak GPU GiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {c} | {g:g} | {s:.3f} | {t:.2f} | {p:.2f} |" for c, g, s, t, p in rows]
    md = "\n".join(lines) + "\n"
    (out / f"core-{slug}.json").write_text(json.dumps(record, indent=2))
    (out / f"core-{slug}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
