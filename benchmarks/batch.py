"""Batch throughput: the same prompts on 1 and 2 GPUs, with the local engine and with Ray.

Full size (run by the lead on 2×H200): the full-size synthetic model (real configs, random weights), 1024²,
20 steps, CFG 4, 32 prompts. Writes ``benchmarks/results/batch-<card>.json`` with ``card`` and ``runs``
(``gpus``, ``engine``, ``images``, ``images_per_s``, ``speedup_vs_1gpu``, and the per-image share of time
outside the denoising loop). Each run uses a fresh output folder; the pipeline load is not timed (the
workers load first, on a warm-up item that is not counted).

``--smoke`` checks that the script runs on a CPU: the small model, 64², 2 steps, 6 prompts, "GPUs" are CPU
worker processes. Its numbers say nothing about GPUs.

    python benchmarks/batch.py              # on the GPU machine
    python benchmarks/batch.py --smoke      # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
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
    kw = dict(opts)
    if engine == "ray":
        kw["ray"] = "local"
        kw["workers"] = gpus
    elif smoke:
        kw["workers"] = gpus
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    # Warm-up: one item per worker loads the pipelines (and compiles); not counted.
    run_batch([f"warm-up {i}" for i in range(gpus)], out / "warm", **kw)
    t0 = time.perf_counter()
    r = run_batch(prompts, out / "run", **kw)
    wall = time.perf_counter() - t0
    rows = [x for x in Manifest(out / "run").load().values() if x.get("status") == "done"]
    denoise = sum(x["denoise_s"] for x in rows)
    worker = sum(x["worker_s"] for x in rows)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "gpus": gpus,
        "engine": engine,
        "images": r.done,
        "failed": r.failed,
        "wall_s": round(wall, 3),
        "images_per_s": round(r.done / wall, 4),
        "outside_denoise_share": round(1 - denoise / worker, 4) if worker else None,
        "workers": r.workers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU check with the small model")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/batch-<card>.json)")
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
    runs = []
    for engine in args.engines.split(","):
        if engine == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray is not installed: skipping the ray runs", file=sys.stderr)
                continue
        base = None
        for g in gpu_counts:
            env = dict(os.environ)
            row = one_run(engine, g, prompts, opts, args.smoke)
            os.environ.clear()
            os.environ.update(env)
            base = base or row["images_per_s"]
            row["speedup_vs_1gpu"] = round(row["images_per_s"] / base, 3) if base else None
            runs.append(row)
            print(json.dumps(row), flush=True)
        if engine == "ray":
            import ray

            ray.shutdown()
    card = "smoke-cpu" if args.smoke else card_slug(hw)
    result = {
        "card": card,
        "model": model,
        "options": {k: v for k, v in opts.items() if k != "model"},
        "prompts": n,
        "smoke": args.smoke,
        "runs": runs,
    }
    path = Path(args.out) if args.out else RESULTS / f"batch-{card}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
