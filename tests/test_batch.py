"""Batch generation on the real small pipeline: prompt files, validation, manifest, resume, the local and
Ray engines, a worker killed mid-run, SIGINT, the CLI. No mocks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwennb
from qwennb.batch import (
    BatchError,
    Defaults,
    FolderLock,
    Manifest,
    read_prompts,
    run_batch,
    write_new_file,
)
from qwennb.cli import main
from qwennb.generation import StopSignal, generate, load_params
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan

# The small model every batch test runs: the embedded toy, which draws what a prompt says (the Ray test checks it).
MODEL = os.environ.get("QWENNB_BATCH_TEST_MODEL", "toy")
SMALL = dict(steps=2, size="64x64")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan():
    return make_plan(describe_machine(host_ram_gb=8), MODEL)


@pytest.fixture(scope="module")
def pipe(plan):
    return build(plan)


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- reading and validating


def test_jsonl_csv_and_text_give_the_same_items_with_defaults(tmp_path, plan):
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a red fox", "seed": 9}\n\n# a comment\n{"prompt": "a blue bird", "steps": 5, "size": "96x64"}\n'
    )
    (tmp_path / "p.csv").write_text("prompt,seed,steps,size\na red fox,9,,\na blue bird,,5,96x64\n")
    d = Defaults(steps=3, width=64, height=64, cfg=2.5)
    a = read_prompts(tmp_path / "p.jsonl", model=MODEL, plan=plan, defaults=d)
    b = read_prompts(tmp_path / "p.csv", model=MODEL, plan=plan, defaults=d)
    assert [(i.id, i.seed, i.steps, i.width, i.height, i.cfg) for i in a.items] == [
        (i.id, i.seed, i.steps, i.width, i.height, i.cfg) for i in b.items
    ]
    fox, bird = a.items
    assert (fox.seed, fox.steps, fox.width, fox.height, fox.cfg) == (9, 3, 64, 64, 2.5)
    assert (bird.steps, bird.width, bird.height) == (5, 96, 64)
    assert fox.source.endswith("p.jsonl:1") and bird.source.endswith("p.jsonl:4")
    assert b.items[1].source.endswith("p.csv:3")
    (tmp_path / "p.txt").write_text("a red fox\n\n# skipped\na blue bird\n")
    t = read_prompts(tmp_path / "p.txt", model=MODEL, plan=plan, defaults=d)
    assert [i.prompt for i in t.items] == ["a red fox", "a blue bird"] and t.items[1].source.endswith(":4")
    # Without defaults the plan's own defaults apply.
    p = read_prompts(["x"], model=MODEL, plan=plan).items[0]
    assert (p.steps, p.cfg, p.width, p.height) == (
        plan.defaults["steps"],
        plan.defaults["cfg"],
        plan.defaults["width"],
        plan.defaults["height"],
    )


def test_ids_and_seeds_are_deterministic_and_distinct(plan):
    src = ["a fox", "a fox", {"prompt": "a cat", "n": 3, "seed": 40}, {"prompt": "a cat", "id": "cat1"}]
    a = read_prompts(src, model=MODEL, plan=plan)
    b = read_prompts(src, model=MODEL, plan=plan)
    assert [(i.id, i.seed) for i in a.items] == [(i.id, i.seed) for i in b.items]
    ids = [i.id for i in a.items]
    assert len(set(ids)) == 6
    assert ids[1] == ids[0] + "-2"  # the same prompt twice: two images with their own seeds
    assert a.items[0].seed != a.items[1].seed
    assert [i.seed for i in a.items[2:5]] == [40, 41, 42]
    assert ids[2:5] == [ids[2][:-2] + f"-{k}" for k in range(3)] and ids[5] == "cat1"
    # Another step count is another image: another id (and key); the same count, the same id.
    other = read_prompts(["a fox"], model=MODEL, plan=plan, defaults=Defaults(steps=3)).items[0]
    assert other.id != ids[0] and other.key != a.items[0].key
    assert read_prompts(["a fox"], model=MODEL, plan=plan).items[0].id == ids[0]


def test_malformed_lines_are_reported_with_file_and_line(tmp_path, plan):
    f = tmp_path / "bad.jsonl"
    f.write_text(
        "\n".join(
            [
                '{"prompt": "fine"}',
                '{"prompt": "a", "steps": 1}',
                "{not json",
                '{"prompt": ""}',
                '{"prompt": "b", "preset": "nope"}',
                '{"prompt": "c", "stpes": 3}',
                '{"prompt": "d", "size": "64x64", "aspect": "1:1"}',
                '{"prompt": "e", "id": "fine"}',
                '{"prompt": "f", "id": "fine"}',
                '{"prompt": "g", "cfg": 0.5}',
                "[1, 2]",
                '{"prompt": "h", "cfg": 1e308}',
            ]
        )
    )
    ps = read_prompts(f, model=MODEL, plan=plan)
    assert [i.prompt for i in ps.items] == ["fine", "e"]
    got = {p.source.rsplit(":", 1)[1]: p.message for p in ps.problems}
    assert sorted(got, key=int) == ["2", "3", "4", "5", "6", "7", "9", "10", "11", "12"]
    assert got["2"] == "steps must be from 2 to 1000, got 1"
    assert got["3"].startswith("not valid JSON")
    assert got["4"] == "the prompt is empty"
    assert got["5"].startswith("unknown preset 'nope'")
    assert got["6"].startswith("unknown field 'stpes'")
    assert got["7"] == "give either a size or an aspect ratio, not both"
    assert got["9"] == f"id 'fine' is already used at {f}:8"
    assert got["10"] == "cfg must be at least 1 (1 turns guidance off) and at most 100, got 0.5"
    assert got["11"] == "a line must be a JSON object"
    assert got["12"] == "cfg must be at least 1 (1 turns guidance off) and at most 100, got 1e+308"
    assert ps.problems[0].text() == f"{f}:2: steps must be from 2 to 1000, got 1"


def test_a_size_that_does_not_fit_the_plan_is_refused_before_loading():
    plan = make_plan(describe_machine(gpu_memory_gb=24), "qwen-image-synthetic")
    ps = read_prompts(
        [{"prompt": "ok", "size": "1024x1024"}, {"prompt": "huge", "size": "4096x4096"}],
        model="qwen-image-synthetic",
        plan=plan,
    )
    assert [i.prompt for i in ps.items] == ["ok"]
    assert ps.problems[0].source == "item 2"
    assert "4096x4096 does not fit the plan's" in ps.problems[0].message


def test_strict_refuses_the_file_and_nothing_loads(tmp_path, plan):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 1}\n{"prompt": ""}\n')
    with pytest.raises(BatchError) as e:
        run_batch(f, tmp_path / "out", model=MODEL, strict=True)
    assert str(e.value) == (
        f"{f}:2: steps must be from 2 to 1000, got 1 (and 1 more bad line); --strict refuses the file"
    )
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_ten_thousand_lines_are_validated_in_two_seconds(tmp_path, plan):
    f = tmp_path / "big.jsonl"
    rows = [
        json.dumps({"prompt": f"prompt number {i}", "seed": i, "steps": 2 + i % 5, "size": "64x64"})
        for i in range(10_000)
    ]
    rows[5000] = '{"prompt": "bad", "steps": "x"}'
    f.write_text("\n".join(rows) + "\n")
    t0 = time.perf_counter()
    ps = read_prompts(f, model=MODEL, plan=plan)
    took = time.perf_counter() - t0
    assert len(ps.items) == 9_999 and len(ps.problems) == 1
    assert ps.problems[0].text() == f"{f}:5001: steps must be a whole number, got 'x'"
    assert took <= 2.0, took


# --------------------------------------------------------------------------- files and folders


def test_write_new_file_never_overwrites(tmp_path):
    target = tmp_path / "a.png"
    write_new_file(target, b"first")
    with pytest.raises(FileExistsError):
        write_new_file(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left


def test_a_second_run_on_a_busy_folder_is_refused(tmp_path, pipe):
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out), pytest.raises(BatchError, match="another qwennb batch .* is writing to"):
        run_batch(["a"], out, pipe=pipe, **SMALL)
    assert run_batch(["a"], out, pipe=pipe, **SMALL).done == 1  # free again


def test_an_unwritable_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["batch", str(blocker), "--out", str(blocker / "sub"), "--model", MODEL]) == 2


def test_manifest_ignores_a_line_cut_short(tmp_path):
    m = Manifest(tmp_path)
    m.append({"id": "a", "status": "running"})
    m.append({"id": "a", "status": "done"})
    m.close()
    with open(m.path, "a") as f:
        f.write('{"id": "b", "stat')
    assert m.load() == {"a": {"id": "a", "status": "done"}}


# --------------------------------------------------------------------------- runs on a loaded pipeline


def test_run_resume_and_redo_only_missing_or_failed(tmp_path, pipe):
    out = tmp_path / "out"
    prompts = [
        "a red fox",
        "a blue bird",
        {"prompt": "a green tree", "seed": 77, "cfg": 1},
        "a boat",
        "a cup",
    ]
    events = []
    r = qwennb.batch(prompts, out=out, pipe=pipe, on_event=events.append, **SMALL)
    assert (r.total, r.done, r.skipped, r.failed, r.pending, r.started) == (5, 5, 0, 0, 0, 5)
    assert [e.kind for e in events].count("item_done") == 5 and events[-1].kind == "end"
    rows = lines(r.manifest)
    assert len(rows) == 5 and {x["status"] for x in rows} == {"done"}
    tree = rows[2]
    assert (tree["seed"], tree["cfg"], tree["steps"], tree["width"]) == (77, 1.0, 2, 64)
    assert tree["denoise_s"] > 0 and tree["worker"].endswith(":inline") and tree["attempts"] == 1
    # The file is a provenance PNG with the manifest's parameters, and the image is what generate() makes.
    png = out / tree["path"]
    assert load_params(png)["seed"] == 77 and load_params(png)["steps"] == 2
    ref = generate(pipe, "a green tree", seed=77, steps=2, cfg=1.0, width=64, height=64)
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(ref.images[0]))
    assert (out / "contact_sheet.html").read_text().count("<img") == 5
    assert Image.open(out / "contact_sheet.png").size == (3 * 160, 2 * 160)
    inodes = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").iterdir()}

    r2 = run_batch(prompts, out, pipe=pipe, **SMALL)
    assert (r2.done, r2.skipped, r2.started) == (0, 5, 0)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").iterdir()} == inodes

    # One image lost, one recorded as failed (a failed item has no file): exactly those two are made again.
    (out / rows[0]["path"]).unlink()
    (out / rows[3]["path"]).unlink()
    rows[3].update(status="failed", error="out of GPU memory")
    Manifest(out).rewrite(rows)
    r3 = run_batch(prompts, out, pipe=pipe, **SMALL)
    assert (r3.done, r3.skipped, r3.failed) == (2, 3, 0)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(inodes)
    assert (out / rows[1]["path"]).stat().st_ino == inodes[Path(rows[1]["path"]).name][0]


def test_a_changed_line_under_the_same_id_is_made_again_beside_the_first(tmp_path, pipe):
    """A line keeps its ``id`` but asks for something else: the rerun makes it again (the record's key differs),
    into a new file beside the first one, which is never overwritten; the manifest then points at the new one."""
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "a red circle"}) + "\n")
    out = tmp_path / "out"
    first = run_batch(f, out, pipe=pipe, **SMALL)
    old = lines(first.manifest)[-1]
    f.write_text(json.dumps({"id": "a", "prompt": "a blue square"}) + "\n")
    again = run_batch(f, out, pipe=pipe, **SMALL)
    assert (again.done, again.skipped, again.failed) == (1, 0, 0)
    new = lines(again.manifest)[-1]
    assert new["prompt"] == "a blue square" and new["path"] != old["path"]
    assert (out / old["path"]).exists() and (out / new["path"]).exists()
    assert run_batch(f, out, pipe=pipe, **SMALL).skipped == 1  # and now it is done


def test_a_file_written_but_not_recorded_is_kept(tmp_path, pipe):
    out = tmp_path / "out"
    r = run_batch(["a", "b"], out, pipe=pipe, **SMALL)
    (out / "manifest.jsonl").unlink()  # as if the run died between writing the image and recording it
    before = {p.name: p.stat().st_ino for p in (out / "images").iterdir()}
    r2 = run_batch(["a", "b"], out, pipe=pipe, **SMALL)
    assert (r2.done, r2.skipped) == (0, 2)
    assert {p.name: p.stat().st_ino for p in (out / "images").iterdir()} == before
    assert [x["status"] for x in lines(r.manifest)] == ["done", "done"]


def test_stop_leaves_a_consistent_manifest_and_the_rest_pending(tmp_path, pipe):
    out = tmp_path / "out"
    stop = StopSignal()
    prompts = [f"prompt {i}" for i in range(6)]

    def on_event(e):
        if e.kind == "item_done" and e.done == 2:
            stop.set()

    r = run_batch(prompts, out, pipe=pipe, stop=stop, on_event=on_event, **SMALL)
    assert r.interrupted and (r.done, r.pending, r.started) == (2, 4, 2)
    rows = lines(r.manifest)
    assert [x["status"] for x in rows] == ["done"] * 2 + ["pending"] * 4
    assert len(list((out / "images").iterdir())) == 2
    r2 = run_batch(prompts, out, pipe=pipe, **SMALL)
    assert (r2.done, r2.skipped, r2.interrupted) == (4, 2, False)


def test_parquet_manifest_when_pyarrow_is_present(tmp_path, pipe):
    pq = pytest.importorskip("pyarrow.parquet")
    r = run_batch(["a", "b", "c"], tmp_path / "out", pipe=pipe, **SMALL)
    table = pq.read_table(r.parquet).to_pylist()
    assert [(x["id"], x["seed"], x["status"]) for x in table] == [
        (x["id"], x["seed"], x["status"]) for x in lines(r.manifest)
    ]


# --------------------------------------------------------------------------- the CLI


def test_cli_errors_are_one_line_before_anything_loads(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a red fox\na blue bird\n")
    out = tmp_path / "out"
    # Errors: one line, exit 2, before anything loads.
    assert main(["batch", str(f), "--out", str(out), "--size", "64by64"]) == 2
    assert capsys.readouterr().err == "qwennb: error: size must look like 1024x1024, got '64by64'\n"
    assert main(["batch", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "no such prompt file" in capsys.readouterr().err
    for extra, message in [
        (["--gpus", "two"], "--gpus must be a count or a list like 0,1; got 'two'"),
        (["--gpus", "0"], "gpus must be at least 1, got 0"),
        (["--gpus", "2"], "GPUs were asked for (2), but toy runs on the cpu here (no CUDA GPU)"),
        (["--gpus", "0,1"], "GPUs were asked for ([0, 1]), but toy runs on the cpu here"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--size", "64x64", "--aspect", "1:1"], "give --size or --aspect, not both"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ]:
        assert main(["batch", str(f), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qwennb: error: {message}") and err.count("\n") == 1
    assert not (out / "manifest.jsonl").exists()


# --------------------------------------------------------------------------- local engine and SIGINT


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "QWENNB_NO_PROGRESS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qwennb.cli", "batch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def test_local_workers_sigint_then_resume(tmp_path, pipe):
    """Two local worker processes; SIGINT mid-run leaves a consistent manifest; the rerun redoes at most
    the items that were in flight, and skips the rest."""
    f = tmp_path / "p.jsonl"
    # Six quick items, then ten that take about two seconds each: the Ctrl-C below always lands while items are
    # being made (with sixteen quick ones the batch could end between two looks at the manifest, and the signal
    # then hit the finished CLI; with ten of about a second, a second worker slow to start on a busy machine
    # made its first image when the batch was nearly done, once).
    lines_ = [{"prompt": f"picture {i}"} for i in range(6)]
    lines_ += [{"prompt": f"picture {i}", "size": "256x256", "steps": 16} for i in range(6, 16)]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines_))
    out = tmp_path / "out"
    proc = _cli(
        str(f),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--steps",
        "4",
        "--size",
        "64x64",
        "--workers",
        "2",
        "--json",
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        m = out / "manifest.jsonl"
        done = [x for x in Manifest(out).load().values() if x["status"] == "done"] if m.exists() else []
        if len(done) >= 3 and len({x["worker"] for x in done}) == 2:  # both workers are making images
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the workers made no images in 300 s: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stdout.strip(), (
        f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    )
    first = json.loads(stdout.strip().splitlines()[-1])
    assert first["interrupted"] and first["total"] == 16 and 3 <= first["done"] < 16, first
    assert first["started"] - first["done"] <= 2  # at most the items in flight are unfinished
    assert len(set(first["workers"])) == 2
    rows = lines(first["manifest"])
    assert len(rows) == 16 and {x["status"] for x in rows} <= {"done", "pending"}
    done_rows = [x for x in rows if x["status"] == "done"]
    assert len(done_rows) == first["done"] and all((out / x["path"]).is_file() for x in done_rows)
    assert len({x["worker"] for x in done_rows}) == 2  # both processes made images
    assert len(list((out / "images").iterdir())) == first["done"]
    # Resume (on the loaded pipeline: ids do not depend on the engine): only the rest is made.
    second = run_batch(f, out, pipe=pipe, steps=4, size="64x64")
    assert (second.skipped, second.done, second.failed) == (first["done"], 16 - first["done"], 0)
    assert len(list((out / "images").iterdir())) == 16
    # A third run, through the CLI: nothing to do.
    proc = _cli(str(f), "--out", str(out), "--model", MODEL, "--steps", "4", "--size", "64x64", "--json")
    stdout, stderr = proc.communicate(timeout=120)
    last = json.loads(stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, stderr
    assert (last["total"], last["done"], last["skipped"], last["failed"]) == (16, 0, 16, 0)
    assert last["manifest"] == first["manifest"]


def test_a_worker_encodes_a_repeated_negative_prompt_once_and_makes_the_same_images(pipe):
    """Batch workers keep recent prompt encodings (generate's _text_cache): the negative prompt, the same for
    every item, runs through the text encoder once, and the images are those made without the cache."""
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        cache: dict = {}
        opts = dict(steps=2, width=64, height=64, cfg=4.0)
        cached = [generate(pipe, f"cached {i}", seed=i, _text_cache=cache, **opts) for i in range(3)]
        assert len(calls) == 4  # three prompts and one negative (" "), not six encodings
        calls.clear()
        plain = [generate(pipe, f"cached {i}", seed=i, **opts) for i in range(3)]
        assert len(calls) == 6
    finally:
        hook.remove()
    for a, b in zip(cached, plain, strict=True):
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_the_coordinator_writes_the_pngs_and_a_slow_writer_does_not_hold_the_worker(tmp_path, monkeypatch):
    """The worker hands back pixels; the PNG is encoded and written in the coordinator (this process), and the
    worker starts its next item without waiting for it: with a writer that takes 1 s an image, every item still
    begins before the previous one's file is on disk. An item is recorded done only after its file is written."""
    batch_module = sys.modules["qwennb.batch"]
    real = batch_module._write_item

    def slow_writer(folder, it, value):
        time.sleep(1.0)
        return real(folder, it, value)

    monkeypatch.setattr(batch_module, "_write_item", slow_writer)
    out = tmp_path / "out"
    prompts = [f"slow writer {i}" for i in range(5)]
    r = run_batch(prompts, out, model=MODEL, workers=1, steps=2, size="64x64")
    assert (r.done, r.failed, r.engine) == (5, 0, "local")
    rows = sorted(lines(r.manifest), key=lambda x: x["began"])
    me = f"{os.uname().nodename}:{os.getpid()}"
    for x in rows:
        assert x["written_by"] == me and int(x["worker"].split(":")[1]) != os.getpid()
        assert x["written"] - x["ended"] >= 1.0 and x["written"] <= x["finished"]  # done once the file is
        assert load_params(out / x["path"])["seed"] == x["seed"]
    for a, b in zip(rows, rows[1:], strict=False):
        assert b["began"] < a["written"], (a, b)  # the next item did not wait for the previous file
        assert b["loop_began"] >= a["loop_ended"]  # one item at a time on the worker
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(x["path"]).name for x in rows)


def test_a_local_worker_killed_mid_item_costs_that_item_only(tmp_path):
    """Two local workers, each with one item queued behind the one it runs; one is killed mid-item: that item is
    retried once, the item queued behind it goes back untouched, the other worker goes on; every item once."""
    prompts = [f"local picture {i}" for i in range(12)]
    out = tmp_path / "out"
    started: list[str] = []
    killed: dict[str, str] = {}
    retries: list[tuple[str, str]] = []

    def on_event(e):
        if e.kind == "item_retry":
            retries.append((e.item_id, e.message))
        if e.kind == "item_start":
            started.append(e.item_id)
            if len(started) == 5 and e.worker:  # kill the process that has just begun this item
                os.kill(int(e.worker.split(":")[1]), signal.SIGKILL)
                killed[e.item_id] = e.worker

    r = run_batch(prompts, out, model=MODEL, workers=2, on_event=on_event, steps=4, size="64x64")
    assert len(killed) == 1
    (lost_id,) = killed
    # the retry says why: the worker's process died (the outcome's message; the worker sent no error of its own)
    assert [i for i, _ in retries] == [lost_id] and "died" in retries[0][1], retries
    assert (r.total, r.done, r.failed, r.pending) == (12, 12, 0, 0), r.failures
    rows = lines(r.manifest)
    assert {x["status"] for x in rows} == {"done"} and len({x["id"] for x in rows}) == 12
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(x["path"]).name for x in rows)
    lost = next(x for x in rows if x["id"] in killed)
    assert lost["attempts"] == 2 and lost["worker"] != killed[lost["id"]]
    assert sum(x["attempts"] for x in rows) == 13  # nothing else was redone (not the other worker's item)
    assert len(set(r.workers)) == 3  # two, and the one started in place of the killed one


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    for attempt in range(3):  # Ray gives its raylet 30 s to register: a busy 2-core machine can miss that
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


