"""Tests of qwennb.stand_ins with real (tiny) pipelines: no mocks, no network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwennb import stand_ins
from qwennb.stand_ins import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    build_synthetic_pipeline,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    count_parameters,
    load_component_config,
    materialize_,
    template_prefix_tokens,
)

CONFIGS = Path(stand_ins.__file__).parent / "configs"
GEN = dict(negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64, num_inference_steps=3)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_pipe():
    return _quiet(build_tiny_pipeline(seed=0))


def _pixels(pipe, seed: int, prompt: str = "a cat") -> np.ndarray:
    image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **GEN).images[0]
    return np.asarray(image)


def _state_digest(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ configs


def test_tiny_configs_match_the_real_classes_and_pipeline_constraints():
    real = {c: load_component_config("qwen-image", c) for c in ("transformer", "vae", "scheduler")}
    tiny = {c: load_component_config("tiny", c) for c in ("transformer", "vae", "scheduler", "text_encoder")}
    assert tiny["scheduler"] == real["scheduler"]
    for c in ("transformer", "vae"):
        assert tiny[c]["_class_name"] == real[c]["_class_name"]
    t, te = tiny["transformer"], tiny["text_encoder"]
    assert (t["in_channels"], t["out_channels"], t["patch_size"]) == (64, 16, 2)
    assert t["joint_attention_dim"] == te["hidden_size"]
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    assert te["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert sum(te["rope_scaling"]["mrope_section"]) * 2 == te["hidden_size"] // te["num_attention_heads"]
    assert te["vision_config"]["out_hidden_size"] == te["hidden_size"]
    for key in ("z_dim", "latents_mean", "latents_std", "temperal_downsample"):
        assert tiny["vae"][key] == real["vae"][key]


def test_tiny_weights_are_drawn_by_role(tiny_pipe):
    """Embeddings ~ std 1, weights within PyTorch's fan-in bound, norm weights 1, biases 0."""
    emb = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert 0.9 < float(emb.float().std()) < 1.1
    lin = next(
        m for m in tiny_pipe.transformer.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
    )
    bound = 1 / lin.weight.shape[1] ** 0.5
    assert float(lin.weight.abs().max()) <= bound + 1e-6 and float(lin.weight.std()) > bound / 3
    assert torch.count_nonzero(lin.bias) == 0
    norms = [m.weight for m in tiny_pipe.text_encoder.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(bool((w == 1).all()) for w in norms)


def test_tiny_component_sizes(tiny_pipe):
    sizes = {n: count_parameters(getattr(tiny_pipe, n)) for n in ("transformer", "vae", "text_encoder")}
    assert all(0 < s < 5_000_000 for s in sizes.values()), sizes
    assert count_parameters(None) == 0
    assert count_parameters(tiny_pipe.transformer) == sum(
        p.numel() for p in tiny_pipe.transformer.parameters()
    )


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_and_chatml():
    tok = build_tiny_tokenizer()
    assert type(tok).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    base = ids[0]
    assert ids == list(range(base, base + len(SPECIAL_TOKENS)))  # right after the learned vocabulary
    assert len(tok) == base + len(SPECIAL_TOKENS)
    assert 256 + 200 <= base <= 256 + 500  # the byte alphabet plus a few hundred merges
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert t in tok.all_special_tokens
        assert tok(t)["input_ids"] == [tok.convert_tokens_to_ids(t)]  # never split
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"

    # byte-level: anything round-trips, English and Chinese compress below one token per byte
    for text in ("A cat sitting on a wooden table.", "一只猫坐在窗边", "emoji 🐱 and tabs\t\n"):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok(" the background")["input_ids"]) == ["Ġthe", "Ġbackground"]
    assert len(tok("一只猫")["input_ids"]) < len("一只猫".encode())

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Draw a cat."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDraw a cat.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (
        tok.apply_chat_template(messages[1:], tokenize=False) == "<|im_start|>user\nDraw a cat.<|im_end|>\n"
    )
    assert tok.chat_template == CHATML_TEMPLATE


