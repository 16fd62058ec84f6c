"""The magics in a real IPython shell, on the real tiny pipeline."""

import os
import time

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from PIL import Image

import qwennb
from qwennb.errors import QwennbError
from qwennb.generation import GenerationResult


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    shell = InteractiveShell.instance()
    out = tmp_path_factory.mktemp("outputs")
    shell.run_line_magic("config", f"QwenMagics.save_dir = {str(out)!r}")
    shell.run_line_magic("load_ext", "qwennb")
    yield shell
    shell.run_line_magic("unload_ext", "qwennb")


def magics(ip):
    return ip.magics_manager.registry["QwenMagics"]


def test_load_ext_is_quick_and_loads_the_toy_with_a_notice(capsys):
    shell = InteractiveShell.instance()
    if "qwennb" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "qwennb")
    t0 = time.perf_counter()
    shell.run_line_magic("load_ext", "qwennb")
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert elapsed < 3, f"%load_ext took {elapsed:.1f} s"
    assert "loading toy in the background" in out and "not Qwen-Image" in out
    assert magics(shell).session.loaded  # waits for the load


@pytest.fixture
def fresh_shell():
    """The shared shell with the extension unloaded first and again after (the module's ``ip`` reloads it)."""
    shell = InteractiveShell.instance()
    if "qwennb" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "qwennb")
    yield shell
    if "qwennb" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "qwennb")
    shell.run_line_magic("load_ext", "qwennb")
    magics(shell).session.wait()


def _gated_build(monkeypatch, fail_first: bool = False):
    """qwennb.pipeline.build held until the returned event is set (the real build after it; the first call
    raising instead when ``fail_first``): a load that takes as long as the test wants."""
    import threading

    from qwennb import pipeline

    gate, started = threading.Event(), threading.Event()
    real = pipeline.build
    calls = []

    def build(*args, **kwargs):
        calls.append(threading.current_thread().name)
        started.set()
        assert gate.wait(120)
        if fail_first and len(calls) == 1:
            raise OSError("the safetensors header is corrupt")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build", build)
    return gate, started, calls


def test_load_ext_returns_while_the_model_loads_and_the_first_command_waits_for_it(
    fresh_shell, monkeypatch, capsys
):
    """%load_ext returns with the model still loading on a thread: other cells run; the first qwennb command says it
    waits, then how long the load took (once); the generation is the one a loaded model gives."""
    import threading

    gate, started, calls = _gated_build(monkeypatch)
    shell = fresh_shell
    shell.run_line_magic("load_ext", "qwennb")
    assert started.wait(60)
    m = magics(shell)
    assert m.session.loading and m.session._pipe is None and calls == ["qwennb-load"]
    shell.run_cell("four = 2 + 2")  # the kernel is free
    assert shell.user_ns["four"] == 4
    capsys.readouterr()
    threading.Timer(0.5, gate.set).start()
    r = shell.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --seed 3 --no-save", "a red circle")
    out, err = capsys.readouterr()
    # the thread's loading bars would land in whatever cell runs: none is printed
    assert "Loading pipeline components" not in err + out and "Loading weights" not in err + out
    assert (
        "waiting for toy to finish loading..." in out
        and "loaded toy in" in out
        and "(in the background)" in out
    )
    assert r.seed == 3 and r.images and not m.session.loading
    r2 = shell.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --seed 3 --no-save", "a red circle")
    assert "waiting" not in capsys.readouterr().out and r2.images[0].tobytes() == r.images[0].tobytes()
    assert calls == ["qwennb-load"]  # loaded once


def test_a_failed_background_load_is_one_usage_error_and_the_next_command_loads_again(
    fresh_shell, monkeypatch
):
    """A load in the background that fails: the first command that needs the model says why in one line (no
    traceback); the extension stays, and the next command loads the model (here, fine) and runs."""
    gate, started, calls = _gated_build(monkeypatch, fail_first=True)
    gate.set()
    shell = fresh_shell
    shell.run_line_magic("load_ext", "qwennb")
    with pytest.raises(UsageError, match=r"could not be loaded: OSError: the safetensors header is corrupt"):
        shell.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --seed 1 --no-save", "a blue star")
    m = magics(shell)
    assert not m.session.loading and not m.session.loaded
    r = shell.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --seed 1 --no-save", "a blue star")
    assert r.images and calls == ["qwennb-load", "MainThread"]


def test_ctrl_c_while_waiting_leaves_the_load_running(fresh_shell, monkeypatch):
    """Ctrl-C during the wait stops the wait, not the load: the next command finds the model loaded."""
    import os
    import signal
    import threading

    gate, started, calls = _gated_build(monkeypatch)
    shell = fresh_shell
    shell.run_line_magic("load_ext", "qwennb")
    assert started.wait(60)
    m = magics(shell)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # what Ctrl-C sends
    with pytest.raises(KeyboardInterrupt):
        m.ready()
    assert m.session.loading
    gate.set()
    m.ready()
    assert m.session.loaded and m.session.report.model == "toy" and calls == ["qwennb-load"]


