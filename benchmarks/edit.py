"""Editing speed: stock ``QwenImageEditPlusPipeline`` against qwennb, on full-size Qwen-Image-Edit with random weights.

Rerun on a CUDA machine with one card of 80 GB or more (H100/H200) and qwennb installed, with one command:

    python benchmarks/edit.py --out benchmarks/results

For each transformer config (``2511``: Qwen-Image-Edit-2511's, with ``zero_cond_t``; ``2509``: without it) it
builds ``qwen-image-edit-synthetic``'s components once on the GPU in bf16 and, in the same process, on the same
weights, instruction, reference images and seed, runs:

- ``stock``: the pipeline as built, called as a hand-written script would (``pipe(image=refs, prompt=...,
  negative_prompt=" ", true_cfg_scale=4, width=1024, height=1024)``);
- ``qwennb``: the same pipeline after ``qwennb.pipeline.apply_plan`` with the plan ``qwennb.edit.plan_edit``
  makes for the card, called through ``qwennb.edit`` (references at the model's 1 megapixel, as stock), with
  cuDNN's attention (``flash4=False``; ``--fa4`` adds ``qwennb+fa4`` rows, the plan's default where flash-attn-4
  is installed).

and, after each stock image, the rounding floor: stock again with SDPA's flash kernel instead of cuDNN (as
``benchmarks/speed.py`` measures text-to-image's; ``--no-floor`` skips it), whose distance from stock is what
rounding alone moves the latents; each qwennb row's ``err_over_floor`` is its error over that floor.

with 1 and with 3 reference images of 1024x1024, CFG 4, after one warm-up image per configuration. Per run:
median s/step over the denoising loop (GPU-synchronised in the step callback), total time, peak GPU memory,
the relative L2 error of the final latents against stock on the same seed, and how many transformer forwards
took qwennb's tuned path. Both configs run the tuned path (reference tokens in the sequence, CFG pairs batched;
for ``2511`` the references' tokens modulated at t=0, those vectors computed once per image), so
``tuned_forwards`` counts every forward of the timed image (a CFG pair counts once per pass).

Writes ``edit-<card>.json`` (``card``, ``torch``, ``diffusers``, ``runs``: one row per configuration with
``config``, ``model``, ``refs``, ``width``, ``height``, ``cfg``, ``steps``, ``s_per_step``, ``speedup_vs_stock``,
``latent_rel_err``, ``peak_gpu_gb``, ``tuned_forwards``) and ``edit-<card>.md``. ``--smoke`` runs the whole flow
on the tiny edit stand-in on the CPU (small sizes, 2 steps) to check that the script executes; there the tuned path
runs uncompiled (a CPU plan keeps stock diffusers) and must take every forward and match stock's latents.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stock_steps import card_slug  # benchmarks/ is the script's folder

INSTRUCTION = "Put the two objects on a wooden table and make the background a sunny kitchen"
SEED = 1234


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def references(n: int, size: int) -> list[Any]:
    """Deterministic structured pictures (colour fields and a square), one per reference."""
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        q = size // 4
        a[q : 3 * q, q : 3 * q] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(a))
    return out


def build(config: str, device: str) -> Any:
    from qwennb import stand_ins

    if device == "cpu":
        pipe = stand_ins.build_tiny_edit_pipeline(
            config_dir="tiny-edit" if config == "2511" else "tiny", dtype=torch.float32
        )
    else:
        cfg_dir = "qwen-image-edit-2511" if config == "2511" else "qwen-image-edit-2509"
        pipe = stand_ins.build_synthetic_edit_pipeline("cuda", torch.bfloat16, config_dir=cfg_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_stock(
    pipe: Any, refs: list[Any], size: int, steps: int, cfg: float, device: str, sdpa: Any = None
) -> dict[str, Any]:
    """One stock image, timed per step; ``sdpa`` (a ``torch.nn.attention.SDPBackend``) forces SDPA's kernel."""
    import contextlib

    from torch.nn.attention import sdpa_kernel

    times: list[float] = []
    state: dict[str, Any] = {}
    mark = {"t": 0.0}

    def cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        sync(device)
        now = time.perf_counter()
        times.append(now - mark["t"])
        mark["t"] = now
        if i == steps - 1:
            state["latents"] = kw["latents"].detach().float().cpu().clone()
        return {}

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    mark["t"] = t0
    with torch.no_grad(), sdpa_kernel(sdpa) if sdpa is not None else contextlib.nullcontext():
        pipe(
            image=refs,
            prompt=INSTRUCTION,
            negative_prompt=" ",
            true_cfg_scale=cfg,
            width=size,
            height=size,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(SEED),
            callback_on_step_end=cb,
        )
    sync(device)
    # Stock's first step also holds its prompt and VAE encoding (the callback clock starts before the call):
    # the median over the steps leaves it out.
    return {
        "step_times_s": times,
        "total_s": time.perf_counter() - t0,
        "latents": state["latents"],
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None,
    }


