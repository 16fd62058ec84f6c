"""Core II on the real tiny pipeline: no mocks."""

import json

import numpy as np
import pytest

import qwennb
from qwennb import OptimizationConfig, PipelineOptimizer
from qwennb.cli import main
from qwennb.errors import GenerationError, LoadError
from qwennb.generation import StopSignal, generate, load_params
from qwennb.pipeline import build, resolve_model, validate_optimization
from qwennb.plan import describe_machine, make_plan

SMALL = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def pipe():
    return build(make_plan(describe_machine(host_ram_gb=8), "tiny"))


def pixels(result):
    return np.asarray(result.images[0])


def test_same_seed_same_pixels_other_seed_other_pixels(pipe):
    a = generate(pipe, "a red fox", seed=11, **SMALL)
    b = generate(pipe, "a red fox", seed=11, **SMALL)
    c = generate(pipe, "a red fox", seed=12, **SMALL)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert a.images[0].size == (64, 64) and pixels(a).std() > 1


def test_the_same_seed_gives_the_same_pixels_in_a_fresh_pipeline(pipe):
    other = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
    assert np.array_equal(
        pixels(generate(pipe, "x", seed=3, **SMALL)), pixels(generate(other, "x", seed=3, **SMALL))
    )


def test_seed_is_drawn_and_recorded_when_not_given(pipe):
    r = generate(pipe, "a red fox", **SMALL)
    assert isinstance(r.seed, int) and r.seed >= 0
    assert np.array_equal(pixels(r), pixels(generate(pipe, "a red fox", seed=r.seed, **SMALL)))


def test_cfg_runs_two_transformer_passes_a_step_and_cfg_1_runs_one(pipe):
    on = generate(pipe, "a cat", cfg=4.0, seed=1, **SMALL)
    off = generate(pipe, "a cat", cfg=1.0, seed=1, **SMALL)
    assert on.transformer_passes_per_step == 2 and on.negative_prompt == " "
    assert off.transformer_passes_per_step == 1
    assert not np.array_equal(pixels(on), pixels(off))


def test_guidance_scale_maps_to_true_cfg_scale_with_a_notice(pipe):
    r = generate(pipe, "a cat", guidance_scale=7.5, seed=1, **SMALL)
    assert r.cfg == 7.5 and r.transformer_passes_per_step == 2
    assert any("guidance_scale=7.5" in n and "true_cfg_scale" in n for n in r.notices)


def test_result_records_timing_and_parameters(pipe):
    r = generate(pipe, "a cat", seed=5, **SMALL)
    assert len(r.step_times_s) == 3 and all(t > 0 for t in r.step_times_s)
    assert r.text_encoding_s > 0 and r.decode_s > 0 and r.total_s >= sum(r.step_times_s)
    assert r.model == "tiny" and r.plan["model"] == "tiny" and r.peak_gpu_memory_gb is None
    assert r.params() == {
        "prompt": "a cat",
        "negative_prompt": " ",
        "seed": 5,
        "steps": 3,
        "cfg": 4.0,
        "width": 64,
        "height": 64,
        "num_images": 1,
    }


def test_sizes_are_rounded_with_a_notice(pipe):
    r = generate(pipe, "a cat", seed=1, steps=2, width=70, height=90)
    assert (r.width, r.height) == (64, 96) and r.images[0].size == (64, 96)
    assert any("rounded to 64x96" in n for n in r.notices)


