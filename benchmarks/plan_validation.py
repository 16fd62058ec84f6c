"""Validate the plan's cost model: predicted against measured, for GPU caps x host-RAM budgets, on one GPU.

For each cap (80/48/24/16/12/8 GB) and host budget (128/64/32 GB), a fresh process limits its usable GPU memory
with ``torch.cuda.set_per_process_memory_fraction``, tells the plan the card has that memory and the host that
much RAM (the real card's compute and PCIe link are kept), loads ``qwen-image-synthetic`` with the plan's choice,
generates 1024x1024 with CFG 4, and records the plan's predictions beside what was measured: s/step (median
after a warm-up), GPU peak (``max_memory_allocated``), host RSS peak (``ru_maxrss``, which checks the host
budget the plan enforced), load time, and whether it ran out of memory. A (cap, budget) whose plan is the same
arrangement as an earlier one is measured once (``--measure-all`` measures every pair).

    python benchmarks/plan_validation.py [--caps 80 48 24 16 12 8] [--hosts 128 64 32] [--steps 6]
    python benchmarks/plan_validation.py --smoke      # CPU, the tiny model: checks the script runs
    python benchmarks/plan_validation.py --model qwen-image-2.1-synthetic --pairs 24:64 16:64 12:32

``--model`` validates another model's plans; an edit model (``qwen-image-edit-synthetic``: 2511's configs) is
planned with room for one reference image and measured editing one (``qwennb.edit``), ``task`` says which.

Writes ``benchmarks/results/plan-validation-<card>.json`` and ``.md`` (``--out`` to change the folder; the smoke
run writes under /tmp unless told otherwise). JSON: ``card`` and ``runs``, each with ``cap_gb``,
``host_budget_gb``, ``arrangement``, ``predicted_s_per_step``, ``measured_s_per_step``, ``estimated_peak_gb``,
``measured_peak_gb``, ``estimated_host_ram_gb``, ``measured_host_rss_gb``, ``oom`` (and more).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stock_steps import card_slug as slug_of  # benchmarks/ is the script's folder

PROMPT = "a red fox reading a newspaper in a cafe, watercolor"
DEFAULT_MODEL = "qwen-image-synthetic"


def one(cap: float, host: float, steps: int, size: int, smoke: bool, model: str = DEFAULT_MODEL) -> dict:
    """One (cap, host budget) in this process: plan, load, generate, measure."""
    import torch

    from qwennb.hardware import detect
    from qwennb.pipeline import build

    hw = detect()
    hw.host_ram_gb = hw.host_ram_available_gb = float(host)
    model = _smoke_model(model) if smoke else model
    cuda = torch.cuda.is_available() and not smoke
    if cuda:
        gpu = hw.best_gpu
        real_total = torch.cuda.get_device_properties(0).total_memory / 1024**3
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / real_total))
        gpu.total_memory_gb = gpu.free_memory_gb = float(cap)
        hw.gpus = [gpu]  # the capped card alone (another GPU of the machine must not become the best one)
    else:
        hw.gpus = []
    row: dict = {"cap_gb": cap, "host_budget_gb": host, "model": model, "oom": False}
    row["task"] = "edit, 1 reference" if _is_edit(model) else "generate"
    try:
        plan = _plan(hw, model, size)
    except Exception as exc:  # noqa: BLE001 - the plan refused: record why
        row.update(arrangement=None, refused=str(exc))
        return row
    run = _runner(model, size)
    t = plan.components["transformer"]
    row.update(
        arrangement=plan.arrangement,
        resident_blocks=t.resident_blocks,
        streamed_gb_per_step=t.streamed_gb_per_step,
        text_encoder=plan.components["text_encoder"].placement,
        fp8_matmul=plan.fp8_matmul,
        predicted_s_per_step=plan.predicted_s_per_step,
        predicted_s_per_image=plan.predicted_s_per_image,
        predicted_load_s=plan.estimated_load_s,
        estimated_peak_gb=plan.estimated_peak_gpu_gb,
        estimated_host_ram_gb=plan.estimated_host_ram_gb,
        time_split=plan.time_split,
        warnings=plan.warnings,
    )
    try:
        t0 = time.perf_counter()
        pipe = build(plan)
        if cuda:
            torch.cuda.synchronize()
        row["measured_load_s"] = round(time.perf_counter() - t0, 1)
        run(pipe, "warm up", 2, 0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = run(pipe, PROMPT, steps, 1)
        row["measured_image_s"] = round(time.perf_counter() - t0, 2)
        row["measured_s_per_step"] = round(statistics.median(r.step_times_s[1:] or r.step_times_s), 3)
        row["text_encoding_s"] = round(r.text_encoding_s, 2)
        row["decode_s"] = round(r.decode_s, 2)
        row["measured_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2) if cuda else 0.0
    except torch.OutOfMemoryError as exc:
        row["oom"] = True
        row["error"] = str(exc).splitlines()[0][:300]
        row["measured_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    except Exception as exc:  # noqa: BLE001 - record and go on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    row["measured_host_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    return row


def _is_edit(model: str) -> bool:
    from qwennb.models import get_model

    return get_model(model).task == "image-edit"


def _smoke_model(model: str) -> str:
    return "tiny-edit" if _is_edit(model) else "tiny"


def _plan(hw: object, model: str, size: int) -> object:
    """The plan for ``model`` at ``size``: an edit model's with room for one reference image of that size."""
    if _is_edit(model):
        from qwennb.edit import plan_edit

        return plan_edit(hw, model, width=size, height=size, references=1)
    from qwennb.plan import make_plan

    return make_plan(hw, model, width=size, height=size)


