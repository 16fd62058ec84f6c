"""Memory tiers on real shapes: full-size Qwen-Image (random weights) under GPU memory caps of 80 to 12 GB.

For each cap, a fresh process limits its usable GPU memory with ``torch.cuda.set_per_process_memory_fraction``,
asks qwennb's plan for a card of that size (the real card's compute and PCIe link, the cap as its memory),
loads ``qwen-image-synthetic`` with the plan, generates 1024x1024 with CFG 4 for a few steps, and records the
arrangement, measured peak GPU memory beside the plan's estimate, host RAM peak, load time, median s/step and
whether it ran out of memory. Each run's final latents (same prompt, seed and weights) are compared with the
uncapped run's: the drift that fp8 storage or fp8 matmuls cost (relative L2 error).

    python benchmarks/memory_tiers.py --out benchmarks/results [--caps 80 48 24 16 12] [--steps 4]
        [--variant 24:fp8_matmul=false]   # also a cap with plan overrides, for comparison
        [--run B --merge]                 # add this run's rows to the file's rows of other runs
    python benchmarks/memory_tiers.py --combine old.json new.json --out benchmarks/results [--note C=...]

Each run measures its own uncapped row (the largest cap, no overrides): slowdowns and latent errors are against
the uncapped row of the same run.

Writes ``memory-tiers-<card>.json`` and ``.md`` and prints the table last.
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


def parse_variant(text: str) -> tuple[float, dict]:
    """``"24:fp8_matmul=false,compile=false"`` -> ``(24.0, {"fp8_matmul": False, "compile": False})``."""
    cap, _, opts = text.partition(":")
    out: dict = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        low = value.strip().lower()
        out[key.strip()] = {"true": True, "false": False, "none": None}.get(low, value.strip())
    return float(cap), out


def one(cap: float, steps: int, size: int, overrides: dict, latents_path: str | None) -> dict:
    import torch

    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import build
    from qwennb.plan import make_plan

    hw = detect()
    gpu = hw.best_gpu
    real_total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / real_total))
    gpu.total_memory_gb = gpu.free_memory_gb = float(cap)
    plan = make_plan(hw, "qwen-image-synthetic", overrides, width=size, height=size)
    row = {
        "cap_gb": cap,
        "overrides": overrides,
        "lossless": plan.lossless,
        "fp8_matmul": plan.fp8_matmul,
        "fast_path": plan.fast_path,
        "arrangement": plan.arrangement,
        "estimated_peak_gb": plan.estimated_peak_gpu_gb,
        "estimated_host_gb": plan.estimated_host_ram_gb,
        "estimated_s_per_step": plan.estimated_s_per_step,
        "resident_blocks": plan.components["transformer"].resident_blocks,
        "oom": False,
    }
    try:
        t0 = time.perf_counter()
        pipe = build(plan)
        torch.cuda.synchronize()
        row["load_s"] = round(time.perf_counter() - t0, 1)
        row["weights_gpu_gb"] = round(torch.cuda.memory_allocated() / 1024**3, 2)
        generate(pipe, "warm up", steps=2, width=size, height=size, cfg=4.0, seed=0)
        torch.cuda.reset_peak_memory_stats()
        final: dict = {}
        r = generate(
            pipe,
            "a red fox reading a newspaper in a cafe, watercolor",
            steps=steps,
            width=size,
            height=size,
            cfg=4.0,
            seed=1,
            on_step=lambda info: final.__setitem__("latents", info.latents),
        )
        if latents_path and final.get("latents") is not None:
            torch.save(final["latents"].float().cpu(), latents_path)
            row["latents_file"] = latents_path
        row["measured_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        row["denoise_peak_gb"] = r.denoise_peak_gpu_memory_gb
        row["s_per_step"] = round(statistics.median(r.step_times_s), 3)
        row["text_encoding_s"] = round(r.text_encoding_s, 2)
        row["decode_s"] = round(r.decode_s, 2)
    except torch.OutOfMemoryError as exc:
        row["oom"] = True
        row["error"] = str(exc).splitlines()[0][:300]
        row["measured_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    except Exception as exc:  # noqa: BLE001 - record and go on to the next cap
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    row["host_ram_peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--caps", type=float, nargs="+", default=[80, 48, 24, 16, 12])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--variant", action="append", default=[], help="CAP:option=value,... (plan overrides)")
    ap.add_argument("--latents-dir", default="/tmp/qwennb-tiers")
    ap.add_argument("--run", default="A", help="label of this run (rows of other runs are kept with --merge)")
    ap.add_argument("--merge", action="store_true", help="keep the result file's rows of other runs")
    ap.add_argument(
        "--note", action="append", default=[], help="RUN=text describing a run (kept in the files)"
    )
    ap.add_argument("--combine", nargs="+", help="merge these result files into --out (no GPU needed)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, args.out, args.note)
    if args.one is not None:
        cap, overrides = parse_variant(args.one)
        tag = args.one.replace(":", "-").replace(",", "-").replace("=", "")
        Path(args.latents_dir).mkdir(parents=True, exist_ok=True)
        latents = str(Path(args.latents_dir) / f"latents-{tag}.pt")
        print("ROW " + json.dumps(one(cap, args.steps, args.size, overrides, latents)), flush=True)
        return 0
    import torch

    card = torch.cuda.get_device_name(0)
    rows = []
    for spec in [f"{c:g}" for c in args.caps] + args.variant:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                spec,
                "--steps",
                str(args.steps),
                "--size",
                str(args.size),
                "--latents-dir",
                args.latents_dir,
            ],
            capture_output=True,
            text=True,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
        row = (
            json.loads(line[-1][4:])
            if line
            else {"cap_gb": parse_variant(spec)[0], "error": proc.stderr.strip().splitlines()[-3:]}
        )
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["run"] = args.run
        rows.append(row)
        print(json.dumps(row), flush=True)
    uncapped = next(
        (
            r
            for r in rows
            if r.get("cap_gb") == max(args.caps) and not r.get("overrides") and r.get("s_per_step")
        ),
        None,
    )
    ref = torch.load(uncapped["latents_file"]) if uncapped and uncapped.get("latents_file") else None
    for r in rows:
        base = uncapped["s_per_step"] if uncapped else None
        r["slowdown_vs_uncapped"] = round(r["s_per_step"] / base, 2) if base and r.get("s_per_step") else None
        if r.get("measured_peak_gb") and r.get("estimated_peak_gb"):
            r["estimate_error"] = round(r["estimated_peak_gb"] / r["measured_peak_gb"] - 1, 3)
        if ref is not None and r.get("latents_file"):
            x = torch.load(r["latents_file"])
            r["latent_rel_err"] = float((x - ref).norm() / ref.norm())
    previous = Path(args.out) / f"memory-tiers-{slug_of(card)}.json"
    old = json.loads(previous.read_text()) if args.merge and previous.exists() else {}
    record = {
        "card": card,
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "cfg": 4.0,
        "run_notes": {**old.get("run_notes", {}), **dict(n.split("=", 1) for n in args.note)},
        "tiers": merge_rows(old.get("tiers", []), rows),
    }
    write(Path(args.out), record)
    return 0


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows of runs that ``new`` does not have, then ``new``; sorted by run, cap, variant."""
    runs = {r.get("run", "A") for r in new}
    rows = [r for r in old if r.get("run", "A") not in runs] + new
    return sorted(rows, key=lambda r: (r.get("run", "A"), -r["cap_gb"], bool(r.get("overrides"))))


