import json
from pathlib import Path

import pytest

from qwennb import ModelDetectionService
from qwennb.cli import main
from qwennb.errors import UnknownModelError
from qwennb.models import REGISTRY, component_sizes, find_local_models, get_model, inspect_folder


def test_registry_names_and_hub_ids():
    assert get_model("qwen-image").hub_id == "Qwen/Qwen-Image"
    assert get_model("Qwen/Qwen-Image-Edit").name == "qwen-image-edit"
    assert get_model("qwen2-vl-7b").hub_id == "Qwen/Qwen2-VL-7B-Instruct"
    assert get_model("qwen2.5-vl-7b").hub_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert get_model("tiny").stand_in and get_model("qwen-image-synthetic").stand_in
    with pytest.raises(UnknownModelError, match="known models"):
        get_model("stable-diffusion")


def test_the_stand_ins_are_the_random_weight_models_and_entries_are_fixed():
    """Stand-ins (random weights: images are noise) are exactly these; the trained toy models are not among them.
    Registry entries cannot be changed in place."""
    import dataclasses

    from qwennb.models import REGISTRY

    assert sorted(m.name for m in REGISTRY.values() if m.stand_in) == [
        "qwen-image-2.1-synthetic",
        "qwen-image-edit-synthetic",
        "qwen-image-synthetic",
        "tiny",
        "tiny-2.1",
        "tiny-edit",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_model("toy").stand_in = True


def test_parameter_counts_come_from_the_configs():
    sizes = component_sizes("qwen-image")
    assert sizes["transformer"].params == 20_430_401_088
    assert sizes["text_encoder"].params == 8_292_166_656
    assert sizes["vae"].params == 126_892_531
    assert sizes["transformer"].blocks == 60
    assert component_sizes("qwen-image-synthetic")["transformer"].params == 20_430_401_088
    tiny = component_sizes("tiny")
    assert sum(s.params for s in tiny.values()) < 50_000_000


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(REGISTRY)
    assert rows["qwen-image"]["components"]["transformer"]["params"] == 20_430_401_088


def _snapshot(root, complete=True, cls="QwenImagePipeline"):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": cls,
                "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLQwenImage"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    for comp in ("transformer", "vae", "scheduler"):
        (root / comp).mkdir()
        (root / comp / "config.json").write_text("{}")
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    shards = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}})
    )
    for s in shards[: 2 if complete else 1]:
        (root / "transformer" / s).write_bytes(b"x")
    return root


def test_folder_detection_complete_and_incomplete(tmp_path):
    good = inspect_folder(_snapshot(tmp_path / "good"))
    assert good.name == "qwen-image" and good.architecture == "MMDiT" and good.complete
    bad = inspect_folder(_snapshot(tmp_path / "bad", complete=False))
    assert not bad.complete and bad.missing == [
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    ]
    found = find_local_models(tmp_path)  # each snapshot folder under tmp_path, in name order
    assert [(Path(m.path).name, m.name, m.complete) for m in found] == [
        ("bad", "qwen-image", False),
        ("good", "qwen-image", True),
    ]
    assert [m.path for m in find_local_models(tmp_path / "good")] == [str(tmp_path / "good")]


def test_detection_service_facade(tmp_path):
    _snapshot(tmp_path / "edit", cls="QwenImageEditPipeline")
    svc = ModelDetectionService(folder=tmp_path)
    current = svc.detect_current_model()
    assert current.name == "qwen-image-edit" and current.task == "image-edit"
    assert svc.detect_model_architecture(current) == "MMDiT"
    unet = tmp_path / "sd"
    unet.mkdir()
    (unet / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    assert svc.detect_model_architecture(unet) == "UNet"


def test_detection_service_falls_back_to_the_embedded_toy(tmp_path, monkeypatch):
    # With no snapshot, the original project's detect_current_model() names what qwennb loads: the toy.
    monkeypatch.delenv("QWENNB_MODEL", raising=False)
    from qwennb.models import EMBEDDED_MODEL, TOY_MODEL_DIR
    from qwennb.pipeline import resolve_model

    current = ModelDetectionService(folder=tmp_path).detect_current_model()
    assert current.name == EMBEDDED_MODEL == "toy" and current.architecture == "MMDiT"
    assert resolve_model(current.path)[:2] == ("toy", TOY_MODEL_DIR)


def test_hf_cache_scan(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Qwen-Image" / "snapshots" / "abc123"
    _snapshot(snap)
    (cache / "models--Qwen--Qwen-Image" / "refs").mkdir()
    (cache / "models--Qwen--Qwen-Image" / "refs" / "main").write_text("abc123")
    # imported before the environment changes: a first import here would read the test's cache into its constants,
    # and monkeypatch would then "restore" that (later tests, alone after this one, found qwen-image there)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    found = find_local_models()
    assert [m.hub_id for m in found] == ["Qwen/Qwen-Image"] and found[0].complete


def test_a_config_not_stored_is_counted_once(monkeypatch):
    """A folder's own config (a fine-tune) is counted on the meta device once, not at every plan size check
    (generation asks the plan's sizes for each candidate size)."""
    from qwennb import models

    cfg = dict(models.load_config("tiny", "transformer"), num_layers=3)
    builds = []
    real = models.build_from_config
    monkeypatch.setattr(models, "build_from_config", lambda c: builds.append(1) or real(c))
    first = models.size_of_config(cfg, "transformer")
    assert models.size_of_config(cfg, "transformer") == first and len(builds) <= 1
    assert first.blocks == 3 != models.component_sizes("tiny")["transformer"].blocks  # its own, not tiny's
