"""LoRAs on the real pipeline (no mocks): every key format, scales, removal, refusals, provenance, presets.

The LoRA files are made in code for the model under test (random weights in each tool's key layout) and
saved as safetensors in a temporary folder. ``MODEL`` is the one place that names the model: the trained
toy model can replace the tiny stand-in here, and a trained toy LoRA can join these files, without touching
the tests themselves.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import threading
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qwennb import lora
from qwennb.generation import generate, load_params
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan
from qwennb.presets import LIGHTNING_SCHEDULER, get_preset, lightning_lora
from qwennb.session import Session

MODEL = "tiny"
SMALL = dict(width=64, height=64, steps=3, cfg=1.0, seed=5)
RANK = 4


def new_pipe():
    return build(make_plan(describe_machine(host_ram_gb=8), MODEL))


@pytest.fixture(scope="module")
def pipe():
    return new_pipe()


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    if lora.list_loras(pipe):
        lora.remove(pipe)
    lora.enable(pipe)


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """The same random LoRA (seed 1) in every layout, with alpha = rank so all of them scale by 1; and one
    with Lightning's alpha (8 at rank 4: twice as strong), and a second, different LoRA."""
    d = tmp_path_factory.mktemp("loras")
    out = {}
    for layout in lora.LAYOUTS:
        out[layout] = d / f"same_{layout.replace('-', '_')}.safetensors"
        lora.save_random_lora(
            pipe.transformer, out[layout], layout=layout, rank=RANK, alpha=RANK, seed=1, std=0.5
        )
    out["alpha8"] = d / "alpha8.safetensors"
    lora.save_random_lora(
        pipe.transformer, out["alpha8"], layout="lightning", rank=RANK, alpha=8, seed=1, std=0.5
    )
    out["other"] = d / "other.safetensors"
    lora.save_random_lora(pipe.transformer, out["other"], layout="diffusers", rank=2, seed=2, std=0.5)
    return out


def px(result):
    return np.asarray(result.images[0]).astype(int)


def image(pipe, **kw):
    return px(generate(pipe, "a red circle", **{**SMALL, **kw}))


@pytest.fixture(scope="module")
def base(pipe):
    return image(pipe)


EXPECTED_FORMAT = {
    "diffusers": "diffusers",
    "peft-default": "diffusers",
    "kohya": "kohya",
    "comfyui": "comfyui",
    "lightning": "lightning",
}


@pytest.mark.parametrize("layout", lora.LAYOUTS)
def test_every_key_format_loads_and_gives_the_same_image(pipe, files, base, layout):
    reference = None
    info = lora.add(pipe, files["diffusers"], 1.0, name="ref")
    reference = image(pipe)
    lora.remove(pipe)
    info = lora.add(pipe, files[layout], 1.0)
    assert info.format == EXPECTED_FORMAT[layout] and info.rank == RANK
    assert info.modules == len(lora.BLOCK_TARGETS) * len(pipe.transformer.transformer_blocks)
    got = image(pipe)
    # The same weights in any tool's layout are the same LoRA: the same pixels.
    assert np.array_equal(got, reference)
    assert np.abs(got - base).max() > 20


