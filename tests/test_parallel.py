"""qwennb.parallel: worker pools of CPU ranks over gloo on the small model, compared with one process.

Each pool is started once per module (spawned processes that import torch and diffusers take a while on a
2-core machine); sizes are 64x64 and a few steps.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from qwennb.errors import GenerationError, QwennbError
from qwennb.generation import StopSignal
from qwennb.parallel import (
    SMALL_MODEL,
    ParallelError,
    WorkerDiedError,
    WorkerPool,
    choose_parallel,
    pad_text_to_multiple,
    split_counts,
)
from qwennb.session import Session

PROMPT = "a red car x"  # 11 tokens with the tiny tokenizer: odd, so Ulysses must pad it
KW = {"steps": 3, "width": 64, "height": 64, "seed": 5}


def pixels_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def single():
    """One process: the reference."""
    s = Session()
    s.load(SMALL_MODEL)
    yield s
    s.unload()


def reference(single, **kw):
    """The one-process result and its final latents."""
    keep = {}
    result = single.generate(PROMPT, on_step=lambda st: keep.__setitem__("lat", st.latents), **{**KW, **kw})
    return result, keep["lat"]


@pytest.fixture(scope="module")
def pool2():
    # The tuned path (uncompiled) in each worker, as on a GPU, where the plan turns it on (compiled).
    pool = WorkerPool(gpus=2, model=SMALL_MODEL, device="cpu", threads=1, tuned_path_eager=True).start()
    yield pool
    pool.close()


# ----------------------------------------------------------------------------- pure parts


def test_choose_parallel_modes_and_degrees():
    p = choose_parallel(2, 4.0, 1024, 1024, 1)
    assert (p.mode, p.cfg_degree, p.ulysses_degree, p.gpus_used) == ("cfg", 2, 1, 2)
    assert p.exchanged_mb_per_step == pytest.approx(4096 * 64 * 2 / 1024**2)
    # One image without CFG: Ulysses (the tuned path's) measured 1.50x one GPU on 2xH200 but not lossless, so one
    # GPU draws it, unless the pool was loaded with a Ulysses degree.
    p = choose_parallel(2, 1.0, 1024, 1024, 1)
    assert (p.mode, p.gpus_used) == ("single", 1) and "0.081 against 0.122" in p.why and "opt-in" in p.why
    p = choose_parallel(2, 1.0, 1024, 1024, 1, ulysses=2)
    assert (p.mode, p.ulysses_degree) == ("ulysses", 2) and "tuned path" in p.why
    # 2 all-to-alls a block: q, k, v of 2048 image tokens, then 2048 tokens + 32 text tokens, 3072 wide, half sent.
    assert p.exchanged_mb_per_step == pytest.approx(60 * (4 * 2048 + 32) * 3072 * 2 / 2 / 1024**2)
    p = choose_parallel(4, 4.0, 1024, 1024, 1)
    assert (p.mode, p.cfg_degree, p.ulysses_degree) == ("cfg+ulysses", 2, 2)
    p = choose_parallel(8, 4.0, 1024, 1024, 1)
    assert (p.mode, p.ulysses_degree, p.gpus_used) == ("cfg+ulysses", 4, 8)
    # 1328x1328 has 83*83 image tokens (odd): no Ulysses; the CFG halves still go to two GPUs.
    p = choose_parallel(8, 4.0, 1328, 1328, 1)
    assert (p.mode, p.ulysses_degree, p.gpus_used) == ("cfg", 1, 2) and "6 GPU(s) idle" in p.why
    p = choose_parallel(4, 4.0, 1024, 1024, 8)
    assert (p.mode, p.data_degree, p.gpus_used) == ("data", 4, 4)
    p = choose_parallel(4, 4.0, 1024, 1024, 2)
    assert (p.mode, p.data_degree) == ("data", 2) and "2 GPU(s) idle" in p.why
    assert choose_parallel(1, 4.0, 1024, 1024, 4).mode == "single"
    # 1008x1008 has 63*63 image tokens: no Ulysses degree divides them, and without CFG nothing else helps.
    assert choose_parallel(2, 1.0, 1008, 1008, 1).mode == "single"
    # A pool fixed at Ulysses 2 on 4 GPUs: one image without CFG runs on one group.
    p = choose_parallel(4, 1.0, 1024, 1024, 1, ulysses=2)
    assert (p.mode, p.ulysses_degree, p.data_degree) == ("data", 2, 1)
    assert "ulysses" in choose_parallel(4, 1.0, 1024, 1024, 1).text()


def test_choose_parallel_refuses_bad_input():
    with pytest.raises(ParallelError, match="gpus"):
        choose_parallel(0, 4.0, 1024, 1024)
    with pytest.raises(ParallelError, match="does not divide"):
        choose_parallel(4, 1.0, 1024, 1024, ulysses=3)
    with pytest.raises(ParallelError, match="heads"):
        choose_parallel(4, 1.0, 1024, 1024, heads=2, ulysses=4)


def test_pad_text_to_multiple():
    e = torch.arange(10.0).reshape(1, 5, 2)
    pe, pm = pad_text_to_multiple(e, None, 4)
    assert pe.shape == (1, 8, 2)
    assert torch.equal(pe[:, :5], e) and pe[:, 5:].abs().sum() == 0
    assert pm.tolist() == [[True] * 5 + [False] * 3]
    m = torch.tensor([[1, 1, 1, 0, 1, 1]])
    e6 = torch.ones(1, 6, 2)
    assert pad_text_to_multiple(e6, m, 3)[0] is e6  # already divides: unchanged
    pe, pm = pad_text_to_multiple(torch.ones(1, 7, 2), m[:, :1].repeat(1, 7), 2)
    assert pm.tolist() == [[1] * 7 + [0]]


def test_padded_text_gives_the_same_image_tokens(single):
    """What Ulysses relies on: a text padded with masked tokens leaves the transformer's output unchanged."""
    pipe = single.pipe
    embeds, mask = pipe.encode_prompt(PROMPT, device="cpu")
    assert embeds.shape[1] % 2 == 1  # the odd length that stock Ulysses fails on
    t = pipe.transformer
    torch.manual_seed(0)
    x = torch.randn(1, 16, 64)
    args = {"timestep": torch.tensor([0.5]), "img_shapes": [[(1, 4, 4)]], "return_dict": False}
    with torch.no_grad():
        ref = t(hidden_states=x, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, **args)[0]
        pe, pm = pad_text_to_multiple(embeds, mask, 4)
        out = t(hidden_states=x, encoder_hidden_states=pe, encoder_hidden_states_mask=pm, **args)[0]
    assert pe.shape[1] % 4 == 0
    assert rel_err(out, ref) < 1e-5


