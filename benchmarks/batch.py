"""Batch throughput: the same prompts on 1 and 2 GPUs, with the local engine and with Ray.

Full size (run by the lead on 2×H200): the full-size synthetic model (real configs, random weights), 1024²,
20 steps, CFG 4, 32 prompts. Writes ``benchmarks/results/batch-<card>.json`` with ``card`` and ``runs``
(``gpus``, ``engine``, ``images``, ``images_per_s``, ``speedup_vs_1gpu``, and the per-image share of time
outside the denoising loop). Each run uses a fresh output folder; each worker loads its pipeline and makes
one warm-up image before its first counted item, and throughput is counted over the workers' generating
window (first item's start to last item's end, by the workers' clocks).

``--smoke`` checks that the script runs on a CPU: the small model, 64², 2 steps, 6 prompts, "GPUs" are CPU
worker processes. Its numbers say nothing about GPUs.

    python benchmarks/batch.py              # on the GPU machine
    python benchmarks/batch.py --smoke      # anywhere
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwennb.batch import Manifest, run_batch  # noqa: E402
from qwennb.hardware import detect  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def card_slug(hw) -> str:
    g = hw.best_gpu
    return re.sub(r"[^a-z0-9]+", "-", (g.name if g else "cpu").lower()).strip("-")


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
        "busy_share": round(worker / (window * gpus), 4),
        "median_step_s": sorted(x["median_step_s"] for x in rows)[len(rows) // 2],
        "workers": r.workers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU check with the small model")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument(
        "--out", default=None, help="results file or folder (default benchmarks/results/batch-<card>.json)"
    )
    args = ap.parse_args()
    hw = detect()
    if args.smoke:
        model, opts, n = "tiny", {"steps": 2, "size": (64, 64), "cfg": 4.0}, args.prompts or 6
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
            "| engine | GPUs | images | failed | images/s | speed-up vs 1 GPU | outside denoising | busy share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            lines.append(
                f"| {r['engine']} | {r['gpus']} | {r['images']} | {r['failed']} | {r['images_per_s']:.4f} | "
                f"{r['speedup_vs_1gpu']} | {r['outside_denoise_share']} | {r['busy_share']} |"
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
