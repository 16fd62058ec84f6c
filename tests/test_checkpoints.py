"""The current checkpoints: Qwen-Image-2512 (same architecture) and Qwen-Image-2.1 (its own classes), from the
registry's shipped configs to a generation on the tiny 2.1 stand-in (real diffusers classes, no mocks)."""

import numpy as np
import pytest

from qwennb.download import DownloadError, download
from qwennb.generation import generate
from qwennb.models import REGISTRY, component_sizes, get_model, load_config
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan, transformer_flops


def test_2512_is_qwen_image_with_newer_weights():
    spec = get_model("Qwen/Qwen-Image-2512")
    assert (spec.name, spec.pipeline_class, spec.config_dir) == (
        "qwen-image-2512",
        "QwenImagePipeline",
        "qwen-image",
    )
    assert "Apache-2.0" in spec.description and spec.licence == ""
    a, b = component_sizes("qwen-image-2512"), component_sizes("qwen-image")
    assert {k: v.params for k, v in a.items()} == {k: v.params for k, v in b.items()}
    for gb in (80, 24, 12):
        p, q = (
            make_plan(describe_machine(gpu_memory_gb=gb), "qwen-image-2512"),
            make_plan(describe_machine(gpu_memory_gb=gb), "qwen-image"),
        )
        assert (
            p.arrangement == q.arrangement
            and p.model == "qwen-image-2512"
            and p.hub_id == "Qwen/Qwen-Image-2512"
        )


def test_2_1_sizes_are_computed_from_its_configs():
    sizes = component_sizes("qwen-image-2.1")
    assert sizes["transformer"].class_name == "QwenImage21Transformer2DModel"
    assert sizes["transformer"].params == 7_115_124_736 and sizes["transformer"].blocks == 32  # "7.1B"
    assert sizes["text_encoder"].class_name == "Qwen3VLForConditionalGeneration"
    assert sizes["text_encoder"].params == 8_767_123_696 and sizes["text_encoder"].blocks == 36  # Qwen3-VL-8B
    assert sizes["vae"].class_name == "AutoencoderKLQwenImage21"
    total_gb = sum(s.params for s in sizes.values()) * 2 / 1e9
    assert 31 < total_gb < 33  # "about 31 GB in bf16"
    assert get_model("2.1").pipeline_class == "QwenImage21Pipeline"
    # One forward at 1024x1024: 32 single-stream blocks of width 4096 over 4096 image + text tokens.
    assert 60e12 < transformer_flops(load_config("qwen-image-2.1", "transformer"), 1024, 1024) < 75e12


@pytest.mark.parametrize("gb", [80, 48, 24, 16, 12])
def test_2_1_plans_fit_every_cap(gb):
    plan = make_plan(describe_machine(gpu_memory_gb=gb), "qwen-image-2.1")
    assert plan.model == "qwen-image-2.1" and plan.hub_id == "Qwen/Qwen-Image-2.1"
    assert plan.budget_gb is not None and plan.estimated_peak_gpu_gb <= plan.budget_gb
    # Its own sizes: at 80 GB the bf16 weights (about 30 GiB) sit whole on the card.
    if gb == 80:
        assert plan.components["transformer"].placement == "gpu" and plan.estimated_peak_gpu_gb > 30