def test_split_counts():
    assert split_counts(5, 2) == [3, 2]
    assert split_counts(8, 4) == [2, 2, 2, 2]
    assert split_counts(1, 3) == [1, 0, 0]


def test_pool_refuses_bad_setup_before_starting():
    with pytest.raises(ParallelError, match="at least 1"):
        WorkerPool(gpus=0)
    with pytest.raises(ParallelError, match="must divide"):
        WorkerPool(gpus=4, ulysses=3)
    with pytest.raises(ParallelError, match="heads"):
        WorkerPool(gpus=4, model=SMALL_MODEL, ulysses=4, device="cpu").start()
    if not torch.cuda.is_available():
        with pytest.raises(ParallelError, match="has 0"):
            WorkerPool(gpus=2, model=SMALL_MODEL, device="cuda").start()
    pool = WorkerPool(gpus=2, model=SMALL_MODEL, device="cpu")
    with pytest.raises(ParallelError, match="not running"):
        pool.generate(PROMPT, **KW)


# ----------------------------------------------------------------------------- two CPU ranks over gloo


def test_cfg_parallel_equals_one_process(single, pool2):
    ref, ref_lat = reference(single)
    steps = []
    out = pool2.generate(PROMPT, return_latents=True, on_step=steps.append, **KW)
    assert out.parallel_mode == "cfg" and out.gpus == 2
    assert [s.step for s in steps] == [1, 2, 3] and len(out.step_times_s) == 3
    assert rel_err(out.final_latents, ref_lat) < 1e-5
    assert pixels_diff(out.images[0], ref.images[0]) <= 1
    assert out.seed == 5 and out.cfg == 4.0 and len(out.peak_gpu_memory_per_gpu_gb) == 2
    assert [a["fast_path"] for a in pool2.active()] == [True, True]  # the tuned path ran inside each worker


