import json
import os

import pytest

from qwennb import hardware
from qwennb.cli import main
from qwennb.hardware import GPU, detect, detect_frontend, visible_gpus


def test_detect_without_gpu_says_so():
    hw = detect()
    assert hw.gpus == []
    assert hw.host_ram_gb > 0 and hw.cpu_count == (os.cpu_count() or 1)
    assert any("No CUDA GPU" in n for n in hw.notes)


def test_detect_json_has_the_interface_keys(capsys):
    assert main(["detect", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("gpus", "host_ram_gb", "frontend", "models"):
        assert key in out
    assert out["gpus"] == [] and isinstance(out["models"], list)


def test_frontends():
    assert detect_frontend({"COLAB_RELEASE_TAG": "x"}, {}) == "colab"
    assert detect_frontend({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, {}) == "kaggle"
    assert detect_frontend({"BINDER_SERVICE_HOST": "1.2.3.4"}, {}) == "binder"
    assert detect_frontend({"VSCODE_PID": "12"}, {}) == "vscode"
    assert detect_frontend({"JPY_PARENT_PID": "12"}, {}) == "jupyter"
    assert detect_frontend({}, {}) == "plain"


def test_gpu_rates_come_from_the_card_not_its_name():
    h100 = GPU(
        0, "whatever", 79.6, 79.0, "9.0", True, sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5, pcie_width=16
    )
    assert 1000 < h100.peak_bf16_tflops < 1100
    assert 50 < h100.host_to_device_gbps < 56  # 54 GB/s measured pinned on a Gen5 x16 H100
    unknown = GPU(0, "x", 8, 8, "7.0", False, sm_count=80, max_sm_clock_mhz=1500)
    assert unknown.peak_bf16_tflops is None


def _machine():
    return [
        GPU(index=i, name=n, total_memory_gb=m, free_memory_gb=m, compute_capability="9.0", bf16=True, uuid=u)
        for i, (n, m, u) in enumerate(
            [
                ("big", 141.0, "GPU-aaaa-1111"),
                ("small", 24.0, "GPU-bbbb-2222"),
                ("mid", 48.0, "GPU-cccc-3333"),
            ]
        )
    ]


@pytest.mark.parametrize(
    "spec, names",
    [
        (None, ["big", "small", "mid"]),
        ("1", ["small"]),
        ("2,0", ["mid", "big"]),
        ("GPU-bbbb", ["small"]),  # a UUID prefix, as CUDA takes it
        ("1,7,0", ["small"]),  # CUDA stops at the first entry that names no GPU
        ("0,0", ["big"]),
        ("", []),
        ("-1", []),
        ("GPU-", []),  # ambiguous prefix
    ],
)
def test_cuda_visible_devices_selects_and_renumbers_gpus(spec, names):
    got = visible_gpus(_machine(), spec)
    assert [g.name for g in got] == names
    assert [g.index for g in got] == list(range(len(names)))  # torch's numbering


def test_detect_plans_only_the_visible_gpus(monkeypatch):
    # NVML lists every GPU of the machine; a process under CUDA_VISIBLE_DEVICES=1 can use only the second one,
    # so the plan must not size itself from the largest card it cannot reach.
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: (_machine(), "580.0"))
    monkeypatch.setattr(hardware, "_merge_torch", lambda gpus, notes: (gpus, None))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    hw = detect()
    assert [g.name for g in hw.gpus] == ["small"] and hw.best_gpu.total_memory_gb == 24.0
    assert any("CUDA_VISIBLE_DEVICES=1" in n and "1 of the machine's 3" in n for n in hw.notes)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert hardware.detect().best_gpu.name == "big"
