import os

# Tests never reach the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QWENNB_NO_PROGRESS", "1")