def _runner(model: str, size: int) -> object:
    """``run(pipe, prompt, steps, seed)``: a generation, or for an edit model an edit of one reference image
    (a gradient, so that the reference is not flat) at ``size``, both at CFG 4."""
    if not _is_edit(model):
        from qwennb.generation import generate

        return lambda pipe, prompt, steps, seed: generate(
            pipe, prompt, steps=steps, width=size, height=size, cfg=4.0, seed=seed
        )
    import numpy as np
    from PIL import Image

    from qwennb.edit import edit

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128, np.uint8)]
    ref = Image.fromarray(np.stack(rgb, -1))
    return lambda pipe, prompt, steps, seed: edit(
        pipe, [ref], "make it " + prompt, steps=steps, width=size, height=size, cfg=4.0, seed=seed
    )


def _plan_key(cap: float, host: float, size: int, smoke: bool, model: str = DEFAULT_MODEL) -> str | None:
    """The arrangement a (cap, host) gets, planned without loading anything (to measure each arrangement once)."""
    from qwennb.hardware import detect

    hw = detect()
    hw.host_ram_gb = hw.host_ram_available_gb = float(host)
    if hw.gpus and not smoke:
        gpu = hw.best_gpu
        gpu.total_memory_gb = gpu.free_memory_gb = float(cap)
        hw.gpus = [gpu]
    else:
        hw.gpus = []
    try:
        plan = _plan(hw, _smoke_model(model) if smoke else model, size)
    except Exception:  # noqa: BLE001
        return None
    c = plan.components
    return json.dumps(
        [plan.arrangement, {k: (v.placement, v.resident_blocks, v.low_cpu_mem_usage) for k, v in c.items()}]
    )