def test_alpha_is_folded_in_as_alpha_over_rank(pipe, files):
    """Kohya/Lightning keep alpha apart: a rank-4 LoRA with alpha 8 changes each layer twice as much."""
    name = "transformer_blocks.0.attn.to_q"
    lora.add(pipe, files["alpha8"], 1.0, name="a8")
    lora.add(pipe, files["diffusers"], 1.0, name="a4")
    layer = dict(pipe.transformer.named_modules())[name]
    d8, d4 = layer.get_delta_weight("a8"), layer.get_delta_weight("a4")
    assert torch.allclose(d8, 2 * d4, rtol=1e-5, atol=1e-7)
    raw = lora.read_state_dict(files["diffusers"])
    b, a = raw[f"transformer.{name}.lora_B.weight"], raw[f"transformer.{name}.lora_A.weight"]
    assert torch.allclose(d4, b @ a, rtol=1e-5, atol=1e-7)
    lora.set_scale(pipe, "a4", 0.25)
    assert torch.allclose(layer.get_delta_weight("a4"), 0.25 * b @ a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("saver", ["save_lora_weights", "save_lora_adapter"])
def test_a_diffusers_file_keeps_its_alpha_in_the_metadata_and_it_is_honoured(pipe, tmp_path, saver):
    """A LoRA trained with PEFT at lora_alpha != r and saved by diffusers keeps its tensors raw and alpha in the
    file's ``lora_adapter_metadata``; qwennb used to load the tensors alone, at r/alpha of the strength (the toy
    LoRA, rank 4 alpha 8, came out half as strong as its kohya copy)."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict

    other = new_pipe().transformer
    other.add_adapter(LoraConfig(r=RANK, lora_alpha=3 * RANK, target_modules=["to_q", "to_v"]))
    for name, p in other.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    name = "transformer_blocks.0.attn.to_q"
    trained = dict(other.named_modules())[name].get_delta_weight("default").detach()
    if saver == "save_lora_weights":
        QwenImagePipeline.save_lora_weights(
            tmp_path,
            transformer_lora_layers=get_peft_model_state_dict(other),
            weight_name="a.safetensors",
            transformer_lora_adapter_metadata=other.peft_config["default"].to_dict(),
        )
    else:
        other.save_lora_adapter(tmp_path, weight_name="a.safetensors")
    path = tmp_path / "a.safetensors"
    assert lora.adapter_config(path)["lora_alpha"] == 3 * RANK
    info = lora.add(pipe, path, 1.0)
    assert info.format == "diffusers" and info.rank == RANK
    got = dict(pipe.transformer.named_modules())[name].get_delta_weight(info.name).detach()
    assert torch.allclose(got, trained, rtol=1e-5, atol=1e-7)


def test_scale_zero_is_no_lora_and_removing_restores_the_pixels_exactly(pipe, files, base):
    info = lora.add(pipe, files["kohya"], 0.0)
    assert np.array_equal(image(pipe), base)
    lora.set_scale(pipe, info.name, 0.8)
    on = image(pipe)
    assert np.abs(on - base).max() > 20
    lora.set_scale(pipe, info.name, 0.4)
    half = image(pipe)
    assert not np.array_equal(half, on) and not np.array_equal(half, base)
    lora.remove(pipe, info.name)
    assert lora.list_loras(pipe) == []
    assert np.array_equal(image(pipe), base)


def test_several_loras_add_up_and_removing_one_leaves_the_other(pipe, files, base):
    lora.add(pipe, files["lightning"], 1.0, name="one")
    only_one = image(pipe)
    lora.add(pipe, files["other"], 1.0, name="two")
    both = image(pipe)
    assert [i.name for i in lora.list_loras(pipe)] == ["one", "two"]
    assert not np.array_equal(both, only_one)
    lora.remove(pipe, "two")
    assert np.array_equal(image(pipe), only_one)
    lora.disable(pipe)
    assert np.array_equal(image(pipe), base)
    assert generate(pipe, "x", **SMALL).loras == []  # disabled LoRAs are not recorded
    lora.enable(pipe)
    assert np.array_equal(image(pipe), only_one)


def test_a_lora_for_another_model_is_refused_in_one_line_and_changes_nothing(pipe, files, base, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    sd = lora.random_lora_state_dict(pipe.transformer, rank=2, layout="diffusers", blocks=[0])
    sd = {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in sd.items()}
    _save(sd, wrong)
    with pytest.raises(lora.LoraError) as e:
        lora.add(pipe, wrong)
    msg = str(e.value)
    assert "\n" not in msg and "14 of 14 layers differ" in msg
    assert "first keys: transformer_blocks.7.attn.add_k_proj.lora_A.weight (no such layer)" in msg
    assert lora.list_loras(pipe) == [] and np.array_equal(image(pipe), base)


def _save(sd, path):
    from safetensors.torch import save_file

    save_file(sd, str(path))


def test_a_lora_with_other_shapes_is_refused_naming_the_layer(pipe, tmp_path):
    sd = lora.random_lora_state_dict(pipe.transformer, rank=2, layout="kohya", blocks=[1])
    key = "lora_unet_transformer_blocks_1_img_mlp_net_2.lora_down.weight"
    sd[key] = torch.zeros(2, 5)
    path = tmp_path / "shape.safetensors"
    _save(sd, path)
    with pytest.raises(
        lora.LoraError, match=r"1 of 14 layers differ, first keys: transformer_blocks\.1\.img_mlp\.net\.2"
    ):
        lora.add(pipe, path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_files_are_refused_unopened(pipe, tmp_path, suffix):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(lora.LoraError, match="pickle, and loading a pickle can run code"):
        lora.add(pipe, path)
    assert not marker.exists()
    folder = tmp_path / "only_pickles"
    folder.mkdir(exist_ok=True)
    (folder / f"adapter_model{suffix}").write_bytes(b"x")
    with pytest.raises(lora.LoraError, match=f"holds only adapter_model\\{suffix}, refused: it is a pickle"):
        lora.add(pipe, folder)


def test_a_folder_with_one_file_loads_and_one_with_several_asks_which(pipe, files, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "pytorch_lora_weights.safetensors").write_bytes(files["kohya"].read_bytes())
    info = lora.add(pipe, one)
    assert info.name == "one" and info.path.endswith("pytorch_lora_weights.safetensors")
    (one / "b.safetensors").write_bytes(files["other"].read_bytes())
    with pytest.raises(lora.LoraError, match="several .safetensors files"):
        lora.resolve_file(one)
    assert lora.resolve_file(one, "b.safetensors").name == "b.safetensors"


def test_a_hub_lora_offline_and_not_cached_is_refused_with_the_command(pipe):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(lora.LoraError) as e:
        lora.add(pipe, "someone/some-lora/style.safetensors")
    assert "`qwennb download --lora someone/some-lora/style.safetensors`" in str(e.value)
    assert "offline" in str(e.value)


def test_bad_names_scales_and_duplicates_are_refused(pipe, files):
    lora.add(pipe, files["kohya"], name="style")
    with pytest.raises(lora.LoraError, match="called 'style' is loaded already"):
        lora.add(pipe, files["other"], name="style")
    with pytest.raises(lora.LoraError, match="a LoRA scale is a number"):
        lora.set_scale(pipe, "style", float("nan"))
    with pytest.raises(lora.LoraError, match="no LoRA called 'nope'; loaded: style"):
        lora.remove(pipe, "nope")
    with pytest.raises(lora.LoraError, match="letters, digits"):
        lora.add(pipe, files["other"], name="my.lora")


def test_hotswap_replaces_the_weights_in_place(pipe, files):
    lora.add(pipe, files["lightning"], 1.0, name="slot")
    first = image(pipe)
    lora.add(pipe, files["alpha8"], 1.0, name="slot", hotswap=True)
    swapped = image(pipe)
    assert [i.name for i in lora.list_loras(pipe)] == ["slot"] and lora.list_loras(pipe)[
        0
    ].format == "lightning"
    lora.remove(pipe)
    lora.add(pipe, files["alpha8"], 1.0, name="fresh")
    assert not np.array_equal(swapped, first) and np.array_equal(swapped, image(pipe))


def copies(files, tmp_path, *layouts):
    """Fresh copies of LoRA files: paths no hash cache has seen."""
    out = []
    for layout in layouts:
        f = tmp_path / f"copy_{layout}.safetensors"
        f.write_bytes(files[layout].read_bytes())
        out.append(f)
    return out


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_is_hashed_once_however_often_it_is_swapped_in(pipe, files, tmp_path, monkeypatch):
    """Hashing the 1.2 GB Lightning-shaped LoRA was the largest single cost of a hotswap in the CPU profile (#17):
    swapping back and forth between two LoRAs reads each file for its hash once."""
    calls = []
    real = lora._hash_file
    monkeypatch.setattr(lora, "_hash_file", lambda p: calls.append(os.fspath(p)) or real(p))
    a, b = copies(files, tmp_path, "lightning", "alpha8")
    lora.add(pipe, a, 1.0, name="slot")
    for f in (b, a, b, a, b):
        info = lora.add(pipe, f, 1.0, name="slot", hotswap=True)
        assert info.sha256 == sha(f) and info.path == str(f)
        timings = lora.last_load_timings(pipe)
        assert set(timings) >= {
            f"{k}_s" for k in ("hash", "read", "convert", "check", "copy", "scales", "total")
        }
        assert timings["hash_s"] == 0.0
    assert sorted(calls) == sorted([str(a), str(b)])
    assert generate(pipe, "a red circle", **SMALL).loras[0]["sha256"] == sha(b)


def test_a_hotswap_does_not_wait_for_the_files_sha256(pipe, files, tmp_path, monkeypatch):
    """The hash is computed beside the load in a background thread; only what reads it (an image's record, or
    a regeneration that must check it before loading) waits. Here the hasher is held back until the swaps are
    done: were the hash on the loading path, ``add`` would wait for it (and fail after a minute)."""
    release = threading.Event()
    real = lora._hash_file

    def held(p):
        assert threading.current_thread() is not threading.main_thread(), "hashed on the loading path"
        assert release.wait(60), "add waited for the hash"
        return real(p)

    monkeypatch.setattr(lora, "_hash_file", held)
    a, b = copies(files, tmp_path, "lightning", "alpha8")
    try:
        lora.add(pipe, a, 1.0, name="slot")
        info = lora.add(pipe, b, 1.0, name="slot", hotswap=True)
        pending = info.__dict__["_sha256"]
        assert isinstance(pending, Future) and not pending.done()
        assert lora.last_load_timings(pipe)["hash_s"] == 0.0
    finally:
        release.set()
    assert info.sha256 == sha(b) and lora.file_sha256(a) == sha(a)
    assert generate(pipe, "a red circle", **SMALL).loras == [
        {"name": "slot", "source": str(b), "sha256": sha(b), "scale": 1.0}
    ]


def test_a_file_changed_after_it_was_read_is_given_no_hash(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"abc")
    when_read = lora._stat_key(f)
    f.write_bytes(b"abcd")
    with pytest.raises(lora.LoraError, match="changed while it was loaded"):
        lora.sha256_soon(f, when_read).result()
    assert lora.file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


def test_a_file_removed_while_it_is_hashed_is_given_no_hash(tmp_path, monkeypatch):
    f = tmp_path / "gone.safetensors"
    f.write_bytes(b"abc")
    when_read = lora._stat_key(f)
    real = lora._hash_file

    def hash_then_remove(path):  # the file goes between the hash and the check that it is still the same
        digest = real(path)
        os.remove(path)
        return digest

    monkeypatch.setattr(lora, "_hash_file", hash_then_remove)
    with pytest.raises(lora.LoraError, match="changed while it was loaded"):
        lora.sha256_soon(f, when_read).result()
    assert when_read not in lora._SHA_CACHE


def test_a_lora_is_read_straight_to_the_transformers_device(pipe, files, monkeypatch):
    """On a GPU the LoRA's tensors are read to the card (safetensors' ``load_file(device=...)``), so diffusers
    converts them there and its hotswap copies device to device, instead of one host-to-device copy per tensor;
    streamed, offloaded or CPU weights, or a card without room, read to the CPU."""
    cuda = torch.device("cuda", 0)

    def stub(*devices):
        return SimpleNamespace(parameters=lambda: iter(SimpleNamespace(device=d) for d in devices))

    free = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 << 30))
    assert lora._load_device(stub(cuda, cuda), files["lightning"]) == cuda
    assert lora._load_device(stub(cuda, torch.device("cpu")), files["lightning"]) == torch.device("cpu")
    assert lora._load_device(stub(torch.device("cpu")), files["lightning"]) == torch.device("cpu")
    free["bytes"] = 1 << 20
    assert lora._load_device(stub(cuda), files["lightning"]) == torch.device("cpu")
    # add() reads to where _load_device says
    marker, seen = object(), []
    real = lora.read_state_dict
    monkeypatch.setattr(lora, "_load_device", lambda transformer, path: marker)
    monkeypatch.setattr(lora, "read_state_dict", lambda p, device="cpu": seen.append(device) or real(p))
    lora.add(pipe, files["lightning"], 1.0)
    assert seen == [marker]


def test_the_tuned_path_sees_scale_changes(pipe, files):
    """The tuned path caches modulation vectors by weight version; a scale change must invalidate them."""
    from qwennb.speed import disable_fast_path, enable_fast_path

    p = new_pipe()
    enable_fast_path(p.transformer, compile=False, scheduler=p.scheduler)
    try:
        fast_base = image(p, cfg=4.0)
        info = lora.add(p, files["lightning"], 1.0)
        on = image(p, cfg=4.0)
        lora.set_scale(p, info.name, 0.0)
        off = image(p, cfg=4.0)
        # One level: with LoRA layers the MLP's GELU is no longer fused into the matmul (rounding only).
        assert np.abs(off - fast_base).max() <= 1 and np.abs(on - fast_base).max() > 20
        lora.set_scale(p, info.name, 1.0)
        assert np.array_equal(image(p, cfg=4.0), on)
    finally:
        disable_fast_path(p.transformer)


def test_png_records_loras_and_regenerating_loads_them_again(pipe, files, tmp_path):
    info = lora.add(pipe, files["comfyui"], 0.6)
    r = generate(pipe, "a red circle", **SMALL)
    want = {"name": info.name, "source": str(files["comfyui"]), "sha256": lora.file_sha256(files["comfyui"])}
    assert r.loras == [{**want, "scale": 0.6}]
    path = r.save(tmp_path)[0]
    params = load_params(path)
    assert params["loras"] == [{**want, "scale": 0.6}] and params == r.params()
    lora.remove(pipe)
    lora.add(pipe, files["other"], 1.0)
    again = generate(pipe, **params)
    assert np.array_equal(px(again), px(r))
    assert [(i.name, i.scale) for i in lora.list_loras(pipe)] == [(info.name, 0.6)]
    assert any("loaded LoRA" in n for n in again.notices) and any(
        "removed LoRA other" in n for n in again.notices
    )


def test_regenerating_refuses_a_lora_file_that_changed(pipe, files, tmp_path):
    path = tmp_path / "mutable.safetensors"
    path.write_bytes(files["kohya"].read_bytes())
    lora.add(pipe, path, 1.0)
    params = generate(pipe, "x", **SMALL).params()
    lora.remove(pipe)
    path.write_bytes(files["lightning"].read_bytes())  # same keys, other weights
    with pytest.raises(lora.LoraError, match="has changed: its sha256 is"):
        generate(pipe, **params)
    assert lora.list_loras(pipe) == []


def test_fp8_plans_fuse_loras_before_quantising(files, base):
    plan = make_plan(describe_machine(host_ram_gb=8), MODEL)
    comps = dict(plan.components)
    comps["transformer"] = dataclasses.replace(comps["transformer"], storage_dtype="float8_e4m3fn")
    fp8_plan = dataclasses.replace(plan, components=comps)
    from qwennb.pipeline import lora_needs_fusing

    assert lora_needs_fusing(fp8_plan) and not lora_needs_fusing(plan)
    p = build(fp8_plan, loras=[(str(files["kohya"]), 0.8)])
    infos = lora.list_loras(p)
    assert [(i.fused, i.scale, i.format) for i in infos] == [(True, 0.8, "kohya")]
    assert not any("lora" in n for n, _ in p.transformer.named_parameters())  # plain weights, no LoRA layers
    fused = image(p)
    ref = new_pipe()
    lora.add(ref, files["kohya"], 0.8)
    assert np.abs(fused - image(ref)).max() <= 1 and np.abs(fused - base).max() > 20
    with pytest.raises(lora.LoraError, match="fused into the weights"):
        lora.remove(p, infos[0].name)
    assert generate(p, "x", **SMALL).loras[0]["scale"] == 0.8


@pytest.mark.parametrize("record", [{"scale": 0.5}, "ink.safetensors", None, ["ink.safetensors", 0.5]])
def test_a_lora_record_without_a_source_is_refused_in_one_line(pipe, record):
    # loras=[...] of generate() and a PNG's records: each a dict with at least a source
    with pytest.raises(lora.LoraError, match=r"^a LoRA record needs at least a source, got "):
        lora.ensure(pipe, [record])
    with pytest.raises(lora.LoraError, match="needs at least a source"):
        generate(pipe, "x", loras=[record], **SMALL)
    assert lora.list_loras(pipe) == []


def test_a_session_on_an_fp8_plan_reloads_with_the_lora_it_is_given(files):
    """On an fp8 plan a LoRA is fused at load: ``Session.lora_add`` reloads with the LoRAs there and the new one.
    (The CPU plans a small model in float32 whatever it is told, so the plan is made fp8 here; the reload replans,
    so what it fuses is checked on a GPU: tests/test_gpu.py.)"""
    s = Session()
    prepared = s.prepare(MODEL)
    comps = dict(prepared.plan.components)
    comps["transformer"] = dataclasses.replace(comps["transformer"], storage_dtype="float8_e4m3fn")
    s.load_prepared(dataclasses.replace(prepared, plan=dataclasses.replace(prepared.plan, components=comps)))
    before = s.pipe
    info = s.lora_add(str(files["kohya"]), 0.8)
    assert s.pipe is not before  # reloaded, not added beside fp8 weights
    assert (info.source, info.scale) == (str(files["kohya"]), 0.8)
    assert [(i.source, i.scale) for i in s.lora_list()] == [(str(files["kohya"]), 0.8)]
    s.unload()


def test_the_lightning_presets_use_the_lightning_scheduler_and_cfg_1(pipe, base):
    r = generate(pipe, "a red circle", preset="lightning-8", width=64, height=64, seed=5)
    assert (r.steps, r.cfg, r.transformer_passes_per_step) == (8, 1.0, 1)
    assert any("stand-in with no lightning-8 LoRA" in n for n in r.notices)
    assert r.params()["preset"] == "lightning-8"
    plain = generate(pipe, "a red circle", steps=8, cfg=1.0, width=64, height=64, seed=5)
    assert not np.array_equal(px(r), px(plain))  # another scheduler: other sigmas
    assert pipe.scheduler.config.shift_terminal == 0.02  # the model's own scheduler is back
    again = generate(pipe, **r.params())
    assert np.array_equal(px(again), px(r))
    four = generate(pipe, "a red circle", preset="lightning-4", width=64, height=64, seed=5)
    assert four.steps == 4 and "preset" in four.params()


def test_the_lightning_scheduler_is_the_published_one():
    """ModelTC/Qwen-Image-Lightning's generate_with_diffusers.py: shift 3 as log(3), exponential, no terminal."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=np.log(3))
    # exponential time shift with mu = log 3 is sigma' = 3 s / (1 + 2 s)
    x = np.linspace(1.0, 1 / 8, 8)
    assert np.allclose(s.sigmas[:-1].numpy(), 3 * x / (1 + 2 * x), atol=1e-6)
    assert get_preset("lightning-8").scheduler is LIGHTNING_SCHEDULER
    assert lightning_lora("qwen-image", "lightning-4")[1] == "Qwen-Image-Lightning-4steps-V2.0.safetensors"


def test_a_lightning_preset_on_the_tuned_path_reads_modulation_from_its_own_schedule():
    """The tuned path's modulation table is built from the scheduler's timesteps: under a few-step preset it must
    be the preset's scheduler (every step then a table row), and the model's own comes back after."""
    from qwennb import speed
    from qwennb.stand_ins import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    state = speed.enable_fast_path(pipe.transformer, compile=False, scheduler=pipe.scheduler)
    own = pipe.scheduler
    r = generate(pipe, "a red circle", preset="lightning-8", width=64, height=64, seed=5)
    assert r.steps == 8
    assert state.stats["modulation_from_schedule"] == 8  # CFG 1: one forward a step, each a row of the table
    assert state.scheduler is own and pipe.scheduler is own
    speed.disable_fast_path(pipe.transformer)


def test_session_lora_api_and_a_bad_lora_at_load_keeps_the_model(files, tmp_path):
    s = Session()
    s.load(MODEL, loras=[(str(files["kohya"]), 0.5)])
    assert [(i.format, i.scale) for i in s.lora_list()] == [("kohya", 0.5)]
    pipe = s.pipe
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"x")
    with pytest.raises(lora.LoraError, match="pickle"):
        s.load(MODEL, loras=[(str(bad), 1.0)])
    assert s.pipe is pipe  # nothing was unloaded
    info = s.lora_add(str(files["other"]), 0.3)
    assert info.scale == 0.3 and len(s.lora_list()) == 2
    assert [d["name"] for d in s.info()["loras"]] == ["same_kohya", "other"]
    s.lora_remove()
    assert s.lora_list() == []
    # LoRAs asked for by a generation on a plan that keeps them unfused (bf16/float32): applied in place, the
    # pipeline not reloaded (a reload is for fp8 plans, whose weights the LoRA is fused into)
    pipe = s.pipe
    s.generate(
        "a red circle",
        steps=2,
        width=64,
        height=64,
        seed=1,
        loras=[{"source": str(files["other"]), "scale": 0.4}],
    )
    assert s.pipe is pipe
    s.unload()