def test_background_load_can_be_turned_off(fresh_shell, capsys):
    """QwenMagics.background_load = False: %load_ext returns with the model loaded, as before."""
    shell = fresh_shell
    shell.run_line_magic("config", "QwenMagics.background_load = False")
    try:
        shell.run_line_magic("load_ext", "qwennb")
        m = magics(shell)
        assert not m.session.loading and m.session._pipe is not None
        assert "loaded toy in" in capsys.readouterr().out
    finally:
        shell.run_line_magic("config", "QwenMagics.background_load = True")


def test_load_ext_takes_under_3_s_in_a_fresh_process():
    """#13's target, in a new interpreter (nothing imported yet but IPython): %load_ext returns in under 3 s; the
    model is then loaded on its thread."""
    import subprocess
    import sys

    code = (
        "import time\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "t0 = time.perf_counter()\n"
        "shell.run_line_magic('load_ext', 'qwennb')\n"
        "took = time.perf_counter() - t0\n"
        "m = shell.magics_manager.registry['QwenMagics']\n"
        "print('TOOK', took, m.session.wait().model)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    took, model = proc.stdout.split("TOOK ")[1].split()
    assert float(took) < 3 and model == "toy", proc.stdout


def test_generate_cell_returns_the_result_and_saves(ip, capsys):
    r = ip.run_cell_magic("qwen_generate", "--steps 3 --size 64x64 --seed 5", "a red fox\nin the snow")
    assert isinstance(r, GenerationResult)
    assert (
        r.prompt == "a red fox\nin the snow"
        and r.seed == 5
        and r.steps == 3
        and (r.width, r.height) == (64, 64)
    )
    assert len(r.paths) == 1 and qwennb.load_params(r.paths[0])["seed"] == 5
    assert os.path.dirname(r.paths[0]) == os.path.abspath(magics(ip).save_dir)  # without --out: save_dir
    assert magics(ip).session.history[-1] is r
    bundle = r._repr_mimebundle_()
    assert "qwennb-timing" in bundle["text/html"] and "<img" in bundle["text/html"]
    assert "seed 5" in bundle["text/plain"]
    assert "done: 3/3 steps" in capsys.readouterr().out


def test_an_image_that_cannot_be_saved_is_kept_and_the_error_says_why_in_words(ip, tmp_path):
    """The folder is checked before a generation; if saving still fails after it (a disk that filled, a folder
    that went away), the image stays in the history and the error gives the OS's reason in words."""
    r = ip.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --seed 3 --no-save", "a red fox")
    index = magics(ip).session.history.index(r)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError) as info:
        magics(ip)._save(r, str(blocker / "sub"))
    message = str(info.value)
    assert "could not be saved" in message and "(Not a directory)" in message and "Errno" not in message
    assert f"%qwen history entry #{index}" in message and magics(ip).session.history[index] is r


def test_run_cell_sets_underscore(ip):
    ip.run_cell("%%qwen_generate --steps 2 --size 64x64 --seed 8 --no-save\na small boat", store_history=True)
    assert isinstance(ip.user_ns["_"], GenerationResult) and ip.user_ns["_"].seed == 8


def test_prompt_variables_are_filled(ip):
    ip.user_ns["animal"] = "otter"
    r = ip.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --no-save", "a {animal} with {{braces}}")
    assert r.prompt == "a otter with {braces}"
    with pytest.raises(UsageError, match="no variable named 'nothing_here'"):
        ip.run_cell_magic("qwen_generate", "--steps 2 --no-save", "a {nothing_here}")


def test_options_cfg_preset_aspect_negative(ip):
    r = ip.run_cell_magic("qwen_generate", "--preset ultra-fast --size 64x64 --no-save --seed 1", "x")
    assert (r.steps, r.cfg) == (12, 3.0)
    r = ip.run_cell_magic(
        "qwen_generate", "--steps 2 --cfg 1 --aspect 16:9 --no-save --negative 'blurry, dark'", "x"
    )
    assert r.cfg == 1 and r.width > r.height and r.transformer_passes_per_step == 1
    r = ip.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --n 2 --no-save", "x")
    assert len(r.images) == 2


