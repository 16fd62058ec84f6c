"""Where a LoRA hotswap's time goes, on the CPU, at the full-size model's width (#17).

The full-size transformer does not fit a laptop, but a hotswap's cost grows with the number of blocks the LoRA
touches, and every block is the same. So this builds Qwen-Image's transformer from its shipped full-size config
(``qwennb/configs/qwen-image``: 3072 wide, 24 heads, modulation 18432 wide) with ``num_layers`` cut to a few,
bf16 weights on the CPU, puts it in a pipeline (the tiny stand-in's other components), and writes random LoRAs
of the Lightning release's shape and key layout for those blocks (rank 64, alpha 8, the 14 Linear layers of
each block, ``transformer_blocks.N.<layer>.lora_down/lora_up.weight`` + ``alpha``). Then it does what a notebook
does: ``qwennb.lora.add`` the first on a plan marked compiled (so ``enable_lora_hotswap`` pads it for
hotswapping), then ``add(..., hotswap=True)``: ``--new-files`` swaps to files new to the process (their sha256
not known yet) and ``--repeats`` swaps between files seen before (medians of each), and one more under cProfile.

Each swap is timed stage by stage (``qwennb.lora.last_load_timings``: hash, read, convert, check, copy, scales,
sync, other; ``*_cpu_s`` the loading thread's CPU time), with ``process_cpu_s`` (every thread, a background hash
included) and ``after_hash_wait_s`` (how long a hash left to the background ran on after the swap returned).
``--inside`` also times a few of diffusers' and PEFT's functions inside the copy stage (``in_copy_*``: PEFT's
hotswap, ``Module.state_dict``, the tensor copies, diffusers' ``lora_state_dict``, which includes the convert
stage's call).

Two block counts (``--layers``, default 2 and 6) give a cost per block and a fixed cost; their line is
extrapolated to the 60 blocks of the real model. The CPU numbers leave out what only a GPU has (host-to-device
copies, synchronisation); ``benchmarks/fewstep.py`` prints the same breakdown on the GPU. On a small shared
machine pin one torch thread and compare CPU times: wall times follow the other processes' load.

    PYTHONPATH=. python benchmarks/hotswap_cpu.py --threads 1 --inside --out /tmp/hotswap

``--file-dtype``: the LoRA files' dtype (the Lightning releases ship ``-bf16`` files, 1.18 GB for all 60 blocks;
``fp32`` doubles the bytes read, converted and hashed).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

FULL_BLOCKS = 60


def build_pipe(layers: int) -> Any:
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from qwennb import stand_ins

    config = stand_ins.load_component_config("qwen-image", "transformer")
    config["num_layers"] = layers
    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel.from_config(config)
    # the base weights' values play no part in a hotswap: zeros are quicker to make than random numbers
    stand_ins.materialize_(transformer, device="cpu", dtype=torch.bfloat16, init=lambda _m, _n, t: t.zero_())
    transformer.eval().requires_grad_(False)
    pipe = stand_ins.build_tiny_pipeline()
    pipe.register_modules(transformer=transformer)
    # what add() reads of a compiled plan: prepare diffusers' hotswap before the first LoRA
    pipe.qwennb = {"plan": SimpleNamespace(compile=True, device="cpu", components={})}
    return pipe


def write_loras(pipe: Any, folder: Path, dtype: torch.dtype) -> list[Path]:

    from qwennb import lora
    from qwennb.presets import LIGHTNING_ALPHA, LIGHTNING_RANK

    files = []
    for seed in (1, 2):
        f = folder / f"Lightning-shaped-{len(pipe.transformer.transformer_blocks)}-{seed}.safetensors"
        lora.save_random_lora(
            pipe.transformer,
            f,
            rank=LIGHTNING_RANK,
            alpha=LIGHTNING_ALPHA,
            layout="lightning",
            seed=seed,
            std=0.01,
            dtype=dtype,
        )
        files.append(f)
    return files


class Inside:
    """Seconds spent in a few of diffusers' and PEFT's functions during ``copy`` (``load_lora_weights``), timed by
    wrapping them (``--inside``): what of the copy stage is diffusers' own."""

    def __init__(self) -> None:
        import diffusers.loaders.lora_base as lora_base
        import diffusers.loaders.peft as dpeft
        import peft.utils.hotswap as hotswap
        from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

        self.t: dict[str, float] = {}
        self._wrap(hotswap, "hotswap_adapter_from_state_dict", "peft_hotswap")
        self._wrap(dpeft, "_create_lora_config", "diffusers_lora_config")
        self._wrap(lora_base, "_func_optionally_disable_offloading", "diffusers_offload_check")
        self._wrap(dpeft, "_maybe_remove_and_reapply_group_offloading", "diffusers_offload_check")
        self._wrap(torch.nn.Module, "state_dict", "module_state_dict", outer_only=True)
        self._wrap(torch.Tensor, "copy_", "tensor_copy")
        raw = QwenImageLoraLoaderMixin.__dict__["lora_state_dict"].__func__
        self._wrap_fn(
            QwenImageLoraLoaderMixin, "lora_state_dict", raw, "diffusers_lora_state_dict", classmethod
        )

    def _wrap(self, owner: Any, name: str, label: str, outer_only: bool = False) -> None:
        self._wrap_fn(owner, name, getattr(owner, name), label, None, outer_only)

    def _wrap_fn(
        self, owner: Any, name: str, fn: Any, label: str, kind: Any = None, outer_only: bool = False
    ) -> None:
        depth = [0]

        def timed(*a: Any, **k: Any) -> Any:
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if not outer_only or depth[0] == 0:
                    self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, kind(timed) if kind else timed)

    def take(self) -> dict[str, float]:
        out, self.t = {f"in_copy_{k}_s": v for k, v in self.t.items()}, {}
        return out