def test_2_1_plans_count_the_memory_measured_on_an_h200():
    # benchmarks/results/plan-validation-qwen-image-2-1-synthetic-nvidia-h200.json: whole on the card, 1024x1024,
    # CFG 4, it peaked at 40.87 GiB; with the text encoder streamed, the 13.25 GiB transformer and an untiled
    # decode (6.85 GiB, phase-memory-*) ran out of 24 GB, which the plan of the time (18.1 GiB) did not foresee.
    hw = describe_machine(gpu_memory_gb=80, compute_capability="9.0", pcie_gen=5)
    whole = make_plan(hw, "qwen-image-2.1")
    assert 40.87 <= whole.estimated_peak_gpu_gb <= 40.87 * 1.1, whole.estimated_peak_gpu_gb
    # its reason quotes 2.1's own path and measurement, not Qwen-Image's
    why = " ".join(whole.reasons)
    assert "qwennb.speed21" in why and "0.225 s/step against 0.29 for stock" in why and "0.368" not in why, (
        why
    )
    capped = make_plan(
        describe_machine(gpu_memory_gb=24, compute_capability="9.0", pcie_gen=5), "qwen-image-2.1"
    )
    t = capped.components["transformer"]
    if t.placement == "gpu" and t.storage_dtype == "bfloat16" and not capped.vae_tiling:
        pytest.fail(
            f"an untiled decode beside the whole bf16 transformer does not fit 24 GB: {capped.arrangement}"
        )
    assert capped.estimated_peak_gpu_gb <= capped.budget_gb


def test_2_1_host_ram_counts_the_whole_model_read_at_load():
    # Round 11 on an H200: 2.1's 16 and 12 GB plans peaked at 30.6 GiB of host RSS (every component read whole
    # into host RAM by from_pretrained before apply_plan places it), where the plan counted 23.6 and 20.2. Qwen-Image
    # is read block by block and keeps the smaller figure.
    def plan(model, gb, host):
        return make_plan(
            describe_machine(gpu_memory_gb=gb, compute_capability="9.0", pcie_gen=5, host_ram_gb=host), model
        )

    for gb in (80, 24, 16, 12):
        p = plan("qwen-image-2.1", gb, 64)
        assert 30.6 <= p.estimated_host_ram_gb <= 30.6 * 1.1, (gb, p.estimated_host_ram_gb)
        assert not p.warnings or all("host RAM" not in w for w in p.warnings)
    qi = plan("qwen-image", 16, 64)
    assert qi.estimated_host_ram_gb < 30  # its block-by-block loader: what stays on the host, plus one block
    # 32 GB of host RAM: the load does not fit its usable share, and the plan says so and why; once loaded the
    # streamed blocks stay pinned (pinning is decided on what the host keeps, not on the load's peak)
    tight = plan("qwen-image-2.1", 12, 32)
    assert any("host RAM" in w and "read whole into host RAM" in w for w in tight.warnings), tight.warnings
    why = " ".join(tight.reasons)
    assert "pinned" in why and "pageable" not in why, why
    assert "least host RAM (nothing fits the host)" in why and "fastest that fits" not in why, why
    # among those that need about as much, the usual choice: lossy fp8 storage only because it is clearly faster
    assert "x faster than the best exact arrangement" in why and "no exact arrangement fits" not in why, why


def test_2_1_gets_no_fp8_matmuls_it_does_not_have():
    # qwennb's fp8 matmuls are the tuned path of Qwen-Image's MMDiT: a 16 GB plan for 2.1 that chose them ran
    # 2.1 under layerwise fp8 casting and regional compile, which dynamo refused (round 10 on an H200).
    from qwennb.pipeline import _stored_form

    for gb in (16, 12):
        plan = make_plan(describe_machine(gpu_memory_gb=gb, compute_capability="9.0"), "qwen-image-2.1")
        assert not plan.fp8_matmul and "fp8 matmuls" not in plan.arrangement, plan.arrangement
        assert not _stored_form(plan)  # qwennb.loading reads Qwen-Image's blocks only
    asked = make_plan(
        describe_machine(gpu_memory_gb=16, compute_capability="9.0"), "qwen-image-2.1", {"fp8_matmul": True}
    )
    assert not asked.fp8_matmul and any("fp8_matmul is qwennb's tuned path" in w for w in asked.warnings)
    fp8 = make_plan(
        describe_machine(gpu_memory_gb=16, compute_capability="9.0"),
        "qwen-image-2.1",
        {"storage_dtype": "float8_e4m3fn", "allow_lossy": True},
    )
    assert fp8.components["transformer"].storage_dtype == "float8_e4m3fn" and not fp8.compile
    assert not _stored_form(fp8)
    qwen = make_plan(describe_machine(gpu_memory_gb=16, compute_capability="9.0"), "qwen-image")
    assert qwen.fp8_matmul  # Qwen-Image keeps them


