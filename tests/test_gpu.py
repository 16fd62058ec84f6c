"""What only a CUDA GPU runs: skipped without one (CI has none), run on a lent GPU with ``pytest tests/test_gpu.py``.

On a CPU the rest of the suite covers these paths' logic, but not what CUDA itself decides: detection read from the
device's properties, group offload with streams and pinned host blocks, fp8 storage with a LoRA fused in before
quantising, and a Lightning preset on such a plan. Each test drives the real toy model, as a user's notebook does.
The last run on a lent H200: ``benchmarks/results/gpu-tests-nvidia-h200.txt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FIXTURES = Path(__file__).parent / "fixtures" / "toy_lora"
KW = dict(seed=3, steps=6, cfg=4.0, width=128, height=128)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_detection_reads_the_card_as_torch_does():
    from qwennb.hardware import detect

    gpu = detect().gpus[0]
    props = torch.cuda.get_device_properties(0)
    assert gpu.compute_capability == f"{props.major}.{props.minor}"
    assert gpu.bf16 == (props.major >= 8)
    assert gpu.sm_count == props.multi_processor_count
    # NVML's total (what the driver reports) is a little above torch's (140.4 against 139.8 GiB on an H200)
    assert abs(gpu.total_memory_gb - props.total_memory / 1024**3) < 0.02 * gpu.total_memory_gb
    assert 0 < gpu.free_memory_gb <= gpu.total_memory_gb
    assert gpu.peak_bf16_tflops and gpu.peak_bf16_tflops > 50  # every bf16 card of the last years


def test_the_toy_under_group_offload_on_cuda_draws_the_resident_toys_image():
    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import build, validate_optimization
    from qwennb.plan import make_plan

    hw = detect()
    plain = build(make_plan(hw, "toy"))
    want = _pixels(generate(plain, "a red circle on the left, white background", **KW))
    del plain
    plan = make_plan(hw, "toy", {"transformer_placement": "group_offload", "resident_blocks": 2})
    t = plan.components["transformer"]
    assert t.placement == "group_offload" and t.resident_blocks == 2
    pipe = build(plan)
    report = validate_optimization(pipe)
    assert report["matches_plan"], report["mismatches"]
    blocks = list(pipe.transformer.transformer_blocks)
    on_gpu = [i for i, b in enumerate(blocks) if next(b.parameters()).device.type == "cuda"]
    assert len(on_gpu) == 2
    streamed = [b for i, b in enumerate(blocks) if i not in on_gpu]
    # pinned where they lie (qwennb.loading.pin_in_place), so that the copies overlap the compute
    assert all(p.is_pinned() for b in streamed for p in b.parameters())
    got = _pixels(generate(pipe, "a red circle on the left, white background", **KW))
    assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("low_cpu_mem_usage,use_stream", [(True, True), (False, False)])
def test_group_offload_options_keep_the_output(low_cpu_mem_usage, use_stream):
    from qwennb.generation import generate
    from qwennb.hardware import detect
    from qwennb.pipeline import build, group_offload_with_resident_blocks
    from qwennb.plan import make_plan

    pipe = build(make_plan(detect(), "toy"))
    want = _pixels(generate(pipe, "a blue star at the top, gray background", **KW))
    pipe.transformer.to("cpu")
    keep = group_offload_with_resident_blocks(
        pipe.transformer, 1, torch.device("cuda"), low_cpu_mem_usage=low_cpu_mem_usage, use_stream=use_stream
    )
    streamed = [b for i, b in enumerate(pipe.transformer.transformer_blocks) if i not in keep]
    pinned = {p.is_pinned() for b in streamed for p in b.parameters()}
    assert pinned == {not low_cpu_mem_usage}  # low_cpu_mem_usage: no page-locked copy of the host blocks
    got = _pixels(generate(pipe, "a blue star at the top, gray background", **KW))
    assert np.abs(got - want).max() <= 1


def test_pin_in_place_leaves_gpu_tensors_alone():
    from qwennb.loading import pin_in_place

    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64).cuda())
    before = m[1].weight.data_ptr()
    values = m[0].weight.detach().clone()
    assert pin_in_place([m]) > 0
    assert m[0].weight.is_pinned() and torch.equal(m[0].weight, values)
    assert m[1].weight.device.type == "cuda" and m[1].weight.data_ptr() == before


def test_an_fp8_plan_fuses_a_lora_in_and_draws_what_it_teaches():
    from qwennb import toy
    from qwennb.pipeline import lora_needs_fusing
    from qwennb.session import Session

    meta = json.loads((FIXTURES / "purple.json").read_text())
    # tests/test_toy_lora.py's four prompts (red, blue, orange, green; English and Chinese) at its settings
    items = [i for i in toy.eval_set(24, seed=4321, split="train") if i.expected["colour"] != "purple"][:12:3]
    opts = dict(steps=8, cfg=4.0, width=128, height=128)

    def colours(s):
        return [toy.read_image(s.generate(i.prompt, seed=i.seed, **opts).images[0]).colour for i in items]

    s = Session()
    s.load("toy", {"storage_dtype": "float8_e4m3fn"})
    assert lora_needs_fusing(s.report.plan)
    before = s.pipe
    plain = colours(s)
    assert "purple" not in plain
    assert sum(c == i.expected["colour"] for c, i in zip(plain, items, strict=True)) >= 3, plain
    s.lora_add(str(FIXTURES / meta["files"]["diffusers"]["file"]), 1.0)
    assert s.pipe is not before  # reloaded with the LoRA fused into the weights before fp8
    assert [i.scale for i in s.lora_list()] == [1.0]
    assert colours(s).count("purple") >= 3
    s.lora_remove()
    assert colours(s) == plain  # the same fp8 weights as before the LoRA


def test_a_lightning_preset_on_an_fp8_toy_does_not_reload():
    from qwennb import toy
    from qwennb.session import Session

    s = Session()
    s.load("toy", {"storage_dtype": "float8_e4m3fn"})
    before = s.pipe
    result = s.generate("a green square on the right, beige background", preset="lightning-8", seed=1)
    assert s.pipe is before  # the toy has no Lightning LoRA to fuse in: nothing reloads
    assert len(result.step_times_s) == 8
    assert any("stand-in with no lightning-8 LoRA" in n for n in result.notices)
    seen = toy.read_image(result.images[0])
    assert (seen.colour, seen.shape, seen.position) == ("green", "square", "right")