def table(record: dict) -> str:
    head = (
        "| cap GB | host GB | arrangement | s/step pred | s/step meas | err | peak est | peak meas | "
        "host est | host RSS | load pred | load meas | OOM |"
    )
    lines = [
        f"# Plan validation on {record['card']}",
        "",
        f"{record['model']}, {record['size']}x{record['size']}, CFG 4, median s/step of {record['steps']} steps "
        "after a 2-step warm-up; one fresh process per (cap, host budget). "
        + (
            "Rows marked * reuse the measurement of an identical arrangement." if record.get("reused") else ""
        ),
        "",
        head,
        "|" + " --- |" * (head.count("|") - 1),
    ]
    for r in record["runs"]:
        if r.get("arrangement") is None:
            lines.append(
                f"| {r['cap_gb']:g} | {r['host_budget_gb']:g} | refused: {r.get('refused') or ('failed: ' + r.get('error', ''))[:200]} |"
                + " |" * 10
            )
            continue
        p, m = r.get("predicted_s_per_step"), r.get("measured_s_per_step")
        err = f"{p / m - 1:+.0%}" if p and m else "–"
        star = "*" if r.get("reused_from") else ""
        lines.append(
            f"| {r['cap_gb']:g} | {r['host_budget_gb']:g}{star} | {r['arrangement']} | {p} | {m} | {err} | "
            f"{r.get('estimated_peak_gb')} | {r.get('measured_peak_gb')} | {r.get('estimated_host_ram_gb')} | "
            f"{r.get('measured_host_rss_gb')} | {r.get('predicted_load_s')} | {r.get('measured_load_s')} | "
            f"{'yes' if r.get('oom') else 'no'}{' ' + r['error'][:60] if r.get('error') and not r.get('oom') else ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", type=float, nargs="+", default=[80, 48, 24, 16, 12, 8])
    ap.add_argument("--hosts", type=float, nargs="+", default=[128, 64, 32])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results; /tmp for --smoke)"
    )
    ap.add_argument("--smoke", action="store_true", help="CPU and the tiny model: check that the script runs")
    ap.add_argument(
        "--measure-all", action="store_true", help="measure every pair, even identical arrangements"
    )
    ap.add_argument(
        "--pairs",
        nargs="+",
        help="(cap, host budget) pairs in the order to run, e.g. 24:64 12:32 (instead of --caps x --hosts)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=1e9, help="start no new pair after this many seconds (results kept)"
    )
    ap.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="full-size stand-in to plan and load (e.g. qwen-image-2.1-synthetic; results get its name)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.size, args.steps = 64, 3
        args.caps, args.hosts = [80.0], args.hosts[:2]
    if args.one is not None:
        cap, host = (float(x) for x in args.one.split(":"))
        print("ROW " + json.dumps(one(cap, host, args.steps, args.size, args.smoke, args.model)), flush=True)
        return 0
    import torch

    card = "cpu (smoke)" if args.smoke or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    out = Path(args.out or ("/tmp/qwennb-plan-validation" if args.smoke else "benchmarks/results"))
    rows, seen = [], {}
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.model == DEFAULT_MODEL or args.smoke else slug_of(args.model) + "-"
    stem = out / f"plan-validation-{tag}{slug_of(card)}"

    def write() -> dict:  # after every pair, so that a run cut short keeps what it measured
        record = {
            "card": card,
            "torch": torch.__version__,
            "model": _smoke_model(args.model) if args.smoke else args.model,
            "size": args.size,
            "steps": args.steps,
            "cfg": 4.0,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "reused": any(r.get("reused_from") for r in rows),
            "runs": rows,
        }
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        stem.with_suffix(".md").write_text(table(record))
        return record

    pairs = (
        [tuple(float(x) for x in p.split(":")) for p in args.pairs]
        if args.pairs
        else [(cap, host) for cap in args.caps for host in args.hosts]
    )
    started = time.perf_counter()
    for cap, host in pairs:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget spent: {cap:g}:{host:g} and later pairs not run", flush=True)
            break
        key = None if args.measure_all else _plan_key(cap, host, args.size, args.smoke, args.model)
        if key is not None and key in seen:
            row = {**seen[key], "cap_gb": cap, "host_budget_gb": host}
            row["reused_from"] = [seen[key]["cap_gb"], seen[key]["host_budget_gb"]]
            rows.append(row)
            print(json.dumps(row), flush=True)
            write()
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", f"{cap:g}:{host:g}", "--steps", str(args.steps)]
        cmd += ["--size", str(args.size), "--model", args.model] + (["--smoke"] if args.smoke else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
        row = (
            json.loads(line[-1][4:])
            if line
            else {
                "cap_gb": cap,
                "host_budget_gb": host,
                "arrangement": None,
                "oom": False,
                "error": " / ".join(proc.stderr.strip().splitlines()[-3:]),
            }
        )
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if key is not None and row.get("measured_s_per_step"):
            seen[key] = row
        print(json.dumps(row), flush=True)
        write()
    record = write()
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