RAY_COLOURS = ["red", "blue", "green", "yellow", "purple"]
RAY_SMALL = dict(steps=8, size="128x128")  # enough for the toy to draw the colour asked for


def test_ray_two_workers_one_killed_every_item_exactly_once(tmp_path, ray_cluster, pipe):
    from qwennb import toy

    prompts = [
        f"a {RAY_COLOURS[i % 5]} {('circle', 'square')[i % 2]} on a white background" for i in range(20)
    ]
    out = tmp_path / "out"
    started: list[str] = []
    killed: dict[str, str] = {}

    def on_event(e):
        if e.kind == "item_start":
            started.append(e.item_id)
            if len(started) == 8:  # kill the process of the actor that was just handed this item
                os.kill(int(e.worker.split(":")[1]), signal.SIGKILL)
                killed[e.item_id] = e.worker

    r = run_batch(prompts, out, model=MODEL, ray="auto", workers=2, on_event=on_event, **RAY_SMALL)
    assert len(killed) == 1
    assert (r.total, r.done, r.failed, r.pending, r.engine) == (20, 20, 0, 0, "ray"), r.failures
    assert (
        len(set(r.workers)) >= 2 and killed[next(iter(killed))] in r.workers
    )  # (+1 if Ray's restart rejoined)
    rows = lines(r.manifest)
    assert len(rows) == 20 and len({x["id"] for x in rows}) == 20 and {x["status"] for x in rows} == {"done"}
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == sorted(Path(x["path"]).name for x in rows)  # every item once, no extra file
    lost = next(x for x in rows if x["id"] == next(iter(killed)))
    assert lost["attempts"] == 2  # the lost item was retried once
    assert sum(x["attempts"] for x in rows) == 21  # and nothing else was redone
    # The images are those of the reference pipeline (same seed, same model, another process).
    one = rows[7]
    ref = generate(pipe, one["prompt"], seed=one["seed"], steps=8, width=128, height=128)
    diff = np.abs(
        np.asarray(Image.open(out / one["path"]).convert("RGB"), int) - np.asarray(ref.images[0], int)
    )
    assert diff.max() <= 2
    # Each image is its own line's: the toy drew the colour its prompt asked for (all but at most one).
    right = [
        toy.read_image(Image.open(out / x["path"])).colour == toy.parse(x["prompt"])["colour"] for x in rows
    ]
    assert sum(right) >= 19, [x["prompt"] for x, ok in zip(rows, right, strict=True) if not ok]
    # A second run skips everything (no worker is started).
    r2 = run_batch(prompts, out, model=MODEL, ray="auto", workers=2, **RAY_SMALL)
    assert (r2.done, r2.skipped, r2.started, r2.engine) == (0, 20, 0, "none")


