"""Stock diffusers against qwennb's tuned path, side by side, on full-size Qwen-Image with random weights.

Rerun on a CUDA machine with one 80 GB card (H100/H200) and qwennb installed, with one command:

    python benchmarks/speed.py --out benchmarks/results

It builds ``qwen-image-synthetic`` once on the GPU (bf16) and, in the same process, on the same weights,
prompt and seed, runs stock diffusers (``pipe(prompt=..., negative_prompt=" ", true_cfg_scale=...)`` as a
hand-written script would) and each qwennb configuration, alternating, after warm-up:

- ``stock``: the pipeline as loaded; ``stock+compile``: plus ``transformer.compile_repeated_blocks(fullgraph=True)``;
- ``qwennb``: the plan's tuned path (:mod:`qwennb.speed`), applied through ``qwennb.pipeline.apply_plan``;
- optional lossy modes: ``qwennb+fp8`` (fp8 matmuls), and at 50 steps ``qwennb+first_block`` /
  ``qwennb+taylorseer`` (step caches) beside ``stock`` and ``qwennb`` at 50 steps.

Per run: median s/step over the denoising loop (GPU-synchronised in ``callback_on_step_end``), total time,
text-encoding and decode time, peak GPU memory, achieved TFLOP/s and its share of an 8192^3 bf16 matmul
measured in the same run, and the relative L2 error of the final latents against stock on the same seed.
The rounding floor is stock against itself with SDPA forced to the flash kernel instead of cuDNN; a
configuration is called lossless when its error is within 3x that floor. Cold start (load + first image,
compile included) is measured for stock, stock+compile and qwennb; the qwennb one runs first in the
process, so it also pays for CUDA library start-up. A torch.profiler kernel-time breakdown of one CFG step
(two forwards) is recorded per configuration.

Writes ``speed-<card>.json`` (``card``, ``torch``, ``diffusers``, ``runs``: one row per configuration, size,
CFG and step count with ``s_per_step``, ``total_s``, ``peak_gpu_gb``, ``speedup_vs_stock``,
``latent_rel_err``, ``lossless`` ...; ``raw_runs``; ``cold_start``; ``profiles``) and ``speed-<card>.md``,
and prints the table last. ``--budget-s`` stops starting new sections after that many seconds (the JSON is
rewritten after every section).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# A fresh inductor cache, so that compile times are cold-start times (set before torch is imported).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="qwennb-inductor-"))

import torch  # noqa: E402
from stock_steps import card_slug  # benchmarks/ is the script's folder

PROMPT = "a red fox reading a newspaper in a cafe, watercolor"
PROMPT2 = "an old lighthouse on a cliff at dusk, waves crashing below, seagulls, oil painting, warm light"
SEED = 1234
LOSSLESS_FACTOR = 3.0  # within this many times the rounding floor counts as rounding-level drift


DEVICE = "cuda"  # --smoke runs the whole flow on the tiny model on the CPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1024**3 if DEVICE == "cuda" else 0.0


class Timer:
    """Device time of a region: CUDA events on the GPU, the host clock after a sync elsewhere."""

    def __enter__(self) -> Timer:
        if DEVICE == "cuda":
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if DEVICE == "cuda":
            self.e.record()
            self.e.synchronize()
            self.ms = self.s.elapsed_time(self.e)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


@contextlib.contextmanager
def _flash_transformer(transformer: Any) -> Any:
    """Run the (stock) transformer's attention with SDPA forced to the flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return type(transformer).forward(transformer, *args, **kwargs)

    transformer.forward = forward
    try:
        yield
    finally:
        del transformer.forward


