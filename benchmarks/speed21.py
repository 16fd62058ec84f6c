"""Qwen-Image-2.1 speed: stock diffusers, stock + ``compile_repeated_blocks``, and qwennb's plan, side by side.

Rerun on a CUDA machine with one 80+ GB card (H100/H200) and qwennb installed:

    python benchmarks/speed21.py --out benchmarks/results

It builds ``qwen-image-2.1-synthetic`` (Qwen-Image-2.1's configs: the 7.1B single-stream DiT, Qwen3-VL-8B, random
bf16 weights) on the GPU once and, on the same weights, prompt and seed, after warm-up, times ``--repeats``
images of ``--steps`` steps at 1024x1024 for each configuration (medians):

- ``stock``: ``pipe(prompt=..., true_cfg_scale=CFG, negative_prompt=" ")`` as loaded;
- ``stock+compile``: plus ``transformer.compile_repeated_blocks(fullgraph=False)``;
- ``qwennb``: ``qwennb.generate`` on the pipeline with qwennb's plan applied (``pipeline.apply_plan``): on 2.1 that
  is diffusers' regional compile (for the prefill step) and qwennb's 2.1 tuned path (``qwennb.speed21``: cached
  steps with CFG's two passes as one forward, real RoPE, the shared modulation once, one compiled block function),
  with cuDNN's attention (``flash4=False``; the ``fa4`` variant is the plan's default where flash-attn-4 is
  installed).

``--variants static cudnn flash autotune cudagraphs autotune-cudagraphs packed packed-autotune`` then adds rows
``qwennb[<variant>]``: the tuned path with static shapes, with cuDNN's or flash attention named instead of SDPA's
choice, compiled in ``max-autotune-no-cudagraphs``, ``reduce-overhead`` (CUDA graphs) or ``max-autotune`` (both)
mode, or with packed Q/K/V and MLP input
weights (``pack=True``), alone or with max-autotune (what the default is chosen by);
``--profile DIR`` writes a kernel table of three tuned cached steps.

``latent_rel_err``: the final latents of one more image of each configuration (the pipeline called directly with
``output_type="latent"``) against stock's, ``|a - b| / |b|``. The ``qwennb`` row also carries the tuned path's
counters (``fast21``: forwards, stock forwards, cached forwards, CFG pairs, reused second halves).

Rows (``model: "qwen-image-2.1"``, ``config``, ``steps``, ``cfg``, ``width``, ``height``, ``s_per_step``,
``s_per_image``, ``peak_gpu_gb``, ``speedup_vs_stock``) go to ``speed21-<card>.json``; ``--merge`` also appends them
to the ``runs`` of ``speed-<card>.json`` (the file ``benchmarks/speed.py`` writes) so that one file holds both
models. ``--smoke`` runs the flow on ``tiny-2.1`` on the CPU (64x64, no compile); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from stock_steps import (
    card_slug,
    timed_call,  # benchmarks/ is the script's folder
)

PROMPT = "a red fox reading a newspaper in a cafe, watercolor"
SEED = 1234


# Other options of the tuned path, measured after the default (``--variants``): the name of the row's config is
# ``qwennb[<variant>]``. Each value: (enable_fast_path_21 keyword arguments, attention backend or None).
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "static": ({"dynamic": False}, None),
    "autotune": ({"mode": "max-autotune-no-cudagraphs"}, None),
    "cudnn": ({}, "_native_cudnn"),
    "flash": ({}, "_native_flash"),
    # CUDA graphs: round 11's profile has the GPU idle 2% of a cached step (host work between kernels and steps)
    "cudagraphs": ({"mode": "reduce-overhead"}, None),
    "autotune-cudagraphs": ({"mode": "max-autotune"}, None),
    # GEMMs are 74% of a cached step at ~690 TFLOP/s: one GEMM for Q/K/V and one for the MLP's inputs
    "packed": ({"pack": True}, None),
    "packed-autotune": ({"pack": True, "mode": "max-autotune-no-cudagraphs"}, None),
    # attention is 17% of a cached step at ~470 TFLOP/s (cuDNN): FlashAttention-4 as SDPA's flash kernel
    "fa4": ({}, "fa4"),
    "fa4-autotune": ({"mode": "max-autotune-no-cudagraphs"}, "fa4"),
}


def profile_steps(pipe: Any, args: Any, folder: Path) -> None:
    """Three cached steps of the tuned path under torch.profiler: GPU time by kernel, to ``folder``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    folder.mkdir(parents=True, exist_ok=True)
    sched = schedule(wait=0, warmup=2, active=3, repeat=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:

        def cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            torch.cuda.synchronize()
            if 1 <= i <= 5:  # step 0 is the prefill: its end starts the window's warm-up
                prof.step()
            return {}

        prof.step()
        pipe(
            prompt=PROMPT,
            negative_prompt=" ",
            true_cfg_scale=args.cfg,
            num_inference_steps=8,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
            callback_on_step_end=cb,
        )
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    (folder / "speed21-qwennb-kernels.txt").write_text(table + "\n")
    print(table[:6000], flush=True)


def table(rec: dict[str, Any]) -> str:
    """The markdown table of a ``speed21-<card>.json`` record (its ``runs``; earlier runs kept under ``rounds``
    get a table each)."""

    def rows_md(rows: list[dict[str, Any]]) -> list[str]:
        out = [
            "| config | s/step | s/image | speed-up vs stock | peak GiB | latent rel. err. vs stock |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            if r.get("s_per_step") is None:
                out.append(f"| {r['config']} | failed: {str(r.get('error', ''))[:120]} | | | | |")
                continue
            out.append(
                f"| {r['config']} | {r['s_per_step']:.4f} | {r['s_per_image']:.2f} | {r['speedup_vs_stock']:.3f}x | "
                f"{r['peak_gpu_gb'] if r.get('peak_gpu_gb') is not None else '-'} | {r['latent_rel_err']:.3g} |"
            )
        return out

    first = rec["runs"][0] if rec["runs"] else {}
    lines = [
        f"# Qwen-Image-2.1 speed on {rec['card']}",
        "",
        f"{first.get('width')}x{first.get('height')}, CFG {first.get('cfg')}, {first.get('steps')} steps; torch "
        f"{rec.get('torch')}, diffusers {rec.get('diffusers')}; {rec.get('date')}. Plan: {rec.get('plan')}.",
        "",
        *rows_md(rec["runs"]),
    ]
    for name, earlier in rec.get("rounds", {}).items():
        lines += ["", f"## {name} ({earlier.get('date')})", "", *rows_md(earlier["runs"])]
    if rec.get("note"):
        lines += ["", rec["note"]]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], args: Any, card: str, plan: Any) -> None:
    """``speed21-<card>.json`` (and with ``--merge`` the 2.1 rows of ``speed-<card>.json``), after every row, so
    that a run cut short keeps what it measured."""
    import diffusers

    base = rows[0]["s_per_step"]
    for r in rows:
        r["speedup_vs_stock"] = round(base / r["s_per_step"], 3) if r.get("s_per_step") else None

    slug = card_slug(card)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {
        "card": card,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "plan": plan.arrangement,
        "runs": rows,
    }
    (out / f"speed21-{slug}.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / f"speed21-{slug}.md").write_text(table(rec))
    if args.merge:
        target = out / f"speed-{slug}.json"
        merged = json.loads(target.read_text()) if target.exists() else {"card": card, "runs": []}
        merged["runs"] = [r for r in merged.get("runs", []) if r.get("model") != "qwen-image-2.1"] + rows
        target.write_text(json.dumps(merged, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--merge", action="store_true", help="also append the rows to speed-<card>.json")
    ap.add_argument("--smoke", action="store_true", help="tiny-2.1 on the CPU, to check the script")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=sorted(VARIANTS),
        help="after the qwennb row, rows of the tuned path with other options (to choose the default by)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        help="folder: a torch.profiler kernel table of three tuned cached steps (GPU time by kernel)",
    )
    args = ap.parse_args(argv)
    logging.getLogger("qwennb").setLevel(logging.ERROR)

    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import apply_plan
    from qwennb.plan import describe_machine, make_plan
    from qwennb.stand_ins21 import build_synthetic21_pipeline, build_tiny21_pipeline

    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    if args.smoke:
        args.size, args.steps, args.repeats, args.warmup = 64, 4, 2, 1
        model, pipe = "tiny-2.1", build_tiny21_pipeline()
        plan = make_plan(describe_machine(host_ram_gb=8), model)
        card = "cpu-smoke"
    else:
        model, pipe = "qwen-image-2.1-synthetic", build_synthetic21_pipeline("cuda", torch.bfloat16)
        plan = make_plan(detect(), model)
        # the 'qwennb' row keeps cuDNN's attention; FlashAttention-4 (the plan's default where flash-attn-4 is
        # installed) is a row of its own, so that one run shows both
        plan = dataclasses.replace(plan, flash4=False)
        card = torch.cuda.get_device_name()
    pipe.set_progress_bar_config(disable=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def stock() -> tuple[float, float]:
        times, total = timed_call(
            pipe,
            sync,
            prompt=PROMPT,
            negative_prompt=" ",
            true_cfg_scale=args.cfg,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(SEED),
        )
        return statistics.median(times[1:] or times), total

    def final_latents() -> torch.Tensor:
        out = pipe(
            prompt=PROMPT,
            negative_prompt=" ",
            true_cfg_scale=args.cfg,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
        )
        return out.images.float().cpu()

    ref: dict[str, torch.Tensor] = {}

    def rel_err(config: str) -> float:
        got = final_latents()
        if config == "stock":
            ref["stock"] = got
        return float((got - ref["stock"]).norm() / ref["stock"].norm())

    def qwennb() -> tuple[float, float]:
        r = generate(
            pipe, PROMPT, steps=args.steps, cfg=args.cfg, width=args.size, height=args.size, seed=SEED
        )
        return r.median_step_s or 0.0, r.total_s

    rows: list[dict[str, Any]] = []

    def measure(config: str, fn: Any) -> None:
        for _ in range(args.warmup):
            fn()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        got = [fn() for _ in range(args.repeats)]
        row = {
            "model": "qwen-image-2.1",
            "stand_in": model,
            "config": config,
            "steps": args.steps,
            "cfg": args.cfg,
            "width": args.size,
            "height": args.size,
            "s_per_step": round(statistics.median(g[0] for g in got), 4),
            "s_per_image": round(statistics.median(g[1] for g in got), 4),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if cuda else None,
            "repeats": args.repeats,
            "latent_rel_err": rel_err(config),
        }
        state = getattr(pipe.transformer, "_qwennb_fast21", None)
        if state is not None:
            row["fast21"] = dict(state.stats)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(rows, args, card, plan)

    measure("stock", stock)
    if cuda:
        pipe.transformer.compile_repeated_blocks(fullgraph=False)
        measure("stock+compile", stock)
        # Start qwennb from the same uncompiled modules: a fresh torch.compile state.
        torch._dynamo.reset()
        for block in pipe.transformer.transformer_blocks:
            if getattr(block, "_compiled_call_impl", None) is not None:
                block._compiled_call_impl = None
    # the 2.1 tuned path is on by default; set here so that a stray QWENNB_TUNED_21=0 does not hide it
    os.environ["QWENNB_TUNED_21"] = "1"
    apply_plan(pipe, plan)
    from qwennb.attention import disable_flash4, enable_flash4
    from qwennb.speed21 import enable_fast_path_21

    if args.smoke:  # on the CPU the plan compiles nothing: the tuned path uncompiled, to check its flow
        enable_fast_path_21(pipe.transformer, compile=False)
    pipe.qwennb = {"model": model, "plan": plan}
    measure("qwennb", qwennb)
    if args.profile and cuda:
        profile_steps(pipe, args, Path(args.profile))
    for name in args.variants:
        kwargs, attention = VARIANTS[name]
        torch._dynamo.reset()
        try:
            if attention == "fa4":
                enable_flash4()
            elif attention:
                pipe.transformer.set_attention_backend(attention)
            enable_fast_path_21(pipe.transformer, compile=cuda, **kwargs)
            measure(f"qwennb[{name}]", qwennb)
        except Exception as exc:  # a variant that fails is a row that says why, not a lost run
            rows.append({"model": "qwen-image-2.1", "config": f"qwennb[{name}]", "error": repr(exc)[:300]})
            print(f"qwennb[{name}]: {exc!r}"[:300], flush=True)
        if attention == "fa4":
            disable_flash4()
        elif attention:
            pipe.transformer.set_attention_backend(plan.attention_backend)
        enable_fast_path_21(pipe.transformer, compile=cuda)  # back to the default for the next variant
    write_results(rows, args, card, plan)
    if args.smoke:
        print("SMOKE RUN on the CPU with tiny-2.1: these numbers mean nothing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