def test_data_parallel_equals_one_process(single, pool2):
    ref, ref_lat = reference(single, num_images=3)
    out = pool2.generate(PROMPT, num_images=3, return_latents=True, **KW)
    assert out.parallel_mode == "data" and out.num_images == 3 and len(out.images) == 3
    assert rel_err(out.final_latents, ref_lat) < 1e-5
    assert [pixels_diff(a, b) <= 1 for a, b in zip(out.images, ref.images, strict=True)] == [True] * 3
    # The images are not all the same: each kept its own slice of the noise.
    assert pixels_diff(out.images[0], out.images[1]) > 10


def test_a_profiled_request_writes_each_ranks_table_and_the_same_image(single, pool2, tmp_path):
    """``profile_dir``: every rank writes its operator table (the transformer's matmuls in it), and the image is the
    unprofiled one."""
    ref = pool2.generate(PROMPT, **KW)
    out = pool2.generate(PROMPT, profile_dir=tmp_path / "prof", **KW)
    assert pixels_diff(out.images[0], ref.images[0]) == 0
    for rank in (0, 1):
        text = (tmp_path / "prof" / f"rank{rank}.txt").read_text()
        assert text.startswith(f"rank {rank} on cpu") and "aten::" in text and "by CPU time" in text


def test_stop_reaches_the_workers(pool2):
    stop = StopSignal()

    def on_step(s):
        if s.step == 2:
            stop.set()

    out = pool2.generate(PROMPT, on_step=on_step, stop=stop, **{**KW, "steps": 8})
    # The controller hears of step 2 through a queue while the workers go on: they stop at the next step they
    # start after the signal, the 3rd at the latest (as with Ctrl-C below), and never run to the end.
    assert out.interrupted and out.steps_completed in (2, 3) and len(out.images) == 1
    # The pool is still usable, and the next run is whole.
    assert pool2.generate(PROMPT, **KW).steps_completed == 3


def test_ctrl_c_stops_at_the_next_step(pool2):
    def on_step(s):
        if s.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    out = pool2.generate(PROMPT, on_step=on_step, **{**KW, "steps": 8})
    assert out.interrupted and out.steps_completed in (1, 2)


def test_bad_options_fail_before_sending(pool2):
    with pytest.raises(GenerationError, match="steps"):
        pool2.generate(PROMPT, **{**KW, "steps": 1})
    with pytest.raises(GenerationError, match="empty"):
        pool2.generate("  ", **KW)
    with pytest.raises(ParallelError, match="CFG > 1"):
        pool2.generate(PROMPT, parallel="cfg", **{**KW, "cfg": 1.0})
    with pytest.raises(ParallelError, match="ulysses"):
        pool2.generate(PROMPT, parallel="ulysses", **KW)
    assert pool2.generate(PROMPT, **KW).steps_completed == 3


