"""The plan's cost model against the GPU runs recorded in benchmarks/results (H100 and H200).

Each constant is recomputed from the recorded measurements and must agree within 5%, so a 7% drift of any of
them (a typo, a "round number", a change made without remeasuring) fails here; and every recorded arrangement's
time and GPU peak, priced by ``qwennb.plan.cost``, must land within the issue's targets (±25% s/step, 15% peak).
"""

import json
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import qwennb.plan as P
from qwennb.models import load_config
from qwennb.plan import Arrangement, cost, describe_machine, setting, transformer_flops

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
TIERS = json.loads((RESULTS / "memory-tiers-nvidia-h100-80gb-hbm3.json").read_text())["tiers"]
SPEED = json.loads((RESULTS / "speed-nvidia-h100-80gb-hbm3.json").read_text())
H200 = json.loads((RESULTS / "anchor-nvidia-h200.json").read_text())["runs"]
GIB = 1024**3
TOL = 0.05  # a constant may sit this far from what the records give; a 7% drift fails


def h100(cap: float = 80, host: float = 125):
    hw = describe_machine(
        cap, compute_capability="9.0", sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5, host_ram_gb=host
    )
    return setting(hw, "qwen-image")


def close(model: float, recorded: float, tol: float = TOL) -> bool:
    return abs(model / recorded - 1) <= tol


def speed_rows(config: str, cfg: float = 4.0, size: int = 1024, steps: int = 20) -> list[float]:
    rows = [
        r
        for r in SPEED["runs"]
        if r["config"] == config and r["cfg"] == cfg and r["width"] == size and r.get("steps", steps) == steps
    ]
    return [r["s_per_step"] for r in rows]


def test_speed_records_are_read():
    assert speed_rows("stock") and speed_rows("qwennb") and speed_rows("qwennb+fp8")


def test_reference_flops_are_two_forwards_at_1024():
    flops = 2 * transformer_flops(load_config("qwen-image", "transformer"), 1024, 1024) / 1e12
    assert abs(flops - P.REF_STEP_TFLOP) < 0.01


def test_nominal_rate_is_the_h100s():
    assert abs(h100().tflops - P.H100_TFLOPS) < 0.1


def test_stock_step_matches_the_records():
    recorded = speed_rows("stock") + [t["s_per_step"] for t in TIERS if t["overrides"] == {"compile": False}]
    assert close(P.STOCK_S_PER_STEP, statistics.median(recorded))
    eager = cost(Arrangement(tuned=False), h100())
    assert close(eager.s_per_step, statistics.median(recorded))


def test_tuned_step_matches_the_records():
    recorded = speed_rows("qwennb") + [
        r["s_per_step"] for r in H200 if r["config"] == "qwennb default" and r["cfg"] == 4
    ]
    assert close(P.TUNED_S_PER_STEP, statistics.median(recorded))
    assert close(cost(Arrangement(), h100()).s_per_step, statistics.median(recorded))
    # the tiers runs' uncapped rows (4-step medians, another harness) agree within the issue's 25%
    for t in TIERS:
        if t["cap_gb"] == 80 and not t["overrides"]:
            assert close(P.TUNED_S_PER_STEP, t["s_per_step"], 0.25)


def test_fp8_step_matches_the_records():
    recorded = speed_rows("qwennb+fp8") + [
        r["s_per_step"] for r in H200 if r["config"] == "qwennb mode=turbo"
    ]
    fp8 = cost(Arrangement("gpu", "float8_e4m3fn", "float8"), h100())
    assert close(fp8.s_per_step, statistics.median(recorded), 0.07)  # H100 0.208, H200 0.194
    assert close(P.FP8_S_PER_STEP, speed_rows("qwennb+fp8")[0])


def test_gemm_share_matches_the_profile():
    kinds = SPEED["profiles"]["qwennb"]["by_kind_ms"]
    assert close(P.GEMM_SHARE, kinds["gemm"] / sum(kinds.values()))


