"""How fast the GPUs of this machine exchange a Ulysses step's data, without any model.

Ulysses on the tuned path measured 0.128 s/step on 2xH200 against one GPU's 0.124 where ~0.07 was expected
(``benchmarks/NOTES.md``, session 4). A step at 1024² sends ~1.5 GB per GPU in 120 all-to-alls (60 blocks x 2:
the image Q/K/V, then the attention output). If NCCL moves that at NVLink speed (hundreds of GB/s) it costs a few
ms; if P2P is unavailable and it goes through host memory, it costs tens of ms and explains the gap. This script
times exactly that pattern (same tensor shapes, bf16, ``all_to_all_single`` eagerly and through the functional
collective that the compiled block uses), plus a plain all-reduce for the link's bandwidth, and prints NCCL's
choice of transport (``NCCL_DEBUG=INFO`` lines with "via P2P", "via SHM", ...).

    python benchmarks/nccl_probe.py --out benchmarks/results   # all GPUs of the machine, ~20 s

Writes ``nccl-probe-<card>.json`` (``card``, ``gpus``, ``runs``: ``op``, ``mb_per_call``, ``calls_per_step``,
``ms_per_call``, ``ms_per_step``, ``gb_per_s``) and ``.md``. ``--smoke`` runs 2 CPU ranks over gloo with small
tensors to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOKENS, HIDDEN, BLOCKS, TEXT = 4096, 3072, 60, 32  # Qwen-Image at 1024²: 4096 image tokens, 24 heads x 128


def _rank(rank: int, world: int, init: str, smoke: bool, q: Any) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    os.environ.setdefault("NCCL_DEBUG", "INFO")
    os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,P2P")
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if not smoke:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if smoke else "nccl", init_method=f"file://{init}", rank=rank, world_size=world
    )
    scale = 64 if smoke else 1
    per_rank = TOKENS // world // scale
    dtype = torch.float32 if smoke else torch.bfloat16
    qkv = torch.randn(3 * per_rank, HIDDEN // scale, device=device, dtype=dtype)  # this rank's image Q, K, V
    out = torch.randn((TOKENS // scale + TEXT) // world, HIDDEN // scale, device=device, dtype=dtype)
    flat = torch.randn(64 * 1024 * 1024 // (4 * scale), device=device, dtype=torch.float32)
    group = dist.group.WORLD

    def sync() -> None:
        if not smoke:
            torch.cuda.synchronize()
        dist.barrier()

    def timed(fn, n: int) -> float:
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n * 1000

    def eager_qkv() -> None:
        buf = torch.empty_like(qkv)
        dist.all_to_all_single(buf, qkv)

    def eager_out() -> None:
        buf = torch.empty_like(out)
        dist.all_to_all_single(buf, out)

    def functional_qkv() -> None:
        funcol.wait_tensor(funcol.all_to_all_single(qkv, None, None, group))

    def all_reduce() -> None:
        dist.all_reduce(flat)

    n = 5 if smoke else 50
    rows = []
    for op, fn, tensor, calls in (
        ("all_to_all image q/k/v (eager)", eager_qkv, qkv, BLOCKS),
        ("all_to_all attention output (eager)", eager_out, out, BLOCKS),
        ("all_to_all image q/k/v (functional, as compiled)", functional_qkv, qkv, BLOCKS),
        ("all_reduce 64 MB (link bandwidth)", all_reduce, flat, 1),
    ):
        ms = timed(fn, n)
        mb = tensor.numel() * tensor.element_size() / 1e6
        sent = mb * (world - 1) / world if op.startswith("all_to_all") else 2 * mb * (world - 1) / world
        rows.append(
            {
                "op": op,
                "mb_per_call": round(mb, 2),
                "calls_per_step": calls,
                "ms_per_call": round(ms, 3),
                "ms_per_step": round(ms * calls, 2),
                "gb_per_s": round(sent / 1e3 / (ms / 1e3), 1),
            }
        )
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    ap.add_argument("--smoke", action="store_true", help="2 CPU ranks over gloo, small tensors")
    args = ap.parse_args(argv)

    import torch
    import torch.multiprocessing as mp

    if args.smoke:
        world, card = 2, "cpu-smoke"
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            print("needs 2 or more GPUs (or --smoke)", file=sys.stderr)
            return 2
        world = args.gpus or torch.cuda.device_count()
        card = torch.cuda.get_device_name(0).lower().replace(" ", "-")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = os.path.join(tempfile.mkdtemp(prefix="qwennb-nccl-"), "rendezvous")
    procs = [ctx.Process(target=_rank, args=(r, world, init, args.smoke, q)) for r in range(world)]
    for p in procs:
        p.start()
    rows = q.get(timeout=300)
    for p in procs:
        p.join(60)
    record = {"card": card, "gpus": world, "torch": torch.__version__, "runs": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"nccl-probe-{card}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Ulysses' exchange without a model on {card} ({world} GPUs)",
        "",
        "| op | MB a call | calls a step | ms a call | ms a step | GB/s sent per GPU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['op']} | {r['mb_per_call']} | {r['calls_per_step']} | {r['ms_per_call']} | {r['ms_per_step']} | "
        f"{r['gb_per_s']} |"
        for r in rows
    ]
    (out / f"nccl-probe-{card}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