def test_tokenizer_is_deterministic_and_fits_the_text_encoder():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    te = load_component_config("tiny", "text_encoder")
    assert len(a) <= te["vocab_size"]
    expected = {
        "bos_token_id": "<|endoftext|>",
        "pad_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    for key, token in expected.items():
        assert te[key] == a.convert_tokens_to_ids(token), key
    assert max(a.get_vocab().values()) < load_component_config("qwen-image", "text_encoder")["vocab_size"]


def test_template_prefix_tokens_counts_the_tokens_before_the_prompt(tiny_pipe):
    tok = tiny_pipe.tokenizer
    template = tiny_pipe.prompt_template_encode
    start = tiny_pipe.prompt_template_encode_start_idx
    assert start == template_prefix_tokens(tok, template)
    # Independently: the user's text starts after the second "<|im_start|>", "user", "\n".
    ids = tok(template.format("a cat"))["input_ids"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    second = [i for i, t in enumerate(ids) if t == im_start][1]
    assert start == second + 1 + len(tok("user\n")["input_ids"])
    assert ids[start : start + 2] == tok("a cat")["input_ids"]
    assert start != 34  # Qwen's own tokenizer's count, which would be wrong here
    assert template_prefix_tokens(tok, "<|im_start|>user\n{}<|im_end|>\n") == 3
    with pytest.raises(ValueError):
        template_prefix_tokens(tok, "no placeholder")


def test_encode_prompt_keeps_the_prompt_and_the_template_suffix(tiny_pipe):
    tok, te = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    embeds, mask = tiny_pipe.encode_prompt("a cat", device=torch.device("cpu"))
    n_prompt = len(tok("a cat")["input_ids"])
    # QwenImagePipeline drops only the template's prefix; "<|im_end|>\n<|im_start|>assistant\n" stays.
    suffix = tiny_pipe.prompt_template_encode.split("{}")[1]
    n_suffix = len(tok(suffix)["input_ids"])
    assert n_suffix == 5  # as with Qwen's own tokenizer
    assert embeds.shape == (1, n_prompt + n_suffix, te.config.text_config.hidden_size)
    assert mask is None  # a single prompt has no padding
    assert torch.isfinite(embeds).all()
    # The kept hidden states are exactly those from the first prompt token on.
    full = tok(tiny_pipe.prompt_template_encode.format("a cat"), return_tensors="pt")
    with torch.no_grad():
        hidden = te(**full, output_hidden_states=True).hidden_states[-1]
    start = tiny_pipe.prompt_template_encode_start_idx
    torch.testing.assert_close(embeds[0], hidden[0, start:])
    # Prompts differ -> embeddings differ; a batch is padded and masked.
    other, _ = tiny_pipe.encode_prompt("一只红色的车", device=torch.device("cpu"))
    assert other.shape[1] != embeds.shape[1] or not torch.equal(other, embeds)
    batch, batch_mask = tiny_pipe.encode_prompt(["a cat", "a cat on a red sofa"], device=torch.device("cpu"))
    assert batch.shape[0] == 2 and batch_mask is not None and batch_mask[0].sum() == embeds.shape[1]


# ------------------------------------------------------------------------------------- tiny pipeline


def test_tiny_pipeline_generates_a_finite_image_with_cfg(tiny_pipe):
    latents_seen = []

    def keep(pipe, step, timestep, kwargs):
        latents_seen.append(kwargs["latents"].clone())
        return {}

    out = tiny_pipe(
        "a cat",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=keep,
        **{**GEN, "height": 128},
    )
    image = out.images[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size == (64, 128)  # (width, height)
    assert len(latents_seen) == GEN["num_inference_steps"]
    assert all(torch.isfinite(lat).all() for lat in latents_seen)
    pixels = np.asarray(image).astype(np.float32)
    assert pixels.std() > 5.0  # not a flat image
    assert 0 < (pixels > 0).mean() and (pixels < 255).mean() > 0.5  # not saturated

    array = tiny_pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    assert array.shape == (1, 64, 64, 3) and np.isfinite(array).all()


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_pipe):
    again = _quiet(build_tiny_pipeline(seed=0))
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first = _pixels(tiny_pipe, seed=1)
    assert np.array_equal(first, _pixels(again, seed=1))
    assert not np.array_equal(first, _pixels(tiny_pipe, seed=2))
    other_weights = build_tiny_pipeline(seed=1)
    assert not torch.equal(other_weights.transformer.img_in.weight, tiny_pipe.transformer.img_in.weight)


def test_tiny_weights_do_not_depend_on_the_cpu_kernels(tiny_pipe):
    """normal_/uniform_ on CPU round differently with and without AVX2; our weights must not."""
    import inspect

    code = "\n".join(
        [
            "import hashlib, torch",
            "from qwennb.stand_ins import build_tiny_pipeline",
            inspect.getsource(_state_digest),
            "p = build_tiny_pipeline(seed=0)",
            "print(torch.backends.cpu.get_cpu_capability())",
            "print(_state_digest(p.transformer, p.vae, p.text_encoder))",
        ]
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split()[0] == "DEFAULT"
    here = _state_digest(tiny_pipe.transformer, tiny_pipe.vae, tiny_pipe.text_encoder)
    assert result.stdout.strip().splitlines()[-1] == here


def test_tiny_pipeline_in_bfloat16():
    pipe = _quiet(build_tiny_pipeline(seed=0, dtype=torch.bfloat16))
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    embeds, _ = pipe.encode_prompt("a cat", device=torch.device("cpu"))
    assert embeds.dtype == torch.bfloat16 and torch.isfinite(embeds.float()).all()


# -------------------------------------------------------------------------------- synthetic pipeline


def _rope_tables(transformer, text_encoder) -> dict[str, torch.Tensor]:
    tables = {
        "pos_freqs": transformer.pos_embed.pos_freqs,
        "neg_freqs": transformer.pos_embed.neg_freqs,
    }
    tables.update({k: b for k, b in text_encoder.named_buffers() if "inv_freq" in k})
    return tables


def _reference_rope_tables() -> dict[str, torch.Tensor]:
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel.from_config(load_component_config("tiny", "transformer"))
    config = Qwen2_5_VLConfig.from_dict(load_component_config("tiny", "text_encoder"))
    return _rope_tables(transformer, Qwen2_5_VLForConditionalGeneration(config))


def _assert_same_tables(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and len(want) == 6  # 2 diffusers tables + 2x2 transformers buffers
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key].cpu(), want[key]), key


def test_synthetic_pipeline_materialises_finite_weights_and_exact_rope():
    pipe = _quiet(build_synthetic_pipeline(device="cpu", dtype=torch.float32, config_dir="tiny", std=0.02))
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, name)
        for pname, p in module.named_parameters():
            assert not p.is_meta and p.device.type == "cpu" and p.dtype == torch.float32, pname
            assert torch.isfinite(p).all(), pname
    big = pipe.text_encoder.model.language_model.embed_tokens.weight
    assert abs(big.std().item() - 0.02) < 0.002
    assert torch.all(pipe.transformer.txt_norm.weight == 1)
    assert torch.all(pipe.transformer.img_in.bias == 0)
    assert pipe.prompt_template_encode_start_idx == template_prefix_tokens(
        pipe.tokenizer, pipe.prompt_template_encode
    )
    _assert_same_tables(_rope_tables(pipe.transformer, pipe.text_encoder), _reference_rope_tables())

    images = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **GEN).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()

    no_te = build_synthetic_pipeline(
        device="cpu", dtype=torch.float32, config_dir="tiny", with_text_encoder=False
    )
    assert no_te.text_encoder is None and no_te.tokenizer is not None