def test_quoted_option_values_lose_their_quotes(ip, tmp_path):
    # IPython splits an options line keeping the quotes in each word: the negative prompt was '"blurry, dark"'
    r = ip.run_cell_magic(
        "qwen_generate", '--steps 2 --size 64x64 --cfg 2 --no-save --negative "blurry, dark"', "x"
    )
    assert r.negative_prompt == "blurry, dark"
    # diffusers' name for it is taken too
    r = ip.run_cell_magic(
        "qwen_generate", "--steps 2 --size 64x64 --cfg 2 --no-save --negative-prompt 'dark'", "x"
    )
    assert r.negative_prompt == "dark"
    photo = tmp_path / "my photo.png"
    Image.new("RGB", (64, 64), "white").save(photo)
    r = ip.run_cell_magic(
        "qwen_generate", f'--init-image "{photo}" --strength 0.5 --steps 2 --no-save --preset "balanced"', "x"
    )
    assert (r.task, r.preset, r.inputs[0]["source"]) == ("img2img", "balanced", str(photo))


@pytest.mark.parametrize(
    "line, cell, message",
    [
        ("--steps 0", "x", "steps must be"),
        ("--size banana", "x", "size must look like"),
        ("--preset nope", "x", "unknown preset"),
        ("--aspect 5:4", "x", "unknown aspect"),
        ("--cfg 0.2", "x", "CFG must be"),
        ("--cfg 1e308", "x", "at most 100"),  # else the guided prediction overflows: a black image
        ("--seed -4", "x", "seed must be"),
        ("--bogus 3", "x", "unrecognized arguments"),
        ("--negative 'blurry", "x", "cannot read the options line.*No closing quotation"),
        ("", "   ", "cell is empty"),
    ],
)
def test_bad_options_raise_usage_error(ip, line, cell, message):
    with pytest.raises(UsageError, match=message):
        ip.run_cell_magic("qwen_generate", line, cell)


def test_usage_error_shows_one_line_without_traceback(ip, capsys):
    res = ip.run_cell("%%qwen_generate --steps 0\nx")
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "UsageError" in text and "steps must be" in text and "Traceback" not in text
    assert res.error_in_exec is not None
    ok = ip.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --no-save", "the kernel still works")
    assert ok.images


def test_interrupt_inside_a_run_stops_and_the_next_cell_works(ip):
    session = magics(ip).session
    pipe = session.pipe
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    handle = pipe.transformer.register_forward_pre_hook(boom)
    try:
        r = ip.run_cell_magic("qwen_generate", "--steps 6 --size 64x64 --no-save", "x")
    finally:
        handle.remove()
    assert r.interrupted and r.steps_completed < 6
    ok = ip.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --no-save", "x")
    assert not ok.interrupted and ok.images


def test_config_traitlets(ip):
    ip.run_line_magic("config", "QwenMagics.default_steps = 3")
    ip.run_line_magic("config", "QwenMagics.default_cfg = 2.5")
    try:
        r = ip.run_cell_magic("qwen_generate", "--size 64x64 --no-save", "x")
        assert (r.steps, r.cfg) == (3, 2.5)
    finally:
        ip.run_line_magic("config", "QwenMagics.default_steps = 0")
        ip.run_line_magic("config", "QwenMagics.default_cfg = 0.0")
    ip.run_line_magic("config", "QwenMagics.preset = 'balanced'")
    try:
        r = ip.run_cell_magic("qwen_generate", "--size 64x64 --no-save --steps 2", "x")
        assert (r.steps, r.cfg) == (2, 3.5)
    finally:
        ip.run_line_magic("config", "QwenMagics.preset = ''")


def test_qwen_subcommands(ip, capsys):
    info = ip.run_line_magic("qwen", "info")
    assert info["loaded"] and info["active"]["matches_plan"]
    assert "model: toy" in info._repr_mimebundle_()["text/plain"]
    plan = ip.run_line_magic("qwen", "plan")
    assert plan.model == "toy"
    other = ip.run_line_magic("qwen", "plan tiny enable_vae_slicing=True")
    assert other.vae_slicing
    ip.run_line_magic("qwen", "presets")
    out = capsys.readouterr().out
    assert "high-quality" in out and "turbo" in out and "3x the rounding floor" in out
    with pytest.raises(UsageError, match="unknown mode 'warp'"):
        ip.run_line_magic("qwen", "plan tiny mode=warp")
    assert ip.run_line_magic("qwen", "plan --model tiny").model == "tiny"  # the CLI's spelling works too
    with pytest.raises(UsageError, match=r"unknown option '--gpu-memory'; usage: %qwen plan MODEL"):
        ip.run_line_magic("qwen", "plan tiny --gpu-memory 24")
    with pytest.raises(UsageError, match=r"usage: %qwen load MODEL"):
        ip.run_line_magic("qwen", "load --fast tiny")
    hist = ip.run_line_magic("qwen", "history")
    assert "#0" in hist._repr_mimebundle_()["text/plain"]
    ip.run_line_magic("qwen", "help")
    assert "%qwen load" in capsys.readouterr().out
    with pytest.raises(UsageError, match="unknown %qwen command"):
        ip.run_line_magic("qwen", "frobnicate")
    capsys.readouterr()
    with pytest.raises(UsageError, match="unknown model"):
        ip.run_line_magic("qwen", "load not-a-model")
    with pytest.raises(UsageError, match="unknown plan option"):
        ip.run_line_magic("qwen", "load tiny bogus=1")
    assert "loading" not in capsys.readouterr().out  # the one line comes before anything says "loading"
    assert magics(ip).session.loaded  # a failed load keeps the loaded model