def test_dead_worker_gives_one_clear_error_and_the_pool_restarts(single, pool2):
    victim = pool2.pids[1]

    def on_step(s):
        if s.step == 1:
            os.kill(victim, signal.SIGKILL)

    with pytest.raises(
        WorkerDiedError, match=r"worker 1 .*died during generation \(signal SIGKILL\).*restart"
    ):
        pool2.generate(PROMPT, on_step=on_step, **{**KW, "steps": 200})
    assert not pool2.running and pool2.pids == []
    with pytest.raises(ParallelError, match="not running"):
        pool2.generate(PROMPT, **KW)
    pool2.restart()
    assert victim not in pool2.pids
    ref, _ = reference(single)
    assert pixels_diff(pool2.generate(PROMPT, **KW).images[0], ref.images[0]) <= 1


# ----------------------------------------------------------------------------- Ulysses, and four ranks


@pytest.mark.parametrize(
    "impl, way", [("tuned", "tuned path, eager"), ("diffusers", "diffusers context parallelism")]
)
def test_ulysses_equals_one_process_with_an_odd_prompt_length(single, impl, way):
    ref, ref_lat = reference(single, cfg=1.0)
    with WorkerPool(gpus=2, model=SMALL_MODEL, device="cpu", ulysses=2, threads=1, ulysses_impl=impl) as pool:
        assert [i["ulysses"] for i in pool.info] == [way, way]  # which Ulysses the workers run
        out = pool.generate(PROMPT, cfg=1.0, return_latents=True, **KW)
        assert out.parallel_mode == "ulysses" and out.gpus == 2
        assert rel_err(out.final_latents, ref_lat) < 1e-5
        assert pixels_diff(out.images[0], ref.images[0]) <= 1
        assert [a["fast_path"] for a in pool.active()] == [impl == "tuned"] * 2
        # each rank's blocks ran on half the image tokens (tuned Ulysses reports it; the diffusers way does not)
        tokens = (KW["width"] // 16) * (KW["height"] // 16)
        assert out.image_tokens_per_gpu == ([tokens // 2] * 2 if impl == "tuned" else [None, None])
        with pytest.raises(GenerationError, match="Ulysses degree"):
            pool.generate(PROMPT, **{**KW, "width": 48, "height": 48})  # 9 image tokens
    with pytest.raises(ParallelError, match="ulysses_impl"):
        WorkerPool(gpus=2, ulysses=2, ulysses_impl="ring")


# The tuned path's Ulysses on the transformer alone, in two gloo ranks: (text tokens, latent height and width in
# patches, batch, a text mask). Odd prompt lengths, a non-square image, a batch and a masked text.
ULYSSES_CASES = [(11, 4, 4, 1, False), (13, 4, 6, 2, False), (9, 6, 4, 1, True)]
ULYSSES_COMPILED = [(11, 4, 4, 1, False), (13, 4, 6, 1, False)]  # two sizes, one graph (dynamic lengths)


def _forward_inputs(text: int, h: int, w: int, batch: int, masked: bool) -> dict:
    g = torch.Generator().manual_seed(text * 100 + h * 10 + w)
    mask = None
    if masked:
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[:, -3:] = 0
    return {
        "hidden_states": torch.randn(batch, h * w, 64, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.3 + 0.2 * i for i in range(batch)]),
        "img_shapes": [[(1, h, w)]] * batch,
        "return_dict": False,
    }


def _ulysses_rank(rank: int, world: int, init_file: str, out) -> None:
    """One gloo rank: the tiny transformer on the tuned path with enable_ulysses, eager and then compiled."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from qwennb import speed
    from qwennb.stand_ins import build_tiny_pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = build_tiny_pipeline(seed=0).transformer
        results = {}
        for compiled, cases in ((False, ULYSSES_CASES), (True, ULYSSES_COMPILED)):
            torch._dynamo.reset()
            counters.clear()
            speed.enable_fast_path(tr, compile=compiled, backend="aot_eager")
            group = speed.enable_ulysses(tr)
            with torch.no_grad():
                results[compiled] = [tr(**_forward_inputs(*c))[0].numpy() for c in cases]
            graphs = counters["stats"]["unique_graphs"]
            speed.disable_fast_path(tr)
        out.put((rank, results, graphs, (group.degree, group.rank), None))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, None, None, None, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def _run_ranks(target, world: int = 2, timeout: float = 600) -> dict:
    import queue
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="qwennb-test-"), "rendezvous")
    procs = [ctx.Process(target=target, args=(r, world, init_file, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < world:
            try:
                row = out.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"the ranks gave no result within {timeout:.0f} s (a collective left waiting?)")
            got[row[0]] = row[1:]
    finally:
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    return got


def test_tuned_ulysses_matches_one_process_eager_and_compiled():
    """Each rank's slice of the image tokens, its rows of the image RoPE and its heads must be exactly the ones a
    single process uses: an off-by-one in any of them changes the output (or its shape), and the check is on
    every rank's whole output. Compiled, the all-to-alls sit inside one graph per block that serves two sizes."""
    from qwennb import speed
    from qwennb.stand_ins import build_tiny_pipeline

    tr = build_tiny_pipeline(seed=0).transformer
    cases = list(dict.fromkeys(ULYSSES_CASES + ULYSSES_COMPILED))
    with torch.no_grad():
        stock = {c: tr(**_forward_inputs(*c))[0] for c in cases}
        speed.enable_fast_path(tr, compile=False)
        ref = {c: tr(**_forward_inputs(*c))[0] for c in cases}  # one process on the tuned path
        speed.disable_fast_path(tr)
    assert max(rel_err(ref[c], stock[c]) for c in cases) < 1e-5
    got = _run_ranks(_ulysses_rank)
    for rank, (results, graphs, group, error) in sorted(got.items()):
        assert error is None, f"rank {rank}: {error}"
        assert group == (2, rank)
        for compiled, cases in ((False, ULYSSES_CASES), (True, ULYSSES_COMPILED)):
            for case, out in zip(cases, results[compiled], strict=True):
                expect = ref[case]
                assert out.shape == tuple(expect.shape), (rank, compiled, case)
                assert rel_err(torch.from_numpy(out), expect) < 1e-6, (rank, compiled, case)
        assert graphs == 1  # the compiled block, collectives inside, for both sizes and prompt lengths


def test_enable_ulysses_refuses_without_the_tuned_path_or_a_process_group():
    from qwennb import speed
    from qwennb.stand_ins import build_tiny_pipeline

    tr = build_tiny_pipeline(seed=0).transformer
    with pytest.raises(RuntimeError, match="enable_fast_path"):
        speed.enable_ulysses(tr)
    speed.enable_fast_path(tr, compile=False)
    try:
        if not torch.distributed.is_initialized():
            with pytest.raises(RuntimeError, match="process group"):
                speed.enable_ulysses(tr)
    finally:
        speed.disable_fast_path(tr)


def test_four_workers_cfg_times_ulysses_and_data(single):
    ref, ref_lat = reference(single)
    ref3, ref3_lat = reference(single, num_images=3)
    with WorkerPool(gpus=4, model=SMALL_MODEL, device="cpu", ulysses=2, threads=1) as pool:
        assert {i["ulysses"] for i in pool.info} == {"tuned path, eager"}
        out = pool.generate(PROMPT, return_latents=True, **KW)
        assert out.parallel_mode == "cfg+ulysses" and out.gpus == 4
        assert rel_err(out.final_latents, ref_lat) < 1e-5
        assert pixels_diff(out.images[0], ref.images[0]) <= 1
        out = pool.generate(PROMPT, num_images=3, return_latents=True, **KW)
        assert out.parallel_mode == "data" and len(out.images) == 3
        assert rel_err(out.final_latents, ref3_lat) < 1e-5
        assert max(pixels_diff(a, b) for a, b in zip(out.images, ref3.images, strict=True)) <= 1


# ----------------------------------------------------------------------------- the magics and the CLI, one option


def test_session_for_checks_and_switches():
    from qwennb.parallel import ParallelSession, session_for

    s = Session()
    assert session_for(s, 1) is s
    p = session_for(s, 2)
    assert isinstance(p, ParallelSession) and p.gpus == 2 and not p.loaded
    assert session_for(p, 2) is p and isinstance(session_for(p, 1), Session)
    with pytest.raises(ParallelError, match="gpus must be"):
        session_for(s, 0)
    with pytest.raises(ParallelError, match="must divide"):
        session_for(s, 4, 3)
    with pytest.raises(QwennbError, match="no model is loaded"):
        p.require()


def test_magics_load_with_gpus_generate_and_unload_ends_the_workers(capsys):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    from qwennb.parallel import ParallelSession

    shell = InteractiveShell.instance()
    if "qwennb" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "qwennb")
    m = shell.magics_manager.registry["QwenMagics"]
    try:
        with pytest.raises(UsageError, match="gpus must be"):
            shell.run_line_magic("qwen", f"load {SMALL_MODEL} gpus=0")
        shell.run_line_magic("qwen", f"load {SMALL_MODEL} gpus=2")
        assert "on 2 workers" in capsys.readouterr().out
        assert isinstance(m.session, ParallelSession) and m.session.loaded
        pids = m.session.pool.pids
        r = shell.run_cell_magic("qwen_generate", "--steps 2 --size 64x64 --seed 3 --no-save", PROMPT)
        assert r.parallel_mode == "cfg" and r.steps_completed == 2 and r.images[0].size == (64, 64)
        assert m.session.history[-1] is r
        info = shell.run_line_magic("qwen", "info")
        assert "model: tiny" in info.text and len(m.session.info()["active_per_worker"]) == 2
        with pytest.raises(UsageError, match="one-GPU session"):
            shell.run_line_magic("qwen", "enhance a fox")
        shell.run_line_magic("qwen", "unload")
        assert not m.session.loaded
        for pid in pids:  # the worker processes are gone: their memory (GPU memory on GPUs) is freed
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        shell.run_line_magic("qwen", f"load {SMALL_MODEL}")  # leave the shared shell on one process
    assert type(m.session) is Session


def test_cli_generate_with_gpus(tmp_path, capsys):
    from qwennb.cli import main

    assert main(["generate", "x", "--gpus", "0", "--model", SMALL_MODEL]) == 2
    assert "gpus must be" in capsys.readouterr().err
    out = tmp_path / "out"
    code = main(
        ["generate", PROMPT, "--gpus", "2", "--model", SMALL_MODEL, "--steps", "2", "--size", "64x64"]
        + ["--seed", "4", "--out", str(out), "--json"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "on 2 workers" in captured.err
    import json

    d = json.loads(captured.out)
    assert d["parallel_mode"] == "cfg" and d["gpus"] == 2 and len(list(out.glob("*.png"))) == 1


def test_the_measured_ulysses_figures_are_the_results_files():
    """The plan's reason for keeping one CFG-1 image on one GPU quotes a run: the numbers must be that run's."""
    import json
    from pathlib import Path

    from qwennb.parallel import ULYSSES_MEASURED as m

    rows = json.loads((Path(__file__).resolve().parents[1] / m["source"]).read_text())["runs"]

    def step(config):
        return next(
            r["s_per_step"]
            for r in rows
            if r["config"] == config and r["cfg"] == 1.0 and r["num_images"] == 1 and r["width"] == m["size"]
        )

    assert round(step(m["config"]), 3) == m["ulysses_s_per_step"]
    assert round(step("qwennb-1gpu"), 3) == m["one_gpu_s_per_step"]
    err = next(r["latent_rel_err"] for r in rows if r["config"] == m["config"] and r["width"] == m["size"])
    assert round(err, 4) == m["latent_rel_err"]
