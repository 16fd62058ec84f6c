"""Few-step generation with a Lightning-shaped LoRA: stock diffusers against qwennb, per image end to end.

Rerun on a CUDA machine with one 80+ GB card (H100/H200) and qwennb installed (peft too), with one command:

    python benchmarks/fewstep.py --out benchmarks/results

It builds ``qwen-image-synthetic`` (Qwen-Image's real configs, random bf16 weights) on the GPU once, and random
LoRAs of the Lightning release's shape: rank 64, alpha 8, on the 14 Linear layers of each of the 60 blocks
(attention projections of both streams, both MLPs, both modulations), written in the release's key layout
(``transformer_blocks.N.<layer>.lora_down/lora_up.weight`` + ``alpha``) and loaded through qwennb (diffusers'
converter), saved in bf16 as the release's ``-bf16`` files are (1.18 GB; ``--lora-dtype fp32``: 2.36 GB, what
round 1 wrote). Then, with Lightning's scheduler (shift 3, exponential, no terminal stretch) at CFG 1, on the same
weights, prompt and seed, after warm-up, ``--repeats`` images each (medians):

- ``stock-lightning-8`` / ``-4``: the pipeline as loaded plus ``pipe.load_lora_weights`` (PEFT layers, unfused) and
  ``pipe(prompt=..., true_cfg_scale=1.0, num_inference_steps=8)``, as a hand-written script would;
- ``qwennb-nolora-8``: qwennb's plan applied (``pipeline.apply_plan``: tuned path, regional compile), no LoRA;
- ``qwennb-lightning-8-unfused``: the same with the LoRA as PEFT layers prepared for hotswap
  (``enable_lora_hotswap`` before the first LoRA); then four hotswaps, an image after each: to the second file
  (new to the process: ``hotswap_s``), back to the first (its sha256 cached: ``hotswap_again_s``), to the second
  with the main thread's stack sampled every 2 ms (``hotswap_samples``), and to the first under cProfile
  (``hotswap_profile``; on Python 3.12+ cProfile also records other threads, so the samples come first). Each
  prints and records its seconds stage by stage (``qwennb.lora.last_load_timings``: hash, read, convert, check,
  copy, scales, sync, other; wall and the loading thread's CPU), the threads alive, and how long the background
  sha256 ran on after it; ``recompiles`` counts graph recompiles over the images after the swaps;
- ``qwennb-lightning-8`` / ``-4``: the LoRA fused into the weights (``fuse_lora`` + ``unload_lora_weights``) and
  ``qwennb.generate(pipe, prompt, preset="lightning-8")``: qwennb's best with a fixed LoRA.

Every row: ``config``, ``model``, ``steps``, ``cfg``, ``width``, ``height``, ``s_per_step`` (median denoising step,
GPU-synchronised), ``s_per_image`` (end to end: text encoding, denoising and decode), ``lora_rank``, plus
``lora`` (none/unfused/fused), ``peak_gpu_gb`` and ``repeats``. Sizes: 1024x1024 and 1328x1328. Writes
``fewstep-<card>.json`` and ``fewstep-<card>.md`` under ``--out``. ``--smoke`` runs the same flow on the tiny
stand-in on the CPU (64x64, a rank-4 LoRA, no compile) to check the script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
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
MODEL = "qwen-image-synthetic"
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2) if DEVICE == "cuda" else None


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def recompiles() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["recompiles"].values()) + counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - private counters: record what exists
        return -1


STAGES = ("hash", "read", "convert", "check", "copy", "scales", "sync", "other")


class StackSampler:
    """Where the main thread is, every ``interval`` seconds, from a sampling thread (py-spy's method, in Python):
    unlike cProfile on Python 3.12+, it cannot mistake another thread's calls for the main thread's, and it sees
    waits. ``top()``: the innermost frames' most common chains, as seconds (samples x interval)."""

    def __init__(self, interval: float = 0.002, depth: int = 4) -> None:
        self.interval, self.depth = interval, depth
        self.counts: dict[str, int] = {}
        self.main = threading.main_thread().ident
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            frame = sys._current_frames().get(self.main)
            chain = []
            while frame is not None and len(chain) < self.depth:
                code = frame.f_code
                chain.append(
                    f"{code.co_filename.split('site-packages/')[-1]}:{frame.f_lineno}({code.co_name})"
                )
                frame = frame.f_back
            key = " <- ".join(chain)
            self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self) -> StackSampler:
        self.thread = threading.Thread(target=self.run, daemon=True, name="fewstep-sampler")
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def top(self, n: int = 25) -> list[dict[str, Any]]:
        rows = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [{"stack": k, "samples": c, "s": round(c * self.interval, 3)} for k, c in rows]