def test_aspect_ratio_and_presets(pipe):
    r = generate(pipe, "a cat", seed=1, steps=2, aspect="16:9")
    assert r.width > r.height and r.width % 16 == 0 and r.height % 16 == 0
    p = generate(pipe, "a cat", seed=1, preset="ultra-fast", width=64, height=64)
    assert (p.steps, p.cfg) == (12, 3.0)
    q = generate(pipe, "a cat", seed=1, preset="ultra-fast", steps=2, width=64, height=64)
    assert (q.steps, q.cfg) == (2, 3.0)  # explicit options win over the preset


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be"),
        (dict(cfg=0.5), "CFG must be at least 1"),
        (dict(cfg=100.5), "and at most 100, got 100.5"),
        (dict(seed=-1), "seed must be"),
        (dict(preset="turbo-max"), "unknown preset"),
        (dict(aspect="5:4"), "unknown aspect"),
        (dict(aspect="16:9", width=64), "not both"),
        (dict(width=8), "width must be"),
        (dict(num_images=0), "number of images"),
    ],
)
def test_bad_options_are_refused_clearly(pipe, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(pipe, "a cat", **{"steps": 3, **kwargs})


def test_empty_prompt(pipe):
    with pytest.raises(GenerationError, match="empty"):
        generate(pipe, "   ")
    with pytest.raises(GenerationError, match="^the prompt is empty$"):
        generate(pipe, None)  # not a TypeError from diffusers' encoder
    with pytest.raises(GenerationError, match="^the prompt must be text, got list; for several prompts"):
        generate(pipe, ["a cat", "a dog"])


def test_size_over_the_budget_is_refused_with_the_largest_that_fits(pipe):
    saved = pipe.qwennb["plan"]
    try:
        pipe.qwennb["plan"] = make_plan(describe_machine(12, host_ram_gb=128), "qwen-image")
        with pytest.raises(GenerationError, match=r"largest size of this shape that fits is \d+x\d+"):
            generate(pipe, "a cat", width=4096, height=4096, steps=2)
    finally:
        pipe.qwennb["plan"] = saved


def test_interrupt_inside_a_step_returns_a_partial_result_and_the_next_run_works(pipe):
    def on_step(info):
        if info.step == 2:
            raise KeyboardInterrupt

    r = generate(pipe, "a cat", seed=1, on_step=on_step, width=64, height=64, steps=5)
    assert r.interrupted and r.steps_completed == 2 and r.images == []
    assert any("interrupted after 2 of 5" in n for n in r.notices)
    ok = generate(pipe, "a cat", seed=1, **SMALL)
    assert not ok.interrupted and len(ok.images) == 1


def test_stop_signal_ends_at_the_next_step_with_a_partial_image(pipe):
    stop = StopSignal()

    def on_step(info):
        if info.step == 2:
            stop.set()

    r = generate(pipe, "a cat", seed=1, on_step=on_step, stop=stop, width=64, height=64, steps=6)
    assert r.interrupted and r.steps_completed == 2 and len(r.images) == 1
    full = generate(pipe, "a cat", seed=1, width=64, height=64, steps=6)
    assert full.steps_completed == 6 and not full.interrupted


def test_nan_output_is_an_error_not_a_black_image():
    bad = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
    import torch

    with torch.no_grad():
        bad.transformer.proj_out.weight.fill_(float("nan"))
    with pytest.raises(GenerationError, match="NaN.*fp16"):
        generate(bad, "a cat", **SMALL)


def test_png_metadata_round_trips_and_regenerates_the_same_pixels(pipe, tmp_path):
    r = generate(pipe, "a lighthouse, 灯塔", seed=99, **SMALL)
    (path,) = r.save(tmp_path)
    params = load_params(path)
    assert params == r.params()
    again = generate(pipe, **params)
    assert np.array_equal(pixels(again), np.asarray(__import__("PIL.Image").Image.open(path).convert("RGB")))


def test_saving_never_overwrites(pipe, tmp_path):
    r = generate(pipe, "a cat", seed=1, **SMALL)
    first = r.save(tmp_path)
    second = r.save(tmp_path)
    assert first != second and len(list(tmp_path.iterdir())) == 2


def test_metadata_opt_out(pipe, tmp_path):
    r = generate(pipe, "a private prompt", seed=1, **SMALL)
    (path,) = r.save(tmp_path, embed_metadata=False)
    assert b"private" not in open(path, "rb").read()
    with pytest.raises(GenerationError, match="no qwennb parameters"):
        load_params(path)


def test_validate_optimization_reads_back_the_pipeline(pipe):
    v = validate_optimization(pipe)
    assert v["matches_plan"] and v["components"]["transformer"]["device"] == "cpu"
    assert v["components"]["transformer"]["storage_dtype"] == "float32"


def test_default_model_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("QWENNB_MODEL", raising=False)
    from qwennb.models import TOY_MODEL_DIR
    from qwennb.pipeline import TOY_NOTICE

    assert resolve_model(folder=str(tmp_path)) == ("toy", TOY_MODEL_DIR, TOY_NOTICE)
    assert resolve_model(TOY_MODEL_DIR) == ("toy", TOY_MODEL_DIR, None)
    monkeypatch.setenv("QWENNB_MODEL", "tiny")
    assert resolve_model() == ("tiny", None, None)
    monkeypatch.setenv("QWENNB_MODEL", "qwen-image")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="not in the local cache"):
        resolve_model(folder=str(tmp_path))
    incomplete = tmp_path / "snap"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]}
        )
    )
    with pytest.raises(LoadError, match="incomplete"):
        resolve_model(str(incomplete))


