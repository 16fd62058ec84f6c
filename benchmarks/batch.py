"""Batch throughput: the same prompts on 1 and 2 GPUs, with the local engine and with Ray.

Full size (run by the lead on 2×H200): the full-size synthetic model (real configs, random weights), 1024²,
20 steps, CFG 4, 32 prompts. Writes ``benchmarks/results/batch-<card>.json`` with ``card`` and ``runs``
(``gpus``, ``engine``, ``images``, ``images_per_s``, ``speedup_vs_1gpu``, and the time outside the denoising
loop). Each run uses a fresh output folder; each worker loads its pipeline and makes one warm-up image before
its first counted item, and throughput is counted over the workers' generating window (first item's start to
last item's end, by the workers' clocks).

Time outside the loop, two ways:
- ``outside_denoise_share``: inside each item's worker call, the share not spent in the denoising loop
  (1 - sum(denoise_s) / sum(worker_s)), what #19 first measured;
- ``outside_loop_share``: what the GPU really waits between loops: on each worker, from one item's last step
  to the next item's first step (the pipeline call's start), over the time from one loop's start to the next
  (scheduling and the hand-over between items included). ``gap_breakdown_s`` splits that gap (means):
  ``decode`` (the VAE and the conversion to an image), ``after_decode`` (the rest of the item's call),
  ``handoff`` (the worker's return to its next call's start), ``before_encode`` (the next call's set-up) and
  ``text_encoding``. ``write_s`` is the coordinator's PNG encode and write per image (off the workers' path),
  ``write_lag_s`` how long after the worker's return the PNG was on disk.

``--smoke`` checks that the script runs on a CPU: the small model, 64², 2 steps, 6 prompts, "GPUs" are CPU
worker processes. Its numbers say nothing about GPUs; ``--model``, ``--size``, ``--steps`` change it (e.g. the
toy model at 256² to see the gap's parts on a CPU).

    python benchmarks/batch.py              # on the GPU machine
    python benchmarks/batch.py --smoke      # anywhere
    python benchmarks/batch.py --smoke --model toy --size 256 --steps 4 --prompts 10 --engines local
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwennb.batch import Manifest, run_batch  # noqa: E402
from qwennb.hardware import detect  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def card_slug(hw) -> str:
    g = hw.best_gpu
    return re.sub(r"[^a-z0-9]+", "-", (g.name if g else "cpu").lower()).strip("-")


GAP_PARTS = ("decode", "after_decode", "handoff", "before_encode", "text_encoding")


def gap_stats(rows: list[dict]) -> dict:
    """The gap between consecutive items' denoising loops on each worker, and its parts (see the docstring)."""
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for x in rows:
        if x.get("loop_began") is not None:
            by_worker[x["worker"]].append(x)
    gaps, cycles, parts = [], 0.0, dict.fromkeys(GAP_PARTS, 0.0)
    for items in by_worker.values():
        items.sort(key=lambda x: x["loop_began"])
        for a, b in zip(items, items[1:], strict=False):
            gaps.append(b["loop_began"] - a["loop_ended"])
            cycles += b["loop_began"] - a["loop_began"]
            parts["decode"] += a["decode_s"]
            parts["after_decode"] += a["ended"] - a["loop_ended"] - a["decode_s"]
            parts["handoff"] += b["began"] - a["ended"]
            parts["before_encode"] += b["loop_began"] - b["began"] - b["text_encoding_s"]
            parts["text_encoding"] += b["text_encoding_s"]
    n = len(gaps)
    writes = [x["write_s"] for x in rows if x.get("write_s") is not None]
    lags = [x["written"] - x["ended"] for x in rows if x.get("written") is not None]
    return {
        "outside_loop_share": round(sum(gaps) / cycles, 4) if cycles else None,
        "gap_s": round(sum(gaps) / n, 4) if n else None,
        "gap_max_s": round(max(gaps), 4) if n else None,
        "gap_breakdown_s": {k: round(v / n, 4) for k, v in parts.items()} if n else None,
        "gaps": n,
        "write_s": round(sum(writes) / len(writes), 4) if writes else None,
        "write_lag_s": round(sum(lags) / len(lags), 4) if lags else None,
    }