def profile_top(prof: cProfile.Profile, n: int = 25) -> list[dict[str, Any]]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:n]  # type: ignore[attr-defined]
    return [
        {
            "function": f"{k[0].split('site-packages/')[-1]}:{k[1]}({k[2]})",
            "cum_s": round(v[3], 4),
            "calls": v[1],
        }
        for k, v in top
    ]


def swap(pipe: Any, f: Path, inside: Inside | None, prof: cProfile.Profile | None = None) -> dict[str, float]:
    """One timed ``add(..., hotswap=True)``, its stages, and how long a background hash ran on after it."""
    from qwennb import lora

    if inside:
        inside.take()
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    lora.add(pipe, f, 1.0, name="lightning", hotswap=True)
    if prof:
        prof.disable()
    row = {"wall_s": time.perf_counter() - t0, "process_cpu_s": time.process_time() - c0}
    row.update(lora.last_load_timings(pipe))
    row.update({f"{k[:-2]}_cpu_s": v for k, v in lora.last_load_timings(pipe, cpu=True).items()})
    row.update(inside.take() if inside else {})
    # a hash left to the background: wait for it here, outside the timing, so the next swap runs alone
    t0 = time.perf_counter()
    lora.file_sha256(f)
    row["after_hash_wait_s"] = time.perf_counter() - t0
    return row


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(statistics.median(r.get(k, 0.0) for r in rows), 4) for k in keys}


def measure(layers: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from qwennb import lora

    pipe = build_pipe(layers)
    files = write_loras(pipe, folder, torch.bfloat16 if args.file_dtype == "bf16" else torch.float32)
    # files new to the process (copies under new names: a hash cache keys on the path)
    fresh = []
    for i in range(args.new_files):
        f = folder / f"new-{layers}-{i}.safetensors"
        shutil.copyfile(files[i % 2], f)
        fresh.append(f)
    mb = round(files[0].stat().st_size / 1e6, 1)
    t0 = time.perf_counter()
    lora.add(pipe, files[0], 1.0, name="lightning")
    lora.file_sha256(files[0])
    first = time.perf_counter() - t0
    inside = Inside() if args.inside else None
    new = [swap(pipe, f, inside) for f in fresh]
    # then swaps between files seen before (hashes cached); one more under cProfile, which slows Python-heavy
    # stages, so it joins no median
    seen = [files[0], fresh[0]] if fresh else files
    hot = [swap(pipe, seen[i % len(seen)], inside) for i in range(args.repeats)]
    prof = cProfile.Profile()
    swap(pipe, seen[0], inside, prof)
    return {
        "layers": layers,
        "file_mb": mb,
        "first_add_s": round(first, 3),
        "new_file": medians(new) if new else {},
        "seen_file": medians(hot),
        "new_file_runs": [{k: round(v, 4) for k, v in r.items()} for r in new],
        "seen_file_runs": [{k: round(v, 4) for k, v in r.items()} for r in hot],
        "profile_top": profile_top(prof),
    }


def line(a: dict[str, Any], b: dict[str, Any], kind: str) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per block and at 60 blocks, from the medians of two block counts."""
    span = b["layers"] - a["layers"]
    keys = sorted(set(a[kind]) | set(b[kind]))
    per = {k: (b[kind].get(k, 0.0) - a[kind].get(k, 0.0)) / span for k in keys}
    at60 = {k: a[kind].get(k, 0.0) + per[k] * (FULL_BLOCKS - a["layers"]) for k in keys}
    return {k: round(v, 5) for k, v in per.items()}, {k: round(v, 3) for k, v in at60.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--file-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeats", type=int, default=5, help="swaps between files seen before")
    ap.add_argument("--new-files", type=int, default=3, help="swaps to files new to the process")
    ap.add_argument("--inside", action="store_true", help="time diffusers' and PEFT's functions in the copy")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="folder for hotswap-cpu.json (default: print only)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwennb-hotswap-") as tmp:
        for n in args.layers:
            rows.append(measure(n, args, Path(tmp)))
            print(
                json.dumps({k: rows[-1][k] for k in ("layers", "file_mb", "new_file", "seen_file")}),
                flush=True,
            )
    rec: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if len(rows) >= 2:
        for kind in ("seen_file", "new_file"):
            if rows[0][kind]:
                per, at60 = line(rows[0], rows[-1], kind)
                rec[f"{kind}_per_block"], rec[f"{kind}_at_60_blocks"] = per, at60
                print(f"{kind}: per block", json.dumps(per))
                print(f"{kind}: at 60 blocks", json.dumps(at60))
    print("cProfile (a hotswap of the largest):")
    for p in rows[-1]["profile_top"] or []:
        print(f"  {p['cum_s']:8.3f} s {p['calls']:7d}  {p['function']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hotswap-cpu.json").write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
