"""FlashAttention-4 as SDPA's kernel (qwennb.attention) and the plan's choice of it.

The kernels themselves need a Hopper or Blackwell card (measured on an H200: benchmarks/results/attention-*.md);
here: what the switch does to PyTorch's process state, the compile caches' key, the adapter between PyTorch's
registration and flash-attn-4, and the plan's decision on described machines.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from qwennb import attention
from qwennb.errors import PlanError
from qwennb.plan import describe_machine, make_plan


@pytest.fixture
def fake_fa4(monkeypatch):
    """FA4 reported available and PyTorch's registration recorded instead of run (no FA4 kernels on a CPU); the
    rest (SDPA's backend flags, torch.compile's cache-key tag) is PyTorch's real state, put back afterwards."""
    calls = []
    monkeypatch.setattr(attention, "flash4_unavailable", lambda device=None: None)
    monkeypatch.setattr(attention, "_activate", lambda: calls.append("activate"))
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    from torch.compiler import config

    tag = config.cache_key_tag
    yield calls
    attention._state.clear()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    config.cache_key_tag = tag


def test_this_machine_says_what_is_missing_in_one_line():
    assert attention.flash4_unavailable() == "no CUDA GPU"
    with pytest.raises(RuntimeError, match="not available: no CUDA GPU"):
        attention.enable_flash4()
    assert not attention.flash4_active()
    missing = attention.flash4_missing()
    if missing is None:
        pytest.skip("flash-attn-4 is installed here")
    assert "\n" not in missing
    from torch.nn.attention import list_flash_attention_impls

    if "FA4" in list_flash_attention_impls():
        assert missing == "the flash-attn-4 package is not installed (pip install flash-attn-4)"


def test_flash_attn_4_is_found_on_disk_without_importing_flash_attn(tmp_path, monkeypatch):
    """detect() runs at %load_ext: finding flash-attn-4 must not import ``flash_attn`` (FA2's CUDA extension where
    both are installed). Here its ``__init__`` raises if it is ever imported."""
    from torch.nn.attention import list_flash_attention_impls

    if "FA4" not in list_flash_attention_impls():
        pytest.skip("this PyTorch does not register FA4")
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('flash_attn was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert (
        attention.flash4_missing() == "the flash-attn-4 package is not installed (pip install flash-attn-4)"
    )
    (pkg / "cute").mkdir()
    assert attention.flash4_missing() is None
    assert "flash_attn" not in sys.modules


def test_capability():
    assert [attention.capability_supported(m) for m in (7, 8, 9, 10, 12)] == [False, False, True, True, False]


def test_enable_turns_cudnn_off_tags_the_compile_caches_and_disable_puts_both_back(fake_fa4):
    from torch.compiler import config

    config.cache_key_tag = "user-tag"
    torch.backends.cuda.enable_cudnn_sdp(True)
    attention.enable_flash4()
    assert fake_fa4 == ["activate"]
    assert attention.flash4_active()
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # SDPA's choice falls to flash, i.e. FA4
    assert config.cache_key_tag == "user-tag+qwennb-fa4"  # the user's own tag kept
    attention.enable_flash4()  # a second call changes nothing
    assert fake_fa4 == ["activate"] and config.cache_key_tag == "user-tag+qwennb-fa4"
    attention.disable_flash4()
    assert not attention.flash4_active()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert config.cache_key_tag == "user-tag"
    attention.disable_flash4()  # nothing to undo
    assert config.cache_key_tag == "user-tag"


def test_disable_keeps_cudnn_off_when_the_user_had_it_off(fake_fa4):
    torch.backends.cuda.enable_cudnn_sdp(False)
    attention.enable_flash4()
    attention.disable_flash4()
    assert not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU code needs a C++ compiler")