def breakdown(swap: dict[str, Any]) -> str:
    """One hotswap as a line: its seconds, stage by stage (``qwennb.lora.last_load_timings``), each with the
    loading thread's CPU seconds in brackets."""
    st, cpu = swap["stages"], swap.get("stages_cpu", {})
    parts = " + ".join(f"{k} {st.get(f'{k}_s', 0.0):.3f} [{cpu.get(f'{k}_s', 0.0):.3f}]" for k in STAGES)
    tail = (
        f"; the background sha256 ran {swap['hash_after_s']:.3f} s more"
        if swap["hash_after_s"] > 0.01
        else ""
    )
    kind = "new file" if swap["new_file"] else "file seen before"
    prof = f", {swap['profiled']}" if swap["profiled"] else ""
    return f"{swap['hotswap_s']:.3f} s ({kind}{prof}) = {parts}{tail}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    # ---- one image, two ways
    def stock_image(self, pipe: Any, steps: int, size: int) -> tuple[float, float]:
        times, total = timed_call(
            pipe,
            sync,
            prompt=PROMPT,
            true_cfg_scale=1.0,
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(SEED),
        )
        # the first interval includes text encoding: the median of the steps is unaffected
        return statistics.median(times), total

    def qwennb_image(self, pipe: Any, steps: int, size: int, preset: str | None) -> tuple[float, float]:
        from qwennb.generation import generate

        r = generate(
            pipe,
            PROMPT,
            steps=steps,
            cfg=1.0,
            width=size,
            height=size,
            seed=SEED,
            preset=preset,
        )
        return r.median_step_s or 0.0, r.total_s

    def measure(self, config: str, fn: Any, steps: int, size: int, lora: str, rank: int | None) -> None:
        for _ in range(self.args.warmup):
            fn(steps, size)
        reset_peak()
        got = [fn(steps, size) for _ in range(self.args.repeats)]
        row = {
            "config": config,
            "model": self.model,
            "steps": steps,
            "cfg": 1.0,
            "width": size,
            "height": size,
            "s_per_step": round(statistics.median(g[0] for g in got), 4),
            "s_per_image": round(statistics.median(g[1] for g in got), 4),
            "lora_rank": rank,
            "lora": lora,
            "peak_gpu_gb": peak_gb(),
            "repeats": self.args.repeats,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    # ---- output
    def save(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        rec = {**self.record, "runs": self.rows, **self.extra}
        (out / f"fewstep-{self.slug}.json").write_text(json.dumps(rec, indent=2) + "\n")
        (out / f"fewstep-{self.slug}.md").write_text(self.table(rec))

    def table(self, rec: dict[str, Any]) -> str:
        lines = [
            f"# Few-step generation on {rec['card']} ({rec['model']}, random weights; LoRA rank {rec['lora']['rank']})",
            "",
            "| config | size | steps | CFG | s/step | s/image (end to end) | LoRA | peak GiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['config']} | {r['width']}² | {r['steps']} | {r['cfg']:g} | {r['s_per_step']:.4f} | "
                f"{r['s_per_image']:.3f} | {r['lora']} | {r['peak_gpu_gb'] if r['peak_gpu_gb'] is not None else '-'} |"
            )
        if "hotswap" in rec:
            h = rec["hotswap"]
            lines += [
                "",
                f"Hotswap ({h.get('lora_file_mb', '?')} MB file): {h['hotswap_s']:.3f} s; graph recompiles during "
                f"the images after the swaps: {h['recompiles']}.",
            ]
            for i, swap in enumerate(h.get("swaps", [])):
                lines.append(f"- hotswap {i + 1}: {breakdown(swap)}")
        if self.args.smoke:
            lines += ["", "SMOKE RUN on the CPU with the tiny stand-in: these numbers mean nothing."]
        return "\n".join(lines) + "\n"

    # ---- the run
    def run(self) -> int:
        global DEVICE
        import logging

        from qwennb import lora
        from qwennb.hardware import detect
        from qwennb.plan import describe_machine, make_plan
        from qwennb.presets import LIGHTNING_ALPHA, LIGHTNING_RANK, LIGHTNING_SCHEDULER

        logging.getLogger("qwennb").setLevel(logging.ERROR)  # the per-image notices (stand-in, no hub LoRA)
        smoke = self.args.smoke
        if smoke:
            DEVICE = "cpu"
        elif not torch.cuda.is_available():
            print("no CUDA GPU: run with --smoke to check the script on the CPU", file=sys.stderr)
            return 2
        self.model = "tiny" if smoke else MODEL
        sizes = [64] if smoke else self.args.sizes
        rank = 4 if smoke else LIGHTNING_RANK
        card = "cpu-smoke" if smoke else torch.cuda.get_device_name()
        self.slug = card_slug(card)
        import diffusers

        self.record: dict[str, Any] = {
            "card": card,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": self.model,
            "prompt": PROMPT,
            "seed": SEED,
            "scheduler": {k: v for k, v in LIGHTNING_SCHEDULER.items()},
            "args": {k: v for k, v in vars(self.args).items()},
        }
        # The stock pipeline (no plan applied yet): what a hand-written script loads.
        from diffusers import FlowMatchEulerDiscreteScheduler

        from qwennb import stand_ins
        from qwennb.pipeline import apply_plan

        if smoke:
            pipe = stand_ins.build_tiny_pipeline()
            plan = make_plan(describe_machine(host_ram_gb=8), "tiny")
        else:
            plan = make_plan(detect(), MODEL)
            pipe = stand_ins.build_synthetic_pipeline(device="cuda", dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        own_scheduler = pipe.scheduler
        tmp = Path(tempfile.mkdtemp(prefix="qwennb-fewstep-"))
        files = []
        for seed in (1, 2):
            f = tmp / f"Lightning-shaped-{seed}.safetensors"
            sd = lora.random_lora_state_dict(
                pipe.transformer,
                rank=rank,
                alpha=LIGHTNING_ALPHA,
                layout="lightning",
                seed=seed,
                std=0.01,
                dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[self.args.lora_dtype]),
            )
            from safetensors.torch import save_file

            save_file(sd, str(f))
            files.append(f)
        self.record["lora"] = {
            "rank": rank,
            "alpha": LIGHTNING_ALPHA,
            "layers": len(sd) // 3,
            "params": sum(v.numel() for k, v in sd.items() if not k.endswith(".alpha")),
            "layout": "lightning (transformer_blocks.N.<layer>.lora_down/lora_up + alpha)",
            "dtype": self.args.lora_dtype,
            "file_mb": round(files[0].stat().st_size / 1e6, 1),
        }
        del sd

        # 1. stock: PEFT LoRA through diffusers, Lightning's scheduler, CFG 1.
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            {**own_scheduler.config, **LIGHTNING_SCHEDULER}
        )
        pipe.load_lora_weights(str(files[0]), adapter_name="lightning")
        for size in sizes:
            for steps in (8, 4):
                self.measure(
                    f"stock-lightning-{steps}",
                    lambda st, sz: self.stock_image(pipe, st, sz),
                    steps,
                    size,
                    "unfused",
                    rank,
                )
        pipe.unload_lora_weights()
        pipe.scheduler = own_scheduler

        # 2. qwennb's plan (tuned path, compile) on the same weights.
        apply_plan(pipe, plan)
        pipe.qwennb = {"model": self.model, "plan": plan}
        for size in sizes:
            self.measure(
                "qwennb-nolora-8",
                lambda st, sz: self.qwennb_image(pipe, st, sz, "lightning-8"),
                8,
                size,
                "none",
                None,
            )
        # 3. unfused and hotswap-ready (qwennb.lora.add prepares the hotswap on a compiled plan)
        info = lora.add(pipe, files[0], 1.0, name="lightning")
        for size in sizes:
            self.measure(
                "qwennb-lightning-8-unfused",
                lambda st, sz: self.qwennb_image(pipe, st, sz, "lightning-8"),
                8,
                size,
                "unfused",
                rank,
            )
        # Hotswaps: to the second file (new to the process: its sha256 is computed in the background), back to the
        # first (hash cached), then the second again under cProfile; an image after each, recompiles counted.
        import cProfile
        import pstats

        before = recompiles()
        swaps = []
        plan_swaps = ((files[1], None), (files[0], None), (files[1], "sampled"), (files[0], "cprofile"))
        for i, (f, how) in enumerate(plan_swaps):
            sync()
            prof = cProfile.Profile() if how == "cprofile" else None
            sampler = StackSampler() if how == "sampled" else None
            threads = sorted(t.name for t in threading.enumerate())
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            with sampler or contextlib.nullcontext():
                lora.add(pipe, f, 1.0, name=info.name, hotswap=True)
                sync()
            if prof:
                prof.disable()
            swap_s = time.perf_counter() - t0
            stages = {k: round(v, 4) for k, v in lora.last_load_timings(pipe).items()}
            cpu = {k: round(v, 4) for k, v in lora.last_load_timings(pipe, cpu=True).items()}
            t0 = time.perf_counter()
            lora.file_sha256(f)  # a hash left to the background: how much longer it ran
            swap = {
                "file": f.name,
                "new_file": i == 0,
                "profiled": how or False,
                "hotswap_s": round(swap_s, 4),
                "stages": stages,
                "stages_cpu": cpu,  # the loading thread's CPU seconds: far below the wall time = it waited
                "hash_after_s": round(time.perf_counter() - t0, 4),
                "threads": threads,
            }
            swaps.append(swap)
            print(f"hotswap {i + 1}: {breakdown(swap)}", flush=True)
            if sampler:
                self.extra["hotswap_samples"] = sampler.top()
                for row in self.extra["hotswap_samples"][:12]:
                    print(f"  {row['s']:7.3f} s  {row['stack']}", flush=True)
            if prof:
                # Python 3.12+ cProfile (sys.monitoring) also records the other threads' calls and can lose or
                # stretch the main thread's frames: round 3's "10 s thread wait" may be one; trust the stages and
                # the sampled stacks first.
                stats = pstats.Stats(prof).sort_stats("cumulative")
                top = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:25]  # type: ignore[attr-defined]
                self.extra["hotswap_profile"] = [
                    {
                        "function": f"{k[0].split('site-packages/')[-1]}:{k[1]}({k[2]})",
                        "cum_s": round(v[3], 4),
                        "calls": v[1],
                    }
                    for k, v in top
                ]
            self.qwennb_image(pipe, 8, sizes[0], "lightning-8")
        self.extra["hotswap"] = {
            "hotswap_s": swaps[0]["hotswap_s"],  # the first swap to a file new to the process, as in round 1
            "hotswap_again_s": swaps[1]["hotswap_s"],  # a file swapped in before (its hash cached)
            "recompiles": recompiles() - before if before >= 0 else None,
            "size": sizes[0],
            "lora_file_mb": round(files[1].stat().st_size / 1e6, 1),
            "swaps": swaps,
        }
        self.save()
        # 4. fused: the LoRA in the weights, no PEFT layers left.
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[info.name])
        pipe.unload_lora_weights()
        pipe.qwennb.pop("loras", None)
        for size in sizes:
            for steps in (8, 4):
                self.measure(
                    f"qwennb-lightning-{steps}",
                    lambda st, sz: self.qwennb_image(pipe, st, sz, f"lightning-{st}"),
                    steps,
                    size,
                    "fused",
                    rank,
                )
        self.save()
        print(self.table({**self.record, **self.extra}))
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 1328])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--lora-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="the LoRA files' dtype (the Lightning releases ship -bf16 files; round 1 wrote fp32, 2.36 GB)",
    )
    ap.add_argument("--smoke", action="store_true", help="the tiny stand-in on the CPU, to check the script")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = min(args.repeats, 2), 1
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