# --------------------------------------------------------------------------- notebook: widget and magic


def test_progress_widget_counts_thumbnails_and_stop_button(tmp_path, pipe):
    from qwennb.widgets import BatchProgress

    bp = BatchProgress(thumbs=3)
    prompts = [f"widget {i}" for i in range(6)]

    def on_event(e):
        bp(e)
        if e.kind == "item_done" and e.done == 4:
            bp.stop_button.click()

    r = run_batch(prompts, tmp_path / "o", pipe=pipe, on_event=on_event, stop=bp.stop, **SMALL)
    assert r.interrupted and (r.done, r.pending) == (4, 2)
    assert (bp.bar.value, bp.bar.max) == (4, 6)
    assert len(bp.strip.children) == 3 and bp.strip.children[0].value[:4] == b"\x89PNG"
    assert bp.status.value.startswith("4/6 · 4 made, 0 already done, 0 failed · ")
    assert bp.stop_button.disabled
    # In the background (what %qwen batch --background does): the rest, then the thread's result.
    bp2 = BatchProgress().start(run_batch, prompts=prompts, out=tmp_path / "o", pipe=pipe, **SMALL)
    r2 = bp2.wait(120)
    assert (r2.done, r2.skipped) == (2, 4) and bp2.status.value.endswith("finished")