def run_qwennb(pipe: Any, refs: list[Any], size: int, steps: int, cfg: float, device: str) -> dict[str, Any]:
    from qwennb.edit import edit

    state: dict[str, Any] = {}

    def on_step(s: Any) -> None:
        if s.step == s.total:
            state["latents"] = s.latents.detach().float().cpu().clone()

    from qwennb import speed

    st = getattr(pipe.transformer, speed.STATE_ATTR, None)
    before = st.stats["forwards"] if st is not None else 0
    r = edit(
        pipe,
        refs,
        INSTRUCTION,
        steps=steps,
        cfg=cfg,
        seed=SEED,
        width=size,
        height=size,
        reference_area=1024 * 1024,  # the model's 1 megapixel, as stock
        on_step=on_step,
    )
    tuned = (st.stats["forwards"] - before) if st is not None else 0
    return {
        "step_times_s": r.step_times_s,
        "total_s": r.total_s,
        "latents": state["latents"],
        "peak_gpu_gb": r.peak_gpu_memory_gb,
        "tuned_forwards": tuned,
        "forwards": r.transformer_passes_per_step * len(r.step_times_s),
    }


def step_median(run: dict[str, Any]) -> float:
    """Median s/step of a run, its first step (prompt and VAE encoding) left out."""
    return statistics.median(run["step_times_s"][1:] or run["step_times_s"])


