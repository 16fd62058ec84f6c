import os

# Tests never reach the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QWENNB_NO_PROGRESS", "1")
# Bit-exact CPU reproducibility (see qwennb/__init__.py), set before anything imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