def test_seed_facade_loads_and_generates():
    optimizer = PipelineOptimizer(OptimizationConfig(architecture_type="MMDiT", enable_tf32=True))
    p = optimizer.create_optimized_pipeline("tiny", "MMDiT")
    assert optimizer.validate_optimization(p)["matches_plan"]
    image = p(
        prompt="a cat", negative_prompt=" ", true_cfg_scale=3.5, width=64, height=64, num_inference_steps=2
    ).images[0]
    assert image.size == (64, 64)
    assert qwennb.generate(p, "a cat", **SMALL).images


def test_seed_facade_loads_the_embedded_toy_without_a_gpu(tmp_path, monkeypatch):
    # The original example passes detect_current_model().path: with no weights that is the toy, on the CPU.
    from qwennb import ModelDetectionService

    monkeypatch.delenv("QWENNB_MODEL", raising=False)
    current = ModelDetectionService(folder=tmp_path, hardware=describe_machine()).detect_current_model()
    optimizer = PipelineOptimizer(OptimizationConfig(architecture_type="MMDiT"), hardware=describe_machine())
    p = optimizer.create_optimized_pipeline(current.path, "MMDiT")
    assert optimizer.plan.model == "toy" and optimizer.validate_optimization(p)["matches_plan"]


def test_build_finds_the_toy_in_the_package_without_a_path():
    # README: qwennb.build(qwennb.make_plan(detect(), "toy")) loads the toy (it has no hub id to fetch from).
    from qwennb.models import TOY_MODEL_DIR

    p = build(make_plan(describe_machine(), "toy"))
    assert p.qwennb["model"] == "toy" and p.qwennb["path"] == TOY_MODEL_DIR


def test_cli_generate_mode_is_planned_and_its_warning_shown(tmp_path, capsys):
    argv = ["generate", "x", "--model", "tiny", "--steps", "2", "--size", "64x64", "--out", str(tmp_path)]
    assert main([*argv, "--mode", "turbo"]) == 0
    assert "mode 'turbo' applies to Qwen-Image on a CUDA GPU; ignored here" in capsys.readouterr().err