def test_magic_batch_on_the_loaded_model(tmp_path):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    loaded = "qwennb" in shell.extension_manager.loaded
    if not loaded:
        shell.run_line_magic("config", f"QwenMagics.model = {MODEL!r}")
        shell.run_line_magic("load_ext", "qwennb")
    try:
        f = tmp_path / "p.jsonl"
        f.write_text('{"prompt": "a fox"}\n{"prompt": "a cat", "seed": 3}\n{"prompt": "x", "steps": 1}\n')
        out = tmp_path / "o"
        shown = shell.run_line_magic("qwen", f"batch {f} --out {out} --steps 2 --size 64x64")
        text = shown._repr_mimebundle_()["text/plain"]
        assert text.startswith("qwennb batch finished: 2 items: 2 made, 0 already done, 0 failed, 0 not run")
        assert "1 bad lines skipped" in text
        assert 'src="data:image/png;base64,' in shown._repr_mimebundle_()["text/html"]
        assert len(list((out / "images").iterdir())) == 2
        with pytest.raises(UsageError, match=f"{f}:3: steps must be from 2 to 1000, got 1; --strict"):
            shell.run_line_magic("qwen", f"batch {f} --out {out} --strict --steps 2 --size 64x64")
        with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
            shell.run_line_magic("qwen", f"batch {f} --bogus")
        bp = shell.run_line_magic("qwen", f"batch {f} --out {out} --steps 2 --size 64x64 --background")
        assert bp.wait(120).skipped == 2
    finally:
        if not loaded:
            shell.run_line_magic("unload_ext", "qwennb")
            # the shell is a singleton: leave its config as found, for the tests of the default model
            shell.run_line_magic("config", "QwenMagics.model = ''")


