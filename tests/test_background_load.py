"""Session.load_in_background on the real tiny pipeline: what waits, what is raised where, and that a failed load
costs nothing but itself."""

import threading

import pytest

from qwennb import pipeline
from qwennb.errors import QwennbError
from qwennb.session import Session


def test_the_model_users_wait_and_the_report_says_background_until_then():
    s = Session()
    started = s.load_in_background("tiny")
    assert started.background and started.model == "tiny" and "in the background" in started.text()
    r = s.generate("a red fox", steps=2, width=64, height=64, seed=4)  # waits for the load
    assert r.images and not s.loading and s.report.model == "tiny" and not s.report.background
    assert s.report.seconds > 0


def test_a_bad_name_is_an_error_at_once_and_nothing_starts():
    s = Session()
    with pytest.raises(QwennbError):
        s.load_in_background("no-such-model-anywhere")
    assert not s.loading and s.pipe is None


def test_a_failed_load_is_raised_once_then_a_new_load_or_unload_goes_on(monkeypatch):
    real = pipeline.build
    calls = []

    def build(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build", build)
    s = Session()
    s.load_in_background("tiny")
    with pytest.raises(OSError, match="disk went away"):
        s.wait()
    assert s.wait() is None and not s.loading  # raised once; nothing loaded
    with pytest.raises(QwennbError, match="no model is loaded"):
        s.require()
    s.load_in_background("tiny")  # the real build this time
    s.unload()  # waits for it, then frees
    assert s.pipe is None and calls == ["qwennb-load", "qwennb-load"]
    calls.clear()
    s.load_in_background("tiny")
    assert s.load("tiny").model == "tiny"  # a load meanwhile waits for the one in the background, then runs
    assert calls == ["qwennb-load", "MainThread"]


def test_a_load_after_a_failed_background_load_is_not_blocked_by_its_error(monkeypatch):
    real = pipeline.build
    first = []

    def build(*args, **kwargs):
        if not first:
            first.append(1)
            raise RuntimeError("corrupt shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build", build)
    s = Session()
    s.load_in_background("tiny")
    assert s.load("tiny").model == "tiny"  # the failed load is replaced, its error not raised here
    assert s.loaded


def test_wait_with_a_timeout_gives_up_and_the_load_goes_on(monkeypatch):
    """wait(timeout) raises TimeoutError while the load runs on; a later wait gets the model."""
    real = pipeline.build
    gate = threading.Event()

    def build(*args, **kwargs):
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build", build)
    s = Session()
    s.load_in_background("tiny")
    with pytest.raises(TimeoutError):
        s.wait(timeout=0.05)
    assert s.loading
    gate.set()
    assert s.wait().model == "tiny" and not s.loading and s.loaded


def _listen(logger_name: str):
    """A handler of the test's own on a library logger: what reaches it, as text."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger(logger_name).addHandler(handler)
    return stream, handler


def test_what_the_load_says_is_held_until_someone_waits_and_said_there(monkeypatch, recwarn):
    """A notebook shows a thread's output in whichever cell runs then: the load's warnings and library log records
    wait for the cell that waits for the model; what other threads say meanwhile goes out at once."""
    import logging
    import warnings

    real = pipeline.build
    said, gate = threading.Event(), threading.Event()

    def build(*args, **kwargs):
        warnings.warn("a deprecation from the load", FutureWarning, stacklevel=1)
        logging.getLogger("diffusers.loaders.probe").warning("a record from the load")
        said.set()
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build", build)
    stream, handler = _listen("diffusers")
    try:
        s = Session()
        s.load_in_background("tiny")
        assert said.wait(60)
        warnings.warn("the main thread's own warning", UserWarning, stacklevel=1)
        logging.getLogger("diffusers.loaders.probe").warning("the main thread's own record")
        assert stream.getvalue() == "the main thread's own record\n"
        assert [str(w.message) for w in recwarn] == ["the main thread's own warning"]
        gate.set()
        assert s.wait().model == "tiny"
        assert stream.getvalue().splitlines() == ["the main thread's own record", "a record from the load"]
        assert [str(w.message) for w in recwarn][-1] == "a deprecation from the load"
        assert recwarn[-1].category is FutureWarning
        s.wait()  # said once
        assert len(stream.getvalue().splitlines()) == 2 and len(recwarn) == 2
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert warnings.showwarning.__module__ != "qwennb.held_output"  # nothing left hooked once no load holds


def test_a_failed_load_still_says_what_it_said_before_its_error(monkeypatch):
    import logging

    def build(*args, **kwargs):
        logging.getLogger("transformers.modeling_utils").warning("shard 3 looks short")
        raise OSError("disk went away")

    monkeypatch.setattr(pipeline, "build", build)
    stream, handler = _listen("transformers")
    try:
        s = Session()
        s.load_in_background("tiny")
        with pytest.raises(OSError, match="disk went away"):
            s.wait()
        assert stream.getvalue() == "shard 3 looks short\n"
    finally:
        logging.getLogger("transformers").removeHandler(handler)