class Sampler:
    """SM clock (MHz) and board power (W) sampled every 20 ms by NVML while the block runs."""

    def __enter__(self) -> Sampler:
        import threading

        self.clocks: list[float] = []
        self.power: list[float] = []
        self.stop = threading.Event()
        self.thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - no NVML (CPU smoke run): record nothing
            return self

        def loop() -> None:
            while not self.stop.wait(0.02):
                try:
                    self.clocks.append(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
                    self.power.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000)
                except Exception:  # noqa: BLE001
                    return

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def summary(self) -> dict[str, float | None]:
        return {
            "sm_mhz": statistics.median(self.clocks) if self.clocks else None,
            "power_w": statistics.median(self.power) if self.power else None,
        }


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """Median bf16 matmul rate of an n^3 product on random data, two input sets rotated."""
    a = [torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    for i in range(3):
        a[i % 2] @ b[i % 2]
    times = []
    for i in range(reps):
        with Timer() as t:
            a[i % 2] @ b[i % 2]
        times.append(t.ms / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw: list[dict[str, Any]] = []
        self.refs: dict[tuple[int, int, float, int], torch.Tensor] = {}
        self.floors: dict[tuple[int, int, float, int], float] = {}
        self.record: dict[str, Any] = {}
        self.stock_compiled: list[Any] | None = None
        self.current = None
        self.enc = {"s": 0.0, "lens": []}
        self.fwd_ref: torch.Tensor | None = None
        self.variants: dict[str, dict[str, Any]] = {}
        self.mark = {"t": 0.0}
        self.kept: list[dict[str, Any]] = []
        if getattr(args, "keep", None) and Path(args.keep).exists():
            old = json.loads(Path(args.keep).read_text())
            note = f"{old.get('date', 'an earlier run')} ({old.get('card')})"
            self.kept = [dict(r, source=r.get("source") or note) for r in old.get("raw_runs", [])]

    # ---- bookkeeping -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self, section: str) -> bool:
        if self.elapsed() > self.args.budget_s:
            self.record.setdefault("skipped", []).append(section)
            print(f"[{self.elapsed():.0f}s] budget spent: skipping {section}", flush=True)
            return True
        print(f"[{self.elapsed():.0f}s] section {section}", flush=True)
        return False

    def save(self) -> None:
        self.record["raw_runs"] = self.raw + self.kept  # kept rows carry their "source"
        self.record["runs"] = self.summary()
        self.record["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / f"speed-{self.slug}.json").write_text(json.dumps(self.record, indent=2, default=str))

    # ---- configurations ----------------------------------------------------------------------
    def set_config(self, name: str) -> float:
        """Switch the one pipeline to a configuration; returns the seconds the switch took."""
        from qwennb import speed
        from qwennb.pipeline import apply_plan

        t0 = time.perf_counter()
        tr = self.pipe.transformer
        if getattr(tr, "is_cache_enabled", False):
            tr.disable_cache()
        speed.disable_fast_path(tr)
        for b in tr.transformer_blocks:
            b._compiled_call_impl = None
        # Stock runs with PyTorch's defaults, qwennb with its plan's flags.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
        if name == "stock":
            pass
        elif name in self.variants:  # an ablation variant of the tuned path, with the plan's flags
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = DEVICE == "cuda"
            extra = {} if DEVICE == "cuda" else {"backend": "aot_eager"}
            speed.enable_fast_path(tr, compile=True, **self.variants[name], **extra)
        elif name == "stock+compile":
            if self.stock_compiled is None:
                extra = {} if DEVICE == "cuda" else {"backend": "aot_eager"}
                tr.compile_repeated_blocks(fullgraph=True, **extra)
                self.stock_compiled = [b._compiled_call_impl for b in tr.transformer_blocks]
            else:
                for b, c in zip(tr.transformer_blocks, self.stock_compiled, strict=True):
                    b._compiled_call_impl = c
        elif name in ("qwennb+fp8", "qwennb-nobatch"):
            # fp8: the plan's fp8 arrangement replaces the bf16 weights for good; here they are kept (fp8="copy",
            # the same matmuls) so that the other configurations can run after it on the same weights.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = DEVICE == "cuda"
            extra = {} if DEVICE == "cuda" else {"backend": "aot_eager"}
            opts = {"fp8": "copy"} if name == "qwennb+fp8" else {"batch_cfg": False}
            speed.enable_fast_path(tr, compile=True, scheduler=self.pipe.scheduler, **opts, **extra)
        elif name.startswith("qwennb"):
            fp8 = False
            cache = name.split("+", 1)[1] if "+" in name else None
            if DEVICE == "cuda":
                plan = self.plan
                plan.cache = cache
                apply_plan(self.pipe, plan)
                plan.cache = None
            else:  # the smoke run: apply_plan leaves a CPU pipeline alone, so switch the path directly
                speed.enable_fast_path(
                    tr, compile=True, fp8=fp8, backend="aot_eager", scheduler=self.pipe.scheduler
                )
                if cache:
                    speed.apply_cache(tr, cache)
        else:
            raise ValueError(name)
        sync()
        self.current = name
        return time.perf_counter() - t0

    # ---- one image ---------------------------------------------------------------------------
    def image(
        self,
        config: str,
        size: int,
        cfg: float,
        steps: int,
        prompt: str = PROMPT,
        phase: str = "timed",
        sdpa: str | None = None,
    ) -> dict[str, Any]:
        if self.current != config:
            self.set_config(config)
        pipe = self.pipe
        times: list[float] = []
        state: dict[str, Any] = {}
        self.enc["s"], self.enc["lens"] = 0.0, []

        def cb(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            sync()
            now = time.perf_counter()
            times.append(now - self.mark["t"])
            self.mark["t"] = now
            if i == steps - 1:
                state["latents"] = kw["latents"].detach().float().clone()
            return {}

        ctx: Any = contextlib.nullcontext()
        if sdpa == "flash":  # the transformer's attention only (the VAE's has no flash kernel)
            ctx = _flash_transformer(pipe.transformer)
        reset_peak()
        sync()
        t0 = time.perf_counter()
        self.mark["t"] = t0
        with ctx, Sampler() as sampler:
            pipe(
                prompt=prompt,
                negative_prompt=" ",
                true_cfg_scale=cfg,
                num_inference_steps=steps,
                width=size,
                height=size,
                generator=torch.Generator("cpu").manual_seed(SEED),
                callback_on_step_end=cb,
            )
        sync()
        end = time.perf_counter()
        lat = state.pop("latents")
        ok = bool(torch.isfinite(lat).all())
        key = (size, size, cfg, steps)
        err = None
        if prompt == PROMPT and phase in ("timed", "floor", "first"):
            ref = self.refs.get(key)
            if config == "stock" and sdpa is None and ref is None:
                self.refs[key] = lat
                ref = lat
            if ref is not None:
                err = float((lat - ref).norm() / ref.norm())
        if sdpa == "flash" and err is not None:
            self.floors[key] = err
        from qwennb.models import load_config
        from qwennb.plan import transformer_flops

        tconf = load_config("qwen-image", "transformer")
        lens = self.enc["lens"] or [77]
        passes = lens[:2] if cfg > 1 else lens[:1]
        flops = sum(transformer_flops(tconf, size, size, n) for n in passes)
        s_step = statistics.median(times) if times else None
        row = {
            "config": config + ("(flash)" if sdpa == "flash" else ""),
            "phase": phase,
            "width": size,
            "height": size,
            "cfg": cfg,
            "steps": steps,
            "prompt": prompt,
            "text_tokens": lens,
            "s_per_step": s_step,
            "mean_s_per_step": sum(times) / len(times) if times else None,
            "step_times_s": [round(x, 5) for x in times],
            "total_s": end - t0,
            "text_encoding_s": self.enc["s"],
            "decode_s": end - self.mark["t"],
            "peak_gpu_gb": peak_gb(),
            "tflops": flops / s_step / 1e12 if s_step else None,
            "latent_rel_err": err,
            "finite": ok,
            **sampler.summary(),
        }
        if row["tflops"] and self.peak:
            row["share_of_matmul_peak"] = row["tflops"] / self.peak
        tr = self.pipe.transformer
        st = getattr(tr, "_qwennb_fast", None)
        if st is not None:
            row["fast_stats"] = dict(st.stats)
        self.raw.append(row)
        print(
            f"[{self.elapsed():.0f}s] {row['config']:<20} {phase:<6} {size} cfg{cfg:g} {steps}st "
            f"s/step {s_step:.4f} total {row['total_s']:.2f} peak {row['peak_gpu_gb']:.2f} "
            f"err {err if err is None else f'{err:.2e}'}",
            flush=True,
        )
        return row

    # ---- summary -----------------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in self.raw:
            if r["phase"] not in ("timed", "floor") or r["prompt"] != PROMPT:
                continue
            groups.setdefault((r["config"], r["width"], r["height"], r["cfg"], r["steps"]), []).append(r)
        kept: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in self.kept:  # --keep: rows of an earlier run for what this run did not measure
            key = (r["config"], r["width"], r["height"], r["cfg"], r["steps"])
            if key not in groups and r["phase"] in ("timed", "floor") and r["prompt"] == PROMPT:
                kept.setdefault(key, []).append(r)
        groups.update(kept)
        rows = []
        for (config, w, h, cfg, steps), rs in groups.items():

            def med(k: str, rs: list[dict[str, Any]] = rs) -> float | None:
                xs = [r[k] for r in rs if r.get(k) is not None]
                return statistics.median(xs) if xs else None

            errs = [r["latent_rel_err"] for r in rs if r.get("latent_rel_err") is not None]
            err = max(errs) if errs else None
            rows.append(
                {
                    "config": config,
                    "width": w,
                    "height": h,
                    "cfg": cfg,
                    "steps": steps,
                    "repeats": len(rs),
                    "source": rs[0].get("source"),
                    "s_per_step": med("s_per_step"),
                    "mean_s_per_step": med("mean_s_per_step"),
                    "sm_mhz": med("sm_mhz"),
                    "power_w": med("power_w"),
                    "total_s": med("total_s"),
                    "text_encoding_s": med("text_encoding_s"),
                    "decode_s": med("decode_s"),
                    "peak_gpu_gb": max(r["peak_gpu_gb"] for r in rs),
                    "tflops": med("tflops"),
                    "share_of_matmul_peak": med("share_of_matmul_peak"),
                    "latent_rel_err": err,
                }
            )
        kept_stock = {
            (r["width"], r["height"], r["cfg"], r["steps"], r["source"]): r
            for r in self.kept
            if r["config"] == "stock" and r["phase"] == "timed" and r["prompt"] == PROMPT
        }
        for r in rows:
            stock = next(
                (
                    x
                    for x in rows
                    if x["config"] == "stock"
                    and (x["width"], x["height"], x["cfg"], x["steps"])
                    == (r["width"], r["height"], r["cfg"], r["steps"])
                ),
                None,
            )
            own = kept_stock.get((r["width"], r["height"], r["cfg"], r["steps"], r.get("source")))
            if own is not None and r.get("source"):  # a kept row: against the stock of its own run
                stock = {"s_per_step": own["s_per_step"], "mean_s_per_step": own["mean_s_per_step"]}
            # Step caches make steps unequal (a computed step, then cheap ones): compare their mean.
            k = (
                "mean_s_per_step"
                if any(m in r["config"] for m in ("first_block", "taylorseer"))
                else "s_per_step"
            )
            r["speedup_vs_stock"] = stock[k] / r[k] if stock and r[k] else None
            r["speedup_basis"] = k
            if k != "s_per_step":  # skipped steps do no work: a rate per step means nothing there
                r["tflops"] = r["share_of_matmul_peak"] = None
            key = (r["width"], r["height"], r["cfg"], r["steps"])
            floor = self.floors.get(key)
            if floor is None:  # the floor of the same size at CFG 4, or any measured one
                floor = self.floors.get((r["width"], r["height"], 4.0, r["steps"])) or next(
                    iter(self.floors.values()), None
                )
            r["rounding_floor"] = floor
            err = r["latent_rel_err"]
            lossy_by_design = any(m in r["config"] for m in ("fp8", "first_block", "taylorseer"))
            if r["config"] == "stock":
                r["lossless"] = True
            elif err is None or not floor:
                r["lossless"] = None
            else:
                r["err_over_floor"] = err / floor if floor else None
                r["lossless"] = (not lossy_by_design) and err <= LOSSLESS_FACTOR * floor
        order = {"stock": 0, "stock(flash)": 1, "stock+compile": 2, "qwennb": 3}
        rows.sort(key=lambda r: (r["steps"], r["width"], -r["cfg"], order.get(r["config"], 9), r["config"]))
        return rows

    def ablation_table(self) -> str:
        abl = self.record.get("ablation", {})
        lines = [
            f"# Ablation of the tuned path on {self.record['card']}: one CFG step (cond + uncond forward) at "
            f"{self.args.sizes.split(',')[0]}², median of 7 (CUDA events); kernel time by kind from torch.profiler",
            "",
            "| variant | step ms | GEMM | attention | Triton | other | kernels | warm-up s | forward err | SM MHz | W |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, p in abl.items():
            if "error" in p:
                lines.append(f"| {name} | error: {p['error'][:80]} |  |  |  |  |  |  |  |  |  |")
                continue
            k = p["by_kind_ms"]
            err = p.get("forward_rel_err")
            lines.append(
                f"| {name} | {p['wall_ms']:.1f} | {k.get('gemm', 0):.1f} | {k.get('attention', 0):.1f} "
                f"| {k.get('triton', 0):.1f} | {k.get('other', 0):.1f} | {p['kernels']} | {p['warmup_s']:.1f} "
                f"| {'–' if err is None else f'{err:.2e}'} | {p.get('sm_mhz') or '–'} | "
                f"{'–' if p.get('power_w') is None else format(p['power_w'], '.0f')} |"
            )
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        rows = self.summary()
        rec = self.record
        lines = [
            f"# Speed: stock diffusers vs qwennb on {rec['card']}",
            "",
            f"torch {rec['torch']}, diffusers {rec['diffusers']}; full-size Qwen-Image with random weights "
            f"(qwen-image-synthetic), bf16, seed {SEED}, same process and weights, configurations alternated "
            f"after warm-up. bf16 matmul peak measured in the run: {rec.get('matmul_peak_tflops', 0):.0f} "
            "TFLOP/s (8192^3). Latent error: relative L2 of the final latents against stock (same seed); the "
            "floor is stock with SDPA forced to flash instead of cuDNN.",
            "",
            "| config | size | CFG | steps | s/step | speed-up | total s | text enc s | decode s | peak GiB "
            "| TFLOP/s | of peak | latent err | x floor | lossless |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]

        def f(x: Any, fmt: str) -> str:
            return "–" if x is None else format(x, fmt)

        for r in rows:
            lines.append(
                f"| {r['config']}{' †' if r.get('source') else ''} | {r['width']}² | {r['cfg']:g} | {r['steps']} "
                f"| {f(r[r['speedup_basis']], '.3f')}{' (mean)' if r['speedup_basis'] != 's_per_step' else ''} "
                f"| {f(r['speedup_vs_stock'], '.2f')}× | {f(r['total_s'], '.2f')} "
                f"| {f(r['text_encoding_s'], '.3f')} | {f(r['decode_s'], '.3f')} | {f(r['peak_gpu_gb'], '.2f')} "
                f"| {f(r['tflops'], '.0f')} | {f(r.get('share_of_matmul_peak'), '.0%')} "
                f"| {f(r['latent_rel_err'], '.2e')} | {f(r.get('err_over_floor'), '.1f')} "
                f"| {'–' if r['lossless'] is None else ('yes' if r['lossless'] else 'no')} |"
            )
        cold = rec.get("cold_start", {})
        if cold:
            lines += [
                "",
                f"Cold start ({self.args.sizes.split(',')[0]}², CFG 4, {self.args.steps} steps; load = building "
                "the weights on the GPU):",
                "",
                "| config | load s | apply s | first image s | cold start s | steady image s | compile ≈ s "
                "| first image, later session s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for name, c in cold.items():
                lines.append(
                    f"| {name} | {f(c.get('load_s'), '.1f')} | {f(c.get('apply_s'), '.1f')} "
                    f"| {f(c.get('first_image_s'), '.1f')} | {f(c.get('cold_start_s'), '.1f')} "
                    f"| {f(c.get('steady_image_s'), '.2f')} | {f(c.get('compile_s'), '.1f')} "
                    f"| {f(c.get('first_image_warm_cache_s'), '.1f')} |"
                )
        profs = rec.get("profiles", {})
        if profs:
            lines += [
                "",
                f"One CFG step (cond + uncond forward) at {self.args.sizes.split(',')[0]}², CUDA kernel time by "
                "kind (torch.profiler), ms:",
                "",
                "| config | wall | GEMM | attention | Triton | other | kernel sum | kernels |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for name, p in profs.items():
                if "error" in p:
                    lines.append(f"| {name} | error: {p['error'][:60]} |  |  |  |  |  |  |")
                    continue
                k = p["by_kind_ms"]
                lines.append(
                    f"| {name} | {p['wall_ms']:.1f} | {k.get('gemm', 0):.1f} | {k.get('attention', 0):.1f} "
                    f"| {k.get('triton', 0):.1f} | {k.get('other', 0):.1f} | {p['kernel_ms']:.1f} "
                    f"| {p['kernels']} |"
                )
        sources = sorted({r["source"] for r in rows if r.get("source")})
        if sources:
            lines += [
                "",
                "† from an earlier run on the same card, same weights and seed: " + "; ".join(sources),
            ]
        if rec.get("skipped"):
            lines += ["", f"Skipped for time: {', '.join(rec['skipped'])}."]
        for note in rec.get("notes", []):
            lines += ["", f"Note: {note}"]
        if rec.get("errors"):
            lines += [
                "",
                "Errors: " + "; ".join(f"{k}: {v.splitlines()[-1]}" for k, v in rec["errors"].items()),
            ]
        return "\n".join(lines) + "\n"

    # ---- profile -----------------------------------------------------------------------------
    def profile_step(
        self, config: str, size: int = 1024, reps: int = 5, sdpa: str | None = None
    ) -> dict[str, Any]:
        """Kernel time of one CFG step (cond forward + uncond forward, a new timestep), its wall time
        (median of ``reps``), clocks, and the relative error of one forward's output against stock's."""
        from torch.profiler import ProfilerActivity, profile

        if self.current != config:
            self.set_config(config)
        pipe, tr = self.pipe, self.pipe.transformer
        ctx: Any = contextlib.nullcontext()
        if sdpa == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        with torch.no_grad(), ctx:  # as the pipeline (the CFG pairing needs version counters)
            cond, _ = pipe.encode_prompt(PROMPT, device=DEVICE)
            unc, _ = pipe.encode_prompt(" ", device=DEVICE)
            g = torch.Generator(DEVICE).manual_seed(0)
            dt = cond.dtype
            lat = torch.randn(1, (size // 16) ** 2, 64, device=DEVICE, dtype=dt, generator=g)
            shapes = [[(1, size // 16, size // 16)]]
            ts = iter(torch.linspace(0.9, 0.1, 64, device=DEVICE, dtype=dt))

            def step() -> None:
                t = next(ts).reshape(1)
                for emb in (cond, unc):
                    tr(
                        hidden_states=lat,
                        encoder_hidden_states=emb,
                        encoder_hidden_states_mask=None,
                        timestep=t,
                        img_shapes=shapes,
                        return_dict=False,
                    )

            t0 = time.perf_counter()
            for _ in range(2):
                step()
            sync()
            warm_s = time.perf_counter() - t0
            walls = []
            with Sampler() as sampler:
                for _ in range(reps):
                    with Timer() as t:
                        step()
                    walls.append(t.ms)
            fixed = torch.full((1,), 0.5, device=DEVICE, dtype=dt)
            out = tr(
                hidden_states=lat,
                encoder_hidden_states=cond,
                encoder_hidden_states_mask=None,
                timestep=fixed,
                img_shapes=shapes,
                return_dict=False,
            )[0].float()
            if config == "stock" and sdpa is None and self.fwd_ref is None:
                self.fwd_ref = out
            fwd_err = (
                float((out - self.fwd_ref).norm() / self.fwd_ref.norm()) if self.fwd_ref is not None else None
            )
            act = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
            with profile(activities=[act]) as prof:
                step()
                sync()
        kinds: dict[str, float] = {}
        top: dict[str, float] = {}
        n = 0
        for ev in prof.events():
            if DEVICE == "cuda" and getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            if DEVICE == "cuda":
                dur = (getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)) / 1e3  # ms
            else:
                dur = getattr(ev, "self_cpu_time_total", 0.0) / 1e3
            name = ev.name
            low = name.lower()
            if low.startswith("triton"):
                kind = "triton"
            elif any(x in low for x in ("fmha", "flash", "sdpa", "attention", "fprop")):
                kind = "attention"
            elif any(
                x in low for x in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk", "scaled_mm", "f8f8")
            ):
                kind = "gemm"
            else:
                kind = "other"
            kinds[kind] = kinds.get(kind, 0.0) + dur
            top[name[:90]] = top.get(name[:90], 0.0) + dur
            n += 1
        return {
            "wall_ms": statistics.median(walls),
            "walls_ms": walls,
            "warmup_s": warm_s,
            "forward_rel_err": fwd_err,
            **sampler.summary(),
            "by_kind_ms": {k: round(v, 2) for k, v in kinds.items()},
            "kernel_ms": round(sum(kinds.values()), 2),
            "kernels": n,
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:20]),
            "text_tokens": [cond.shape[1], unc.shape[1]],
        }

    # ---- the run -----------------------------------------------------------------------------
    def section(self, name: str, fn: Any) -> None:
        if self.over_budget(name):
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 - record and go on with the next section
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.record.setdefault("errors", {})[name] = tb[-3000:]
            with contextlib.suppress(Exception):
                self.set_config("stock")
        self.save()

    def run(self) -> int:
        import diffusers
        import transformers

        from qwennb import __version__
        from qwennb.hardware import detect
        from qwennb.plan import OptimizationConfig, make_plan
        from qwennb.stand_ins import build_synthetic_pipeline

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        a = self.args
        card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-smoke"
        self.slug = card_slug(card)
        self.record.update(
            {
                "card": card,
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "qwennb": __version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "args": vars(a),
                "lossless_rule": f"latent_rel_err <= {LOSSLESS_FACTOR} x rounding floor, and exact math by design",
            }
        )
        self.peak = matmul_peak_tflops() if DEVICE == "cuda" else matmul_peak_tflops(256, 3)
        self.record["matmul_peak_tflops"] = self.peak
        sync()
        t0 = time.perf_counter()
        if DEVICE == "cuda":
            self.pipe = build_synthetic_pipeline("cuda", torch.bfloat16)
        else:
            from qwennb.stand_ins import build_tiny_pipeline

            self.pipe = build_tiny_pipeline(seed=0)
        sync()
        load_s = time.perf_counter() - t0
        self.pipe.set_progress_bar_config(disable=True)
        self.record["load_s"] = load_s
        if DEVICE == "cuda":
            self.record["weights_gpu_gb"] = torch.cuda.memory_allocated() / 1024**3
            hw = detect()
            self.plan = make_plan(hw, "qwen-image-synthetic", OptimizationConfig(compile=True))
            self.plan_fp8 = make_plan(
                hw, "qwen-image-synthetic", OptimizationConfig(compile=True, fp8_matmul=True)
            )
            self.record["plan"] = self.plan.to_dict()
            self.record["plan_fp8"] = self.plan_fp8.to_dict()

        encode = self.pipe.encode_prompt

        def timed_encode(*args: Any, **kwargs: Any) -> Any:
            sync()
            t = time.perf_counter()
            out = encode(*args, **kwargs)
            sync()
            now = time.perf_counter()
            self.enc["s"] += now - t
            self.enc["lens"].append(int(out[0].shape[1]))
            self.mark["t"] = now  # the first step's time starts after encoding
            return out

        self.pipe.encode_prompt = timed_encode
        cold: dict[str, Any] = {}
        self.record["cold_start"] = cold
        sizes = [int(s) for s in a.sizes.split(",")]
        base = sizes[0]

        def cold_starts() -> None:
            # qwennb first: it pays for CUDA library start-up as well as its compile.
            from torch._dynamo.utils import counters

            apply_s = self.set_config("qwennb")
            first = self.image("qwennb", base, 4.0, a.steps, phase="first")
            graphs = dict(counters["stats"])
            other = self.image("qwennb", base, 4.0, a.steps, prompt=PROMPT2, phase="newlen")
            steady = self.image("qwennb", base, 4.0, a.steps, phase="warm")
            cold["qwennb"] = {
                "load_s": load_s,
                "apply_s": apply_s,
                "first_image_s": first["total_s"],
                "cold_start_s": load_s + apply_s + first["total_s"],
                "steady_image_s": steady["total_s"],
                "compile_s": first["total_s"] - steady["total_s"],
                "new_prompt_length_image_s": other["total_s"],
                "dynamo_after_first": graphs,
                "dynamo_after_new_length": dict(counters["stats"]),
            }
            first = self.image("stock", base, 4.0, a.steps, phase="first")
            steady = self.image("stock", base, 4.0, a.steps, phase="warm")
            cold["stock"] = {
                "load_s": load_s,
                "apply_s": 0.0,
                "first_image_s": first["total_s"],
                "cold_start_s": load_s + first["total_s"],
                "steady_image_s": steady["total_s"],
                "compile_s": 0.0,
            }
            apply_s = self.set_config("stock+compile")
            first = self.image("stock+compile", base, 4.0, a.steps, phase="first")
            other = self.image("stock+compile", base, 4.0, a.steps, prompt=PROMPT2, phase="newlen")
            steady = self.image("stock+compile", base, 4.0, a.steps, phase="warm")
            cold["stock+compile"] = {
                "load_s": load_s,
                "apply_s": apply_s,
                "first_image_s": first["total_s"],
                "cold_start_s": load_s + apply_s + first["total_s"],
                "steady_image_s": steady["total_s"],
                "compile_s": first["total_s"] - steady["total_s"],
                "new_prompt_length_image_s": other["total_s"],
            }

        def timed(size: int, repeats: int) -> Any:
            def go() -> None:
                configs = ["stock", "stock+compile", "qwennb", "qwennb-nobatch"]
                if size != base:  # a new size: warm every configuration up (stock+compile recompiles)
                    for c in configs:
                        self.image(c, size, 4.0, 3, phase="warmup")
                for r in range(repeats):
                    for cfg in (4.0, 1.0):
                        for c in configs if r % 2 == 0 else configs[::-1]:
                            self.image(c, size, cfg, a.steps)
                self.image("stock", size, 4.0, a.steps, phase="floor", sdpa="flash")
                if size == base:
                    self.image("stock", size, 1.0, a.steps, phase="floor", sdpa="flash")

            return go

        def profiles() -> None:
            profs = self.record.setdefault("profiles", {})
            for c in ("stock", "stock+compile", "qwennb", "qwennb-nobatch"):
                try:
                    profs[c] = self.profile_step(c, base)
                except Exception as exc:  # noqa: BLE001
                    profs[c] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"[{self.elapsed():.0f}s] profile {c}: {profs[c].get('wall_ms')}", flush=True)

        def fp8() -> None:
            t = self.set_config("qwennb+fp8")
            first = self.image("qwennb+fp8", base, 4.0, a.steps, phase="first")
            cold["qwennb+fp8"] = {"apply_s": t, "first_image_s": first["total_s"]}
            for _ in range(2):
                self.image("qwennb+fp8", base, 4.0, a.steps)
            self.image("qwennb+fp8", base, 1.0, a.steps)
            for size in sizes[1:]:
                free = 99.0
                if DEVICE == "cuda":  # free on the card plus what the allocator holds unused
                    unused = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
                    free = (torch.cuda.mem_get_info()[0] + unused) / 1024**3
                if free < 9:
                    self.record.setdefault("notes", []).append(f"fp8 at {size}: skipped, {free:.1f} GiB free")
                    continue
                self.image("qwennb+fp8", size, 4.0, 3, phase="warmup")
                self.image("qwennb+fp8", size, 4.0, a.steps)
            profs = self.record.setdefault("profiles", {})
            profs["qwennb+fp8"] = self.profile_step("qwennb+fp8", base)

        def caches() -> None:
            n = a.cache_steps
            for c in ("stock", "qwennb", "qwennb+first_block", "qwennb+taylorseer"):
                self.image(c, base, 4.0, n)

        def ablation() -> None:
            self.variants = {
                "A: fused QKV, dispatch, stack RoPE (run 1)": dict(
                    fuse_qkv=True, sdpa_op=False, rope_style="stack"
                ),
                "B: A without fused QKV": dict(fuse_qkv=False, sdpa_op=False, rope_style="stack"),
                "C: B with pair-table RoPE": dict(fuse_qkv=False, sdpa_op=False, rope_style="pairs"),
                "D: C with the BSHD SDPA op": dict(fuse_qkv=False, sdpa_op=True, rope_style="pairs"),
                "E: D without GELU epilogue": dict(
                    fuse_qkv=False, sdpa_op=True, rope_style="pairs", gelu_epilogue=False
                ),
                "F: D without modulation reuse": dict(
                    fuse_qkv=False, sdpa_op=True, rope_style="pairs", cache_modulation=False
                ),
            }
            abl = self.record.setdefault("ablation", {})
            self.record["ablation_variants"] = self.variants
            names = ["stock", "stock(flash)", "stock+compile", *self.variants]
            for c in names:
                try:
                    if c == "stock(flash)":
                        abl[c] = self.profile_step("stock", base, reps=7, sdpa="flash")
                    else:
                        abl[c] = self.profile_step(c, base, reps=7)
                except Exception as exc:  # noqa: BLE001
                    abl[c] = {
                        "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()[-2000:],
                    }
                print(
                    f"[{self.elapsed():.0f}s] {c}: {abl[c].get('wall_ms')} ms, warm-up {abl[c].get('warmup_s')} s, "
                    f"err {abl[c].get('forward_rel_err')}, {abl[c].get('sm_mhz')} MHz {abl[c].get('power_w')} W",
                    flush=True,
                )
                self.save()

        def warm_cache_compile() -> None:
            # A second session on the same machine: dynamo forgets, inductor's on-disk caches stay.
            torch._dynamo.reset()
            self.set_config("stock")
            self.set_config("qwennb")
            first = self.image("qwennb", base, 4.0, a.steps, phase="first2")
            cold["qwennb"]["first_image_warm_cache_s"] = first["total_s"]

        if a.ablate:
            self.section("ablation", ablation)
            self.save()
            md = self.ablation_table()
            (self.out / f"speed-ablation-{self.slug}.md").write_text(md)
            print(md, flush=True)
            return 0
        self.section("cold_starts", cold_starts)
        self.section(f"timed_{base}", timed(base, a.repeats))
        self.section("profiles", profiles)
        for size in sizes[1:]:
            self.section(f"timed_{size}", timed(size, a.repeats_large))
        if not a.no_fp8:
            self.section("fp8", fp8)
        if not a.no_cache:
            self.section("caches", caches)
        self.section("warm_cache_compile", warm_cache_compile)
        self.save()
        md = self.table()
        (self.out / f"speed-{self.slug}.md").write_text(md)
        print(md, flush=True)
        return 0


def render(args: argparse.Namespace) -> int:
    """Recompute a result file's summary rows and table from its raw rows, adding ``--note`` lines."""
    rec = json.loads(Path(args.render).read_text())
    bench = Bench(argparse.Namespace(**{**rec["args"], "out": args.out, "keep": args.keep}))
    bench.record = rec
    bench.raw = [r for r in rec["raw_runs"] if not r.get("source")]
    seen = {json.dumps(r, sort_keys=True, default=str) for r in bench.kept}
    bench.kept += [
        r
        for r in rec["raw_runs"]
        if r.get("source") and json.dumps(r, sort_keys=True, default=str) not in seen
    ]
    for r in bench.raw + bench.kept:
        if r["config"] == "stock(flash)" and r.get("latent_rel_err") is not None:
            bench.floors.setdefault((r["width"], r["height"], r["cfg"], r["steps"]), r["latent_rel_err"])
    bench.slug = card_slug(rec["card"])
    rec["notes"] = [*rec.get("notes", []), *args.note]
    bench.save()
    md = bench.table()
    (bench.out / f"speed-{bench.slug}.md").write_text(md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", default="1024,1328", help="square sizes, the first one is the main one")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats at the first size")
    ap.add_argument("--repeats-large", type=int, default=1, help="timed repeats at the other sizes")
    ap.add_argument("--cache-steps", type=int, default=50)
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new section after this many s")
    ap.add_argument("--smoke", action="store_true", help="the whole flow on the tiny model on the CPU")
    ap.add_argument(
        "--keep", help="an earlier speed-<card>.json: keep its rows for what this run does not measure"
    )
    ap.add_argument(
        "--ablate", action="store_true", help="only time variants of the tuned path (one CFG step)"
    )
    ap.add_argument(
        "--render", help="rewrite a speed-<card>.json's summary and table (no GPU); with --keep and --note"
    )
    ap.add_argument(
        "--note", action="append", default=[], help="with --render: a note printed under the table"
    )
    args = ap.parse_args(argv)
    if args.render:
        return render(args)
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