def one_run(engine: str, gpus: int, prompts: list[str], opts: dict, smoke: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"qwennb-batch-{engine}-{gpus}-"))
    kw = dict(opts, warmup=True)  # each worker makes one throwaway image first (load, compile, caches)
    if engine == "ray":
        kw.update(ray="local", workers=gpus)
    elif smoke:
        kw["workers"] = gpus
    else:
        kw["gpus"] = gpus
    t0 = time.perf_counter()
    r = run_batch(prompts, out, **kw)
    wall = time.perf_counter() - t0
    rows = [x for x in Manifest(out).load().values() if x.get("status") == "done"]
    # Throughput over the generating window, from the workers' own clocks: the first item's start to the
    # last item's end (loading and warm-up excluded; scheduling, transfers and writing included).
    window = max(x["ended"] for x in rows) - min(x["began"] for x in rows)
    denoise = sum(x["denoise_s"] for x in rows)
    worker = sum(x["worker_s"] for x in rows)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "gpus": gpus,
        "engine": engine,
        "images": r.done,
        "failed": r.failed,
        "window_s": round(window, 3),
        "wall_s_with_load": round(wall, 3),
        "images_per_s": round(r.done / window, 4),
        "outside_denoise_share": round(1 - denoise / worker, 4) if worker else None,
        **gap_stats(rows),
        "busy_share": round(worker / (window * gpus), 4),
        "median_step_s": sorted(x["median_step_s"] for x in rows)[len(rows) // 2],
        "workers": r.workers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU check with the small model")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--model", default=None, help="with --smoke: another small model (e.g. toy)")
    ap.add_argument("--size", type=int, default=None, help="with --smoke: the image side (default 64)")
    ap.add_argument("--steps", type=int, default=None, help="with --smoke: steps (default 2)")
    ap.add_argument(
        "--out", default=None, help="results file or folder (default benchmarks/results/batch-<card>.json)"
    )
    args = ap.parse_args()
    hw = detect()
    if args.smoke:
        side = args.size or 64
        model = args.model or "tiny"
        opts, n = {"steps": args.steps or 2, "size": (side, side), "cfg": 4.0}, args.prompts or 6
        gpu_counts = [1, 2]
    else:
        if len(hw.gpus) < 2:
            print("needs 2 GPUs (use --smoke on a CPU)", file=sys.stderr)
            return 2
        model, opts, n = (
            "qwen-image-synthetic",
            {"steps": 20, "size": (1024, 1024), "cfg": 4.0},
            args.prompts or 32,
        )
        gpu_counts = [1, 2]
    opts["model"] = model
    prompts = [f"benchmark prompt {i}: a lighthouse on a cliff at dusk, number {i}" for i in range(n)]
    card = "smoke-cpu" if args.smoke else card_slug(hw)
    default = Path(tempfile.gettempdir()) if args.smoke else RESULTS  # smoke numbers are not results
    path = Path(args.out) if args.out else default / f"batch-{card}.json"
    if path.is_dir():
        path = path / f"batch-{card}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []

    def write() -> None:  # after every run, so that a run cut short keeps what it measured
        result = {
            "card": card,
            "model": model,
            "options": {k: v for k, v in opts.items() if k != "model"},
            "prompts": n,
            "smoke": args.smoke,
            "runs": runs,
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
        lines = [
            f"# Batch throughput on {card} ({model}, {n} prompts, {opts['size'][0]}x{opts['size'][1]}, "
            f"{opts['steps']} steps, CFG {opts['cfg']:g})",
            "",
            "| engine | GPUs | images | failed | images/s | speed-up vs 1 GPU | outside denoising (in call) | "
            "outside loop (between loops) | busy share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            lines.append(
                f"| {r['engine']} | {r['gpus']} | {r['images']} | {r['failed']} | {r['images_per_s']:.4f} | "
                f"{r['speedup_vs_1gpu']} | {r['outside_denoise_share']} | {r['outside_loop_share']} | "
                f"{r['busy_share']} |"
            )
        lines += ["", "Gap between two items' loops on a worker (means, s):", ""]
        for r in runs:
            parts = " + ".join(f"{k} {v}" for k, v in (r["gap_breakdown_s"] or {}).items())
            lines.append(
                f"- {r['engine']}, {r['gpus']} GPU(s): {r['gap_s']} = {parts}; the PNG, off the workers' path: "
                f"{r['write_s']} (on disk {r['write_lag_s']} after the worker's return)"
            )
        if args.smoke:
            lines += ["", "SMOKE RUN on CPU processes: these numbers say nothing about GPUs."]
        path.with_suffix(".md").write_text("\n".join(lines) + "\n")

    for engine in args.engines.split(","):
        if engine == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray is not installed: skipping the ray runs", file=sys.stderr)
                continue
        base = None
        for g in gpu_counts:
            row = one_run(engine, g, prompts, opts, args.smoke)
            base = base or row["images_per_s"]
            row["speedup_vs_1gpu"] = round(row["images_per_s"] / base, 3) if base else None
            runs.append(row)
            print(json.dumps(row), flush=True)
            write()
        if engine == "ray":
            import ray

            ray.shutdown()
    write()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
