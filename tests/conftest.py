import os

# Tests never reach the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QWENNB_NO_PROGRESS", "1")
# Bit-exact CPU reproducibility (see qwennb/__init__.py), set before anything imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import signal  # noqa: E402

# A suite started in the background (`nohup pytest &`, a job of a non-interactive shell) inherits SIGINT ignored, and
# so does every CLI and worker it starts: the Ctrl-C tests would then send signals nobody hears. Python's own
# handler, as in a terminal (the processes the tests start get SIGINT's default from it and install theirs).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import re  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def fits_phrasing():
    """``fits_phrasing(template)``: a pattern that matches every instruction the toy edit phrasing ``template`` (with
    ``{obj}`` and ``{new}`` slots) can make, case aside; the tests that keep training and held-out phrasings apart
    all read "fits a template" this one way."""

    def pattern(template: str) -> re.Pattern:
        parts = re.split(r"(\{obj\}|\{new\})", template)
        return re.compile(
            "".join(".+" if p in ("{obj}", "{new}") else re.escape(p) for p in parts), re.IGNORECASE
        )

    return pattern
