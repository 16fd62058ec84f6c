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
