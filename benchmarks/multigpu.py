"""One image on several GPUs: stock diffusers' context parallelism against qwennb's worker-pool modes.

Rerun on a machine with 2 (or 4) H200s and qwennb installed, with one command:

    python benchmarks/multigpu.py --out benchmarks/results            # every GPU of the machine
    python benchmarks/multigpu.py --gpus 4 --sizes 1024 1328 --out benchmarks/results
    python benchmarks/multigpu.py --gpus 2 --only-cfg1 --out benchmarks/results   # one CFG-1 image: Ulysses rows

Same synthetic full-size weights (``qwen-image-synthetic``, seed 0), prompt and seed everywhere, 20 steps, CFG 4
(negative " ") and CFG 1, 1024² (and 1328²). Configurations, each in its own processes:

- ``stock-1gpu``: plain ``QwenImagePipeline.__call__`` on one GPU, as loaded;
- ``stock-ulysses-anything``: the same plus ``enable_parallelism(ContextParallelConfig(ulysses_degree=N,
  ulysses_anything=True))`` over N ranks, cuDNN attention (plain Ulysses fails on odd prompt lengths);
- ``qwennb-1gpu``: :class:`qwennb.parallel.WorkerPool` with one worker (the plan's tuned path);
- ``qwennb-cfg-parallel``: N=2 workers, the two CFG passes on the two GPUs (CFG > 1 only);
- ``qwennb-cfg-ulysses``: N>=4 workers, CFG halves × Ulysses N/2 (CFG > 1 only);
- ``qwennb-ulysses``: N workers, Ulysses N on qwennb's tuned path (compiled blocks with the all-to-alls inside,
  each rank its slice of the image tokens and the whole text; ``WorkerPool(ulysses_impl="tuned")``);
- ``qwennb-ulysses-diffusers``: N workers, Ulysses N the former way: diffusers' context parallelism on its stock
  forward, the text padded to a multiple of N (``ulysses_impl="diffusers"``; the rows named ``qwennb-ulysses``
  in results written before the tuned path had it);
- ``qwennb-data-parallel``: N workers, 2N images at once, each GPU its share.

Per run: median s/step over steps 2..end of a timed image after a warm-up image (the warm-up compiles),
images/s (images over the timed ``generate``'s wall time, text encoding and decoding included), speed-up
against ``qwennb-1gpu`` (s/step for one image; for data parallel, images/s against one GPU running the same
2N images as one batch), and the relative L2 error of the final packed latents against ``qwennb-1gpu``'s single
image on the same seed (for batches, their first image). NVLink
multicast stays off in every process (``qwennb.parallel.WORKER_ENV``).

Writes ``multigpu-<card>.json`` (``card``, ``gpus_available``, ``runs`` with ``config``, ``gpus``, ``width``,
``height``, ``cfg``, ``steps``, ``s_per_step``, ``images_per_s``, ``speedup_vs_qwennb_1gpu``,
``latent_rel_err``...; ``plan_choice``: :func:`qwennb.parallel.choose_parallel` for each case) and
``multigpu-<card>.md``; each Ulysses row also says which way its workers ran (``ulysses_way``). ``--only-cfg1``
runs only one CFG-1 image a configuration (``qwennb-1gpu``, ``stock-ulysses-anything``, ``qwennb-ulysses``,
``qwennb-ulysses-diffusers``; ``--skip-stock`` drops the stock one) and writes ``multigpu-cfg1-<card>.{json,md}``,
leaving the full run's files alone. ``--smoke`` runs the whole flow on CPU ranks over gloo with the small model
(64², 3 steps) to check the script; its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from stock_steps import card_slug  # benchmarks/ is the script's folder

from qwennb.parallel import SMALL_MODEL, WORKER_ENV, ParallelError, WorkerPool, choose_parallel

os.environ.update(WORKER_ENV)

PROMPT = "a red fox reading a newspaper in a cafe, watercolor"
SEED = 1234


def median_step(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 2 else times)


def rel_err(a: Any, b: Any) -> float | None:
    import numpy as np

    if a is None or b is None:
        return None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return None
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- stock diffusers, N ranks


def _stock_worker(
    rank: int, world: int, init_file: str, cases: list[dict[str, Any]], smoke: bool, out: Any
) -> None:
    os.environ.update(WORKER_ENV)
    import torch
    import torch.distributed as dist

    from qwennb.stand_ins import build_synthetic_pipeline, build_tiny_pipeline

    cuda = not smoke
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
    try:
        t0 = time.perf_counter()
        if smoke:
            pipe = build_tiny_pipeline(seed=0)
        else:
            pipe = build_synthetic_pipeline("cuda", torch.bfloat16)
            if world > 1:  # as measured on 2xH200 before: a backend with context parallelism
                pipe.transformer.set_attention_backend("_native_cudnn")
        pipe.set_progress_bar_config(disable=True)
        if world > 1:
            from unittest import mock

            from diffusers import ContextParallelConfig

            config = ContextParallelConfig(ulysses_degree=world, ulysses_anything=True)
            with mock.patch.object(
                torch.accelerator, "device_count", return_value=max(1, torch.accelerator.device_count())
            ):
                pipe.transformer.enable_parallelism(config=config)
        load_s = time.perf_counter() - t0
        for case in cases:
            row: dict[str, Any] = {"load_s": load_s}
            try:
                for timed in (False, True):
                    times: list[float] = []
                    last = {"t": 0.0}

                    def cb(
                        p: Any,
                        i: int,
                        t: Any,
                        kw: dict[str, Any],
                        times: list[float] = times,
                        last: dict[str, float] = last,
                    ) -> dict[str, Any]:
                        if cuda:
                            torch.cuda.synchronize()
                        now = time.perf_counter()
                        times.append(now - last["t"])
                        last["t"] = now
                        return {}

                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                        torch.cuda.synchronize()
                    start = last["t"] = time.perf_counter()
                    out_ = pipe(
                        prompt=PROMPT,
                        negative_prompt=" " if case["cfg"] > 1 else None,
                        true_cfg_scale=case["cfg"],
                        width=case["width"],
                        height=case["height"],
                        num_inference_steps=case["steps"] if timed else 3,
                        generator=torch.Generator("cpu").manual_seed(SEED),
                        callback_on_step_end=cb,
                        output_type="latent",
                    )
                    if cuda:
                        torch.cuda.synchronize()
                    wall = time.perf_counter() - start
                row.update(
                    s_per_step=median_step(times),
                    images_per_s=1 / wall,
                    peak_gpu_gb=torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
                    latents=out_.images.float().cpu().numpy() if rank == 0 else None,  # by value
                )
            except Exception as exc:  # noqa: BLE001 - recorded, like the measured stock failures
                row["error"] = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                )
            if rank == 0:
                out.put(row)
    except Exception as exc:  # noqa: BLE001
        if rank == 0:
            out.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_stock(world: int, cases: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="qwennb-bench-"), "rendezvous")
    procs = [
        ctx.Process(target=_stock_worker, args=(r, world, init_file, cases, smoke, out)) for r in range(world)
    ]
    for p in procs:
        p.start()
    rows = []
    for _ in cases:
        try:
            row = out.get(timeout=1800)
        except queue.Empty:
            row = {"error": "no result within 30 minutes"}
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be read back
            row = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        if "error" in row and "s_per_step" not in row and "load_s" not in row:
            rows += [row] * (len(cases) - len(rows))
            break
    for p in procs:
        p.join(60)
        if p.exitcode is None:
            p.terminate()
    return rows


# --------------------------------------------------------------------------- qwennb pools


def run_pool(
    gpus: int,
    ulysses: int,
    cases: list[dict[str, Any]],
    model: str,
    smoke: bool,
    ulysses_impl: str = "tuned",
    profile: str | None = None,
) -> list[dict[str, Any]]:
    """Each case: mode, width, height, cfg, steps, images. One pool for all of them. With ``profile`` (a folder),
    one more request of 3 steps per case runs under torch.profiler after the timed one: each rank's operator table
    lands in ``profile/<gpus>gpu-<mode>-<impl>-<size>-cfg<cfg>/rank<R>.txt``."""
    rows = []
    try:
        pool = WorkerPool(
            gpus=gpus,
            model=model,
            ulysses=ulysses,
            device="cpu" if smoke else None,
            ulysses_impl=ulysses_impl,
        ).start()
    except ParallelError as exc:
        return [{"error": str(exc)} for _ in cases]
    try:
        for case in cases:
            row: dict[str, Any] = {"load_s": pool.load_s}
            if ulysses > 1:
                row["ulysses_way"] = pool.info[0].get("ulysses")
            kw = {
                "width": case["width"],
                "height": case["height"],
                "cfg": case["cfg"],
                "seed": SEED,
                "num_images": case.get("images", 1),
            }
            try:
                pool.generate(PROMPT, parallel=case["mode"], steps=3, **kw)  # warm-up (compiles)
                t0 = time.perf_counter()
                res = pool.generate(
                    PROMPT, parallel=case["mode"], steps=case["steps"], return_latents=True, **kw
                )
                wall = time.perf_counter() - t0
                lat = res.final_latents
                row.update(
                    s_per_step=median_step(res.step_times_s),
                    images_per_s=len(res.images) / wall,
                    peak_gpu_gb_per_gpu=res.peak_gpu_memory_per_gpu_gb,
                    image_tokens_per_gpu=res.image_tokens_per_gpu,  # tuned Ulysses: each rank's share
                    mode=res.parallel_mode,
                    gpus_used=res.gpus,
                    latents=lat[:1] if lat is not None else None,
                )
                if profile:
                    tag = f"{gpus}gpu-{case['mode']}-{ulysses_impl}-{case['width']}-cfg{case['cfg']:g}"
                    pool.generate(
                        PROMPT, parallel=case["mode"], steps=3, profile_dir=Path(profile) / tag, **kw
                    )
                    row["profile"] = str(Path(profile) / tag)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    finally:
        pool.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all; --smoke: 2 CPU ranks)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024], help="square sizes, e.g. 1024 1328")
    ap.add_argument("--cfgs", type=float, nargs="+", default=[4.0, 1.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU ranks over gloo, the small model, 64x64, 3 steps"
    )
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument(
        "--only-cfg1",
        action="store_true",
        help="one CFG-1 image per configuration: qwennb 1 GPU, stock ulysses_anything, qwennb Ulysses on the tuned "
        "path and the former way; writes multigpu-cfg1-<card>.*",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after each qwennb configuration's timed run, 3 more steps under torch.profiler: each rank's operator "
        "table in DIR/<gpus>gpu-<mode>-<impl>-<size>-cfg<cfg>/rank<R>.txt",
    )
    ap.add_argument(
        "--cudagraphs",
        action="store_true",
        help="with --only-cfg1: also one GPU and Ulysses with the tuned path's blocks compiled in torch.compile's "
        "reduce-overhead mode (CUDA graphs; QWENNB_COMPILE_MODE in the workers): rows qwennb-1gpu-cudagraphs, "
        "qwennb-ulysses-cudagraphs",
    )
    ap.add_argument("--skip-diffusers", action="store_true", help="no qwennb-ulysses-diffusers row")
    args = ap.parse_args(argv)

    import torch

    smoke = args.smoke
    if smoke:
        model, card, available = SMALL_MODEL, "cpu-smoke", os.cpu_count() or 1
        gpus = args.gpus or 2
        sizes, steps = [64], 3
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --smoke to check the script on CPU", file=sys.stderr)
            return 2
        model, card, available = (
            "qwen-image-synthetic",
            card_slug(torch.cuda.get_device_name(0)),
            torch.cuda.device_count(),
        )
        gpus = args.gpus or available
        sizes, steps = args.sizes, args.steps
    heads = WorkerPool(gpus, model)._heads()
    cfgs = [1.0] if args.only_cfg1 else args.cfgs
    cases = [{"width": s, "height": s, "cfg": c, "steps": steps} for s in sizes for c in cfgs]
    results: list[dict[str, Any]] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"multigpu-cfg1-{card}" if args.only_cfg1 else f"multigpu-{card}"
    json_path = out_dir / f"{stem}.json"

    def record(config: str, n: int, case: dict[str, Any], row: dict[str, Any], images: int = 1) -> None:
        results.append(
            {
                "config": config,
                "gpus": n,
                **{k: case[k] for k in ("width", "height", "cfg", "steps")},
                "num_images": images,
                **row,
            }
        )
        write()

    def write() -> None:
        base = {
            (r["width"], r["cfg"], r["num_images"]): r
            for r in results
            if r["config"] == "qwennb-1gpu" and "s_per_step" in r
        }
        runs = []
        for r in results:
            # Against one GPU with the same images: for data parallel, its 2N images in one batch (throughput).
            b = base.get((r["width"], r["cfg"], r["num_images"]))
            first = base.get((r["width"], r["cfg"], 1))
            row = {k: v for k, v in r.items() if k != "latents"}
            row.setdefault("s_per_step", None)
            row.setdefault("images_per_s", None)
            row["speedup_vs_qwennb_1gpu"] = None
            row["latent_rel_err"] = None
            if b is not None and r.get("s_per_step"):
                if r["config"] == "qwennb-data-parallel":
                    row["speedup_vs_qwennb_1gpu"] = round(r["images_per_s"] / b["images_per_s"], 3)
                    if first is not None and first.get("images_per_s"):  # against one GPU's single images
                        row["speedup_vs_1gpu_single_images"] = round(
                            r["images_per_s"] / first["images_per_s"], 3
                        )
                else:
                    row["speedup_vs_qwennb_1gpu"] = round(b["s_per_step"] / r["s_per_step"], 3)
            if first is not None and r.get("s_per_step"):  # the first image against one GPU's single image
                err = rel_err(r.get("latents"), first.get("latents"))
                row["latent_rel_err"] = None if err is None else float(f"{err:.3g}")
            runs.append(row)
        data = {
            "card": card,
            "gpus_available": available,
            "smoke": smoke,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "model": model,
            "seed": SEED,
            "prompt": PROMPT,
            "runs": runs,
            "plan_choice": [
                {
                    "width": c["width"],
                    "height": c["height"],
                    "cfg": c["cfg"],
                    "images": i,
                    **vars(choose_parallel(gpus, c["cfg"], c["width"], c["height"], i, heads=heads)),
                }
                for c in cases
                for i in ((1,) if args.only_cfg1 else (1, 2 * gpus))
            ],
        }
        json_path.write_text(json.dumps(data, indent=2))
        lines = [
            f"# multigpu{' (one CFG-1 image)' if args.only_cfg1 else ''} on {card} "
            f"({'CPU smoke run: not GPU figures' if smoke else f'{gpus} GPUs'})",
            "",
            "| config | GPUs | size | CFG | images | s/step | images/s | speed-up vs qwennb 1 GPU | latent rel err | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
            lines.append(
                f"| {r['config']} | {r['gpus']} | {r['width']}x{r['height']} | {r['cfg']:g} | {r['num_images']} | "
                f"{fmt(r['s_per_step'], '.3f')} | {fmt(r['images_per_s'], '.3f')} | {fmt(r['speedup_vs_qwennb_1gpu'], '.2f')} | "
                f"{fmt(r['latent_rel_err'], '.2g')} | "
                f"{r.get('error', ', '.join(x for x in (r.get('mode'), r.get('ulysses_way')) if x))} |"
            )
        (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")

    def safely(fn: Any, *a: Any) -> list[dict[str, Any]]:
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - one failed configuration must not lose the others
            traceback.print_exc()
            cases_ = next(x for x in a if isinstance(x, list))
            return [{"error": f"{type(exc).__name__}: {exc}"} for _ in cases_]

    one = [{**c, "mode": "data"} for c in cases]
    if not args.only_cfg1:
        one += [{**c, "mode": "data", "images": 2 * gpus} for c in cases]
    for case, row in zip(one, safely(run_pool, 1, 1, one, model, smoke, "tuned", args.profile), strict=True):
        record("qwennb-1gpu", 1, case, row, case.get("images", 1))
    if not args.skip_stock:
        if not args.only_cfg1:
            for case, row in zip(cases, safely(run_stock, 1, cases, smoke), strict=True):
                record("stock-1gpu", 1, case, row)
        for case, row in zip(cases, safely(run_stock, gpus, cases, smoke), strict=True):
            record("stock-ulysses-anything", gpus, case, row)
    uc = [{**c, "mode": "ulysses"} for c in cases]
    if args.only_cfg1:
        ways = [("tuned", "qwennb-ulysses")] + (
            [] if args.skip_diffusers else [("diffusers", "qwennb-ulysses-diffusers")]
        )
        for impl, config in ways:
            for case, row in zip(
                uc, safely(run_pool, gpus, gpus, uc, model, smoke, impl, args.profile), strict=True
            ):
                record(config, gpus, case, row)
        if args.cudagraphs:  # the workers read it when they build the pipeline (spawned: they inherit it)
            os.environ["QWENNB_COMPILE_MODE"] = "reduce-overhead"
            try:
                for case, row in zip(
                    one, safely(run_pool, 1, 1, one, model, smoke, "tuned", None), strict=True
                ):
                    record("qwennb-1gpu-cudagraphs", 1, case, row)
                for case, row in zip(
                    uc, safely(run_pool, gpus, gpus, uc, model, smoke, "tuned", None), strict=True
                ):
                    record("qwennb-ulysses-cudagraphs", gpus, case, row)
            finally:
                os.environ.pop("QWENNB_COMPILE_MODE", None)
        print((out_dir / f"{stem}.md").read_text())
        return 0
    cfg_cases = [c for c in cases if c["cfg"] > 1]
    plain = [{**c, "mode": "cfg"} for c in cfg_cases] + [
        {**c, "mode": "data", "images": 2 * gpus} for c in cases
    ]
    if gpus != 2:
        plain = plain[len(cfg_cases) :]  # cfg-parallel alone is for two GPUs
    for case, row in zip(
        plain, safely(run_pool, gpus, 1, plain, model, smoke, "tuned", args.profile), strict=True
    ):
        record(
            "qwennb-cfg-parallel" if case["mode"] == "cfg" else "qwennb-data-parallel",
            gpus,
            case,
            row,
            case.get("images", 1),
        )
    if gpus >= 4 and gpus % 2 == 0 and cfg_cases:
        cu = [{**c, "mode": "cfg"} for c in cfg_cases]
        for case, row in zip(
            cu, safely(run_pool, gpus, gpus // 2, cu, model, smoke, "tuned", args.profile), strict=True
        ):
            record("qwennb-cfg-ulysses", gpus, case, row)
    for impl, config in (("tuned", "qwennb-ulysses"), ("diffusers", "qwennb-ulysses-diffusers")):
        for case, row in zip(
            uc, safely(run_pool, gpus, gpus, uc, model, smoke, impl, args.profile), strict=True
        ):
            record(config, gpus, case, row)
    write()
    print((out_dir / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