def test_materialise_recomputes_rope_of_modules_built_under_the_meta_device():
    """Under ``torch.device("meta")`` even the RoPE tables are meta; they must come back exact."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(load_component_config("tiny", "transformer"))
        config = Qwen2_5_VLConfig.from_dict(load_component_config("tiny", "text_encoder"))
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    assert transformer.pos_embed.pos_freqs.is_meta
    generator = torch.Generator().manual_seed(0)
    for module in (transformer, text_encoder):
        materialize_(module, device="cpu", dtype=torch.float32, init=stand_ins._normal_init(generator, 0.02))
    _assert_same_tables(_rope_tables(transformer, text_encoder), _reference_rope_tables())


def test_full_size_configs_build_on_meta_with_known_sizes():
    """Every parameter of the real architecture has an init rule, and the sizes are the real ones."""
    transformer, vae, text_encoder = stand_ins._empty_components("qwen-image")
    assert count_parameters(transformer) == 20_430_401_088
    for module in (transformer, vae, text_encoder):
        for owner in module.modules():
            for name, p in owner._parameters.items():
                if p is not None:
                    assert p.is_meta
                    stand_ins._param_role(owner, name, p)  # raises on an unknown parameter
    assert not any(b.is_meta for b in text_encoder.buffers())  # RoPE buffers were computed for real
    real = json.loads((CONFIGS / "qwen-image" / "text_encoder.json").read_text())
    assert text_encoder.config.text_config.vocab_size == real["vocab_size"]