def test_magic_batch_checks_the_file_before_loading_a_model(tmp_path):
    """With no model loaded, a missing prompt file, a file of bad lines under --strict or an unwritable folder is a
    UsageError before the model loads: the session stays empty."""
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    loaded = "qwennb" in shell.extension_manager.loaded
    if not loaded:
        shell.run_line_magic("config", f"QwenMagics.model = {MODEL!r}")
        shell.run_line_magic("load_ext", "qwennb")
    magics = shell.magics_manager.registry["QwenMagics"]
    try:
        shell.run_line_magic("qwen", "unload")
        assert not magics.session.loaded
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a fox", "steps": 1}\n')
        blocker = tmp_path / "file"
        blocker.write_text("")
        cases = [
            (f"batch {tmp_path / 'none.txt'} --out {tmp_path / 'o'}", "no such prompt file"),
            (f"batch {bad} --out {tmp_path / 'o'} --strict", "steps must be from 2 to 1000"),
            (f"batch {bad} --out {blocker / 'sub'}", "cannot write|not a folder|output folder"),
        ]
        for line, message in cases:
            with pytest.raises(UsageError, match=message):
                shell.run_line_magic("qwen", line)
            assert not magics.session.loaded, line
    finally:
        if not loaded:
            shell.run_line_magic("unload_ext", "qwennb")
            shell.run_line_magic("config", "QwenMagics.model = ''")