def test_2_1_streams_its_blocks_like_qwen_image():
    # The 16 and 12 GB plans for 2.1 are group offload in bf16: its blocks stream through diffusers' hooks as
    # Qwen-Image's do. On the CPU (no streams) one of tiny-2.1's two blocks resident: the same pixels as whole.
    from qwennb.hardware import detect
    from qwennb.pipeline import is_hooked

    offload = make_plan(
        detect(), "tiny-2.1", {"transformer_placement": "group_offload", "resident_blocks": 1}
    )
    assert offload.components["transformer"].placement == "group_offload"
    streamed = build(offload)
    assert is_hooked(streamed.transformer)
    whole = build(make_plan(detect(), "tiny-2.1"))
    a, b = (
        np.asarray(generate(p, "a red car", steps=2, width=64, height=64, seed=1).images[0])
        for p in (streamed, whole)
    )
    assert np.array_equal(a, b)


def test_2_1_licence_is_shown_at_download(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError):
        download("qwen-image-2.1", dry_run=True)
    err = capsys.readouterr().err
    assert "licence: Qwen-Image-2.1's weights are under a non-commercial licence" in err
    assert REGISTRY["qwen-image-2.1"].licence and not REGISTRY["qwen-image"].licence


@pytest.fixture(scope="module")
def pipe21():
    return build(make_plan(describe_machine(host_ram_gb=8), "tiny-2.1"))


def test_tiny_2_1_generates_through_the_same_api(pipe21):
    assert type(pipe21).__name__ == "QwenImage21Pipeline"
    kw = dict(width=64, height=64, steps=2)
    a = generate(pipe21, "a red car", seed=3, cfg=1.0, **kw)
    b = generate(pipe21, "a red car", seed=3, cfg=1.0, **kw)
    c = generate(pipe21, "a red car", seed=4, cfg=1.0, **kw)
    g = generate(pipe21, "a red car", seed=3, cfg=4.0, **kw)
    assert a.images[0].size == (64, 64) and a.model == "tiny-2.1"
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert (a.transformer_passes_per_step, g.transformer_passes_per_step) == (1, 2)
    assert len(a.step_times_s) == 2 and a.text_encoding_s > 0


def test_synthetic_2_1_is_a_registry_stand_in():
    spec = get_model("synthetic-2.1")
    assert spec.stand_in and spec.config_dir == "qwen-image-2.1" and spec.hub_id is None


def test_loras_load_on_2_1_too(pipe21, tmp_path):
    from qwennb import lora

    kw = dict(width=64, height=64, steps=2, seed=3, cfg=1.0)
    base = np.asarray(generate(pipe21, "a red car", **kw).images[0], int)
    # diffusers' Kohya converter knows Qwen-Image's layer names, not 2.1's gate_layer: refused, naming it.
    kohya = tmp_path / "k21.safetensors"
    lora.save_random_lora(pipe21.transformer, kohya, layout="kohya", rank=4)
    with pytest.raises(
        lora.LoraError,
        match=r"2 of 14 layers differ, first keys: transformer_blocks\.0\.img_mlp\.gate\.layer",
    ):
        lora.add(pipe21, kohya)
    path = tmp_path / "l21.safetensors"
    lora.save_random_lora(pipe21.transformer, path, layout="lightning", rank=4, std=0.5)
    info = lora.add(pipe21, path, 1.0)
    assert info.modules == 7 * len(pipe21.transformer.transformer_blocks)
    on = np.asarray(generate(pipe21, "a red car", **kw).images[0], int)
    lora.set_scale(pipe21, info.name, 0.0)
    assert np.array_equal(np.asarray(generate(pipe21, "a red car", **kw).images[0], int), base)
    lora.remove(pipe21)
    assert np.abs(on - base).max() > 10
    assert np.array_equal(np.asarray(generate(pipe21, "a red car", **kw).images[0], int), base)
