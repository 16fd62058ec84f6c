"""Prompt enhancement and image description on real tiny models (no mocks, no network).

The tiny models have random weights, so their answers are noise: the tests check the mechanics (the exact
chat handed to the model, tokens, limits, reproducibility, fallbacks, errors, metadata), and the success
path of the post-processing on crafted answers.
"""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from PIL import Image

from qwennb import enhance
from qwennb.cli import main
from qwennb.enhance import (
    CONTEXT_LABEL,
    DESCRIBE_INSTRUCTIONS,
    PROMPT_LABEL,
    SYSTEM_PROMPTS,
    check_rewrite,
    describe_image,
    detect_language,
    enhance_prompt,
    enhance_prompt_with_qwen2vl,
    find_repetition,
    finish_rewrite,
    load_image,
    load_vl_model,
    pipeline_image_processor,
    prepare_chat_inputs,
    unload_vl_model,
    word_count,
)
from qwennb.errors import QwennbError
from qwennb.generation import PNG_KEY, generate, load_params
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan
from qwennb.presets import POSITIVE_MAGIC
from qwennb.stand_ins import TINY_VL_MAX_PIXELS, build_tiny_pipeline, build_tiny_vl

EN_SYSTEM, ZH_SYSTEM = SYSTEM_PROMPTS["en"], SYSTEM_PROMPTS["zh"]


@pytest.fixture(scope="module")
def pipe():
    return build(make_plan(describe_machine(host_ram_gb=8), "tiny"))


@pytest.fixture(autouse=True)
def _no_vl_model_left():
    yield
    unload_vl_model()


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ the chat