def test_ctrl_c_while_the_workers_start_still_ends_with_the_json_summary(tmp_path):
    """Ctrl-C while the worker processes load the model (before any item runs): exit 130, the last line of stdout
    is still the JSON summary (interrupted, nothing made), and the manifest holds every item as pending."""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"picture {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    args = (str(f), "--out", str(out), "--model", MODEL, "--steps", "4", "--size", "64x64", "--workers", "2")
    proc = _cli(*args, "--json")
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "manifest.jsonl").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["total"] == 6 and summary["failed"] == 0
    rows = lines(summary["manifest"])
    assert len(rows) == 6 and {x["status"] for x in rows} <= {"done", "pending"}
    assert sum(x["status"] == "done" for x in rows) == summary["done"]


def test_closing_a_worker_whose_pool_never_started_its_thread():
    """A Ctrl-C that lands while a local worker's pool starts leaves ProcessPoolExecutor with a manager thread object
    it never started; its shutdown raises "cannot join thread before it is started" (seen once in the Ctrl-C test
    above). Closing the engine must still end cleanly."""
    import threading
    from concurrent.futures import ProcessPoolExecutor

    from qwennb.batch import _shutdown

    pool = ProcessPoolExecutor(1)
    pool._executor_manager_thread = threading.Thread(
        target=lambda: None
    )  # as the interrupted start leaves it
    with pytest.raises(RuntimeError, match="before it is started"):
        pool.shutdown(wait=True, cancel_futures=True)
    pool2 = ProcessPoolExecutor(1)
    pool2._executor_manager_thread = threading.Thread(target=lambda: None)
    _shutdown(pool2, wait=True)  # no exception


