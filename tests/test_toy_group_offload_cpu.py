"""A small model's explicit memory options are applied, not dropped: the toy under group offload on the CPU."""

import numpy as np

from qwennb.generation import generate
from qwennb.pipeline import build, validate_optimization
from qwennb.plan import describe_machine, make_plan


def _hooked(module):
    reg = getattr(module, "_diffusers_hook", None)
    return set(reg.hooks) if reg is not None else set()


def test_the_toy_under_group_offload_draws_the_plain_toys_image():
    hw = describe_machine(host_ram_gb=16)
    plain = build(make_plan(hw, "toy"))
    plan = make_plan(hw, "toy", {"transformer_placement": "group_offload", "resident_blocks": 2})
    assert plan.components["transformer"].placement == "group_offload"
    assert plan.components["transformer"].resident_blocks == 2 and not plan.warnings
    offloaded = build(plan)
    blocks = list(offloaded.transformer.transformer_blocks)
    hooked = [i for i, b in enumerate(blocks) if "group_offloading" in _hooked(b)]
    assert len(hooked) == len(blocks) - 2 and hooked  # the resident ones run without hooks
    report = validate_optimization(offloaded)
    assert report["matches_plan"], report["mismatches"]
    kw = dict(seed=3, steps=3, cfg=4.0, width=128, height=128)
    a = np.asarray(generate(plain, "a red circle on a blue background", **kw).images[0], dtype=np.int16)
    b = np.asarray(generate(offloaded, "a red circle on a blue background", **kw).images[0], dtype=np.int16)
    assert a.shape == b.shape == (128, 128, 3)
    assert np.abs(a - b).max() <= 1  # the same image, within a rounding step of uint8


def test_a_step_cache_asked_for_on_the_cpu_is_on_the_transformer():
    pipe = build(make_plan(describe_machine(host_ram_gb=16), "toy", {"cache": "first_block"}))
    assert pipe.transformer.is_cache_enabled