def test_offload_constants_refit_from_the_capped_runs():
    """Refit the hooks' cost (fixed + per streamed block) on the batched capped runs; the constants must agree."""
    runs = [
        (t["resident_blocks"], t["s_per_step"]) for t in TIERS if t["run"] in "CD" and t["resident_blocks"]
    ]
    runs += [(r["resident_blocks"], r["s_per_step"]) for r in H200 if r.get("resident_blocks")]
    assert len(runs) == 7
    st = h100()
    rows, left = [], []
    for resident, measured in runs:
        c = cost(Arrangement("group_offload", "float8_e4m3fn", "float8", resident, "group_offload"), st)
        rows.append([1.0, 60 - resident])
        left.append(measured - c.compute_s - c.stream_s)
    fixed, per_block = np.linalg.lstsq(np.array(rows), np.array(left), rcond=None)[0]
    assert close(P.OFFLOAD_STEP_S, fixed)
    assert close(P.OFFLOAD_BLOCK_S, per_block)


def test_text_encoder_and_decode_constants_match_the_records():
    st = h100()
    resident = statistics.mean(t["text_encoding_s"] for t in TIERS if t["cap_gb"] == 80)
    streamed = statistics.mean(t["text_encoding_s"] for t in TIERS if t["cap_gb"] < 80)
    copy = st.sizes["text_encoder"].gib(2) * GIB / (st.h2d_gbps * 1e9)
    assert close(P.TEXT_ENCODE_S, resident)
    assert close(P.TEXT_STREAM_FIXED_S, streamed - resident - copy)
    assert close(cost(Arrangement(text_encoder="group_offload"), st).text_s, streamed)
    whole = statistics.mean(t["decode_s"] for t in TIERS if t["cap_gb"] >= 24)
    tiled = statistics.mean(t["decode_s"] for t in TIERS if t["cap_gb"] < 24)
    assert close(P.DECODE_S_PER_MP * 1.048576, whole)
    assert close(P.TILED_DECODE_SLOWDOWN, tiled / whole)


def test_upcast_constant_matches_the_layerwise_run():
    """Run B's 24 GB row without fp8 matmuls: stock eager + offload hooks + two upcasts of the Linear weights."""
    row = next(t for t in TIERS if t["overrides"] == {"fp8_matmul": False})
    n = 60 - row["resident_blocks"]
    hooks = P.OFFLOAD_STEP_S + 2 * n * P.OFFLOAD_BLOCK_S
    upcast = (row["s_per_step"] - P.STOCK_S_PER_STEP - hooks) / 2
    linear = h100().sizes["transformer"].linear_params / 1e9
    assert close(P.UPCAST_S_PER_GPARAM * linear, upcast)


def _recorded_arrangement(t: dict) -> Arrangement:
    text = "group_offload" if "text encoder streamed" in t["arrangement"] else "gpu"
    tiled = "VAE tiled" in t["arrangement"]
    if t["resident_blocks"] is None:
        return Arrangement("gpu", "bfloat16", "bfloat16", None, text, tiled, t["fast_path"])
    fp8mm = t["fp8_matmul"]
    return Arrangement(
        "group_offload",
        "float8_e4m3fn",
        "float8" if fp8mm else "bfloat16",
        t["resident_blocks"],
        text,
        tiled,
        fp8mm,
    )


@pytest.mark.parametrize(
    "t", [t for t in TIERS if t["run"] in "BCD"], ids=lambda t: f"{t['run']}-{t['cap_gb']:g}"
)
def test_every_recorded_arrangement_within_the_targets(t):
    """±25% s/step and 15% GPU peak for every run of the current code (runs C, D; B for layerwise fp8 and 48 GB)."""
    if t["run"] == "B" and t["fp8_matmul"]:
        pytest.skip("run B's fp8-matmul rows ran CFG's passes apart (before batching)")
    c = cost(_recorded_arrangement(t), h100(t["cap_gb"]))
    assert abs(c.s_per_step / t["s_per_step"] - 1) <= 0.25
    assert abs(c.gpu_peak_gb / t["measured_peak_gb"] - 1) <= 0.15


def test_the_h200_cap_within_the_targets():
    run = next(r for r in H200 if r.get("resident_blocks"))
    c = cost(Arrangement("group_offload", "float8_e4m3fn", "float8", 54, "group_offload"), h100(24, 128))
    assert abs(c.s_per_step / run["s_per_step"] - 1) <= 0.10
    assert abs(c.gpu_peak_gb / run["peak_gb"] - 1) <= 0.15


def test_mean_error_over_the_capped_runs_is_small():
    errs = []
    for t in TIERS:
        if t["run"] in "CD" and t["resident_blocks"]:
            c = cost(_recorded_arrangement(t), h100(t["cap_gb"]))
            errs.append(c.s_per_step / t["s_per_step"] - 1)
    assert abs(statistics.mean(errs)) < 0.03 and max(map(abs, errs)) < 0.10


