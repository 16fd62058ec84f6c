"""Behaviours of generate() that a one-line break would lose: on the real tiny pipeline, no mocks.

Two real SIGINTs (the second interrupts at once), memory released on the out-of-memory path (checked with weak
references to the step's tensors, while the error is still held as a notebook holds its last traceback), and a
non-square PNG round trip.
"""

import gc
import os
import signal
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from qwennb.errors import GenerationError
from qwennb.generation import generate, load_params
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan


@pytest.fixture(scope="module")
def pipe():
    return build(make_plan(describe_machine(host_ram_gb=8), "tiny"))


def _ctrl_c_at(step, times):
    def on_step(info):
        if info.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C or the notebook's Stop button sends

    return on_step


def test_one_ctrl_c_decodes_what_exists_and_a_second_interrupts_at_once(pipe):
    before = signal.getsignal(signal.SIGINT)
    once = generate(pipe, "a cat", seed=1, on_step=_ctrl_c_at(2, 1), width=64, height=64, steps=6)
    assert once.interrupted and once.steps_completed == 2 and len(once.images) == 1
    assert any("partly denoised" in n for n in once.notices)
    assert signal.getsignal(signal.SIGINT) is before
    twice = generate(pipe, "a cat", seed=1, on_step=_ctrl_c_at(2, 2), width=64, height=64, steps=6)
    # The second Ctrl-C does not wait for the step to end and nothing is decoded.
    assert twice.interrupted and twice.steps_completed == 2 and twice.images == []
    assert "interrupted after 2 of 6 steps" in twice.notices
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back after the second one too
    ok = generate(pipe, "a cat", seed=1, width=64, height=64, steps=6)
    assert not ok.interrupted and ok.steps_completed == 6 and len(ok.images) == 1


def test_out_of_memory_frees_the_steps_tensors_while_the_error_is_still_held(pipe):
    calls = {"n": 0}
    held = []
    collections = []

    def oom_at_step_2(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 1's two CFG passes run; step 2's first pass runs out of memory
            held.append(weakref.ref(kwargs["hidden_states"]))  # the latents going into the step
            collections.clear()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def on_step(info):
        held.append(weakref.ref(info.latents))

    def on_gc(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    handle = pipe.transformer.register_forward_pre_hook(oom_at_step_2, with_kwargs=True)
    gc.callbacks.append(on_gc)
    try:
        with pytest.raises(GenerationError, match="out of GPU memory at 64x64 x1") as info:
            generate(pipe, "a cat", seed=1, on_step=on_step, width=64, height=64, steps=4)
        # The error is still referenced here (as IPython keeps the last traceback): the latents must be gone.
        assert len(held) == 2 and [r() is None for r in held] == [True, True]
        assert info.value.__context__ is None  # no out-of-memory error (and its frames) kept as context
        assert (
            2 in collections
        )  # a full garbage collection ran after the error (then CUDA's cache is emptied)
    finally:
        gc.callbacks.remove(on_gc)
        handle.remove()
    again = generate(pipe, "a cat", seed=1, width=64, height=64, steps=2)
    assert len(again.images) == 1 and not again.interrupted


@pytest.mark.parametrize("size", [(64, 96), (112, 48)])
def test_a_non_square_png_round_trips_width_and_height(pipe, tmp_path, size):
    w, h = size
    r = generate(pipe, "a lighthouse", seed=21, width=w, height=h, steps=2)
    (path,) = r.save(tmp_path)
    params = load_params(path)
    assert (params["width"], params["height"]) == (w, h)
    assert params == r.params()
    again = generate(pipe, **params)
    assert again.images[0].size == (w, h)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(path).convert("RGB")))


def test_generate_gives_stock_diffusers_pixels_for_the_same_seed(pipe):
    """generate() is diffusers' pipeline with a CPU generator seeded with the recorded seed, a " " negative prompt
    and true_cfg_scale: the same pixels as calling the pipeline directly."""
    r = generate(pipe, "a red fox", seed=5, width=64, height=48, steps=3, cfg=4.0)
    stock = pipe(
        "a red fox",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        width=64,
        height=48,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert r.images[0].size == stock.size == (64, 48)
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(stock))


def test_median_step_time_is_the_median_of_the_recorded_steps(pipe):
    import statistics

    for steps in (4, 5):  # an even and an odd count
        r = generate(pipe, "a cat", seed=1, width=64, height=64, steps=steps)
        assert len(r.step_times_s) == steps
        assert r.median_step_s == statistics.median(r.step_times_s)
        assert r.to_dict()["median_step_s"] == r.median_step_s and r.to_dict()["steps_completed"] == steps


@pytest.mark.parametrize("steps", [1, 0, 1001])
def test_step_counts_that_cannot_work_are_refused(pipe, steps):
    """One step gives NaN with this scheduler (its sigmas need two points), so the least is 2."""
    with pytest.raises(GenerationError, match="steps must be"):
        generate(pipe, "a cat", steps=steps, width=64, height=64)
    assert generate(pipe, "a cat", steps=2, seed=1, width=64, height=64).steps_completed == 2


def test_a_size_over_the_budget_is_refused_before_the_transformer_runs(pipe):
    """The refusal names the need, the budget and the largest size of the same shape that fits, and comes before
    any step (the transformer never runs)."""
    import re

    from qwennb.plan import with_size

    plan = make_plan(describe_machine(12, host_ram_gb=128), "qwen-image")
    size, n = 1536, 4
    assert with_size(plan, size, size, n) > plan.budget_gb  # over this plan's budget...
    assert with_size(plan, 1024, 1024, 1) <= plan.budget_gb  # ...which a default image fits

    def no_step(module, args):
        raise AssertionError("the transformer ran for a size over the budget")

    saved = pipe.qwennb["plan"]
    handle = pipe.transformer.register_forward_pre_hook(no_step)
    try:
        pipe.qwennb["plan"] = plan
        with pytest.raises(GenerationError) as info:
            generate(pipe, "a cat", width=size, height=size, num_images=n, steps=2)
    finally:
        handle.remove()
        pipe.qwennb["plan"] = saved
    m = re.fullmatch(
        r"1536x1536 x4 needs about ([\d.]+) GiB but the plan's budget is ([\d.]+) GiB; "
        r"the largest size of this shape that fits is (\d+)x(\d+)",
        str(info.value),
    )
    assert m, str(info.value)
    need, budget, w, h = float(m[1]), float(m[2]), int(m[3]), int(m[4])
    assert (
        need == round(with_size(plan, size, size, n), 1)
        and budget == round(plan.budget_gb, 1)
        and need > budget
    )
    assert w == h < size and w % 16 == 0 and with_size(plan, w, h, n) <= plan.budget_gb
    assert (
        with_size(plan, w + 80, h + 80, n) > plan.budget_gb
    )  # the largest on the 5% grid, not any that fits