def write(out: Path, record: dict) -> None:
    """Write ``memory-tiers-<card>.json`` and ``.md`` and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    card, rows = record["card"], record["tiers"]
    slug = slug_of(card)
    (out / f"memory-tiers-{slug}.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# Memory tiers on {card}",
        "",
        f"Full-size Qwen-Image with random weights, {record['size']}x{record['size']}, CFG 4, median of "
        f"{record['steps']} steps after a 2-step warm-up; one fresh process per cap "
        "(`torch.cuda.set_per_process_memory_fraction`); torch "
        f"{record.get('torch')}. Slowdown and latent error (relative L2 of the final latents, same prompt, seed "
        "and weights) are against the uncapped row of the same run.",
        "",
    ]
    for label, note in sorted(record.get("run_notes", {}).items()):
        lines.append(f"- run {label}: {note}")
    if record.get("run_notes"):
        lines.append("")
    lines += [
        "| cap GB | arrangement | est. peak GiB | measured peak GiB | host RAM peak GiB | load s | s/step "
        "| x uncapped | latent err | OOM | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        err = r.get("latent_rel_err")
        over = "".join(f", {k}={v}" for k, v in (r.get("overrides") or {}).items())
        lines.append(
            f"| {r['cap_gb']:g}{over} | {r.get('arrangement', '-')} | {r.get('estimated_peak_gb', '-')} | "
            f"{r.get('measured_peak_gb', '-')} | {r.get('host_ram_peak_gb', '-')} | {r.get('load_s', '-')} | "
            f"{r.get('s_per_step', '-')} | {r.get('slowdown_vs_uncapped', '-')} | "
            f"{f'{err:.2e}' if err is not None else '-'} | "
            f"{'yes' if r.get('oom') else ('error' if r.get('error') else 'no')} | {r.get('run', 'A')} |"
        )
    md = "\n".join(lines) + "\n"
    (out / f"memory-tiers-{slug}.md").write_text(md)
    print(md)


def combine(paths: list[str], out: str, notes: list[str]) -> int:
    """Merge result files of separate runs (later files win for the same run label); no GPU needed."""
    record: dict = {}
    for p in paths:
        rec = json.loads(Path(p).read_text())
        if record and rec["card"] != record["card"]:
            raise SystemExit(f"{p} is from {rec['card']}, not {record['card']}")
        tiers = merge_rows(record.get("tiers", []), rec["tiers"])
        notes_so_far = {**record.get("run_notes", {}), **rec.get("run_notes", {})}
        record = {**record, **rec, "tiers": tiers, "run_notes": notes_so_far}
    record["run_notes"] = {**record.get("run_notes", {}), **dict(n.split("=", 1) for n in notes)}
    write(Path(out), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
