"""The Qwen-Image-2.1 tuned path (qwennb.speed21) on the tiny 2.1 stand-in, on the CPU: same function as stock."""

import pytest
import torch

from qwennb import speed21
from qwennb.stand_ins21 import build_tiny21_pipeline

PROMPT = "a red fox reading a newspaper"
NEGATIVE = (
    "blurry low quality ugly image of a thing"  # longer than PROMPT once encoded: different prefix lengths
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny21_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def latents(pipe, cfg=4.0, n=1, steps=4, size=64, prompt=PROMPT, negative=NEGATIVE, **kw):
    g = torch.Generator().manual_seed(3)
    return pipe(
        prompt,
        negative_prompt=negative if cfg > 1 else None,
        true_cfg_scale=cfg,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=g,
        output_type="latent",
        num_images_per_prompt=n,
        **kw,
    ).images


def test_prompts_have_different_lengths(pipe):
    a = pipe.encode_prompt(PROMPT, device="cpu")[0]
    b = pipe.encode_prompt(NEGATIVE, device="cpu")[0]
    assert a.shape[1] != b.shape[1]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_tuned_21_matches_stock(pipe, cfg, n):
    """Final latents within 1e-5 of stock; with CFG every cached step is one paired forward whose second half is
    handed to the pipeline's second call. Two images a prompt: the pair's split must keep each sample's rows."""
    ref = latents(pipe, cfg=cfg, n=n)
    state = speed21.enable_fast_path_21(pipe.transformer, compile=False)
    try:
        got = latents(pipe, cfg=cfg, n=n)
    finally:
        speed21.disable_fast_path_21(pipe.transformer)
    assert rel(got, ref) < 1e-5
    cached = 3  # steps 2-4 of 4 decode from the KV cache; the prefill step runs stock
    if cfg > 1:
        assert state.stats["cfg_pairs"] == cached and state.stats["cfg_reused"] == cached
        assert state.stats["stock"] == 2 and state.stats["forwards"] == 8
    else:
        assert state.stats["cfg_pairs"] == 0 and state.stats["cached"] == cached
        assert state.stats["stock"] == 1 and state.stats["forwards"] == 4
    assert not speed21.is_fast21(pipe.transformer)
    assert "forward" not in pipe.transformer.__dict__


def test_unpaired_and_stock_cases(pipe):
    """batch_cfg off: each pass alone, still exact; use_kv_cache=False: every forward stock."""
    ref = latents(pipe)
    state = speed21.enable_fast_path_21(pipe.transformer, compile=False, batch_cfg=False)
    try:
        assert rel(latents(pipe), ref) < 1e-5
        assert state.stats["cfg_pairs"] == 0 and state.stats["cached"] == 6
    finally:
        speed21.disable_fast_path_21(pipe.transformer)
    ref_nocache = latents(pipe, use_kv_cache=False)
    state = speed21.enable_fast_path_21(pipe.transformer, compile=False)
    try:
        assert rel(latents(pipe, use_kv_cache=False), ref_nocache) < 1e-5
        assert state.stats["stock"] == state.stats["forwards"] == 8
    finally:
        speed21.disable_fast_path_21(pipe.transformer)


def _halve_second_cached_timestep(forward):
    """Wrap a transformer forward: every second call of a cached step gets half the timestep."""
    calls = []

    def spy(*a, **k):
        calls.append(k.get("kv_cache_mode"))
        if k.get("kv_cache_mode") == "cached" and len(calls) % 2 == 0:
            k["timestep"] = k["timestep"] * 0.5
        return forward(*a, **k)

    return spy


def test_a_second_pass_that_differs_is_computed_not_taken_from_the_pair(pipe):
    """A stored second half is handed out only to the call it was computed for (here: a different timestep)."""
    tr = pipe.transformer
    tr.forward = _halve_second_cached_timestep(tr.forward)
    try:
        ref = latents(pipe, steps=3)
    finally:
        del tr.forward
    state = speed21.enable_fast_path_21(tr, compile=False)
    try:
        tr.forward = _halve_second_cached_timestep(tr.forward)
        got = latents(pipe, steps=3)
    finally:
        speed21.disable_fast_path_21(tr)
        tr.__dict__.pop("forward", None)
    assert state.stats["cfg_pairs"] == 2 and state.stats["cfg_reused"] == 0 and state.stats["cached"] == 4
    assert rel(got, ref) < 1e-5


def test_compiled_tuned_21_matches_stock_with_one_graph(pipe):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = latents(pipe)
    ref_big = latents(
        pipe, size=96, prompt="a much longer prompt with many more words in it than the first one"
    )
    state = speed21.enable_fast_path_21(pipe.transformer, compile=True, backend="aot_eager")
    try:
        assert rel(latents(pipe), ref) < 1e-5
        assert (
            rel(
                latents(
                    pipe, size=96, prompt="a much longer prompt with many more words in it than the first one"
                ),
                ref_big,
            )
            < 1e-5
        )
        assert state.stats["cfg_pairs"] == 6
        assert counters["stats"]["unique_graphs"] == 1  # new lengths and sizes: no new graph
    finally:
        speed21.disable_fast_path_21(pipe.transformer)
        torch._dynamo.reset()
