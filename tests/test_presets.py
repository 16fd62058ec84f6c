"""Presets, official sizes and the positive-magic suffix: exact values from the model card."""

import pytest

from qwennb.errors import GenerationError
from qwennb.generation import generate
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan
from qwennb.presets import (
    ASPECT_RATIOS,
    POSITIVE_MAGIC,
    PRESETS,
    aspect_size,
    get_preset,
    is_chinese,
    round16,
)


def test_official_sizes_are_the_model_cards():
    assert ASPECT_RATIOS == {
        "1:1": (1328, 1328),
        "16:9": (1664, 928),
        "9:16": (928, 1664),
        "4:3": (1472, 1104),
        "3:4": (1104, 1472),
        "3:2": (1584, 1056),
        "2:3": (1056, 1584),
    }
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in ASPECT_RATIOS.values())


def test_presets_steps_and_cfg():
    assert {n: (p.steps, p.cfg) for n, p in PRESETS.items()} == {
        "ultra-fast": (12, 3.0),
        "balanced": (20, 3.5),
        "high-quality": (35, 4.0),
        "official": (50, 4.0),
        "lightning-4": (4, 1.0),  # the Lightning LoRAs' distilled schedules: CFG off
        "lightning-8": (8, 1.0),
    }
    assert PRESETS["official"].official_sizes and not PRESETS["balanced"].official_sizes


@pytest.mark.parametrize("name", ["Ultra_Fast", " ultra-fast ", "ULTRA-FAST"])
def test_preset_names_are_normalised(name):
    assert get_preset(name) is PRESETS["ultra-fast"]


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(
        GenerationError, match="unknown preset 'turbo-max'; choose one of: ultra-fast, balanced"
    ):
        get_preset("turbo-max")


@pytest.mark.parametrize(
    "x, expected",
    [(0, 16), (8, 16), (24, 32), (70, 64), (90, 96), (1000, 992), (1330, 1328), (1670, 1664), (1340, 1344)],
)
def test_round16_is_the_nearest_multiple_of_16(x, expected):
    assert round16(x) == expected


def test_aspect_sizes_scaled_to_a_long_side():
    assert aspect_size("16:9") == (1664, 928)
    assert aspect_size("16:9", scale_to=256) == (256, 144)
    assert aspect_size("9:16", scale_to=256) == (144, 256)
    assert aspect_size("4:3", scale_to=512) == (512, 384)
    with pytest.raises(GenerationError, match="unknown aspect ratio '5:4'"):
        aspect_size("5:4")


def test_chinese_is_detected_by_its_characters():
    assert is_chinese("灯塔") and is_chinese("a lighthouse, 灯塔") and is_chinese("\u3400")
    assert not is_chinese("a lighthouse") and not is_chinese("こんにちは")
    assert POSITIVE_MAGIC == {"en": ", Ultra HD, 4K, cinematic composition.", "zh": ", 超清，4K，电影级构图."}


def test_positive_magic_follows_the_prompts_language():
    pipe = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
    small = dict(seed=1, steps=2, width=64, height=64, positive_magic=True)
    en = generate(pipe, "a lighthouse", **small)
    zh = generate(pipe, "灯塔", **small)
    assert (
        en.prompt == "a lighthouse, Ultra HD, 4K, cinematic composition."
        and en.original_prompt == "a lighthouse"
    )
    assert zh.prompt == "灯塔, 超清，4K，电影级构图." and zh.original_prompt == "灯塔"
    plain = generate(pipe, "a lighthouse", seed=1, steps=2, width=64, height=64, preset="balanced")
    assert plain.prompt == "a lighthouse" and (plain.steps, plain.cfg) == (2, 3.5)  # explicit steps win


@pytest.mark.parametrize("preset", ["lightning-8", "lightning-4"])
def test_a_lightning_preset_on_the_embedded_toy_runs_its_steps_and_says_there_is_no_lora(preset):
    # The toy is what a machine without weights runs (and the panel offers the Lightning presets there too): no
    # Lightning LoRA exists for it, so the preset's steps, CFG 1 and scheduler apply and a notice says so.
    from qwennb import toy

    pipe = build(make_plan(describe_machine(host_ram_gb=16), "toy"))
    prompt = "blue triangle, top of the picture, white backdrop"
    r = generate(pipe, prompt, preset=preset, seed=2, width=256, height=256)
    steps = get_preset(preset).steps
    assert (len(r.step_times_s), r.steps, r.cfg, r.preset) == (steps, steps, 1.0, preset)
    assert [n for n in r.notices if "no Lightning" in n or "stand-in with no" in n] == [
        f"toy is a stand-in with no {preset} LoRA: only its steps, CFG 1 and scheduler apply"
    ]
    assert r.loras == []
    seen = toy.read_image(r.images[0])
    assert (seen.colour, seen.shape) == ("blue", "triangle")


def test_each_lightning_lora_is_the_file_for_its_step_count_and_checkpoint():
    from qwennb.models import get_model
    from qwennb.presets import LIGHTNING_LORAS, lightning_lora

    for model, table in LIGHTNING_LORAS.items():
        spec = get_model(model)  # a registry model
        assert not spec.unpublished and spec.hub_id
        for steps, (repo, file) in table.items():
            assert get_preset(f"lightning-{steps}").steps == steps
            assert f"-{steps}steps-" in file and repo.startswith("lightx2v/")
            # the file of this checkpoint, not another's: Qwen-Image-Edit-2509's, Edit's, 2512's or Qwen-Image's
            stem = file.rsplit("/", 1)[-1].split("-Lightning-")[0]
            assert stem == spec.hub_id.split("/")[1], (model, file)
            assert lightning_lora(model, f"lightning-{steps}") == (repo, file)
