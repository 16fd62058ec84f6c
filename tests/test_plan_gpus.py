"""gpus=N in the plan: how one request spreads over identical GPUs (qwennb.parallel.choose_parallel), refused
beyond the GPUs the machine has."""

from __future__ import annotations

import json

import pytest

from qwennb.cli import main
from qwennb.errors import PlanError
from qwennb.plan import describe_machine, make_plan


def _machine(n: int):
    return describe_machine(gpu_memory_gb=141, host_ram_gb=256, compute_capability="9.0", gpu_count=n)


def test_one_gpu_plan_has_no_parallel_choice():
    plan = make_plan(_machine(2), "qwen-image")
    assert plan.gpus == 1 and plan.parallel is None


@pytest.mark.parametrize(
    ("gpus", "cfg", "mode", "degrees"),
    [
        (2, 4.0, "cfg", (2, 1)),  # CFG's two passes on two GPUs
        (4, 4.0, "cfg+ulysses", (2, 2)),  # and Ulysses inside each pass
        (2, 1.0, "single", (1, 1)),  # no CFG: Ulysses measured slower than one GPU
    ],
)
def test_the_plan_spreads_one_request_as_choose_parallel_says(gpus, cfg, mode, degrees):
    plan = make_plan(_machine(gpus), "qwen-image", {"gpus": gpus, "optimal_cfg_scale": cfg})
    used = degrees[0] * degrees[1]
    assert plan.gpus == used and plan.parallel["mode"] == mode
    assert (plan.parallel["cfg_degree"], plan.parallel["ulysses_degree"]) == degrees
    assert any(r.startswith(f"gpus={gpus}: {mode} on {used} of {gpus}") for r in plan.reasons)
    # each GPU holds the arrangement a single GPU would: the per-GPU plan does not change
    single = make_plan(_machine(gpus), "qwen-image", {"optimal_cfg_scale": cfg})
    assert (
        plan.arrangement == single.arrangement and plan.estimated_peak_gpu_gb == single.estimated_peak_gpu_gb
    )


def test_more_gpus_than_the_machine_has_is_refused():
    with pytest.raises(PlanError, match=r"gpus=4: this machine has 2 GPU\(s\)"):
        make_plan(_machine(2), "qwen-image", {"gpus": 4})


def test_cli_plan_gpus_json(capsys):
    assert main(["plan", "--model", "qwen-image", "--gpu-memory", "141GB", "--gpus", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == 2 and d["parallel"]["mode"] == "cfg" and d["parallel"]["gpus"] == 2
