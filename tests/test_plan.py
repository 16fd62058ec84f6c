import json

import pytest

from qwennb import ModelDetectionService, OptimizationConfig
from qwennb.cli import main
from qwennb.errors import PlanError
from qwennb.models import load_config
from qwennb.plan import describe_machine, make_plan, parse_memory, transformer_flops

H100 = dict(compute_capability="9.0", sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5)
RTX4090 = dict(compute_capability="8.9", sm_count=128, max_sm_clock_mhz=2520, pcie_gen=4)


def plan_for(gb, **kw):
    host = kw.pop("host_ram_gb", 128)
    return make_plan(describe_machine(gpu_memory_gb=gb, host_ram_gb=host, **kw), "qwen-image")


@pytest.mark.parametrize("card", [H100, RTX4090, {}])
@pytest.mark.parametrize("gb", [80, 48, 24, 16, 12])
def test_every_tier_fits_its_budget(gb, card):
    plan = plan_for(gb, **card)
    assert plan.estimated_peak_gpu_gb <= plan.budget_gb < gb
    assert plan.dtype == "bfloat16"
    assert len(plan.reasons) >= 3 and all(isinstance(r, str) and r for r in plan.reasons)


def test_80gb_everything_on_gpu_without_savers():
    plan = plan_for(80, **H100)
    assert {c.placement for c in plan.components.values()} == {"gpu"}
    assert all(c.storage_dtype == "bfloat16" and c.quantization is None for c in plan.components.values())
    assert not plan.vae_tiling and not plan.vae_slicing and not plan.attention_slicing
    assert plan.lossless
    # the tuned path (on by default here) measured 0.244-0.250 s/step at 1024x1024 CFG on an H100
    assert plan.fast_path and 0.2 < plan.estimated_s_per_step < 0.3


def test_48gb_keeps_the_transformer_whole_and_streams_the_text_encoder():
    plan = plan_for(48, **H100)
    assert plan.components["transformer"].placement == "gpu"
    assert plan.components["transformer"].storage_dtype == "bfloat16"
    assert plan.components["text_encoder"].placement != "gpu"


def test_24gb_and_below_shrink_or_stream_the_transformer():
    for gb in (24, 16, 12):
        t = plan_for(gb, **H100).components["transformer"]
        assert t.placement == "group_offload" or t.storage_dtype != "bfloat16" or t.quantization
        assert t.gpu_gb < gb
    # Fewer blocks stay resident as the card shrinks.
    res = [plan_for(gb, **H100).components["transformer"].resident_blocks for gb in (24, 16, 12)]
    assert res == sorted(res, reverse=True)


def test_lossless_only_when_asked():
    plan = make_plan(
        describe_machine(24, host_ram_gb=128, **H100), "qwen-image", OptimizationConfig(allow_lossy=False)
    )
    t = plan.components["transformer"]
    assert t.storage_dtype == "bfloat16" and t.quantization is None and plan.lossless
    assert plan.estimated_peak_gpu_gb <= plan.budget_gb


def test_no_bf16_is_refused_unless_fp32_is_forced():
    with pytest.raises(PlanError, match="fp16"):
        make_plan(describe_machine(16, bf16=False), "qwen-image")
    plan = make_plan(
        describe_machine(16, bf16=False, host_ram_gb=256), "qwen-image", OptimizationConfig(force=True)
    )
    assert plan.dtype == "float32"


def test_cpu_plans_tiny_and_refuses_the_real_model_unless_forced():
    cpu = describe_machine(host_ram_gb=24)
    assert make_plan(cpu, "tiny").device == "cpu"
    with pytest.raises(PlanError, match="tiny"):
        make_plan(cpu, "qwen-image")
    with pytest.raises(PlanError, match="RAM"):
        make_plan(cpu, "qwen-image", {"force": True})
    assert make_plan(describe_machine(host_ram_gb=128), "qwen-image", {"force": True}).device == "cpu"


def test_seed_overrides_win():
    cfg = OptimizationConfig(
        enable_cpu_offload=True, optimal_steps=30, optimal_cfg_scale=4.5, enable_vae_slicing=True
    )
    plan = make_plan(describe_machine(80, **H100), "qwen-image", cfg)
    assert plan.components["transformer"].placement == "model_offload"
    assert plan.defaults["steps"] == 30 and plan.defaults["cfg"] == 4.5 and plan.vae_slicing
    assert plan.overrides["optimal_steps"] == 30
    with pytest.raises(PlanError, match="unknown plan option"):
        make_plan(describe_machine(80), "qwen-image", {"bogus": 1})
    with pytest.raises(PlanError, match="MMDiT"):
        make_plan(describe_machine(80), "qwen-image", OptimizationConfig(architecture_type="UNet"))


def test_flops_match_the_measured_count():
    assert round(transformer_flops(load_config("qwen-image", "transformer"), 1024, 1024) / 1e12, 2) == 69.57