def test_english_prompt_gets_the_english_system_prompt_and_the_exact_chat(pipe):
    e = enhance_prompt("a red fox", pipe, max_new_tokens=4)
    assert e.chat == [
        {"role": "system", "content": EN_SYSTEM},
        {"role": "user", "content": PROMPT_LABEL["en"] + "a red fox"},
    ]
    assert e.language == "en" and e.original == "a red fox" and e.model == "tiny text encoder"
    for rule in ("proper nouns", "double quotes", "never translated", "under 200 words", "do not answer"):
        assert rule in EN_SYSTEM
    rendered = prepare_chat_inputs(pipe.tokenizer, e.chat).text
    assert rendered == (
        f"<|im_start|>system\n{EN_SYSTEM}<|im_end|>\n<|im_start|>user\nPrompt: a red fox<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chinese_prompt_gets_the_chinese_system_prompt_and_context_is_appended(pipe):
    e = enhance_prompt("一只猫坐在窗边", pipe, context="水彩画，柔和的光线", max_new_tokens=4)
    assert e.language == "zh"
    assert e.chat[0] == {"role": "system", "content": ZH_SYSTEM}
    assert e.chat[1]["content"] == (
        PROMPT_LABEL["zh"] + "一只猫坐在窗边" + "\n" + CONTEXT_LABEL["zh"] + "水彩画，柔和的光线"
    )
    assert "200字" in ZH_SYSTEM and "绝不翻译" in ZH_SYSTEM
    en = enhance_prompt("a cat", pipe, context="  watercolor, soft light ", max_new_tokens=2)
    assert en.chat[1]["content"] == "Prompt: a cat\n" + CONTEXT_LABEL["en"] + "watercolor, soft light"


def test_cjk_detection():
    assert detect_language("a cat") == "en"
    assert detect_language("一只猫") == "zh"
    assert detect_language('a sign that says "東京"') == "zh"  # any CJK character
    assert detect_language("\u3400 extension A") == "zh"
    assert detect_language("café, naïve, Ünïcödé") == "en"


# ------------------------------------------------------------------------------------------ decoding


def test_greedy_decoding_is_reproducible_and_max_new_tokens_is_respected(pipe):
    a = enhance_prompt("a lighthouse at dusk", pipe, max_new_tokens=12)
    b = enhance_prompt("a lighthouse at dusk", pipe, max_new_tokens=12)
    assert not a.sampled and a.seed is None
    assert (a.raw, a.enhanced, a.new_tokens) == (b.raw, b.enhanced, b.new_tokens)
    assert 0 < a.new_tokens <= 12
    assert a.hit_token_limit == (a.new_tokens == 12)
    short = enhance_prompt("a lighthouse at dusk", pipe, max_new_tokens=3)
    assert short.new_tokens <= 3
    # The enhanced prompt is exactly what the post-processing makes of the model's answer.
    assert finish_rewrite(a.raw, a.original, a.language, hit_token_limit=a.hit_token_limit)[:2] == (
        a.enhanced,
        a.fallback_reason,
    )


def test_sampling_is_reproducible_from_its_seed_and_records_it(pipe):
    s1 = enhance_prompt("a red car", pipe, sample=True, seed=5, max_new_tokens=10)
    s2 = enhance_prompt("a red car", pipe, sample=True, seed=5, max_new_tokens=10)
    assert s1.sampled and s1.seed == 5 and s1.raw == s2.raw
    drawn = enhance_prompt("a red car", pipe, sample=True, max_new_tokens=2)
    assert drawn.sampled and 0 <= drawn.seed  # drawn and recorded: it reproduces the answer
    assert enhance_prompt("a red car", pipe, sample=True, seed=drawn.seed, max_new_tokens=2).raw == drawn.raw
    with pytest.raises(QwennbError, match="temperature"):
        enhance_prompt("a red car", pipe, sample=True, temperature=0)


def test_the_text_encoder_stays_where_it_is_and_encodes_the_same_afterwards(pipe):
    before, _ = pipe.encode_prompt("a cat", device=torch.device("cpu"))
    devices = {p.device for p in pipe.text_encoder.parameters()}
    enhance_prompt("a cat", pipe, max_new_tokens=6)
    describe_image(_image(64, 64), pipe=pipe, max_new_tokens=4)
    after, _ = pipe.encode_prompt("a cat", device=torch.device("cpu"))
    assert torch.equal(before, after)
    assert {p.device for p in pipe.text_encoder.parameters()} == devices
    assert pipe.text_encoder.model.rope_deltas is None


def test_tiny_models_noise_falls_back_to_the_original_prompt(pipe):
    """Random weights answer noise (greedy decoding: the same noise each run), which is refused: the prompt is
    kept as it was, with the reason, and the answer is kept in ``raw`` for inspection."""
    e = enhance_prompt("a cat on a red sofa", pipe, max_new_tokens=24)
    assert e.fallback_reason == "the rewrite is garbled: it contains undecodable bytes" and e.used_fallback
    assert e.enhanced == e.original == "a cat on a red sofa" and str(e) == "a cat on a red sofa"
    assert e.notices == [
        "the rewrite reached max_new_tokens and was cut back to its last full sentence",
        "kept the original prompt: the rewrite is garbled: it contains undecodable bytes",
    ]
    assert e.hit_token_limit and e.new_tokens == 24 and "\ufffd" in e.raw and e.raw.strip() != e.original
    assert not e.enhanced.endswith(POSITIVE_MAGIC["en"])


# ------------------------------------------------------------------------------------------ post-processing


def test_check_rewrite_accepts_and_cleans_good_rewrites():
    good = "A red fox reading a newspaper in a Paris cafe, watercolor, soft morning light."
    assert check_rewrite(good) == (good, None)
    assert check_rewrite(f'Enhanced prompt: "{good}"') == (good, None)
    assert check_rewrite(f"Sure! Here is the rewritten prompt:\n{good}<|im_end|>") == (good, None)
    assert check_rewrite(f"“{good}”") == (good, None)
    assert check_rewrite("改写后的提示词：一只橘猫趴在木窗台上，午后阳光，水彩风格。")[1] is None
    quoted = 'A neon sign that says "OPEN 24 HOURS" above a shop door at night, red glow.'
    assert check_rewrite(quoted) == (quoted, None)


def test_check_rewrite_refuses_empty_repetitive_garbled_and_too_long():
    assert check_rewrite("")[1] == "the rewrite is empty"
    assert check_rewrite("  \n ")[1] == "the rewrite is empty"
    assert check_rewrite('""')[1] == "the rewrite is empty"
    assert check_rewrite("... !!")[1] == "the rewrite is empty"
    assert "repetitive" in check_rewrite("a cat cat cat cat on a sofa")[1]
    assert "repetitive" in check_rewrite("a red fox, a red fox, a red fox, in the snow")[1]
    assert "repetitive" in check_rewrite("a red fox!!!!!!!!!!!!")[1]
    assert "repetitive" in check_rewrite("猫猫猫猫猫")[1]
    assert "repetitive" in check_rewrite(" ".join(["fox", "red", "snow"] * 4 + ["fox", "snow"] * 10))[1]
    assert "garbled" in check_rewrite("a red fox \ufffd in the snow")[1]
    assert "garbled" in check_rewrite("a ~~~ ||| ^^^ <<< >>> ### @@@ $$$ %%%")[1]
    words = " ".join(f"word{i}" for i in range(201))
    assert check_rewrite(words)[1] == "the rewrite is too long: 201 words, the cap is 200"
    assert check_rewrite(words, max_words=300)[1] is None
    many_characters = "".join(chr(0x4E00 + 7 * i) for i in range(210))
    assert "too long" in check_rewrite(many_characters)[1]  # CJK characters count one each
    assert word_count("a red fox, 一只猫") == 6
    assert find_repetition("a cat on a mat, a dog on a log, very very nice") is None


def test_finish_rewrite_appends_the_magic_of_the_language_or_falls_back():
    en, reason, notices = finish_rewrite("A red fox in a misty forest at dawn.", "a red fox")
    assert reason is None and notices == []
    assert en == "A red fox in a misty forest at dawn" + POSITIVE_MAGIC["en"]
    zh, reason, _ = finish_rewrite("一只橘猫趴在木窗台上，午后阳光。", "一只猫", "zh")
    assert reason is None and zh == "一只橘猫趴在木窗台上，午后阳光" + POSITIVE_MAGIC["zh"]
    plain, _, _ = finish_rewrite("A red fox at dawn.", "a red fox", positive_magic=False)
    assert plain == "A red fox at dawn."
    assert finish_rewrite("x " * 300, "a red fox")[:2] == (
        "a red fox",
        "the rewrite is repetitive: the word 'x' repeated 300 times in a row",
    )
    long = " ".join(f"w{i}" for i in range(250))
    kept, reason, notices = finish_rewrite(long, "a red fox")
    assert kept == "a red fox" and "too long" in reason and "kept the original prompt" in notices[-1]
    cut, reason, notices = finish_rewrite(
        "A red fox in the snow. Soft light falls on the birch trees. The fox lo", "fox", hit_token_limit=True
    )
    assert reason is None and cut.startswith("A red fox in the snow. Soft light falls on the birch trees")
    assert "lo" not in cut.split()[-4:] and "max_new_tokens" in notices[0]
    assert finish_rewrite("A b c.", "x", token_ids=[7] * 16)[1].startswith("the rewrite is repetitive")


# ------------------------------------------------------------------------------------------ limits


def test_a_prompt_over_the_encoders_limit_is_truncated_with_a_notice(pipe):
    long_prompt = "a cat " * 600
    assert len(pipe.tokenizer(long_prompt)["input_ids"]) > pipe.tokenizer_max_length == 1024
    e = enhance_prompt(long_prompt, pipe, max_new_tokens=2)
    assert e.truncated and e.prompt_truncated and e.original == long_prompt
    assert any("1024" in n and "tokens" in n for n in e.notices)
    sent = e.chat[1]["content"][len(PROMPT_LABEL["en"]) :]
    assert len(pipe.tokenizer(sent, add_special_tokens=False)["input_ids"]) <= 1024
    short = enhance_prompt("a cat", pipe, max_new_tokens=1)
    assert not short.prompt_truncated and short.truncated == short.hit_token_limit


def test_bad_arguments_are_refused(pipe):
    with pytest.raises(QwennbError, match="empty"):
        enhance_prompt("   ", pipe)
    with pytest.raises(QwennbError, match="max_new_tokens"):
        enhance_prompt("a cat", pipe, max_new_tokens=0)
    with pytest.raises(QwennbError, match="focus"):
        describe_image(_image(32, 32), "colour", pipe=pipe)
    with pytest.raises(QwennbError, match="load_vl_model"):
        enhance_prompt("a cat")  # no pipeline and no VL model loaded


# ------------------------------------------------------------------------------------------ no LM head


def test_a_model_without_an_lm_head_is_refused_naming_the_alternatives(pipe, tmp_path):
    base = pipe.text_encoder.model  # Qwen2_5_VLModel: the encoder without its head
    assert base.get_output_embeddings() is None
    _, processor = build_tiny_vl("qwen2.5-vl")
    for model in (base, (base, processor)):
        with pytest.raises(QwennbError, match=r"lm_head.*qwen2\.5-vl-7b.*qwen2-vl-7b"):
            enhance_prompt("a cat", model=model)
    headless = build_tiny_pipeline()
    headless.text_encoder = headless.text_encoder.model
    with pytest.raises(QwennbError, match="lm_head"):
        enhance_prompt("a cat", headless)
    with pytest.raises(QwennbError, match="lm_head"):
        describe_image(_image(32, 32), pipe=headless)
    # A snapshot whose text encoder was saved without lm_head weights (transformers would make them up).
    from safetensors.torch import save_file

    (tmp_path / "text_encoder").mkdir()
    save_file(
        {"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "text_encoder/model.safetensors")
    )
    missing = build_tiny_pipeline()
    missing.qwennb = {"model": "qwen-image", "path": str(tmp_path)}
    with pytest.raises(QwennbError, match="checkpoint's text encoder has no lm_head weights"):
        enhance_prompt("a cat", missing)


# ------------------------------------------------------------------------------------------ VL models


@pytest.mark.parametrize(("name", "cls"), [("tiny-vl", "Qwen2_5_VL"), ("tiny-vl2", "Qwen2VL")])
def test_enhance_prompt_with_qwen2vl_works_with_both_tiny_vl_models(name, cls, pipe):
    vl = load_vl_model(name)
    assert type(vl.model).__name__ == f"{cls}ForConditionalGeneration" and vl.name == name
    out = enhance_prompt_with_qwen2vl("a red fox", max_new_tokens=8)  # the loaded VL model by default
    assert out == "a red fox"  # random weights: a garbled rewrite, refused; the prompt comes back as it was
    again = enhance_prompt_with_qwen2vl("a red fox", model=name, max_new_tokens=8)
    assert again == out
    e = enhance_prompt("a red fox", model=vl, max_new_tokens=8)
    assert e.model == name and e.enhanced == out and e.new_tokens == 8 and e.raw
    assert e.fallback_reason == "the rewrite is garbled: it contains undecodable bytes"
    assert unload_vl_model() and enhance.current_vl_model() is None
    with pytest.raises(QwennbError, match="unloaded"):
        enhance_prompt("a red fox", model=vl)
    with_pipe = enhance_prompt_with_qwen2vl("a red fox", pipe=pipe, max_new_tokens=4)
    assert with_pipe == enhance_prompt("a red fox", pipe, max_new_tokens=4).enhanced == "a red fox"
    with pytest.raises(QwennbError, match=r"load_vl_model\('qwen2\.5-vl-7b'\)"):
        enhance_prompt_with_qwen2vl("a red fox")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_7b_vl_model_is_refused_with_numbers_before_any_file_is_touched():
    with pytest.raises(QwennbError, match=r"qwen2\.5-vl-7b needs 15\.4 GiB in bfloat16.*no CUDA GPU.*cpu"):
        load_vl_model("qwen2.5-vl-7b")
    with pytest.raises(QwennbError, match="image model"):
        load_vl_model("qwen-image")


# ------------------------------------------------------------------------------------------ images


def test_decoding_gives_back_the_text_as_written(pipe):
    """The model's words come back as tokenised: no clean-up of spaces before punctuation (" ," stays), which
    would change what a prompt says in languages and notations that space them."""
    text = "a cat , on a mat . 3 : 4"
    ids = pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert enhance._decode(pipe.tokenizer, ids) == text


def test_pixel_limits_prefer_the_processors_own_then_its_size_then_qwen25vls():
    from types import SimpleNamespace

    both = SimpleNamespace(min_pixels=100, max_pixels=1000, size={"shortest_edge": 5, "longest_edge": 50})
    assert enhance._pixel_limits(both) == (100, 1000)
    assert enhance._pixel_limits(SimpleNamespace(size={"shortest_edge": 5, "longest_edge": 50})) == (5, 50)
    assert enhance._pixel_limits(SimpleNamespace(size={"min_pixels": 7, "max_pixels": 70})) == (7, 70)
    assert enhance._pixel_limits(SimpleNamespace()) == (
        enhance.QWEN25VL_MIN_PIXELS,
        enhance.QWEN25VL_MAX_PIXELS,
    )


def test_image_tokens_match_the_processors_grid(pipe):
    ip = pipeline_image_processor(pipe)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert enhance._pixel_limits(ip) == (3136, 12845056)  # Qwen2.5-VL's preprocessor_config.json
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    ci = prepare_chat_inputs(pipe.tokenizer, chat, image=_image(300, 200), image_processor=ip)
    t, h, w = ci.grid_thw
    pad = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ci.input_ids.count(pad) == ci.image_tokens == t * h * w // ip.merge_size**2
    assert tuple(ci.tensors["image_grid_thw"][0].tolist()) == (t, h, w)
    assert ci.tensors["pixel_values"].shape[0] == t * h * w
    assert "<|vision_start|>" + "<|image_pad|>" * ci.image_tokens + "<|vision_end|>" in ci.text
    assert ci.image_size_used == (w * 14, h * 14) == (308, 196)


def test_describe_image_with_the_pipelines_text_encoder(pipe):
    d = describe_image(_image(300, 200), pipe=pipe, max_new_tokens=6)
    assert d.focus == "style" and d.model == "tiny text encoder" and d.new_tokens <= 6
    assert d.chat[1]["content"][0] == {"type": "image"}
    assert d.chat[1]["content"][1]["text"] == DESCRIBE_INSTRUCTIONS[("style", "en")]
    for word in ("palette", "lighting", "composition"):
        assert word in DESCRIBE_INSTRUCTIONS[("style", "en")]
    t, h, w = d.grid_thw
    assert d.image_tokens == t * h * w // 4 and d.image_size_used == (308, 196)
    assert (d.text == "") == (d.problem is not None)
    content = describe_image(_image(300, 200), "content", pipe=pipe, max_new_tokens=2)
    assert content.chat[1]["content"][1]["text"] == DESCRIBE_INSTRUCTIONS[("content", "en")]


def test_bytes_path_and_pil_give_the_same_description(tmp_path):
    load_vl_model("tiny-vl")
    im = _image(120, 90, seed=3)
    path = tmp_path / "ref.png"
    im.save(path)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    outs = [describe_image(x, max_new_tokens=6) for x in (im, str(path), path, buf.getvalue())]
    assert len({(d.raw, d.grid_thw, d.image_size_used) for d in outs}) == 1
    assert outs[0].model == "tiny-vl"


def test_urls_and_unreadable_inputs_are_refused(pipe, tmp_path):
    for url in ("https://example.com/cat.png", "http://x/y.jpg", "data:image/png;base64,iVBORw0KGgo="):
        with pytest.raises(QwennbError, match="URLs are not fetched"):
            describe_image(url, pipe=pipe)
    with pytest.raises(QwennbError, match="no image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(QwennbError, match="not an image"):
        load_image(b"not an image")
    with pytest.raises(QwennbError, match="PIL image, a path or bytes"):
        load_image(42)
    assert load_image(Image.new("RGBA", (8, 8))).mode == "RGB"


def test_a_large_image_is_resized_to_the_processors_limit():
    vl = load_vl_model("tiny-vl2")
    d = describe_image(_image(1600, 1000), "content", max_new_tokens=2)
    w, h = d.image_size_used
    assert w * h <= TINY_VL_MAX_PIXELS and w % 28 == 0 and h % 28 == 0 and w > h
    assert d.original_size == (1600, 1000) and any("resized from 1600x1000" in n for n in d.notices)
    assert d.image_tokens == d.grid_thw[1] * d.grid_thw[2] // 4
    ci = prepare_chat_inputs(
        vl.tokenizer,
        d.chat,
        image=_image(1600, 1000),
        image_processor=vl.image_processor,
        max_pixels=28 * 28 * 16,
    )
    assert ci.image_size_used[0] * ci.image_size_used[1] <= 28 * 28 * 16 < TINY_VL_MAX_PIXELS


# ------------------------------------------------------------------------------------------ CLI


def test_cli_enhance_json_has_the_documented_keys(capsys):
    assert main(["enhance", "a cat on a red sofa", "--model", "tiny", "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"original", "enhanced", "language", "model", "seconds"} <= set(out)
    assert (
        out["original"] == "a cat on a red sofa"
        and out["language"] == "en"
        and out["model"] == "tiny text encoder"
    )
    assert main(["enhance", "一只猫", "--model", "tiny-vl", "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["language"] == "zh" and out["model"] == "tiny-vl"


def test_cli_enhance_refuses_an_empty_prompt_or_a_missing_image_before_loading_a_model(tmp_path, capsys):
    for argv, said in (
        (["enhance", "  "], "qwennb: error: the prompt is empty"),
        (["enhance", "a cat", "--image", str(tmp_path / "no.png")], "no.png"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err  # one line: nothing loaded first


def test_cli_describe(tmp_path, capsys):
    path = tmp_path / "ref.png"
    _image(100, 80).save(path)
    rc = main(
        ["describe", str(path), "--focus", "content", "--model", "tiny-vl", "--json", "--max-new-tokens", "4"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["focus"] == "content" and out["model"] == "tiny-vl"
    assert {"text", "image_size_used", "seconds", "problem"} <= set(out)
    assert main(["describe", "https://example.com/a.png"]) == 2
    assert "URLs are not fetched" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ metadata


def test_generation_records_the_enhanced_and_the_original_prompt(pipe, tmp_path):
    e = enhance_prompt("a red fox", pipe, max_new_tokens=4)
    # The tiny model's rewrite is noise; give the result a usable rewrite to follow it through generation.
    e = dataclasses.replace(
        e, enhanced=finish_rewrite("A red fox in a snowy birch forest at dawn.", e.original)[0]
    )
    result = generate(pipe, e.enhanced, original_prompt=e.original, steps=2, width=64, height=64, seed=1)
    assert result.prompt == e.enhanced and result.original_prompt == "a red fox"
    path = result.save(tmp_path)[0]
    with Image.open(path) as im:
        meta = json.loads(im.text[PNG_KEY])
    assert meta["prompt"] == e.enhanced and meta["original_prompt"] == "a red fox"
    assert load_params(path)["prompt"] == e.enhanced
