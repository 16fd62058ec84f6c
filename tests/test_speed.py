"""The tuned path (qwennb.speed) on the tiny model, on the CPU: same function as stock diffusers."""

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from qwennb import speed
from qwennb.errors import PlanError
from qwennb.plan import OptimizationConfig, describe_machine, make_plan
from qwennb.stand_ins import build_tiny_pipeline

H100 = dict(compute_capability="9.0", sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5)


def _fp8_matmul_runs_here() -> bool:
    """Whether this torch build has ``torch._scaled_mm`` for the CPU (asked once, outside the code under test)."""
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0))
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_fp8_matmul = pytest.mark.skipif(not _fp8_matmul_runs_here(), reason="no fp8 matmul on this CPU build")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def latents(pipe, prompt="a red fox", size=128, steps=4, cfg=4.0, n=1, negative=" "):
    g = torch.Generator().manual_seed(3)
    out = pipe(
        prompt,
        negative_prompt=negative,
        true_cfg_scale=cfg,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=g,
        output_type="latent",
        num_images_per_prompt=n,
    )
    return out.images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_matches_complex_rope(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 3, 16, generator=g).to(dtype)
    angles = torch.randn(37, 8, generator=g, dtype=torch.float64).float()
    freqs = torch.polar(torch.ones_like(angles), angles)  # complex64, as diffusers builds it
    ref = apply_rotary_emb_qwen(x, freqs, use_real=False)
    cos, sin = speed.rope_to_real(freqs)
    assert cos.shape == sin.shape == (37, 16) and cos.dtype == torch.float32
    out = speed.apply_rotary_emb_real(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # the same float32 values rounded to bf16: equal but for a rare last-bit tie
        assert (out != ref).float().mean() < 1e-3
        torch.testing.assert_close(out, ref, rtol=8e-3, atol=8e-3)
    stacked = speed._apply_rotary_emb_stack(x, cos, sin)
    torch.testing.assert_close(stacked.float(), out.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_processor_matches_stock_processor(pipe, fused, mask):
    attn = pipe.transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(1)
    d = attn.inner_dim
    img = torch.randn(2, 24, d, generator=g)
    txt = torch.randn(2, 7, d, generator=g)
    m = torch.ones(2, 7, dtype=torch.bool)  # the transformer passes the text mask as bool
    m[1, 4:] = False
    angles = torch.randn(31, attn.inner_dim // attn.heads // 2, generator=g)
    freqs = torch.polar(torch.ones_like(angles), angles)
    rope = (freqs[7:], freqs[:7])
    kwargs = dict(encoder_hidden_states_mask=m if mask else None)
    with torch.no_grad():
        ref = QwenDoubleStreamAttnProcessor2_0()(attn, img, txt, image_rotary_emb=rope, **kwargs)
        if fused:
            speed.fuse_qkv_(attn)
        proc = speed.QwenRealRopeAttnProcessor()
        out_complex = proc(attn, img, txt, image_rotary_emb=rope, **kwargs)
        real = (speed.rope_to_real(rope[0]), speed.rope_to_real(rope[1]))
        out_real = proc(attn, img, txt, image_rotary_emb=real, **kwargs)
        proc.sdpa_op = True
        out_op = proc(attn, img, txt, image_rotary_emb=real, **kwargs)
        attn.fused_projections = False
    for out in (out_complex, out_real, out_op):
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_fused_qkv_shares_the_weights(pipe):
    attn = pipe.transformer.transformer_blocks[1].attn
    before = sum(p.numel() for p in pipe.transformer.parameters())
    speed.fuse_qkv_(attn)
    q = attn.to_q.weight
    assert q.data_ptr() == attn.to_qkv.weight.data_ptr()
    assert attn.to_k.weight.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    # Parameters are deduplicated by object, not storage: the fused ones are new objects over old storage.
    assert attn.to_qkv.weight.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert sum(p.numel() for p in pipe.transformer.parameters()) > before
    attn.fused_projections = False


@pytest.mark.parametrize("batch_cfg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_matches_stock_pipeline_and_restores_it(dtype, batch_cfg):
    pipe = build_tiny_pipeline(seed=0, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    ref, ref1, ref2 = latents(pipe), latents(pipe, cfg=1.0), latents(pipe, n=2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for sched in (None, pipe.scheduler):
        state = speed.enable_fast_path(tr, compile=False, scheduler=sched, batch_cfg=batch_cfg)
        assert speed.is_fast(tr)
        assert type(tr.transformer_blocks[0].attn.processor) is speed.QwenRealRopeAttnProcessor
        assert rel(latents(pipe), ref) < tol
        assert rel(latents(pipe, cfg=1.0), ref1) < tol
        assert rel(latents(pipe, n=2), ref2) < tol
        assert state.stats["forwards"] == 8 + 4 + 8  # the pipeline's calls
        # With batch_cfg: the first CFG image learns the negative text at step 1 and pairs steps 2-4; the image
        # without CFG pairs its step 1 with that text in vain, then runs alone; the batch of two (a new shape)
        # learns again at step 1. The pipeline is called directly here: generate() says whether CFG is on.
        assert state.stats["cfg_pairs"] == (3 + 1 + 3 if batch_cfg else 0)
        computed = 5 + 4 + 5 if batch_cfg else 8 + 4 + 8
        if sched is None:  # CFG: the second pass of each step reuses the first pass's modulation
            assert state.stats["modulation_reused"] == (1 + 0 + 1 if batch_cfg else 4 + 0 + 4)
        else:  # every step's modulation comes from the table built at the image's first step
            assert state.stats["modulation_from_schedule"] == computed
        speed.disable_fast_path(tr)
        assert not speed.is_fast(tr)
        assert type(tr.transformer_blocks[0].attn.processor) is QwenDoubleStreamAttnProcessor2_0
        assert "forward" not in tr.__dict__ and "forward" not in tr.transformer_blocks[0].__dict__
        assert torch.equal(latents(pipe), ref)


def test_batched_cfg_is_exact_per_sample_and_only_pairs_the_pipelines_pattern():
    """The pair forward equals two separate forwards (float32: to rounding), a stored second output is only
    handed to the same latents (unchanged), timestep and negative text, and a text that comes alone runs
    alone."""
    pipe = build_tiny_pipeline(seed=0)
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 64, generator=g)
    cond, uncond = torch.randn(1, 9, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    t = torch.full((1,), 0.7)
    shapes = [[(1, 8, 8)]]
    y = torch.randn(1, 64, 64, generator=g)
    z = torch.randn(1, 64, 64, generator=g)

    def call(h, text, at=t):
        return tr(
            hidden_states=h, encoder_hidden_states=text, timestep=at, img_shapes=shapes, return_dict=False
        )[0]

    with torch.no_grad():
        ref_c, ref_u = call(x, cond), call(x, uncond)
        ref_moved_u = call(x + 0.25, uncond)  # stock, on the latents after an in-place change of value
        ref_later_u = call(x + 0.25, uncond, torch.full((1,), 0.4))  # stock, at another timestep
        ref_zc = call(z, cond)
        state = speed.enable_fast_path(tr, compile=False)
        try:
            assert rel(call(x, cond), ref_c) < 1e-5 and rel(call(x, uncond), ref_u) < 1e-5  # learns the pair
            assert state.cfg_guess is uncond and state.stats["cfg_pairs"] == 0
            out_c = call(x, cond)  # computes both
            assert state.stats["cfg_pairs"] == 1 and state.cfg_stash is not None
            assert (
                rel(out_c, ref_c) < 1e-5 and rel(call(x, uncond.clone()), ref_u) < 1e-5
            )  # equal values: stored
            assert state.cfg_stash is None and state.stats["cfg_pairs"] == 1
            call(x, cond)
            x.add_(0.25)  # the latents changed in value, in place: the stored half must not be used
            assert rel(call(x, uncond), ref_moved_u) < 1e-5 and state.stats["cfg_pairs"] == 2
            speed.disable_fast_path(tr)
            state = speed.enable_fast_path(tr, compile=False)  # a fresh state for the next checks
            call(x, cond), call(x, uncond)  # learns
            other = torch.randn(1, 3, 32, generator=g)
            x = x.clone()  # the next step's latents (a new tensor, as the scheduler makes)
            call(x, cond)  # paired with the known negative text...
            assert state.stats["cfg_pairs"] == 1 and state.cfg_stash is not None
            want = call(x.clone(), other)  # ...but another text on other latents is computed, not taken
            x = x.clone()
            assert state.stats["cfg_pairs"] == 2  # (that text, on new latents, was paired with the negative)
            call(x, cond)  # paired at t=0.7; the second pass comes at another timestep: computed there
            assert state.stats["cfg_pairs"] == 3
            assert rel(call(x, uncond, torch.full((1,), 0.4)), ref_later_u) < 1e-5
            speed.disable_fast_path(tr)
            assert rel(want, call(x, other)) < 1e-5
            state = speed.enable_fast_path(tr, compile=False)
            call(x, cond), call(x, uncond)  # learns
            call(y, cond)  # paired in vain: no second pass follows on y
            assert state.stats["cfg_pairs"] == 1
            assert rel(call(z, cond), ref_zc) < 1e-5
            assert state.cfg_solo is cond and state.cfg_stash is None  # cond now runs alone
            assert state.stats["cfg_pairs"] == 1  # computed alone, not paired
            call(z, uncond)  # ...until a second pass follows it
            assert state.cfg_solo is None
            state.cfg_solo = None
            with speed.expect_cfg(tr, False):  # what generate() says for an image without CFG
                call(y, cond)
                assert state.cfg_stash is None  # not paired
            assert state.cfg_hint is None
            call(
                torch.randn(1, 64, 64, generator=g), cond.clone()
            )  # a new prompt: paired with the known negative
            assert state.cfg_stash is not None
        finally:
            speed.disable_fast_path(tr)


def test_generate_tells_the_fast_path_when_cfg_is_off():
    from qwennb.generation import generate

    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    state = speed.enable_fast_path(p.transformer, compile=False, scheduler=p.scheduler)
    try:
        generate(p, "a red fox", steps=3, cfg=4.0, width=64, height=64, seed=1)
        assert state.stats["cfg_pairs"] == 2  # steps 2-3 (step 1 learns the negative text)
        generate(p, "a red fox", steps=3, cfg=1.0, width=64, height=64, seed=1)
        assert state.stats["cfg_pairs"] == 2 and state.cfg_hint is None  # none in vain, hint restored
        generate(p, "a blue fox", steps=3, cfg=4.0, width=64, height=64, seed=1)
        assert state.stats["cfg_pairs"] == 2 + 3  # a known negative text: every step paired
    finally:
        speed.disable_fast_path(p.transformer)


def test_modulation_cache_follows_weight_changes(pipe):
    tr = pipe.transformer
    ref = latents(pipe)
    speed.enable_fast_path(tr, compile=False)
    latents(pipe)
    with torch.no_grad():
        w = tr.transformer_blocks[0].img_mod[1].weight
        w.mul_(1.5)  # an in-place change (a LoRA fuse, a reload) bumps the version: no stale vectors
    changed = latents(pipe)
    speed.disable_fast_path(tr)
    expect = latents(pipe)
    with torch.no_grad():
        w.div_(1.5)
    assert rel(changed, expect) < 1e-5 and rel(changed, ref) > 1e-4


def test_compiled_fast_path_one_graph_for_all_lengths_and_sizes(pipe):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tr = pipe.transformer
    ref = latents(pipe)
    latents_ref_cfg1 = latents(pipe, cfg=1.0, steps=5)
    speed.enable_fast_path(tr, compile=True, backend="aot_eager", scheduler=pipe.scheduler)
    try:
        assert rel(latents(pipe), ref) < 1e-5
        assert counters["stats"]["unique_graphs"] == 1  # a CFG image needs only the pair's graph
        assert (
            tr._qwennb_fast.stats["cfg_self_pairs"] == 2
        )  # its first step's passes, each paired with itself
        latents(pipe, prompt="a much longer prompt with many more words in it than before", size=160)
        latents(pipe, size=96, cfg=1.0)  # no CFG: the single block's graph
        latents(pipe, prompt="short", size=128)
        assert counters["stats"]["unique_graphs"] == 2
        # A fresh state (no negative text known yet) and an image without CFG: one pass paired with itself,
        # then alone (not every step paired with itself).
        speed.disable_fast_path(tr)
        state = speed.enable_fast_path(tr, compile=True, backend="aot_eager", scheduler=pipe.scheduler)
        assert rel(latents(pipe, cfg=1.0, steps=5), latents_ref_cfg1) < 1e-5
        assert state.stats["cfg_self_pairs"] == 1 and state.stats["forwards"] == 5
    finally:
        speed.disable_fast_path(tr)


@needs_fp8_matmul
def test_fp8_linear_approximates_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64, generator=g)
    f = speed.FP8Linear(lin)
    assert f.weight_fp8.dtype == torch.float8_e4m3fn and f.weight_scale.shape == (1, 48)
    with torch.no_grad():
        ref = lin(x)
        out = f(x)
    assert out.shape == ref.shape
    assert 1e-4 < rel(out, ref) < 0.08  # lossy, but close


def test_fp8_path_swaps_and_restores_the_linears(pipe):
    tr = pipe.transformer
    block = tr.transformer_blocks[0]
    up = block.img_mlp.net[0].proj
    speed.enable_fast_path(tr, compile=False, fp8=True)
    try:
        assert isinstance(block.img_mlp.net[0].proj, speed.FP8Linear)
        assert isinstance(block.attn.to_q, speed.FP8Linear)
        assert type(block.img_mod[1]) is torch.nn.Linear  # modulation stays in bf16
    finally:
        speed.disable_fast_path(tr)
    assert block.img_mlp.net[0].proj is up


@needs_fp8_matmul
def test_fp8_replace_halves_the_blocks_and_runs_under_group_offload_compiled():
    """fp8="replace": every block Linear becomes fp8 (modulation as weight-only fp8), the bf16 weights are freed,
    and the compiled tuned path runs under diffusers' block-level group offload (the 24 GB arrangement)."""
    from diffusers.hooks import apply_group_offloading
    from torch._dynamo.utils import counters

    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    tr = p.transformer
    ref = latents(p)
    blocks_bytes = sum(t.numel() * t.element_size() for t in tr.transformer_blocks.parameters())
    torch._dynamo.reset()
    counters.clear()
    speed.enable_fast_path(tr, compile=True, backend="aot_eager", fp8="replace", scheduler=p.scheduler)
    block = tr.transformer_blocks[0]
    assert isinstance(block.attn.to_q, speed.FP8Linear) and isinstance(
        block.img_mod[1], speed.FP8WeightLinear
    )
    assert not any(type(m) is torch.nn.Linear for m in tr.transformer_blocks.modules())
    fp8_bytes = sum(t.numel() * t.element_size() for t in tr.transformer_blocks.parameters())
    assert fp8_bytes < 0.3 * blocks_bytes  # float32 tiny model: a quarter, plus norms and biases
    apply_group_offloading(
        tr, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    out = latents(p)
    assert torch.isfinite(out).all()
    assert 1e-4 < rel(out, ref) < 0.2  # lossy, but the same image
    latents(p, prompt="a much longer prompt with many more words in it than before")
    assert counters["stats"]["unique_graphs"] == 1  # only the CFG pair's block
    assert tr._qwennb_fast.stats["cfg_pairs"] == 3 + 4  # the second image pairs its first step too
    speed.disable_fast_path(tr) if not getattr(tr, "_diffusers_hook", None) else None
    assert isinstance(block.attn.to_q, speed.FP8Linear)  # replaced for good


def test_cache_configs_are_the_documented_ones():
    fbc, ts = speed.cache_config("first_block"), speed.cache_config("taylorseer")
    assert type(fbc).__name__ == "FirstBlockCacheConfig" and fbc.threshold == 0.05
    assert type(ts).__name__ == "TaylorSeerCacheConfig"
    assert (ts.cache_interval, ts.disable_cache_before_step, ts.max_order, ts.use_lite_mode) == (
        5,
        3,
        1,
        True,
    )
    with pytest.raises(
        ValueError, match="unknown cache mode 'bogus'; choose one of: first_block, taylorseer"
    ):
        speed.cache_config("bogus")


def test_caches_compose_with_the_fast_path(pipe):
    """Each cache on the tuned path gives what the same cache gives on stock diffusers (bounded), and TaylorSeer
    predicts steps (a bounded change from the uncached image)."""
    tr = pipe.transformer
    ref = latents(pipe, steps=8)
    stock = {}
    for mode in speed.CACHE_MODES:
        speed.apply_cache(tr, mode)
        stock[mode] = latents(pipe, steps=8)
        tr.disable_cache()
    # Measured on the tiny model: First Block Cache at 0.05 skips nothing there (its first block moves more than
    # that each step), TaylorSeer's predicted steps move the latents by 1.7%.
    assert rel(stock["first_block"], ref) < 1e-6
    assert 5e-3 < rel(stock["taylorseer"], ref) < 5e-2
    speed.enable_fast_path(tr, compile=False, scheduler=pipe.scheduler)
    try:
        for mode, bound in (("first_block", 1e-5), ("taylorseer", 2e-3)):  # measured 1.1e-6 and 4.5e-4
            speed.apply_cache(tr, mode)
            assert tr.is_cache_enabled
            assert rel(latents(pipe, steps=8), stock[mode]) < bound
            tr.disable_cache()
        speed.apply_cache(tr, "first_block")
        with pytest.raises(RuntimeError, match="before disable_fast_path"):
            speed.disable_fast_path(
                tr
            )  # the cache wraps the tuned blocks: removing them first would leave stale ones
        assert speed.is_fast(tr)
        tr.disable_cache()
        speed.disable_fast_path(tr)
        speed.apply_cache(tr, "first_block")
        with pytest.raises(RuntimeError, match="before diffusers hooks"):
            speed.enable_fast_path(tr, compile=False)
        assert not speed.is_fast(tr)
        tr.disable_cache()
    finally:
        if getattr(tr, "is_cache_enabled", False):
            tr.disable_cache()
        speed.disable_fast_path(tr)
    with pytest.raises(ValueError, match="fp8 must be"):
        speed.enable_fast_path(tr, compile=False, fp8="bogus")
    assert not speed.is_fast(tr)
    assert torch.equal(latents(pipe, steps=8), ref)  # stock again, cache off


def test_a_changed_negative_prompt_is_computed_not_taken_from_the_stored_pair():
    """The tuned path pairs each first pass with the last negative prompt it saw; when the next image has another
    negative prompt, the stored half must not be handed to it (the stock result is the reference)."""
    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    negatives = ("blurry, low quality", "dark", "blurry, low quality", " ")
    refs = [latents(p, negative=n) for n in negatives]
    assert rel(refs[0], refs[1]) > 1e-3  # the negative prompt matters here: a wrong half would show
    state = speed.enable_fast_path(p.transformer, compile=False, scheduler=p.scheduler)
    try:
        for i, (negative, ref) in enumerate(zip(negatives, refs, strict=True)):
            assert rel(latents(p, negative=negative), ref) < 1e-5, (i, negative)
        # image 1 learns at step 1 (3 pairs); each later image pairs all 4 first passes with the previous
        # negative text, and a changed one is computed apart at step 1 and paired from then on.
        assert state.stats["cfg_pairs"] == 3 + 4 + 4 + 4
        assert state.stats["forwards"] == 4 * 8
    finally:
        speed.disable_fast_path(p.transformer)


def test_plan_turns_on_the_fast_path_only_where_it_applies():
    big = describe_machine(80, **H100)
    plan = make_plan(big, "qwen-image", OptimizationConfig(compile=True))
    assert plan.compile and plan.fast_path and plan.lossless and not plan.fp8_matmul
    fp8 = make_plan(big, "qwen-image", OptimizationConfig(fp8_matmul=True))
    assert fp8.fp8_matmul and fp8.fast_path and fp8.compile and not fp8.lossless
    # fp8 weights replace the bf16 ones: the transformer takes about half.
    assert fp8.estimated_peak_gpu_gb < plan.estimated_peak_gpu_gb - 15
    assert fp8.components["transformer"].storage_dtype == "float8_e4m3fn"
    # 24 GB on Hopper: fp8 matmuls (whole, or with a few streamed blocks), in the tuned path.
    small = make_plan(describe_machine(24, host_ram_gb=128, **H100), "qwen-image")
    t = small.components["transformer"]
    assert small.fp8_matmul and small.fast_path and (t.resident_blocks or 60) > 40
    streamed = make_plan(describe_machine(16, host_ram_gb=128, **H100), "qwen-image")
    assert (
        streamed.fp8_matmul
        and streamed.fast_path
        and streamed.components["transformer"].placement == "group_offload"
    )
    exact = make_plan(describe_machine(24, host_ram_gb=128, **H100), "qwen-image", {"allow_lossy": False})
    assert exact.lossless and not exact.fp8_matmul and not exact.fast_path
    ampere = dict(H100, compute_capability="8.6")
    old = make_plan(describe_machine(24, host_ram_gb=128, **ampere), "qwen-image", {"compile": True})
    assert old.compile and not old.fast_path and not old.fp8_matmul  # streamed bf16: stock regional compile
    ada = make_plan(describe_machine(80, compute_capability="8.6"), "qwen-image", {"fp8_matmul": True})
    assert not ada.fp8_matmul and any("8.9" in w for w in ada.warnings)
    with pytest.raises(PlanError, match=r"unknown cache 'bogus'; choose one of: first_block, taylorseer"):
        make_plan(big, "qwen-image", {"cache": "bogus"})


@pytest.mark.parametrize("with_schedule", [False, True])
def test_modulation_cache_follows_weight_changes_at_the_same_timestep(with_schedule):
    """The cached modulation vectors are keyed on the weights' versions too: a weight changed in place between two
    calls at the same timestep (a LoRA fused mid-session) gives the new stock output, not the stale vectors."""
    pipe = build_tiny_pipeline(seed=0)
    tr = pipe.transformer
    pipe.scheduler.set_timesteps(4, mu=0.5)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 64, 64, generator=g), torch.randn(1, 9, 32, generator=g)
    t = (pipe.scheduler.timesteps[1:2] / 1000).float()
    w = tr.transformer_blocks[0].img_mod[1].weight

    def call():
        return tr(
            hidden_states=x,
            encoder_hidden_states=text,
            timestep=t,
            img_shapes=[[(1, 8, 8)]],
            return_dict=False,
        )[0]

    with torch.no_grad():
        before = call()
        w.mul_(1.5)
        after = call()
        w.div_(1.5)
        assert rel(after, before) > 1e-3  # the change shows in the stock output
        state = speed.enable_fast_path(
            tr, compile=False, batch_cfg=False, scheduler=pipe.scheduler if with_schedule else None
        )
        try:
            with speed.expect_cfg(tr, False):
                assert rel(call(), before) < 1e-5
                w.mul_(1.5)
                assert rel(call(), after) < 1e-5
                w.div_(1.5)
                assert rel(call(), before) < 1e-5
            key = "modulation_from_schedule" if with_schedule else "modulation_reused"
            assert state.stats[key] == (3 if with_schedule else 0)
        finally:
            speed.disable_fast_path(tr)


# --------------------------------------------------------------------------- zero_cond_t (Qwen-Image-Edit-2511)


@pytest.fixture(scope="module")
def edit_tr():
    """The tiny edit stand-in's transformer (``configs/tiny-edit``: 2511's ``zero_cond_t``) and its scheduler."""
    from qwennb.stand_ins import build_tiny_edit_pipeline

    p = build_tiny_edit_pipeline(seed=0)
    assert p.transformer.config.zero_cond_t
    return p.transformer, p.scheduler


def edit_loop(tr, scheduler, refs=((1, 4, 6),), steps=4, cfg=4.0, text_len=9, dtype=torch.float32):
    """QwenImageEditPlusPipeline's denoising loop on the transformer alone (the same calls: the latents and the
    reference latents side by side, ``img_shapes`` with the references after the image, ``timestep / 1000``, the
    conditional pass then the negative one on the same input tensor, the norm-preserving CFG), on small random
    inputs: the final latents."""
    g = torch.Generator().manual_seed(0)
    shapes = [[(1, 8, 8), *refs]]
    n_ref = sum(f * h * w for f, h, w in refs)
    x = torch.randn(1, 64, 64, generator=g).to(dtype)
    ref_latents = torch.randn(1, n_ref, 64, generator=g).to(dtype)
    cond = torch.randn(1, text_len, 32, generator=g).to(dtype)
    uncond = torch.randn(1, 3, 32, generator=g).to(dtype)
    scheduler.set_timesteps(steps, mu=0.5)
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = torch.cat([x, ref_latents], dim=1)
            ts = t.expand(1).to(dtype) / 1000

            def call(text, inp=inp, ts=ts):
                out = tr(
                    hidden_states=inp,
                    encoder_hidden_states=text,
                    timestep=ts,
                    img_shapes=shapes,
                    return_dict=False,
                )[0]
                return out[:, :64]

            pred = call(cond)
            if cfg > 1:
                neg = call(uncond)
                comb = neg + cfg * (pred - neg)
                pred = comb * (pred.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
            x = scheduler.step(pred, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("with_schedule", [False, True])
@pytest.mark.parametrize("batch_cfg", [False, True])
def test_zero_cond_t_takes_the_tuned_path_and_matches_stock(edit_tr, batch_cfg, with_schedule):
    """A zero_cond_t transformer (2511) runs the tuned path (modulation cached, from the schedule's table, CFG
    pairs) and ends on stock's final latents to float32 rounding: one reference, two of other sizes, no CFG."""
    tr, sched = edit_tr
    cases = [dict(), dict(refs=((1, 4, 6), (1, 6, 2)), text_len=5), dict(cfg=1.0)]
    refs = [edit_loop(tr, sched, **c) for c in cases]
    state = speed.enable_fast_path(
        tr, compile=False, batch_cfg=batch_cfg, scheduler=sched if with_schedule else None
    )
    try:
        for case, ref in zip(cases, refs, strict=True):
            assert rel(edit_loop(tr, sched, **case), ref) < 1e-5, case  # measured 1.2e-6
        assert state.stats["forwards"] == 8 + 8 + 4  # every call on the tuned path, none given to stock
        # With batch_cfg the first image learns the negative text at step 1 and pairs steps 2-4; the second (other
        # inputs, so another negative text) pairs its step 1 with the first's in vain, learns, then pairs steps 2-4;
        # the image without CFG pairs its step 1 in vain, then runs alone.
        assert state.stats["cfg_pairs"] == (3 + 4 + 1 if batch_cfg else 0)
        if with_schedule:
            assert state.stats["modulation_from_schedule"] == (5 + 5 + 4 if batch_cfg else 8 + 8 + 4)
        else:  # a negative pass computed alone reuses its step's vectors
            assert state.stats["modulation_reused"] == (1 + 1 + 0 if batch_cfg else 4 + 4 + 0)
    finally:
        speed.disable_fast_path(tr)


def test_zero_cond_t_bfloat16_matches_stock(edit_tr):
    tr, sched = edit_tr
    tr.to(torch.bfloat16)
    try:
        ref = edit_loop(tr, sched, dtype=torch.bfloat16)
        speed.enable_fast_path(tr, compile=False, scheduler=sched)
        try:
            assert (
                rel(edit_loop(tr, sched, dtype=torch.bfloat16), ref) < 2e-2
            )  # as text-to-image's bf16 bound
        finally:
            speed.disable_fast_path(tr)
    finally:
        tr.to(torch.float32)


@pytest.mark.parametrize("with_schedule", [False, True])
def test_zero_cond_t_reference_tokens_are_modulated_at_t0(edit_tr, monkeypatch, with_schedule):
    """Every output token of one forward, the reference images' included (the pipeline drops them, but they are
    where t=0 acts first), equals stock's to rounding, alone and in a CFG pair; a variant that modulates the
    references at t (diffusers' ``modulate_index`` all zeros) misses by far more than the tolerance."""
    tr, sched = edit_tr
    sched.set_timesteps(4, mu=0.5)
    g = torch.Generator().manual_seed(1)
    shapes = [[(1, 8, 8), (1, 4, 6)]]
    x = torch.randn(1, 64 + 24, 64, generator=g)
    cond, uncond = torch.randn(1, 9, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    t = (sched.timesteps[1:2] / 1000).float()

    def call(text):
        return tr(
            hidden_states=x, encoder_hidden_states=text, timestep=t, img_shapes=shapes, return_dict=False
        )[0]

    with torch.no_grad():
        ref_c, ref_u = call(cond), call(uncond)
        state = speed.enable_fast_path(tr, compile=False, scheduler=sched if with_schedule else None)
        try:
            assert rel(call(cond), ref_c) < 1e-5 and rel(call(uncond), ref_u) < 1e-5  # alone; learns the pair
            out_c = call(cond)  # the pair
            assert state.stats["cfg_pairs"] == 1
            assert rel(out_c, ref_c) < 1e-5 and rel(call(uncond), ref_u) < 1e-5  # measured 2-3e-6
            speed.disable_fast_path(tr)
            real = speed.FastPathState.modulate_index
            monkeypatch.setattr(
                speed.FastPathState, "modulate_index", lambda self, s, d: real(self, s, d) * 0
            )
            speed.enable_fast_path(tr, compile=False, scheduler=sched if with_schedule else None)
            with speed.expect_cfg(tr, False):
                wrong = call(cond)
            assert rel(wrong[:, 64:], ref_c[:, 64:]) > 1e-3  # measured 1.7e-2: 5000 times the error above
        finally:
            speed.disable_fast_path(tr)


def test_zero_cond_t_compiles_one_graph_for_every_reference_size(edit_tr):
    """The compiled tuned path (aot_eager on the CPU) on a zero_cond_t transformer: stock's latents, and one pair
    graph for other reference sizes and counts and prompt lengths (``modulate_index`` marked dynamic with them)."""
    from torch._dynamo.utils import counters

    tr, sched = edit_tr
    cases = [dict(), dict(refs=((1, 4, 6), (1, 6, 2)), text_len=5), dict(refs=((1, 2, 2),), text_len=12)]
    refs = [edit_loop(tr, sched, **c) for c in cases]
    ref_solo = edit_loop(tr, sched, cfg=1.0)
    torch._dynamo.reset()
    counters.clear()
    speed.enable_fast_path(tr, compile=True, backend="aot_eager", scheduler=sched)
    try:
        for case, ref in zip(cases, refs, strict=True):
            assert rel(edit_loop(tr, sched, **case), ref) < 1e-5, case
        assert counters["stats"]["unique_graphs"] == 1  # the pair's block only
        assert rel(edit_loop(tr, sched, cfg=1.0), ref_solo) < 1e-5
        assert counters["stats"]["unique_graphs"] == 2  # and the single block's
    finally:
        speed.disable_fast_path(tr)