def test_mode_from_config_reaches_the_plan(ip):
    ip.run_line_magic("config", "QwenMagics.mode = 'turbo'")
    try:
        ip.run_line_magic("qwen", "load tiny")
        plan = magics(ip).session.report.plan
        assert plan.overrides.get("mode") == "turbo"
        assert any("mode 'turbo' applies" in w for w in plan.warnings)  # a CPU and the tiny model: no effect
    finally:
        ip.run_line_magic("config", "QwenMagics.mode = ''")
        ip.run_line_magic("qwen", "load tiny")
    assert "mode" not in magics(ip).session.report.plan.overrides


def test_unload_and_load(ip, capsys, monkeypatch):
    from qwennb import session as session_module

    ip.run_line_magic("qwen", "unload")
    assert not magics(ip).session.loaded and "unloaded tiny" in capsys.readouterr().out
    assert "model: none loaded" in ip.run_line_magic("qwen", "info").text
    with pytest.raises(QwennbError, match="no model is loaded"):
        magics(ip).session.require()
    planned = []
    real = session_module._make_plan
    monkeypatch.setattr(session_module, "_make_plan", lambda *a, **k: planned.append(a) or real(*a, **k))
    ip.run_line_magic("qwen", "load tiny")
    assert magics(ip).session.loaded
    assert len(planned) == 1  # the plan it says it loads is the plan it loads: made once


def test_load_from_a_folder_loads_that_folder(ip, tmp_path, capsys):
    """%qwen load FOLDER loads the weights in that folder, and says which model they are before it loads them."""
    import shutil

    from qwennb.models import TOY_MODEL_DIR

    folder = tmp_path / "my-toy"
    shutil.copytree(TOY_MODEL_DIR, folder)
    capsys.readouterr()
    ip.run_line_magic("qwen", f"load {folder}")
    report = magics(ip).session.report
    assert report.path == str(folder)
    assert f"qwennb: loading {report.model}..." in capsys.readouterr().out
    ip.run_line_magic("qwen", "load tiny")


def test_reload_ext_frees_and_reloads(ip):
    old = magics(ip).session
    ip.run_line_magic("reload_ext", "qwennb")
    assert old.pipe is None and magics(ip).session.loaded


def test_help_is_available(ip):
    doc = ip.find_cell_magic("qwen_generate").__doc__
    assert "--steps" in doc and "{name}" in doc


def test_enhance_option_and_subcommands(ip, tmp_path):
    r = ip.run_cell_magic(
        "qwen_generate", "--enhance --steps 2 --size 64x64 --seed 2", 'a sign that reads "Qwen"'
    )
    # The tiny model's rewrite is noise (greedy, so always the same noise): qwennb falls back to the prompt and
    # still records both.
    assert r.original_prompt == 'a sign that reads "Qwen"' and r.prompt == r.original_prompt
    import json

    from PIL import Image

    meta = json.loads(Image.open(r.paths[0]).info["qwennb"])
    assert meta["original_prompt"] == r.original_prompt and meta["prompt"] == r.prompt
    e = ip.run_line_magic("qwen", "enhance a quiet harbour at dusk")
    assert e.original == "a quiet harbour at dusk" and e.language == "en" and e.chat[0]["role"] == "system"
    picture = tmp_path / "ref.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(picture)
    d = ip.run_line_magic("qwen", f"describe {picture}")
    assert d.focus == "style" and d.image_tokens > 0
    with pytest.raises(UsageError, match="no such file"):
        ip.run_line_magic("qwen", "describe /nonexistent.png")
    with pytest.raises(UsageError, match="usage"):
        ip.run_line_magic("qwen", "enhance")


def test_a_figure_shows_as_a_png_after_load_ext():
    # Without pyplot a kernel shows a matplotlib Figure as "<Figure size ...>" text only; the quickstart's
    # result.timing_figure() and the notebooks' charts are such Figures.
    from matplotlib.figure import Figure

    from qwennb.magics import register_figure_display

    shell = InteractiveShell.instance()
    register_figure_display(shell)
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([1, 2])
    data, _ = shell.display_formatter.format(fig)
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
