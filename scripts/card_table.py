"""Print README's table of predicted seconds per 1024x1024 image (20 steps, CFG 4, ``qwen-image``, default plan)
for the cards people own, from qwennb's cost model (no GPU needed):

    python scripts/card_table.py

Each card is described by what the driver would report (memory, compute capability, SM count, boost clock, PCIe
link) and a typical host RAM; the plan is ``make_plan(describe_machine(...), "qwen-image")``. The ``basis``
column says which rows rest on a measurement (``benchmarks/results``) and which on the model alone.
"""

from __future__ import annotations

from qwennb.plan import PlanError, describe_machine, make_plan

# name, GPU GB, host GB, compute capability, SMs, boost MHz, PCIe gen, basis
CARDS = [
    ("RTX 4090", 24, 64, "8.9", 128, 2520, 4, "model (not measured)"),
    ("RTX 4080", 16, 32, "8.9", 76, 2505, 4, "model (not measured)"),
    ("RTX 4070 Ti", 12, 32, "8.9", 60, 2610, 4, "model (not measured)"),
    ("RTX 3090", 24, 64, "8.6", 82, 1695, 4, "model (not measured)"),
    ("RTX 3060", 12, 32, "8.6", 28, 1777, 4, "model (not measured)"),
    ("A100 40GB (SXM)", 40, 256, "8.0", 108, 1410, 4, "model (not measured)"),
    ("A100 80GB (SXM)", 80, 256, "8.0", 108, 1410, 4, "model (not measured)"),
    ("L40S", 48, 256, "8.9", 142, 2520, 4, "model (not measured)"),
    ("H100 80GB (SXM)", 80, 256, "9.0", 132, 1980, 5, "measured: 0.244-0.250 s/step, 5.4 s an image"),
    ("H200", 141, 256, "9.0", 132, 1980, 5, "measured: 0.238-0.243 s/step, 5.0 s an image"),
    ("H200, capped to 24 GB", 24, 64, "9.0", 132, 1980, 5, "measured (plan validation): 0.191 s/step"),
    ("H200, capped to 16 GB", 16, 32, "9.0", 132, 1980, 5, "measured (plan validation): 3.00 s/step"),
    ("H200, capped to 12 GB", 12, 32, "9.0", 132, 1980, 5, "measured (plan validation): 4.04 s/step"),
    ("H200, capped to 8 GB", 8, 32, "9.0", 132, 1980, 5, "measured (plan validation): 6.18 s/step"),
]


def rows() -> list[str]:
    out = [
        "| card | memory | host RAM | PCIe | plan | s/step | s an image | basis |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, mem, host, cc, sms, mhz, gen, basis in CARDS:
        hw = describe_machine(
            mem,
            compute_capability=cc,
            sm_count=sms,
            max_sm_clock_mhz=mhz,
            pcie_gen=gen,
            pcie_width=16,
            host_ram_gb=host,
        )
        try:
            p = make_plan(hw, "qwen-image", width=1024, height=1024)
        except PlanError as exc:
            out.append(
                f"| {name} | {mem} GB | {host} GB | gen {gen} x16 | refused: {exc} | – | – | {basis} |"
            )
            continue
        out.append(
            f"| {name} | {mem} GB | {host} GB | gen {gen} x16 | {p.arrangement} | {p.predicted_s_per_step:.2f} | "
            f"{p.predicted_s_per_image:.1f} | {basis} |"
        )
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
