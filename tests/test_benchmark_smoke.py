"""The GPU benchmark scripts added for round 10 run on the CPU (``--smoke``) and write what their readers use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, *args):
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600
    )


def test_phase_memory_smoke_writes_each_phase(tmp_path):
    proc = run("phase_memory.py", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("phase-memory-tiny-*.json")).read_text())
    assert record["card"] == "cpu (smoke)" and record["model"] == "tiny" and record["size"] == 64
    # on a CPU nothing is measured on a device; the plan's own figures are there to compare against
    assert set(record["plan"]) == {
        "activations_gb",
        "vae_decode_gb",
        "vae_decode_tiled_gb",
        "text_encoding_gb",
    }
    assert record["phases"] == {"vae_decode_tiled": None}
    # without --smoke on a machine with no GPU: refused, nothing written
    other = tmp_path / "real"
    proc = run("phase_memory.py", "--out", str(other))
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not other.exists()


def test_toy_adherence_runs_only_the_settings_asked_for(tmp_path):
    proc = run("toy_adherence.py", "--smoke", "--out", str(tmp_path), "--settings", "qwennb exact")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("toy-adherence-*.json")).read_text())
    assert list(record["settings"]) == ["qwennb exact"] and record["n_items"] == 8
    assert record["settings"]["qwennb exact"]["score"]["all"]["n"] == 8
    bad = run("toy_adherence.py", "--smoke", "--out", str(tmp_path), "--settings", "fp8 turbo")
    assert bad.returncode == 2 and "no setting 'fp8 turbo' here" in bad.stderr  # a GPU setting, on a CPU


def test_speed21_variants_are_rows_and_a_failing_one_says_why(tmp_path):
    """speed21.py --variants: each variant is a row of its own on the same pipeline; one that cannot run (cuDNN
    attention named on a CPU) is a row with its error, and the run goes on to the next."""
    proc = run(
        "speed21.py", "--smoke", "--out", str(tmp_path), "--variants", "cudnn", "static", "fa4", "packed"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "speed21-cpu-smoke.json").read_text())
    rows = {r["config"]: r for r in record["runs"]}
    assert list(rows) == [
        "stock",
        "qwennb",
        "qwennb[cudnn]",
        "qwennb[static]",
        "qwennb[fa4]",
        "qwennb[packed]",
    ]
    assert "FlashAttention-4 is not available: no CUDA GPU" in rows["qwennb[fa4]"]["error"]
    assert rows["qwennb[packed]"]["latent_rel_err"] < 1e-5
    md = (tmp_path / "speed21-cpu-smoke.md").read_text()
    assert "| qwennb[packed] |" in md and "| qwennb[cudnn] | failed:" in md
    assert "error" in rows["qwennb[cudnn]"] and "s_per_step" not in rows["qwennb[cudnn]"]
    static = rows["qwennb[static]"]
    assert (
        static["latent_rel_err"] < 1e-5 and static["speedup_vs_stock"] > 0
    )  # the tuned path: stock's latents
    assert static["fast21"]["cfg_pairs"] > 0


def test_gemm21_writes_separate_and_packed_block_times(tmp_path):
    """gemm21.py: each GEMM of a 2.1 block a row; the block's GEMM time separate and packed; no GPU, no --smoke:
    refused, nothing written."""
    proc = run("gemm21.py", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "gemm21-cpu-smoke.json").read_text())
    assert [r["gemm"] for r in record["rows"]] == [
        "q, k, v",
        "qkv packed",
        "attention out",
        "mlp proj, gate",
        "mlp packed",
        "mlp out",
    ]
    by = {r["gemm"]: r for r in record["rows"]}
    assert (
        by["qkv packed"]["n"] == 3 * by["q, k, v"]["n"]
        and by["mlp packed"]["n"] == 2 * by["mlp proj, gate"]["n"]
    )
    assert record["block_ms_separate"] > 0 and record["block_ms_packed"] > 0
    assert (tmp_path / "gemm21-cpu-smoke.md").read_text().count("|") > 20
    bare = run("gemm21.py", "--out", str(tmp_path / "bare"))
    assert bare.returncode == 2 and "no GPU" in bare.stderr and not (tmp_path / "bare").exists()


def test_attention_kernels_smoke_writes_rows_and_refuses_without_a_gpu(tmp_path):
    """attention.py: a row per kernel and case with its time and error against float32; on a machine without a GPU
    and without --smoke it refuses and writes nothing."""
    proc = run("attention.py", "--smoke", "--out", str(tmp_path), "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "attention-cpu-smoke.json").read_text())
    (row,) = record["rows"]
    assert row["kernel"] == "math" and row["ms"] > 0 and row["rel_err"] < 1e-5
    assert "| smoke | math |" in (tmp_path / "attention-cpu-smoke.md").read_text()
    bare = tmp_path / "bare"
    proc = run("attention.py", "--out", str(bare))
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not bare.exists()


def test_edit_benchmark_smoke_rows_and_a_failed_row_renders(tmp_path):
    """edit.py --smoke: stock and the tuned path on the tiny edit stand-in for one and three references (the tuned
    path takes every forward and lands on stock's latents), and a row that failed (a FA4 run that could not start)
    renders as a row that says why instead of breaking the table."""
    proc = run("edit.py", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "edit-cpu-smoke.json").read_text())
    rows = [(r["config"], r["refs"]) for r in record["runs"]]
    floor = "stock, other SDPA kernel (rounding floor)"
    assert rows == [("stock", 1), (floor, 1), ("qwennb", 1), ("stock", 3), (floor, 3), ("qwennb", 3)]
    for f, r in zip(record["runs"][1::3], record["runs"][2::3], strict=True):
        assert r["tuned_forwards"] == r["forwards"] > 0 and r["latent_rel_err"] < 1e-4
        # the floor: stock with SDPA's math kernel on the CPU, as far from stock as rounding goes, and not nothing
        assert 0 < f["latent_rel_err"] < 1e-4 and f["tuned_forwards"] == 0
        assert r["err_over_floor"] == pytest.approx(r["latent_rel_err"] / f["latent_rel_err"], rel=0.02)
    assert f"| {floor} |" in (tmp_path / "edit-cpu-smoke.md").read_text()
    sys.path.insert(0, str(BENCH))
    import edit as bench_edit

    record["runs"].append({"config": "qwennb+fa4", "model": "m", "error": "RuntimeError('no CUDA GPU')"})
    md = bench_edit.render(record, 64, 2, 4.0)
    assert "| m | - | qwennb+fa4 | failed: RuntimeError('no CUDA GPU') |" in md


def test_vae2d_smoke_compares_both_paths_and_refuses_without_a_gpu(tmp_path):
    """benchmarks/vae2d.py --smoke: decode and encode rows, the 2D path exact to float order on the CPU."""
    proc = run("vae2d.py", "--smoke", "--profile", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "vae2d-cpu-smoke.json").read_text())
    prof = record["profile_tiled_decode"]
    assert prof["size"] == 64 and prof["stock"]["aten_ops"] > 0 and prof["image_convolutions"]["aten_ops"] > 0
    ops = [(r["op"], r["size"]) for r in record["rows"]]
    assert ops == [("decode", 64), ("encode", 64), ("decode (tiled)", 64), ("encode (tiled)", 64)]
    assert record["image_convolutions"] > 0 and record["convolutions_left"] == 0
    for r in record["rows"]:
        assert r["rel_err"] < 1e-5 and r["stock_rerun_rel_err"] == 0 and r["image_convolutions_s"] > 0
    assert "| decode | 64² |" in (tmp_path / "vae2d-cpu-smoke.md").read_text()
    other = tmp_path / "real"
    proc = run("vae2d.py", "--out", str(other))
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and not other.exists()