def test_records_and_specs_parse():
    assert lora.parse_spec("C:/x/y.safetensors:0.25") == ("C:/x/y.safetensors", 0.25)
    assert lora.parse_spec("C:/x/y.safetensors") == ("C:/x/y.safetensors", 1.0)
    assert lora.parse_spec("C:\\x\\y.safetensors") == ("C:\\x\\y.safetensors", 1.0)  # a drive's colon
    with pytest.raises(
        lora.LoraError, match=r"^a LoRA scale is a number, got 'strong' \(in 'ink.safetensors:strong'\)$"
    ):
        lora.parse_spec("ink.safetensors:strong")
    assert lora.detect_format(["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"]) == "comfyui"
    assert json.loads(json.dumps(lora.LoraInfo("a", "b", "c", "d").record())) == {
        "name": "a",
        "source": "b",
        "sha256": "d",
        "scale": 1.0,
    }


def test_a_lightning_preset_offline_without_the_file_names_the_command(pipe):
    with pytest.raises(lora.LoraError) as e:
        lora.ensure_preset_lora(pipe, get_preset("lightning-4"), "qwen-image-2512")
    msg = str(e.value)
    assert (
        "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors) is not downloaded and the hub is offline"
        in msg
    )
    assert "`qwennb download --lora lightning-4 --for-model qwen-image-2512`" in msg
    assert lora.list_loras(pipe) == []


