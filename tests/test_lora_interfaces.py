"""LoRAs through each interface: the ``%qwen lora`` magic and ``--lora`` in a real IPython shell, ``qwennb
generate --lora`` and ``qwennb download --lora`` from the CLI, and the panel's LoRA row (real ipywidgets)."""

import json

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from qwennb import lora
from qwennb.cli import main
from qwennb.generation import load_params
from qwennb.session import Session
from qwennb.stand_ins import build_tiny_pipeline

MODEL = "tiny"  # the model the LoRA files are made for (the toy model can take its place)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("lora") / "ink.safetensors"
    lora.save_random_lora(build_tiny_pipeline().transformer, p, layout="kohya", rank=4, std=0.5)
    return p


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    shell = InteractiveShell.instance()
    if "qwennb" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "qwennb")
    m = shell.magics_manager.registry["QwenMagics"]
    m.save_dir = str(tmp_path_factory.mktemp("out"))
    m.load(MODEL, show=False)
    yield shell
    m.session.lora_remove()


def session(ip) -> Session:
    return ip.magics_manager.registry["QwenMagics"].session


def test_qwen_lora_add_list_scale_remove(ip, path):
    out = ip.run_line_magic("qwen", f"lora add {path} 0.5 name=ink")
    assert out.text.startswith("qwennb: LoRA ink: scale 0.5, kohya, rank 4")
    assert ip.run_line_magic("qwen", "lora list").text.startswith("ink: scale 0.5")
    ip.run_line_magic("qwen", "lora scale ink 0.25")
    assert [(i.name, i.scale) for i in session(ip).lora_list()] == [("ink", 0.25)]
    ip.run_line_magic("qwen", "lora off")
    assert session(ip).pipe.qwennb.get("loras_disabled") is True
    ip.run_line_magic("qwen", "lora on")
    assert ip.run_line_magic("qwen", "lora remove ink").text == "qwennb: removed LoRA ink"
    assert ip.run_line_magic("qwen", "lora list").text == "no LoRA loaded"


def test_qwen_lora_add_a_quoted_path_with_a_space(ip, path, tmp_path):
    spaced = tmp_path / "my inks" / "ink two.safetensors"
    spaced.parent.mkdir()
    spaced.write_bytes(path.read_bytes())
    out = ip.run_line_magic("qwen", f'lora add "{spaced}" 0.5 name=ink2')
    assert out.text.startswith("qwennb: LoRA ink2: scale 0.5")
    assert [i.path for i in session(ip).lora_list()] == [str(spaced)]
    ip.run_line_magic("qwen", "lora remove ink2")
    with pytest.raises(UsageError, match="cannot read the %qwen lora line: No closing quotation"):
        ip.run_line_magic("qwen", f'lora add "{spaced}')


@pytest.mark.parametrize(
    "line, message",
    [
        ("lora add evil.ckpt", "evil.ckpt refused: it is a pickle, and loading a pickle can run code"),
        ("lora scale nope 1", "no LoRA called 'nope'"),
        ("lora scale nope much", "a LoRA scale is a number, got 'much'"),
        ("lora", "usage: %qwen lora add PATH"),
        ("lora jump", "usage: %qwen lora add PATH"),
    ],
)
def test_qwen_lora_errors_are_one_line_usage_errors(ip, line, message):
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("qwen", line)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert session(ip).loaded


def test_generate_cell_with_lora_records_it_and_changes_the_pixels(ip, path):
    cell = "--steps 2 --size 64x64 --seed 3 --cfg 1 --no-save"
    plain = ip.run_cell_magic("qwen_generate", cell, "a red circle")
    r = ip.run_cell_magic("qwen_generate", f"{cell} --lora {path}:0.7", "a red circle")
    assert [(d["name"], d["scale"]) for d in r.loras] == [("ink", 0.7)]
    assert np.abs(np.asarray(r.images[0], int) - np.asarray(plain.images[0], int)).max() > 20
    with pytest.raises(UsageError, match="holds no .safetensors file|no LoRA file"):
        ip.run_cell_magic("qwen_generate", f"{cell} --lora {path.parent / 'missing.safetensors'}", "x")
    session(ip).lora_remove()
    again = ip.run_cell_magic("qwen_generate", cell, "a red circle")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))


def test_cli_generate_with_lora(path, tmp_path, capsys):
    args = ["generate", "a red circle", "--model", MODEL, "--steps", "2", "--size", "64x64", "--seed", "3"]
    assert main([*args, "--lora", f"{path}:0.5", "--out", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["scale"]) for d in res["loras"]] == [("ink", 0.5)]
    params = load_params(res["images"][0])
    assert params["loras"][0]["sha256"] == lora.file_sha256(path)


def test_cli_generate_refuses_a_bad_lora_before_loading(path, tmp_path, capsys):
    bad = tmp_path / "other.safetensors"
    sd = lora.random_lora_state_dict(
        build_tiny_pipeline().transformer, rank=2, layout="lightning", blocks=[0]
    )
    from safetensors.torch import save_file

    save_file({k.replace("blocks.0.", "blocks.9."): v for k, v in sd.items()}, str(bad))
    args = ["generate", "x", "--model", MODEL, "--steps", "2", "--size", "64x64"]
    assert main([*args, "--lora", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "first keys: transformer_blocks.9.attn.add_k_proj.lora_A.weight" in err[0]
    assert main([*args, "--lora", str(tmp_path / "w.bin")]) == 2
    assert "it is a pickle" in capsys.readouterr().err


def test_panel_lora_row(path):
    from qwennb.widgets import QwenPanel

    s = Session()
    s.load(MODEL)
    panel = QwenPanel(s, save_dir=None)
    assert panel.lora_pick.options == () and panel.lora_remove_button.disabled
    panel.add_lora()
    assert panel.lora_status.value == "name a LoRA file, folder or hub id first"
    panel.lora_source.value = f"{path}:0.4"
    panel.add_lora()
    assert panel.lora_pick.options == ("ink",) and panel.lora_scale.value == 0.4
    panel.lora_scale.value = 1.5
    assert s.lora_list()[0].scale == 1.5 and panel.lora_status.value == "ink: scale 1.5"
    panel.lora_source.value = "evil.pt"
    panel.add_lora()
    assert panel.lora_status.value.startswith("error: evil.pt refused: it is a pickle")
    panel.remove_lora()
    assert s.lora_list() == [] and panel.lora_pick.options == ()
    s.unload()


def test_panel_lightning_preset_runs_with_its_scheduler():
    from qwennb.widgets import QwenPanel

    s = Session()
    s.load(MODEL)
    panel = QwenPanel(s, save_dir=None)
    panel.prompt.value = "a red circle"
    panel.preset.value = "lightning-4"
    assert (panel.steps.value, panel.cfg.value) == (4, 1.0)
    panel.randomize.value = False
    panel.seed.value = 5
    panel.start()
    r = panel.wait()
    assert panel.last_error is None and r.steps == 4 and r.params()["preset"] == "lightning-4"
    assert r.transformer_passes_per_step == 1
    s.unload()