# --------------------------------------------------------------------------- plan validation on the H200
VALIDATION = json.loads((RESULTS / "plan-validation-nvidia-h200.json").read_text())["runs"]
MEASURED = [r for r in VALIDATION if not r.get("reused_from") and r.get("measured_s_per_step")]


def h200(cap: float, host: float):
    return describe_machine(
        cap, compute_capability="9.0", sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5, host_ram_gb=host
    )


def _validation_arrangement(r: dict) -> Arrangement:
    text = {"gpu": "gpu", "group_offload": "group_offload", "cpu": "cpu"}[r["text_encoder"]]
    tiled = "VAE tiled" in r["arrangement"]
    if r["resident_blocks"] is None:
        storage = "float8_e4m3fn" if r["fp8_matmul"] else "bfloat16"
        return Arrangement("gpu", storage, "float8" if r["fp8_matmul"] else "bfloat16", None, text, tiled)
    a = Arrangement("group_offload", "float8_e4m3fn", "float8", r["resident_blocks"], text, tiled)
    st = setting(h200(r["cap_gb"], r["host_budget_gb"]), "qwen-image")
    # as the plan decides it: pinned when the pinned copies fit the host's share for them
    return replace(a, pinned=cost(a, st).host_peak_gb <= P.HOST_PIN_SHARE * st.host_gb)


def test_pageable_rate_refits_from_the_pageable_validation_runs():
    """The three streamed H200 runs under a 32 GB host budget streamed pageable weights (too little RAM to pin
    them): what they took beyond compute and hooks, over the bytes streamed, is PAGEABLE_GBPS."""
    rates = []
    for r in MEASURED:
        if r["resident_blocks"] is None or _validation_arrangement(r).pinned:
            continue
        st = setting(h200(r["cap_gb"], r["host_budget_gb"]), "qwen-image")
        c = cost(_validation_arrangement(r), st)
        rates.append(
            c.streamed_gb_per_step * GIB / (r["measured_s_per_step"] - c.compute_s - c.offload_s) / 1e9
        )
    assert len(rates) == 3
    assert close(P.PAGEABLE_GBPS, statistics.mean(rates))


def test_pinned_streaming_rows_were_measured_and_hide_their_copies():
    """The three streamed H200 runs under a 64 GB host budget kept their blocks pinned: measured within ±25% of a
    model where the copies (up to 15 GB a step) hide under compute, far from the pageable rate's 5 s a step."""
    pinned = [r for r in MEASURED if r["resident_blocks"] is not None and _validation_arrangement(r).pinned]
    assert sorted((r["cap_gb"], r["host_budget_gb"]) for r in pinned) == [(8, 64), (12, 64), (16, 64)]
    for r in pinned:
        st = setting(h200(r["cap_gb"], r["host_budget_gb"]), "qwen-image")
        c = cost(_validation_arrangement(r), st)
        pageable = cost(replace(_validation_arrangement(r), pinned=False), st)
        assert abs(c.s_per_step / r["measured_s_per_step"] - 1) <= 0.25
        assert r["measured_s_per_step"] < 0.25 * pageable.s_per_step


def test_cpu_rate_refits_from_the_cpu_text_encoder_run():
    r = next(r for r in MEASURED if r["text_encoder"] == "cpu")
    te = h200(r["cap_gb"], r["host_budget_gb"])
    params = setting(te, "qwen-image").sizes["text_encoder"].params
    assert close(P.CPU_TFLOPS, 2 * 2 * params * P.TEXT_TOKENS / r["text_encoding_s"] / 1e12)


@pytest.mark.parametrize("r", MEASURED, ids=lambda r: f"{r['cap_gb']:g}-{r['host_budget_gb']:g}")
def test_every_validation_run_within_the_targets_with_the_current_constants(r):
    """±25% s/step, 15% GPU peak, host RSS at most the estimate + 10%; and the plan still picks that arrangement."""
    plan = P.make_plan(
        h200(r["cap_gb"], r["host_budget_gb"]), "qwen-image-synthetic", width=1024, height=1024
    )
    assert plan.arrangement == r["arrangement"]
    assert abs(plan.predicted_s_per_step / r["measured_s_per_step"] - 1) <= 0.25
    assert abs(plan.estimated_peak_gpu_gb / r["measured_peak_gb"] - 1) <= 0.15
    assert r["measured_host_rss_gb"] <= plan.estimated_host_ram_gb * 1.10


