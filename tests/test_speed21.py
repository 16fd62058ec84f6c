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


@pytest.mark.parametrize("pack", [False, True])
def test_compiled_tuned_21_matches_stock_with_one_graph(pipe, pack):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = latents(pipe)
    ref_big = latents(
        pipe, size=96, prompt="a much longer prompt with many more words in it than the first one"
    )
    state = speed21.enable_fast_path_21(pipe.transformer, compile=True, backend="aot_eager", pack=pack)
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


def _storages(block) -> set[int]:
    qkv, mlp = speed21._block_linears(block)
    return {lin.weight.untyped_storage().data_ptr() for lin in (*qkv, *mlp)}


def test_packed_projections_are_the_same_function_with_no_copy(pipe):
    """pack=True: each block's Q/K/V and MLP input weights share one storage (views, values unchanged); the
    tuned path with one GEMM for each is still stock's function; disabling gives every weight its storage back."""
    tr = pipe.transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    ref = latents(pipe)
    state = speed21.enable_fast_path_21(tr, compile=False, pack=True)
    try:
        for block in tr.transformer_blocks:
            qkv, mlp = speed21._block_linears(block)
            w = speed21._packed(qkv)
            assert w is not None and w.shape[0] == sum(lin.out_features for lin in qkv)
            assert torch.equal(w, torch.cat([lin.weight for lin in qkv]))
            assert speed21._packed(mlp) is not None
            assert len(_storages(block)) == 2  # one for Q/K/V, one for the MLP's inputs
        assert rel(latents(pipe), ref) < 1e-5
        assert state.stats["cfg_pairs"] == 3
    finally:
        speed21.disable_fast_path_21(tr)
    for block in tr.transformer_blocks:
        assert len(_storages(block)) == 5
        assert speed21._packed(speed21._block_linears(block)[0]) is None
    after = tr.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_weight_no_longer_packed_is_used_as_it_is_now(pipe):
    """A weight given new values after packing (a fused LoRA, a reload) leaves the pack: that block computes its
    projections one by one with the new weight, never the packed copy's stale values."""
    tr = pipe.transformer
    block = tr.transformer_blocks[0]
    k_weight = block.attn.to_k.weight.detach().clone()
    up_weight = block.img_mlp.gate_layer.weight.detach().clone()
    speed21.enable_fast_path_21(tr, compile=False, pack=True)
    try:
        with torch.no_grad():
            block.attn.to_k.weight.data = k_weight * 1.5
            block.img_mlp.gate_layer.weight.data = up_weight * 0.5
        qkv, mlp = speed21._block_linears(block)
        assert speed21._packed(qkv) is None and speed21._packed(mlp) is None
        got = latents(pipe)
    finally:
        speed21.disable_fast_path_21(tr)
    ref = latents(pipe)  # stock, with the changed weights
    with torch.no_grad():
        block.attn.to_k.weight.data = k_weight
        block.img_mlp.gate_layer.weight.data = up_weight
    assert rel(got, ref) < 1e-5


def test_packing_leaves_unpackable_weights_alone():
    """Weights of two dtypes (or not on one device, or on the meta device) are not packed; nothing changes."""
    a, b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False).double()
    pa, pb = a.weight.data_ptr(), b.weight.data_ptr()
    assert not speed21._pack((a, b))
    assert (a.weight.data_ptr(), b.weight.data_ptr()) == (pa, pb)
    c = torch.nn.Linear(4, 4, bias=True)
    assert not speed21._pack((a, c))
    d = torch.nn.Linear(4, 6, bias=False)
    assert speed21._pack((a, d))
    with torch.no_grad():
        assert speed21._packed((a, d)).shape == (10, 4)
        assert speed21._packed((d, a)) is None  # the order the pack was made in
    # training: the weights' gradients must reach them, so the (detached) packed view is not used
    assert speed21._packed((a, d)) is None
    a.weight.requires_grad_(False), d.weight.requires_grad_(False)
    assert speed21._packed((a, d)) is not None


def test_cuda_graph_modes_copy_each_block_output_out_of_the_graph(pipe, monkeypatch):
    """Under a CUDA-graph mode every block call is marked a new step (its replay may overwrite the last output),
    and its output is copied before the next call; in other modes neither."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    buffers = {}

    def replay(block, x, *rest):
        # as a CUDA graph's replay: one static output buffer per shape, overwritten before the inputs are read
        out = buffers.get((x.shape, x.dtype))
        if out is not None:
            out.zero_()
        y = speed21._fast_block21(block, x, *rest)
        if out is None:
            out = buffers[(x.shape, x.dtype)] = torch.empty_like(y)
        return out.copy_(y)

    monkeypatch.setattr(
        speed21,
        "_compiled_block21",
        lambda mode, backend: replay if mode == "reduce-overhead" else speed21._fast_block21,
    )
    ref = latents(pipe)
    blocks = len(pipe.transformer.transformer_blocks)
    for mode, expected in (("reduce-overhead", 3 * blocks), ("max-autotune-no-cudagraphs", 0)):
        marks.clear()
        speed21.enable_fast_path_21(pipe.transformer, compile=True, mode=mode)
        try:
            assert rel(latents(pipe), ref) < 1e-5
        finally:
            speed21.disable_fast_path_21(pipe.transformer)
        assert len(marks) == expected  # 3 cached steps, one paired forward each


def test_the_kv_pair_is_reused_unless_a_hook_is_on_the_blocks(pipe):
    """A diffusers hook on the blocks (a cache, offload) may skip or move work between the pair's two calls, so the
    pair is not reused then; a hook registry left empty (diffusers keeps one after a hook is removed) is no hook."""
    from diffusers.hooks import HookRegistry, ModelHook

    ref = latents(pipe)
    block = pipe.transformer.transformer_blocks[0]
    registry = HookRegistry.check_if_exists_or_initialize(block)
    try:
        for hooked in (False, True):
            if hooked:
                registry.register_hook(ModelHook(), "qwennb-test-hook")
            state = speed21.enable_fast_path_21(pipe.transformer, compile=False)
            try:
                got = latents(pipe)
            finally:
                speed21.disable_fast_path_21(pipe.transformer)
            assert rel(got, ref) < 1e-5
            assert state.stats["cfg_reused"] == (0 if hooked else 3), hooked
    finally:
        if registry.get_hook("qwennb-test-hook") is not None:
            registry.remove_hook("qwennb-test-hook")
        del block._diffusers_hook