def stock_row(config: str, run: dict[str, Any], s: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A results row of a run against the stock run ``s`` of the same references (``tuned_row`` adds a tuned
    run's counters)."""
    return dict(
        config=config,
        **base,
        s_per_step=round(step_median(run), 4),
        speedup_vs_stock=round(step_median(s) / step_median(run), 3),
        latent_rel_err=float(f"{rel_err(run['latents'], s['latents']):.3g}"),
        total_s=round(run["total_s"], 3),
        peak_gpu_gb=run["peak_gpu_gb"],
        tuned_forwards=0,
    )


def tuned_row(
    config: str, q: dict[str, Any], s: dict[str, Any], base: dict[str, Any], plan: str
) -> dict[str, Any]:
    """A results row of a qwennb run ``q`` against the stock run ``s`` of the same references; where the rounding
    floor was measured (``s["floor_run"]``), ``err_over_floor`` is the row's error over it."""
    row = stock_row(config, q, s, base)
    row.update(tuned_forwards=q["tuned_forwards"], forwards=q["forwards"], plan=plan)
    floor = rel_err(s["floor_run"]["latents"], s["latents"]) if "floor_run" in s else 0.0
    if floor:
        row["err_over_floor"] = round(rel_err(q["latents"], s["latents"]) / floor, 2)
    return row


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def render(record: dict[str, Any], size: int, steps: int, cfg: float) -> str:
    """The markdown table of a record (written after every configuration, so a run cut short keeps it)."""
    lines = [
        f"# Editing: stock QwenImageEditPlusPipeline vs qwennb on {record['card']}",
        "",
        f"{record['date']}, torch {record['torch']}, diffusers {record['diffusers']}; {size}x{size}, CFG "
        f"{cfg:g}, {steps} steps, seed {SEED}; random weights.",
        "",
        "| model | refs | config | s/step | speed-up | latent rel. err | x floor | peak GiB | tuned forwards |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r.get('refs', '-')} | {r['config']} | failed: {r['error'][:100]} | | | | | |"
            )
            continue
        peak = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] is not None else "-"
        over = f"{r['err_over_floor']:.1f}" if r.get("err_over_floor") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['refs']} | {r['config']} | {r['s_per_step']:.4f} | {r['speedup_vs_stock']:.2f}x | "
            f"{r['latent_rel_err']:.2e} | {over} | {peak} | {r['tuned_forwards']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--refs", default="1,3", help="reference counts to run, e.g. 1,3")
    ap.add_argument(
        "--configs",
        default=None,
        help="transformer configs: 2511 (zero_cond_t), 2509 (default: both; --smoke: 2511)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="the whole flow on the tiny edit stand-in on the CPU"
    )
    ap.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the rounding floor (one more stock image per reference count, with another SDPA kernel)",
    )
    ap.add_argument(
        "--fa4",
        action="store_true",
        help="also rows 'qwennb+fa4': the tuned path with FlashAttention-4 as SDPA's kernel (qwennb.attention)",
    )
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke on a CPU", file=sys.stderr)
        return 2
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    from qwennb.hardware import detect
    from qwennb.pipeline import apply_plan

    card = torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke"
    import diffusers

    record: dict[str, Any] = {
        "card": card,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "instruction": INSTRUCTION,
        "seed": SEED,
        "runs": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = card_slug(card)
    ref_counts = [int(x) for x in args.refs.split(",")]
    for config in (args.configs or ("2511" if args.smoke else "2511,2509")).split(","):
        model = f"qwen-image-edit-{config}-synthetic" if device == "cuda" else f"tiny-edit ({config} config)"
        pipe = build(config, device)
        stock: dict[int, dict[str, Any]] = {}
        for n in ref_counts:
            refs = references(n, size if device == "cuda" else 64)
            run_stock(pipe, refs, size, steps, args.cfg, device)  # warm-up
            stock[n] = run_stock(pipe, refs, size, steps, args.cfg, device)
            if not args.no_floor:
                # the rounding floor: stock against itself with SDPA's flash kernel instead of cuDNN (on the CPU,
                # the math kernel instead of the CPU's flash), as benchmarks/speed.py measures text-to-image's; math
                # stays allowed for what flash cannot run (the VAE's one-head attention over 384 channels)
                from torch.nn.attention import SDPBackend

                kernel = (
                    [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH] if device == "cuda" else SDPBackend.MATH
                )
                stock[n]["floor_run"] = run_stock(pipe, refs, size, steps, args.cfg, device, sdpa=kernel)
        from qwennb.edit import plan_edit

        name = "qwen-image-edit-synthetic" if device == "cuda" else "tiny-edit"
        plan = plan_edit(detect(), name, references=max(ref_counts))
        # the 'qwennb' row keeps cuDNN's attention; FlashAttention-4 (the plan's default where flash-attn-4 is
        # installed) is a row of its own, so that one run shows both
        plan = dataclasses.replace(plan, flash4=False)
        pipe.qwennb = {"model": name, "path": None, "plan": plan, "load_s": 0.0}
        apply_plan(pipe, plan)
        if (
            device == "cpu"
        ):  # a CPU plan keeps stock diffusers: the smoke run checks the tuned path, uncompiled
            from qwennb.speed import enable_fast_path

            enable_fast_path(pipe.transformer, compile=False, scheduler=pipe.scheduler)
        for n in ref_counts:
            refs = references(n, size if device == "cuda" else 64)
            run_qwennb(pipe, refs, size, steps, args.cfg, device)  # warm-up (compiles)
            q = run_qwennb(pipe, refs, size, steps, args.cfg, device)
            if args.smoke and (
                q["tuned_forwards"] != q["forwards"] or rel_err(q["latents"], stock[n]["latents"]) > 1e-4
            ):
                print(
                    f"smoke: {config} off the tuned path or away from stock: {q['tuned_forwards']} of "
                    f"{q['forwards']} forwards tuned, latents {rel_err(q['latents'], stock[n]['latents']):.1e}",
                    file=sys.stderr,
                )
                return 1
            s = stock[n]
            base = dict(model=model, refs=n, width=size, height=size, cfg=args.cfg, steps=steps)
            record["runs"].append(stock_row("stock", s, s, base))
            if "floor_run" in s:
                record["runs"].append(
                    stock_row("stock, other SDPA kernel (rounding floor)", s["floor_run"], s, base)
                )
            record["runs"].append(tuned_row("qwennb", q, s, base, plan.arrangement))
            (out / f"edit-{slug}.json").write_text(json.dumps(record, indent=2, default=str))
            (out / f"edit-{slug}.md").write_text(render(record, size, steps, args.cfg))
        if args.fa4 and device == "cuda":
            from qwennb.attention import disable_flash4, enable_flash4

            torch._dynamo.reset()  # the compiled blocks trace again, with SDPA's choice now FA4
            try:
                enable_flash4()
                for n in ref_counts:
                    refs = references(n, size)
                    run_qwennb(pipe, refs, size, steps, args.cfg, device)  # warm-up (compiles)
                    q = run_qwennb(pipe, refs, size, steps, args.cfg, device)
                    base = dict(model=model, refs=n, width=size, height=size, cfg=args.cfg, steps=steps)
                    record["runs"].append(tuned_row("qwennb+fa4", q, stock[n], base, plan.arrangement))
                    (out / f"edit-{slug}.json").write_text(json.dumps(record, indent=2, default=str))
            except Exception as exc:  # a failed FA4 run is a row that says why, not a lost run
                record["runs"].append(dict(config="qwennb+fa4", model=model, error=repr(exc)[:300]))
                print(f"qwennb+fa4: {exc!r}"[:300], flush=True)
            finally:
                disable_flash4()
                torch._dynamo.reset()
        del pipe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    table = render(record, size, steps, args.cfg)
    (out / f"edit-{slug}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