def test_readme_card_table_is_what_the_model_predicts():
    """README's table of cards is `python scripts/card_table.py`'s output: a change to the model shows there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "card_table", RESULTS.parents[1] / "scripts" / "card_table.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (RESULTS.parents[1] / "README.md").read_text()
    for row in mod.rows():
        assert row in readme, row


# --------------------------------------------------------------------------- Qwen-Image-2.1's plans on the H200
V21 = json.loads((RESULTS / "plan-validation-qwen-image-2-1-synthetic-nvidia-h200.json").read_text())["runs"]
# measured with the GPU to itself, an arrangement the plan still picks
V21_NOW = [r for r in V21 if not r.get("gpu_shared") and r.get("chosen_now", True)]


def plan21(r: dict, **kw) -> P.Plan:
    return P.make_plan(
        h200(r["cap_gb"], r["host_budget_gb"]), "qwen-image-2.1-synthetic", width=1024, height=1024, **kw
    )


def test_2_1_validation_rows_cover_every_cap_alone():
    assert sorted({r["cap_gb"] for r in V21_NOW}) == [12, 16, 80]
    assert all(not r["oom"] for r in V21)


@pytest.mark.parametrize("r", V21_NOW, ids=lambda r: f"{r['cap_gb']:g}-{r['host_budget_gb']:g}")
def test_every_2_1_validation_run_within_the_targets_with_the_current_constants(r):
    """±25% s/step, the GPU peak never above the estimate, and the plan still picks that arrangement."""
    plan = plan21(r)
    assert plan.arrangement == r["arrangement"]
    assert abs(plan.predicted_s_per_step / r["measured_s_per_step"] - 1) <= 0.25
    assert r["measured_peak_gb"] <= plan.estimated_peak_gpu_gb * 1.02


def test_2_1_group_offload_hides_no_copies(monkeypatch):
    """2.1's group-offload rows are compute + hooks + every copy: with the copies hidden under compute (the
    Qwen-Image constant) the bf16 rows were predicted 30-35% fast; counted, within 13%."""
    streamed = [r for r in V21 if r["resident_blocks"] is not None and not r.get("gpu_shared")]
    assert len(streamed) == 3
    assert P.STREAM_OVERLAP_BY_CLASS["QwenImage21Transformer2DModel"] == 0.0
    now = {(r["cap_gb"], r["host_budget_gb"]): plan21(r).predicted_s_per_step for r in streamed}
    monkeypatch.setattr(P, "STREAM_OVERLAP_BY_CLASS", {})
    hidden = {(r["cap_gb"], r["host_budget_gb"]): plan21(r).predicted_s_per_step for r in streamed}
    for r in streamed:
        key = (r["cap_gb"], r["host_budget_gb"])
        if r.get("chosen_now", True):
            assert abs(now[key] / r["measured_s_per_step"] - 1) <= 0.15
        if "bf16" in r["arrangement"] and r.get("chosen_now", True):
            assert hidden[key] / r["measured_s_per_step"] - 1 < -0.25


def test_2_1_speed_constants_are_the_medians_of_the_recorded_runs():
    """The plan's reason quotes 2.1's tuned and stock s/step: the medians of every same-run record on the H200."""
    rec = json.loads((RESULTS / "speed21-nvidia-h200.json").read_text())
    runs = [rec["runs"], *(r["runs"] for r in rec.get("rounds", {}).values())]
    # runs whose plain row had FlashAttention-4 (the plan's default with flash-attn-4 installed) are labelled so and
    # left out: the plan's estimate is the cuDNN path's
    runs = [rows for rows in runs if any(r["config"] == "qwennb" for r in rows)]
    tuned = [next(r["s_per_step"] for r in rows if r["config"] == "qwennb") for rows in runs]
    stock = [next(r["s_per_step"] for r in rows if r["config"] == "stock") for rows in runs]
    assert len(runs) >= 4
    assert close(P.SPEED21_S_PER_STEP, statistics.median(tuned), 0.01)
    assert close(P.SPEED21_STOCK_S_PER_STEP, statistics.median(stock), 0.01)