def test_ctrl_c_while_the_contact_sheet_is_drawn_still_returns_the_summary(tmp_path, pipe, monkeypatch):
    """Every image is made and recorded; a Ctrl-C that lands while the contact sheet is drawn must not lose the
    summary (the CLI prints it as its last line): the run ends interrupted, without a sheet."""
    import qwennb.batch as qb

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qb, "contact_sheet", interrupted)
    r = run_batch(["a red circle", "a blue square"], tmp_path / "out", pipe=pipe, steps=2, size="64x64")
    assert r.interrupted and r.done == 2 and r.contact_sheet_html is None
    assert {x["status"] for x in lines(r.manifest)} == {"done"}


def quick_batch_argv(prompts, tmp_path) -> list[str]:
    """`qwennb batch` on a prompt file: two steps at 64x64 into tmp_path/out, one JSON summary line."""
    out = str(tmp_path / "out")
    return [
        "batch",
        str(prompts),
        "--out",
        out,
        "--model",
        MODEL,
        "--steps",
        "2",
        "--size",
        "64x64",
        "--json",
    ]


def test_ctrl_c_while_the_summary_prints_does_not_lose_it(tmp_path, monkeypatch):
    """The run is over when a Ctrl-C lands on the CLI printing its summary (a real SIGINT, sent from inside the
    write): the JSON line is still printed whole and the exit status is the run's, not 130."""

    class Stdout:
        def __init__(self):
            self.text, self.signalled = "", False

        def write(self, s):
            if not self.signalled:
                self.signalled = True
                os.kill(os.getpid(), signal.SIGINT)
            self.text += s
            return len(s)

        def flush(self):
            pass

    f = tmp_path / "p.txt"
    f.write_text("a red circle\na blue square\n")
    out = Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    rc = main(quick_batch_argv(f, tmp_path))
    monkeypatch.undo()
    assert out.signalled and rc == 0
    summary = json.loads(out.text.strip().splitlines()[-1])
    assert summary["done"] == 2 and not summary["interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # held only while printing


def test_the_summary_hold_is_a_no_op_off_the_main_thread(tmp_path, capsys):
    """signal.signal may only be called from the main thread: the CLI's batch run from another thread (a notebook's
    background thread, a test runner's worker) prints its summary without trying to hold SIGINT."""
    import threading

    f = tmp_path / "p.txt"
    f.write_text("a red circle\n")
    box: dict = {}

    def run():
        try:
            box["rc"] = main(quick_batch_argv(f, tmp_path))
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever escaped
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(300)
    assert "error" not in box, box.get("error")
    assert box["rc"] == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_gpus_that_the_machine_lacks_are_refused_before_anything_loads():
    from qwennb.batch import _check_gpus
    from qwennb.plan import describe_machine, make_plan

    hw = describe_machine(80, gpu_count=2, host_ram_gb=256)
    plan = make_plan(hw, "qwen-image")
    _check_gpus(2, plan, hw)
    _check_gpus(5, plan, hw)  # "at most five": the two there are
    _check_gpus([1], plan, hw)
    with pytest.raises(BatchError, match=r"^no GPU 3, 7 on this machine; its GPUs are 0, 1$"):
        _check_gpus([0, 3, 7], plan, hw)
    with pytest.raises(BatchError, match="at least 1"):
        _check_gpus(0, plan, hw)
    with pytest.raises(BatchError, match="a count or a list"):
        _check_gpus(True, plan, hw)