def test_the_tag_keeps_graphs_compiled_before_out_of_the_cache(fake_fa4, tmp_path, monkeypatch):
    """What an H200 run showed: a graph traced with cuDNN came back from torch.compile's cache after FA4 was
    turned on. With the tag, the same function compiles afresh (a miss) instead of hitting the cache."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", True)
    x = torch.randn(1, 2, 8, 16)

    def compiled() -> dict:
        torch._dynamo.reset()
        counters.clear()
        torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend="inductor")(x)
        c = dict(counters["inductor"]) | {k: v for k, v in counters["aot_autograd"].items()}
        return c

    def hit(c: dict) -> bool:
        return c.get("fxgraph_cache_hit", 0) + c.get("autograd_cache_hit", 0) > 0

    assert not hit(compiled())  # first compile: nothing cached
    assert hit(compiled())  # the same again: from the cache
    attention.enable_flash4()
    assert not hit(compiled())  # FA4 on: traced afresh
    attention.disable_flash4()
    assert hit(compiled())  # FA4 off again: the first graph


def test_the_adapter_gives_pytorch_the_two_values_it_unpacks(monkeypatch):
    """flash-attn-4 betas from late 2026 return (out, lse, p, row_max, o_lo); PyTorch 2.10-2.12 unpack two."""
    iface = types.ModuleType("flash_attn.cute.interface")
    iface._flash_attn_fwd = lambda q, k, v, **kw: ("out", "lse", "p", "row_max", "o_lo")
    iface._flash_attn_bwd = lambda *a, **kw: ("dq", "dk", "dv")
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = iface
    pkg = types.ModuleType("flash_attn")
    pkg.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", iface)
    monkeypatch.delitem(sys.modules, "qwennb._fa4_compat", raising=False)
    from qwennb import _fa4_compat

    assert _fa4_compat._flash_attn_fwd(1, 2, 3, return_lse=True) == ("out", "lse")
    assert _fa4_compat._flash_attn_bwd() == ("dq", "dk", "dv")
    iface._flash_attn_fwd = lambda q, k, v, **kw: ("out", "lse")  # the older two-value form passes as it is
    assert _fa4_compat._flash_attn_fwd(1, 2, 3) == ("out", "lse")
    monkeypatch.delitem(sys.modules, "qwennb._fa4_compat", raising=False)


H200 = describe_machine(gpu_memory_gb=141, compute_capability="9.0", gpu_name="NVIDIA H200")


def _fa4_reason(plan) -> list[str]:
    return [r for r in plan.reasons if "FlashAttention-4" in r]


@pytest.mark.parametrize("model", ["qwen-image", "qwen-image-2.1", "qwen-image-edit-2511"])
def test_a_hopper_with_flash_attn_4_installed_plans_fa4_by_default(model):
    hw = dataclasses.replace(H200, flash4_missing=None)
    if model.startswith("qwen-image-edit"):
        from qwennb.edit import plan_edit

        plan = plan_edit(hw, model)
    else:
        plan = make_plan(hw, model)
    assert plan.flash4
    (reason,) = _fa4_reason(plan)
    assert "default: flash-attn-4 is installed" in reason and "flash4=False" in reason


def test_the_plan_leaves_fa4_off_where_it_cannot_run_and_says_why():
    missing = "the flash-attn-4 package is not installed (pip install flash-attn-4)"
    plan = make_plan(dataclasses.replace(H200, flash4_missing=missing), "qwen-image")
    assert not plan.flash4
    assert missing in _fa4_reason(plan)[0]  # the hint: what to install
    ada = dataclasses.replace(
        describe_machine(gpu_memory_gb=48, compute_capability="8.9"), flash4_missing=None
    )
    assert not make_plan(ada, "qwen-image").flash4 and not _fa4_reason(make_plan(ada, "qwen-image"))
    cpu = describe_machine(host_ram_gb=16)
    assert not make_plan(cpu, "toy").flash4
    off = make_plan(dataclasses.replace(H200, flash4_missing=None), "qwen-image", {"flash4": False})
    assert not off.flash4 and "off (asked for)" in _fa4_reason(off)[0]
    other = make_plan(
        dataclasses.replace(H200, flash4_missing=None), "qwen-image", {"attention_backend": "_native_cudnn"}
    )
    assert not other.flash4  # the user named another kernel


def test_asking_for_fa4_where_it_cannot_run_is_one_clear_error():
    hw = dataclasses.replace(
        H200, flash4_missing="the flash-attn-4 package is not installed (pip install flash-attn-4)"
    )
    with pytest.raises(PlanError, match=r"^flash4: the flash-attn-4 package is not installed"):
        make_plan(hw, "qwen-image", {"flash4": True})
    ada = dataclasses.replace(
        describe_machine(gpu_memory_gb=48, compute_capability="8.9"), flash4_missing=None
    )
    with pytest.raises(PlanError, match="compute capability 9.x and 10.x; .* is 8.9"):
        make_plan(ada, "qwen-image", {"flash4": True})
    with pytest.raises(PlanError, match="CUDA GPU"):
        make_plan(describe_machine(host_ram_gb=16), "toy", {"flash4": True})
    with pytest.raises(PlanError, match="pick one"):
        make_plan(
            dataclasses.replace(H200, flash4_missing=None),
            "qwen-image",
            {"flash4": True, "attention_backend": "_native_cudnn"},
        )
    with pytest.raises(PlanError, match=r"^flash4 is True, False or None .*got 'yes'$"):
        make_plan(dataclasses.replace(H200, flash4_missing=None), "qwen-image", {"flash4": "yes"})
    # planning for a described machine: what is installed there is not known, so asking is taken at its word
    plan = make_plan(H200, "qwen-image", {"flash4": True})
    assert plan.flash4 and "not checked" in _fa4_reason(plan)[0]


def test_the_load_turns_fa4_on_when_planned_and_only_warns_when_it_cannot(fake_fa4, monkeypatch):
    from qwennb.pipeline import apply_attention_plan

    torch.backends.cuda.enable_cudnn_sdp(True)
    plan = make_plan(dataclasses.replace(H200, flash4_missing=None), "qwen-image")
    assert apply_attention_plan(plan) and attention.flash4_active() and fake_fa4 == ["activate"]
    attention.disable_flash4()

    def broken() -> None:
        raise ImportError("libcute_dsl_runtime.so: cannot open shared object file")

    monkeypatch.setattr(attention, "_activate", broken)
    with pytest.warns(UserWarning, match=r"could not be turned on \(libcute.*stays on SDPA's own kernel"):
        assert not apply_attention_plan(plan)
    assert not attention.flash4_active() and torch.backends.cuda.cudnn_sdp_enabled()  # nothing half-done
    off = make_plan(dataclasses.replace(H200, flash4_missing=None), "qwen-image", {"flash4": False})
    assert not apply_attention_plan(off)