def test_parse_memory():
    assert parse_memory("24GB") == 24 and parse_memory("24 GiB") == 24 and parse_memory("12288MB") == 12
    for bad in ("banana", "-3GB", "0"):
        with pytest.raises(PlanError):
            parse_memory(bad)


def test_plan_cli_json(capsys):
    assert (
        main(["plan", "--model", "qwen-image", "--gpu-memory", "24GB", "--host-ram", "128GB", "--json"]) == 0
    )
    d = json.loads(capsys.readouterr().out)
    for key in (
        "model",
        "dtype",
        "components",
        "attention_backend",
        "compile",
        "estimated_peak_gpu_gb",
        "defaults",
        "reasons",
    ):
        assert key in d
    for c in d["components"].values():
        assert {"placement", "storage_dtype", "quantization"} <= set(c)
    assert set(d["defaults"]) >= {"steps", "cfg", "width", "height"}
    assert d["estimated_peak_gpu_gb"] < 24


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--gpu-memory", "banana"], "memory size"),
        (["plan", "--model", "nope"], "unknown model"),
        (["plan", "--gpu-memory", "11GB", "--no-bf16"], "no bf16"),
        (["plan"], "no CUDA GPU"),
        (["plan", "--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) if "--bogus" in argv else _nothing():
        rc = main(argv)
        assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_performance_analysis_is_computed_from_the_plan():
    svc = ModelDetectionService(hardware=describe_machine(24, host_ram_gb=128, **RTX4090))
    r = svc.analyze_performance_characteristics("qwen-image")
    assert r["expected_s_per_step"] == r["plan"].estimated_s_per_step > 0
    fast = ModelDetectionService(hardware=describe_machine(80, **H100)).analyze_performance_characteristics(
        "qwen-image"
    )
    assert fast["expected_s_per_step"] < r["expected_s_per_step"]
    assert any("Edit" in w for w in svc.analyze_performance_characteristics("qwen-image-edit")["warnings"])


def test_streamed_blocks_are_spread_between_resident_ones():
    from qwennb.pipeline import resident_block_indices

    keep = resident_block_indices(60, 20)
    assert len(keep) == 20 and keep[0] == 0 and max(b - a for a, b in zip(keep, keep[1:], strict=False)) == 3
    assert resident_block_indices(60, 0) == [] and resident_block_indices(60, 99) == list(range(60))


def test_small_host_ram_pins_on_the_fly():
    def plan(host):
        hw = describe_machine(gpu_memory_gb=16, host_ram_gb=host, **H100)
        return make_plan(hw, "qwen-image", OptimizationConfig(transformer_placement="group_offload"))

    roomy = plan(256).components["transformer"]
    tight = plan(24).components["transformer"]
    assert roomy.placement == tight.placement == "group_offload"
    assert not roomy.low_cpu_mem_usage and tight.low_cpu_mem_usage
    assert tight.host_gb < roomy.host_gb


def test_plan_estimates_match_the_h100_memory_tiers():
    """The arrangements and s/step the plan gives an H100 under caps, against benchmarks/results (run C)."""
    measured = {24: 0.302, 16: 0.302, 12: 0.319}
    for cap, s_step in measured.items():
        plan = make_plan(describe_machine(cap, host_ram_gb=125, **H100), "qwen-image")
        t = plan.components["transformer"]
        assert plan.fp8_matmul and plan.fast_path and t.placement == "group_offload"
        assert abs(plan.estimated_s_per_step / s_step - 1) < 0.15
    # 48 GB: the exact arrangement (0.259 measured) stays, fp8 (0.217) is not 1.5x faster.
    plan = make_plan(describe_machine(48, host_ram_gb=125, **H100), "qwen-image")
    assert plan.lossless and not plan.fp8_matmul and plan.components["transformer"].placement == "gpu"


def test_modes_expand_to_options_and_explicit_options_win():
    big = describe_machine(80, host_ram_gb=125, **H100)
    turbo = make_plan(big, "qwen-image", {"mode": "turbo"})
    assert turbo.fp8_matmul and not turbo.lossless and any("mode 'turbo'" in r for r in turbo.reasons)
    assert not make_plan(big, "qwen-image", {"mode": "turbo", "fp8_matmul": False}).fp8_matmul
    cached = make_plan(big, "qwen-image", {"mode": "turbo-cache"})
    assert cached.cache == "taylorseer" and not cached.lossless
    exact = make_plan(describe_machine(24, host_ram_gb=125, **H100), "qwen-image", {"mode": "exact"})
    assert exact.lossless and not exact.fp8_matmul
    with pytest.raises(PlanError, match="unknown mode 'warp'; choose one of: exact, turbo, turbo-cache"):
        make_plan(big, "qwen-image", {"mode": "warp"})


def test_plan_cli_mode(capsys):
    argv = ["plan", "--gpu-memory", "24GB", "--host-ram", "128GB", "--mode", "exact", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["lossless"] and plan["overrides"]["mode"] == "exact"
