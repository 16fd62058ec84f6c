"""The quick commands stay quick: stored parameter counts (checked here against meta-device builds) and no
diffusers or transformers import on the paths of ``qwennb plan|models|detect|--help``."""

import json
import subprocess
import sys
import time

import pytest

from qwennb.models import (
    REGISTRY,
    _measure,
    build_from_config,
    component_sizes,
    config_digest,
    load_config,
    stored_sizes,
)


def test_every_registry_config_has_stored_counts():
    for spec in REGISTRY.values():
        comps = ["config"] if spec.architecture == "VL" else list(spec.components)
        for comp in comps:
            assert config_digest(load_config(spec.config_dir, comp)) in stored_sizes(), (spec.name, comp)


@pytest.mark.parametrize("digest", sorted(stored_sizes()))
def test_stored_counts_equal_a_meta_device_build(digest):
    entry = stored_sizes()[digest]
    folder, _, name = entry["source"].partition("/")
    cfg = load_config(folder, name.removesuffix(".json"))
    assert config_digest(cfg) == digest
    built = _measure(build_from_config(cfg), entry["name"])
    for key in ("params", "linear_params", "blocks", "block_params", "groups", "class_name"):
        assert getattr(built, key) == entry[key], (entry["source"], key)


def test_component_sizes_come_from_the_stored_counts():
    assert component_sizes("qwen-image")["transformer"].params == 20430401088
    assert component_sizes("qwen-image")["text_encoder"].params == 8292166656


PROBE = (
    "import sys, time; t = time.perf_counter(); from qwennb.cli import main; import contextlib, io\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        main({argv})\n"
    "    except SystemExit:\n"
    "        pass\n"
    "print(time.perf_counter() - t, 'diffusers' in sys.modules, 'transformers' in sys.modules)"
)


@pytest.mark.parametrize(
    "argv",
    [["plan"], ["plan", "--gpu-memory", "24GB", "--json"], ["models", "--json"], ["detect"], ["--help"]],
    ids=lambda a: " ".join(a),
)
def test_quick_commands_import_neither_diffusers_nor_transformers(argv):
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=json.dumps(argv))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    wall = time.perf_counter() - t0
    assert out[1:] == ["False", "False"], out
    assert float(out[0]) < 3.0 and wall < 6.0  # about 0.5 s on an idle CI machine


def test_no_command_is_one_usage_line():
    proc = subprocess.run([sys.executable, "-m", "qwennb.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the following arguments are required: command" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_force_on_a_cpu_plans_qwen_image_not_the_embedded_model():
    """Without a GPU, `qwennb plan` plans the embedded model; --force asks for Qwen-Image on the CPU anyway (which a
    24 GiB machine cannot hold: refused in one line; a larger one plans it)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU plans Qwen-Image without --force")
    cmd = [sys.executable, "-m", "qwennb.cli", "plan", "--json"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and json.loads(plain.stdout)["model"] == "toy"
    forced = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=120)
    if forced.returncode == 0:
        assert json.loads(forced.stdout)["model"] == "qwen-image"
    else:
        assert (
            forced.returncode == 2
            and "qwen-image needs" in forced.stderr
            and "Traceback" not in forced.stderr
        )
