import json

from qwennb.cli import main
from qwennb.hardware import GPU, detect, detect_frontend


def test_detect_without_gpu_says_so():
    hw = detect()
    assert hw.gpus == []
    assert hw.host_ram_gb > 0 and hw.cpu_count >= 1
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
