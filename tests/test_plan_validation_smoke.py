"""benchmarks/plan_validation.py --smoke runs on the CPU and writes the keys the checks read."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_validation.py"
KEYS = {
    "cap_gb",
    "host_budget_gb",
    "arrangement",
    "predicted_s_per_step",
    "measured_s_per_step",
    "estimated_peak_gb",
    "measured_peak_gb",
    "estimated_host_ram_gb",
    "measured_host_rss_gb",
    "oom",
}


def test_smoke_run_writes_the_interface(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], check=True, capture_output=True
    )
    record = json.loads(next(tmp_path.glob("plan-validation-*.json")).read_text())
    assert record["card"] == "cpu (smoke)" and len(record["runs"]) == 2
    for run in record["runs"]:
        assert KEYS <= set(run) and run["oom"] is False and "error" not in run
        assert run["measured_s_per_step"] > 0 and run["arrangement"] == "everything on cpu in float32"
        assert 0 < run["estimated_host_ram_gb"] and run["measured_host_rss_gb"] > 0.1
    assert record["runs"][1]["reused_from"] == [80.0, 128.0]
    assert (tmp_path / next(tmp_path.glob("*.json")).name.replace(".json", ".md")).exists()


def test_an_edit_model_is_validated_through_an_edit(tmp_path):
    """--model with an edit model plans with room for one reference image and measures an edit of one."""
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--out",
            str(tmp_path),
            "--model",
            "qwen-image-edit-synthetic",
            "--pairs",
            "24:64",
        ],
        check=True,
        capture_output=True,
    )
    record = json.loads(next(tmp_path.glob("plan-validation-*.json")).read_text())
    (run,) = record["runs"]
    assert record["model"] == run["model"] == "tiny-edit"
    assert "error" not in run and run["measured_s_per_step"] > 0
    assert run["task"] == "edit, 1 reference"
