"""Editing, image-to-image and inpainting on the real diffusers pipelines (the embedded toy models): no mocks.

EDIT_MODEL and T2I_MODEL name the models: the trained toy models (``toy-edit``, ``toy``); the random stand-ins
(``tiny-edit``, ``tiny``) run the same tests. What the toy edits mean is tested in test_toy_edit.py.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from PIL import Image
from test_download import hub  # noqa: F401 - the fake hub fixture (real huggingface_hub client, local server)

from qwennb.cli import main
from qwennb.edit import (
    ImageInputError,
    check_edit_inputs,
    compare_models,
    edit,
    image_sha256,
    load_edit_pipeline,
    load_provenance,
    plan_edit,
    read_image,
    reference_tokens,
)
from qwennb.errors import GenerationError
from qwennb.generation import generate
from qwennb.models import component_sizes, get_model, load_config
from qwennb.pipeline import build
from qwennb.plan import describe_machine, image_tokens, make_plan

EDIT_MODEL = "toy-edit"
T2I_MODEL = "toy"


@pytest.fixture(scope="module")
def edit_pipe():
    return load_edit_pipeline(EDIT_MODEL, describe_machine(host_ram_gb=8))


@pytest.fixture(scope="module")
def t2i_pipe():
    return build(make_plan(describe_machine(host_ram_gb=8), T2I_MODEL))


def reference_area(width, height):
    """The pixel count the edit model's references go to by default: the toy edit model was trained with them
    at the output's size, the tiny stand-in uses its default size's."""
    return width * height if EDIT_MODEL == "toy-edit" else 256 * 256


def picture(w=96, h=64, seed=0):
    """A structured RGB picture: two colour halves and a white square, plus a little noise."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (220, 30, 30)
    a[:, w // 2 :] = (30, 30, 220)
    a[h // 4 : h // 2, w // 4 : w // 2] = 255
    a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def count_tokens(pipe):
    """Record the image-token count of every transformer pass."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    return seen, handle


# --------------------------------------------------------------------------- registry and plan


def test_edit_models_are_registered_with_their_pipelines_and_computed_sizes():
    assert get_model("qwen-image-edit-2511").pipeline_class == "QwenImageEditPlusPipeline"
    assert get_model("Qwen/Qwen-Image-Edit-2509").name == "qwen-image-edit-2509"
    assert get_model("qwen-image-edit").pipeline_class == "QwenImageEditPipeline"
    assert get_model(EDIT_MODEL).task == "image-edit"
    base = component_sizes("qwen-image")
    for name in ("qwen-image-edit-2511", "qwen-image-edit-2509", "qwen-image-edit"):
        sizes = component_sizes(name)
        assert {k: v.params for k, v in sizes.items()} == {k: v.params for k, v in base.items()}
    assert load_config("qwen-image-edit-2511", "transformer")["zero_cond_t"] is True
    assert "zero_cond_t" not in load_config("qwen-image-edit-2509", "transformer")


def test_reference_tokens_count_in_the_plan():
    assert reference_tokens([(1024, 1024)]) == 4096
    assert reference_tokens([(1000, 750)]) == image_tokens(1184, 896)
    hw = describe_machine(gpu_memory_gb=80)
    one = plan_edit(hw, "qwen-image-edit-2511", references=1)
    three = plan_edit(hw, "qwen-image-edit-2511", references=3)
    t2i = make_plan(hw, "qwen-image")
    assert one.estimated_for == (1024, 2048) and three.estimated_for == (1024, 4096)
    assert t2i.estimated_peak_gpu_gb < one.estimated_peak_gpu_gb < three.estimated_peak_gpu_gb
    assert any("12288 more image tokens" in r for r in three.reasons)
    assert one.model == "qwen-image-edit-2511" and one.hub_id == "Qwen/Qwen-Image-Edit-2511"
    with pytest.raises(ImageInputError, match="takes 1 to 1 reference images, got 2"):
        plan_edit(hw, "qwen-image-edit", references=2)


def test_compare_models_says_what_is_shared_and_swapped():
    r = compare_models("qwen-image", "qwen-image-edit-2511")
    assert r.swapped == ["transformer"] and r.unverified == ["text_encoder", "vae"] and r.shared == []
    sizes = component_sizes("qwen-image-edit-2511")
    assert r.swap_gib == round(sum(s.gib(2.0) for s in sizes.values()), 2)
    tiny = compare_models("tiny", "tiny-edit")
    assert "text_encoder" in tiny.shared and "transformer" in tiny.swapped
    assert "transformer: swapped" in r.text()
    # The embedded pair, compared by their files: toy-edit loads the toy's VAE and text encoder (it was trained
    # against them), only its transformer is its own.
    toys = compare_models("toy", "toy-edit")
    assert sorted(toys.shared) == ["text_encoder", "vae"] and toys.swapped == ["transformer"]


def test_compare_models_sees_a_toy_edit_text_encoder_of_its_own(monkeypatch):
    # A toy-edit shipped with the text encoder it was trained against (train_edit.py --ship does that for one
    # trained against another): the switch from the toy then swaps the text encoder too.
    from qwennb import toy_edit

    monkeypatch.setitem(toy_edit.COMPONENT_DIRS, "text_encoder", toy_edit.TOY_EDIT_DIR)
    toys = compare_models("toy", "toy-edit")
    assert toys.shared == ["vae"] and sorted(toys.swapped) == ["text_encoder", "transformer"], toys.text()


def test_cli_plan_of_an_edit_model_counts_three_references(capsys):
    assert main(["plan", "--model", "qwen-image-edit-2511", "--gpu-memory", "80GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "qwen-image-edit-2511" and plan["estimated_for"] == [1024, 4096]


# --------------------------------------------------------------------------- edit


def test_edit_one_image_keeps_its_size_and_feeds_its_tokens(edit_pipe):
    seen, handle = count_tokens(edit_pipe)
    try:
        r = edit(edit_pipe, picture(96, 64), "make the square green", steps=3, seed=11, cfg=4.0)
    finally:
        handle.remove()
    assert r.images[0].size == (96, 64) and (r.width, r.height) == (96, 64)
    assert r.seed == 11 and r.steps == 3 and len(r.step_times_s) == 3 and r.task == "edit"
    assert r.transformer_passes_per_step == 2 and r.cfg == 4.0
    assert seen == [image_tokens(96, 64) + reference_tokens([(96, 64)], reference_area(96, 64))] * 6
    assert r.notices[0] == "output 96x64: the size of the input image"
    assert r.inputs == [
        {
            "role": "image",
            "source": "PIL image",
            "width": 96,
            "height": 64,
            "sha256": image_sha256(picture(96, 64)),
        }
    ]


def test_edit_three_references_all_reach_the_transformer(edit_pipe):
    refs = [picture(96, 64, 0), picture(64, 64, 1), picture(48, 80, 2)]
    seen, handle = count_tokens(edit_pipe)
    try:
        r = edit(edit_pipe, refs, "put them together", steps=2, seed=2, cfg=1.0)
    finally:
        handle.remove()
    assert r.images[0].size == (96, 64) and len(r.inputs) == 3
    area = reference_area(96, 64)  # every reference goes to this area, at its own aspect ratio
    assert seen == [image_tokens(96, 64) + reference_tokens([(96, 64), (64, 64), (48, 80)], area)] * 2
    assert [x["role"] for x in r.inputs] == ["image 1", "image 2", "image 3"]
    assert r.transformer_passes_per_step == 1


def test_edit_is_reproducible_and_follows_its_inputs(edit_pipe):
    a = np.asarray(edit(edit_pipe, picture(), "make it blue", steps=2, seed=4).images[0])
    b = np.asarray(edit(edit_pipe, picture(), "make it blue", steps=2, seed=4).images[0])
    c = np.asarray(edit(edit_pipe, picture(seed=9), "make it blue", steps=2, seed=4).images[0])
    d = np.asarray(edit(edit_pipe, picture(), "make it red", steps=2, seed=4).images[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_output_size_is_rounded_with_one_notice_and_an_explicit_size_is_said(edit_pipe):
    r = edit(edit_pipe, picture(150, 60), "x", steps=2, seed=1)
    assert r.images[0].size == (144, 64)
    assert r.notices[0] == "output 144x64: the input image 150x60 rounded to multiples of 16"
    assert any("may shift or stretch" in n for n in r.notices)
    r = edit(edit_pipe, picture(96, 64), "x", steps=2, seed=1, width=64, height=64)
    assert r.images[0].size == (64, 64)
    assert r.notices[0].startswith("output 64x64 as asked; the input image is 96x64")


def test_images_as_array_path_and_bytes_hash_the_same(edit_pipe, tmp_path):
    im = picture()
    path = tmp_path / "in.png"
    im.save(path)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    forms = [im, np.asarray(im), str(path), buf.getvalue(), np.asarray(im).astype(np.float32) / 255]
    hashes = {read_image(f).sha256 for f in forms}
    assert hashes == {image_sha256(im)}
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert read_image(rgba).image.getpixel((0, 0)) == (255, 255, 255)  # transparent over white


@pytest.mark.parametrize(
    "images, message",
    [
        (["/no/such/file.png"], "image /no/such/file.png: no such file"),
        ([b"not an image at all"], "image: these 19 bytes are not an image PIL can read"),
        ([Image.new("RGB", (32, 32))] * 4, "takes 1 to 3 reference images, got 4"),
        ([], "takes 1 to 3 reference images, got 0"),
        ([Image.new("RGB", (8, 32))], "image is 8x32; sides from 16 to 8192 pixels are accepted"),
        ([np.zeros((32, 32, 2))], "image array has shape (32, 32, 2)"),
        ([42], "image must be a PIL image, a numpy array, a file path or image bytes, got int"),
    ],
)
def test_bad_edit_inputs_are_refused_in_one_line(images, message):
    with pytest.raises(ImageInputError) as info:
        check_edit_inputs(EDIT_MODEL, images, "x")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_array_likes_that_are_not_numpy_are_refused_by_type():
    """Only numpy arrays are read as arrays: a torch tensor (channels first, -1..1 or 0..1: no one convention) is
    named in the error rather than guessed at."""
    import torch

    with pytest.raises(ImageInputError, match="image must be a PIL image, a numpy array, .* got Tensor"):
        read_image(torch.zeros(3, 32, 32))


def test_not_an_image_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(ImageInputError, match="notes.png: not an image PIL can read"):
        read_image(str(bad))


def test_images_of_more_than_8_bits_keep_their_tones(tmp_path):
    """A 16-bit grayscale PNG (PIL opens it as I;16), a 32-bit integer image and a float image come in scaled to 8
    bits, not clipped at 255 (which turned a 16-bit photo white); a mask of 16 bits keeps its black and white; values
    beyond what the mode can mean are one clear line."""
    from qwennb.edit import read_mask

    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    got = np.asarray(read_image(str(tmp_path / "gray16.png")).image)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16") and got.shape == (32, 64, 3)
    np.testing.assert_allclose(got[..., 0], ramp / 257.0, atol=0.51)
    assert (got[..., 0] == got[..., 2]).all() and got.min() == 0 and got.max() == 255
    for array, want in ((np.full((32, 32), 0.5, np.float32), 128), (np.full((32, 32), 200, np.int32), 200)):
        assert (np.asarray(read_image(Image.fromarray(array)).image) == want).all()
    mask = np.zeros((32, 32), np.uint16)
    mask[:, 16:] = 65535
    read = np.asarray(read_mask(Image.fromarray(mask), (32, 32)).image)
    assert (read[:, :16] == 0).all() and (read[:, 16:] == 255).all()
    for array in (np.full((32, 32), 70000, np.int32), np.full((32, 32), 300.0, np.float32)):
        with pytest.raises(ImageInputError, match="values up to"):
            read_image(Image.fromarray(array))
    for array in (np.full((32, 32), -1, np.int32), np.full((32, 32), np.nan, np.float32)):
        with pytest.raises(ImageInputError, match="values below 0 or not finite"):
            read_image(Image.fromarray(array))
    # a 16-bit array as OpenCV or imageio give it (HxWx3 uint16) is scaled as the 16-bit PNG is
    rgb16 = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], axis=-1)
    got = np.asarray(read_image(rgb16).image)
    np.testing.assert_allclose(got, rgb16 / 257.0, atol=0.51)
    assert got[..., 2].min() == got[..., 2].max() == 128
    mask = np.asarray(read_mask(np.where(ramp > 30000, 65535, 0).astype(np.uint16), (64, 32)).image)
    assert set(np.unique(mask)) == {0, 255}
    with pytest.raises(ImageInputError, match="values outside 0..255"):
        read_image(np.full((4, 4), 256, np.int64))


def test_the_first_edit_model_takes_one_image():
    with pytest.raises(ImageInputError, match="qwen-image-edit takes exactly 1 input image, got 2"):
        check_edit_inputs("qwen-image-edit", [Image.new("RGB", (32, 32))] * 2, "x")


def test_generate_refuses_an_edit_pipeline_and_edit_a_text_to_image_one(edit_pipe, t2i_pipe):
    with pytest.raises(GenerationError, match="is an edit model: give it images with qwennb.edit"):
        generate(edit_pipe, "a cat", steps=2)
    with pytest.raises(ImageInputError, match="QwenImagePipeline is not an edit pipeline"):
        edit(t2i_pipe, picture(), "x")
    with pytest.raises(ImageInputError, match="edits with instructions: use qwennb.edit"):
        generate(edit_pipe, "a cat", init_image=picture(), steps=2)


def test_a_failed_edit_leaves_the_pipeline_usable(edit_pipe):
    with pytest.raises(GenerationError):
        edit(edit_pipe, picture(), "x", steps=1)
    assert edit(edit_pipe, picture(), "x", steps=2, seed=1).images[0].size == (96, 64)


def test_edit_stops_at_the_next_step(edit_pipe):
    from qwennb.generation import StopSignal

    stop = StopSignal()
    r = edit(
        edit_pipe,
        picture(),
        "x",
        steps=6,
        seed=1,
        stop=stop,
        on_step=lambda s: stop.set() if s.step == 2 else None,
    )
    assert r.interrupted and len(r.step_times_s) == 2 and r.images


def test_edit_provenance_round_trip(edit_pipe, tmp_path):
    refs = [picture(seed=1), picture(seed=2)]
    r = edit(edit_pipe, refs, "blend", steps=2, seed=21)
    (path,) = r.save(tmp_path)
    meta = load_provenance(path)
    assert meta["task"] == "edit" and meta["seed"] == 21 and meta["prompt"] == "blend"
    assert [x["sha256"] for x in meta["inputs"]] == [image_sha256(x) for x in refs]
    again = edit(edit_pipe, refs, meta["prompt"], steps=meta["steps"], seed=meta["seed"], cfg=meta["cfg"])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(path).convert("RGB")))


# --------------------------------------------------------------------------- img2img and inpainting


def _packed_latents(pipe, image):
    x = pipe.image_processor.preprocess(image).unsqueeze(2)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    z = ((z - mean) / std)[:, :, 0]
    return pipe._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])


def test_img2img_low_strength_stays_closer_to_the_input(t2i_pipe):
    init = picture(128, 128)
    target = _packed_latents(t2i_pipe, init)
    dist, steps_run = {}, {}
    last: dict = {}
    for s in (0.3, 1.0):
        last.clear()
        r = generate(
            t2i_pipe,
            "a red car",
            init_image=init,
            strength=s,
            steps=10,
            seed=1,
            on_step=lambda i: last.update(x=i.latents),
        )
        assert (
            r.images[0].size == (128, 128) and r.task == "img2img" and r.strength == s and not r.interrupted
        )
        steps_run[s] = len(r.step_times_s)
        dist[s] = float((last["x"] - target).abs().mean())
    assert steps_run == {0.3: 3, 1.0: 10}
    # The tiny stand-in's random VAE decodes any latents to similar noise, so the distance is measured on the
    # latents the VAE decodes (a trained model's pixels follow them).
    assert dist[0.3] < 0.6 * dist[1.0], dist


def test_img2img_builds_from_the_loaded_components(t2i_pipe):
    generate(t2i_pipe, "x", init_image=picture(64, 64), strength=0.5, steps=2, seed=1)
    derived = t2i_pipe.qwennb["derived"]["QwenImageImg2ImgPipeline"]
    assert type(derived).__name__ == "QwenImageImg2ImgPipeline"
    assert derived.transformer is t2i_pipe.transformer and derived.vae is t2i_pipe.vae
    assert derived.text_encoder is t2i_pipe.text_encoder


def test_inpainting_keeps_unmasked_pixels_and_redraws_the_masked_ones(t2i_pipe, tmp_path):
    init = picture(128, 128)
    a = np.asarray(init).astype(int)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    r = generate(t2i_pipe, "a red car", init_image=init, mask=mask, strength=1.0, steps=4, seed=3)
    o = np.asarray(r.images[0]).astype(int)
    keep = mask == 0
    assert r.task == "inpaint" and r.images[0].size == (128, 128)
    assert np.abs(o[keep] - a[keep]).max() <= 1
    assert np.abs(o[~keep] - a[~keep]).mean() > 20
    raw = generate(
        t2i_pipe, "a red car", init_image=init, mask=mask, strength=1.0, steps=4, seed=3, keep_unmasked=False
    )
    assert (
        np.abs(np.asarray(raw.images[0]).astype(int)[keep] - a[keep]).mean() > 5
    )  # the pipeline alone does not
    (path,) = r.save(tmp_path)
    meta = load_provenance(path)
    assert [x["role"] for x in meta["inputs"]] == ["init image", "mask"] and meta["strength"] == 1.0
    assert meta["inputs"][0]["sha256"] == image_sha256(init)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(strength=1.5),
            "strength must be above 0 and at most 1 (the share of the image redrawn), got 1.5",
        ),
        (dict(strength=0), "strength must be above 0"),
        (
            dict(mask=np.zeros((32, 32), np.uint8)),
            "the mask is 32x32 but the image is 64x64; they must match",
        ),
    ],
)
def test_bad_img2img_inputs(t2i_pipe, kwargs, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(t2i_pipe, "x", init_image=picture(64, 64), steps=8, **kwargs)


def test_mask_without_init_image_is_refused(t2i_pipe):
    with pytest.raises(GenerationError, match="need an init image"):
        generate(t2i_pipe, "x", mask=np.zeros((64, 64), np.uint8), steps=2)


# --------------------------------------------------------------------------- CLI


def test_cli_edit_json(tmp_path, capsys):
    path = tmp_path / "in.png"
    picture(80, 48).save(path)
    argv = ["edit", str(path), "make it blue", "--model", EDIT_MODEL, "--seed", "6", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"images", "seed", "steps", "cfg", "width", "height", "step_times_s", "model"} <= set(d)
    assert d["seed"] == 6 and d["steps"] == 2 and len(d["step_times_s"]) == 2 and d["model"] == EDIT_MODEL
    assert (d["width"], d["height"]) == (80, 48) and Image.open(d["images"][0]).size == (80, 48)
    assert load_provenance(d["images"][0])["inputs"][0]["sha256"] == image_sha256(picture(80, 48))


def test_cli_edit_keeps_the_image_when_the_folder_cannot_be_written(tmp_path, capsys):
    path = tmp_path / "in.png"
    picture(64, 64).save(path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["edit", str(path), "make it blue", "--model", EDIT_MODEL, "--seed", "6", "--steps", "2"]
    assert main([*argv, "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"qwennb: error: could not save to {blocker / 'out'}")
    rescued = Path(err.split("saved to ")[-1].split()[0])
    assert rescued.suffix == ".png" and Image.open(rescued).size == (64, 64)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/no/such.png", "x"], "image /no/such.png: no such file"),
        (["only-an-instruction"], "give at least one image and the instruction"),
        (["IMG", "IMG", "IMG", "IMG", "x"], "takes 1 to 3 reference images, got 4"),
        (["IMG", "x", "--model", T2I_MODEL], "edits need an edit model"),
        (["IMG", "x", "--steps", "1"], "steps must be a whole number of at least 2, got 1"),
        (["IMG", "x", "--seed", "-2"], "seed must be a whole number"),
        (["IMG", "x", "--cfg", "0.5"], "CFG must be at least 1"),
    ],
)
def test_cli_edit_errors_are_one_line_before_loading(tmp_path, capsys, argv, message):
    path = tmp_path / "in.png"
    picture().save(path)
    argv = [str(path) if a == "IMG" else a for a in argv]
    assert main(["edit", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "loaded" not in err


def test_cli_edit_usage_says_images_then_one_instruction(capsys):
    """argparse would render the positionals as "IMAGE... INSTRUCTION [IMAGE... INSTRUCTION ...]" (many
    instructions); the usage line says what the command takes."""
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage == "usage: qwennb edit [options] IMAGE [IMAGE ...] INSTRUCTION", usage


def test_cli_generate_refuses_an_edit_model_before_loading(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", EDIT_MODEL, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{EDIT_MODEL} is an edit model: use `qwennb edit" in err and "loaded" not in err


def test_cli_generate_img2img(tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture(64, 64).save(init)
    Image.new("L", (32, 32)).save(mask)
    base = [
        "generate",
        "a cat",
        "--model",
        T2I_MODEL,
        "--steps",
        "4",
        "--out",
        str(tmp_path),
        "--init-image",
        str(init),
    ]
    assert main([*base, "--strength", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (
        d["task"] == "img2img" and d["strength"] == 0.5 and len(d["step_times_s"]) == 2 and d["width"] == 64
    )
    assert main([*base, "--strength", "1.5"]) == 2
    assert "strength must be above 0 and at most 1" in capsys.readouterr().err
    assert main([*base, "--mask", str(mask)]) == 2
    err = capsys.readouterr().err
    assert "the mask is 32x32 but the image is 64x64" in err and "loaded" not in err


# --------------------------------------------------------------------------- magics


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    shell = InteractiveShell.instance()
    if "qwennb" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "qwennb")
    out = tmp_path_factory.mktemp("outputs")
    shell.run_line_magic("config", f"QwenMagics.save_dir = {str(out)!r}")
    shell.run_line_magic("config", "QwenMagics.autoload = False")
    shell.run_line_magic("load_ext", "qwennb")
    yield shell
    shell.run_line_magic("unload_ext", "qwennb")
    shell.run_line_magic("config", "QwenMagics.autoload = True")


def magics(ip):
    return ip.magics_manager.registry["QwenMagics"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("--image /no/such.png", "image /no/such.png: no such file"),
        ("--image nothing_here", "image nothing_here: no variable or file of that name"),
        ("--image img --image img --image img --image img", "takes 1 to 3 reference images, got 4"),
        ("", "give the image(s) to edit"),
        ("--image img --steps 1", "steps must be a whole number of at least 2, got 1"),
        ("--image img --seed -1", "seed must be a whole number"),
        ("--image img --cfg 0.5", "CFG must be at least 1"),
        ("--image img --size 10x10", "width must be a whole number from 16"),
        ("--image img --cfg 1000", "at most 100"),
        ("--image 'my photo.png", "%%qwen_edit: cannot read the options line"),
    ],
)
def test_qwen_edit_refuses_bad_inputs_before_loading(ip, line, message):
    ip.user_ns["img"] = picture()
    assert not magics(ip).session.loaded
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("qwen_edit", line, "make it blue")
    assert message in str(info.value)
    assert not magics(ip).session.loaded


def test_generate_init_image_options_refused_before_loading(ip):
    ip.user_ns["img"] = picture(64, 64)
    with pytest.raises(UsageError, match="strength must be above 0 and at most 1"):
        ip.run_cell_magic("qwen_generate", "--init-image img --strength 1.5", "a cat")
    ip.user_ns["small_mask"] = np.zeros((16, 16), np.uint8)
    with pytest.raises(UsageError, match="the mask is 16x16 but the image is 64x64"):
        ip.run_cell_magic("qwen_generate", "--init-image img --mask small_mask", "a cat")
    assert not magics(ip).session.loaded


def test_qwen_generate_then_edit_the_last_result(ip):
    ip.run_line_magic("qwen", f"load {T2I_MODEL}")
    ip.run_cell("%%qwen_generate --steps 2 --size 64x48 --seed 8 --no-save\na small boat", store_history=True)
    first = ip.user_ns["_"]
    img2img = ip.run_cell_magic(
        "qwen_generate", "--init-image _ --strength 0.5 --steps 4 --seed 2 --no-save", "a ship"
    )
    assert img2img.task == "img2img" and img2img.inputs[0]["sha256"] == image_sha256(first.images[0])
    with pytest.raises(UsageError, match="is not an edit model; add --model"):
        ip.run_cell_magic("qwen_edit", "--image _", "make it red")
    ip.run_cell(
        "%%qwen_edit --image _ --model " + EDIT_MODEL + " --steps 2 --seed 3\nmake it red", store_history=True
    )
    r = ip.user_ns["_"]
    assert r.task == "edit" and r.images[0].size == (64, 48) and r.seed == 3 and len(r.paths) == 1
    assert os.path.dirname(r.paths[0]) == os.path.abspath(magics(ip).save_dir)  # without --out: save_dir
    assert r.inputs[0]["sha256"] == image_sha256(first.images[0])  # run_cell_magic does not set `_`
    assert magics(ip).session.report.model == EDIT_MODEL
    assert f"switching from {T2I_MODEL}" in magics(ip).session.report.notice


def test_qwen_edit_takes_variables_paths_and_bytes(ip, tmp_path):
    path = tmp_path / "b.png"
    picture(seed=5).save(path)
    buf = io.BytesIO()
    picture(seed=6).save(buf, format="PNG")
    ip.user_ns.update(first=picture(seed=4), raw=buf.getvalue(), obj="a cat")
    r = ip.run_cell_magic(
        "qwen_edit", f"--image first --image {path} --image raw --steps 2 --seed 1 --no-save", "{obj} here"
    )
    assert r.prompt == "a cat here" and len(r.inputs) == 3
    assert [x["sha256"] for x in r.inputs] == [image_sha256(picture(seed=s)) for s in (4, 5, 6)]
    assert [x["source"] for x in r.inputs] == ["PIL image", str(path), "bytes"]


# --------------------------------------------------------------------------- download


def edit_repo():
    """A tiny Qwen-Image-Edit-2511-shaped repository: the Qwen-Image layout plus the processor folder."""
    from test_download import make_repo

    files = make_repo(seed=5)
    index = json.loads(files["model_index.json"])
    index["_class_name"] = "QwenImageEditPlusPipeline"
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    files["model_index.json"] = json.dumps(index).encode()
    files["transformer/config.json"] = b'{"_class_name": "QwenImageTransformer2DModel", "zero_cond_t": true}'
    for name in (
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    ):
        files[f"processor/{name}"] = b"{}" if name.endswith(".json") else b"x\n"
    return files


def test_download_fetches_what_the_edit_pipeline_reads(hub, tmp_path):  # noqa: F811 - the imported fixture
    hub.repos["Qwen/Qwen-Image-Edit-2511"] = files = edit_repo()
    out = tmp_path / "models"
    assert main(["download", "--model", "qwen-image-edit-2511", "--dir", str(out)]) == 0
    snap = out / "qwen-image-edit-2511"
    for rel, data in files.items():
        if rel.endswith(".bin") or rel == "README.md":
            continue
        assert (snap / rel).read_bytes() == data, rel
    from qwennb.edit import resolve_edit_model
    from qwennb.models import find_local_models

    (local,) = find_local_models(out)
    assert local.name == "qwen-image-edit-2511" and local.complete and local.task == "image-edit"
    assert resolve_edit_model(None, folder=str(out)) == ("qwen-image-edit-2511", local.path, None)


# --------------------------------------------------------------------------- the tuned path on edits


@pytest.mark.parametrize("config_dir", ["tiny", "tiny-edit"])
def test_tuned_path_on_edits_matches_stock(config_dir):
    """Edit transformers run qwennb's tuned path, CFG pairs included: 2509-style ones and 2511's zero_cond_t
    (``tiny-edit``: the references' tokens modulated at t=0). Transformer-level checks: tests/test_speed.py."""
    from qwennb import speed
    from qwennb.stand_ins import build_tiny_edit_pipeline

    pipe = build_tiny_edit_pipeline(config_dir=config_dir)
    pipe.set_progress_bar_config(disable=True)
    refs = [picture(64, 64, 1), picture(64, 64, 2)]

    def final_latents():
        last = {}
        edit(pipe, refs, "swap them", steps=3, seed=1, on_step=lambda s: last.update(x=s.latents.clone()))
        return last["x"]

    stock = final_latents()
    state = speed.enable_fast_path(pipe.transformer, compile=False, scheduler=pipe.scheduler)
    fast = final_latents()
    speed.disable_fast_path(pipe.transformer)
    assert float((fast - stock).norm() / stock.norm()) < 1e-4
    assert state.stats["forwards"] == 6 and state.stats["cfg_pairs"] == 2


def test_a_local_edit_folder_is_told_2509_from_2511(tmp_path):
    from qwennb.models import inspect_folder

    for name, zero in (("a", True), ("b", False)):
        folder = tmp_path / name
        (folder / "transformer").mkdir(parents=True)
        index = {
            "_class_name": "QwenImageEditPlusPipeline",
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        }
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "transformer" / "config.json").write_text(json.dumps({"zero_cond_t": zero}))
    assert inspect_folder(tmp_path / "a").name == "qwen-image-edit-2511"
    assert inspect_folder(tmp_path / "b").name == "qwen-image-edit-2509"
    assert inspect_folder(tmp_path / "b").task == "image-edit"


def test_the_first_edit_pipeline_runs_one_image_at_one_megapixel():
    from qwennb.stand_ins import build_tiny_edit_pipeline

    pipe = build_tiny_edit_pipeline(pipeline_class="QwenImageEditPipeline")
    pipe.set_progress_bar_config(disable=True)
    seen, handle = count_tokens(pipe)
    try:
        r = edit(pipe, picture(64, 48), "make it blue", steps=2, seed=1, cfg=1.0)
    finally:
        handle.remove()
    assert r.images[0].size == (64, 48) and len(r.step_times_s) == 2
    assert seen == [image_tokens(64, 48) + reference_tokens([(64, 48)])] * 2  # the reference at 1 megapixel
    with pytest.raises(ImageInputError, match="QwenImageEditPipeline takes exactly 1 input image, got 2"):
        edit(pipe, [picture(), picture()], "x")
    with pytest.raises(ImageInputError, match="reference_area is for 2509/2511"):
        edit(pipe, picture(), "x", reference_area=512 * 512)


def test_the_plan_puts_2511_on_the_tuned_path_as_2509():
    for gb in (24, 80):
        hw = describe_machine(gpu_memory_gb=gb)
        p2511 = plan_edit(hw, "qwen-image-edit-2511")
        p2509 = plan_edit(hw, "qwen-image-edit-2509")
        assert p2511.fast_path and p2509.fast_path
        assert p2511.fp8_matmul == p2509.fp8_matmul == (gb == 24)
        assert p2511.estimated_s_per_step == p2509.estimated_s_per_step is not None
        assert p2511.components["transformer"] == p2509.components["transformer"]
        assert any("zero_cond_t" in r and "tuned path" in r for r in p2511.reasons)
        assert not any("zero_cond_t" in r for r in p2509.reasons)


def test_synthetic_edit_pipeline_finds_its_image_tokens_with_the_small_tokenizer(tmp_path):
    # The full-size synthetic edit model pairs Qwen2.5-VL's real config (image token 151655) with the small
    # stand-in tokenizer; unaligned, the text encoder finds no image tokens in the prompt and the edit fails
    # ("Image features and image tokens do not match, tokens: 0"), as it did on the H200.
    import shutil

    import qwennb
    from qwennb.stand_ins import build_synthetic_edit_pipeline

    src = Path(qwennb.__file__).parent / "configs" / "tiny-edit"
    dst = tmp_path / "tiny-edit-real-ids"
    shutil.copytree(src, dst)
    te = json.loads((dst / "text_encoder.json").read_text())
    real = {"vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655}
    te.update({k: v for k, v in real.items() if k in te})
    (dst / "text_encoder.json").write_text(json.dumps(te))
    pipe = build_synthetic_edit_pipeline(device="cpu", dtype=torch.float32, config_dir=str(dst))
    assert pipe.text_encoder.config.image_token_id == pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pipe.qwennb = {"model": "tiny-edit", "plan": None}
    r = edit(pipe, picture(64, 64), "make the square green", steps=2, seed=1)
    assert r.images[0].size == (64, 64)