def test_scales_of_a_hotswap_prepared_lora_change_without_recompiling(files):
    """A compiled plan prepares hotswap before its first LoRA (PEFT keeps each layer's scaling as a tensor, read by
    the compiled graph). Setting a scale must write those tensors in place: diffusers' set_adapters turns them back
    into Python floats, which a compiled graph bakes in, so every new scale recompiled. Checked here with the
    transformer's blocks compiled (eager backend): new scales and a hotswap add no graph, and each image equals the
    same LoRA at that scale on a pipeline that never prepared hotswap."""
    from torch._dynamo.utils import counters

    plain, prepared = new_pipe(), new_pipe()
    prepared.enable_lora_hotswap(target_rank=8, check_compiled="ignore")
    for p in (plain, prepared):
        lora.add(p, files["lightning"], 1.0, name="slot")
    torch._dynamo.reset()
    counters.clear()
    for block in prepared.transformer.transformer_blocks:
        block.compile(backend="eager", dynamic=False)
    try:
        assert np.array_equal(image(prepared), image(plain))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        for scale in (0.5, 0.0, 1.7):
            for p in (plain, prepared):
                lora.set_scale(p, "slot", scale)
            assert np.array_equal(image(prepared), image(plain)), scale
        lora.add(prepared, files["alpha8"], 1.7, name="slot", hotswap=True)
        lora.remove(plain)
        lora.add(plain, files["alpha8"], 1.7, name="slot")
        assert np.array_equal(image(prepared), image(plain))
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile for scales or the hotswap
    finally:
        torch._dynamo.reset()
        for p in (plain, prepared):
            lora.remove(p)