def test_cli_generate_json(tmp_path, capsys):
    rc = main(
        [
            "generate",
            "a red fox",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--size",
            "64x64",
            "--seed",
            "4",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in (
        "images",
        "seed",
        "steps",
        "cfg",
        "width",
        "height",
        "step_times_s",
        "total_s",
        "peak_gpu_memory_gb",
        "model",
    ):
        assert key in d
    assert d["seed"] == 4 and len(d["step_times_s"]) == 2 and d["model"] == "tiny"
    assert load_params(d["images"][0])["seed"] == 4


def test_cli_generate_takes_the_prompt_unquoted(tmp_path, capsys):
    """`qwennb generate --steps 2 a red fox` draws "a red fox" (the words after the options), as the quoted form."""
    opts = [
        "--model",
        "tiny",
        "--steps",
        "2",
        "--size",
        "64x64",
        "--seed",
        "4",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(["generate", *opts, "a", "red", "fox"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert load_params(d["images"][0])["prompt"] == "a red fox"
    with pytest.raises(SystemExit) as e:  # words split by an option: refused, as argparse refuses
        main(["generate", "a", "red", "--steps", "2", "fox"])
    assert e.value.code == 2
    assert "unrecognized arguments: fox" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--size", "big"], "size must look like"),
        (["--steps", "0"], "steps must be"),
    ],
)
def test_cli_generate_errors(tmp_path, capsys, argv, message):
    assert main(["generate", "a cat", "--model", "tiny", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_out_of_memory_is_a_clear_error_and_the_pipeline_stays_usable(pipe):
    import torch

    def oom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = pipe.transformer.register_forward_pre_hook(oom)
    try:
        with pytest.raises(GenerationError, match="out of GPU memory at 64x64.*group_offload"):
            generate(pipe, "a cat", **SMALL)
    finally:
        handle.remove()
    assert generate(pipe, "a cat", **SMALL).images


def test_a_real_ctrl_c_stops_at_the_next_step_with_a_partial_image(pipe):
    import os
    import signal

    def on_step(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C or the notebook's Stop button sends

    before = signal.getsignal(signal.SIGINT)
    r = generate(pipe, "a cat", seed=1, on_step=on_step, width=64, height=64, steps=6)
    assert r.interrupted and r.steps_completed == 2 and len(r.images) == 1
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_the_toy_planned_by_its_folder_is_the_toy():
    from qwennb.models import TOY_MODEL_DIR
    from qwennb.plan import describe_machine, make_plan

    plan = make_plan(describe_machine(host_ram_gb=8), TOY_MODEL_DIR)
    assert plan.model == "toy" and plan.defaults["steps"] == 20 and plan.defaults["width"] == 256


def test_a_toy_folder_without_its_weights_is_a_clear_load_error(monkeypatch, tmp_path):
    # a package installed without its data files: one short LoadError, not a traceback from deep in diffusers
    import shutil

    import qwennb.pipeline as qp
    from qwennb.errors import LoadError
    from qwennb.models import TOY_MODEL_DIR
    from qwennb.plan import describe_machine, make_plan

    broken = tmp_path / "toy_model"
    shutil.copytree(TOY_MODEL_DIR, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(qp, "TOY_MODEL_DIR", str(broken))
    name, path, _ = qp.resolve_model("toy")
    assert path == str(broken)
    with pytest.raises(LoadError, match="could not load"):
        qp.build(make_plan(describe_machine(host_ram_gb=8), name), path)


def test_the_cli_prints_a_notice_once_with_its_prefix(tmp_path):
    # generate() logs each notice and the CLI prints the result's notices: one line each on stderr, prefixed.
    # Python's last-resort handler used to print the logged copy unprefixed as well; a fresh process has no
    # logging set up (pytest's own handlers would hide it here), so the command runs as a user runs it.
    import subprocess
    import sys

    code = "import sys; from qwennb.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        "generate",
        "a red circle",
        "--model",
        "tiny",
        "--size",
        "100x100",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if "rounded to 96x96" in line]
    assert lines == ["qwennb: size 100x100 rounded to 96x96 (sizes must be multiples of 16)."], p.stderr


def test_the_cli_leaves_no_log_handler_behind_after_an_error():
    # main() echoes the qwennb logger's warnings while a command runs; a refused command must not leave that
    # handler on the logger (a notebook or a program calling main() twice would print every warning twice).
    import logging

    before = list(logging.getLogger("qwennb").handlers)
    assert main(["generate", "", "--model", "tiny"]) == 2
    assert main(["generate", "x", "--model", "tiny", "--steps", "0"]) == 2
    assert logging.getLogger("qwennb").handlers == before
