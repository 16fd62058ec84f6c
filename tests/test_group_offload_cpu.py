"""Resident blocks under group offload, checked on the CPU (streams need CUDA, so they are off here)."""

import torch

from qwennb.pipeline import group_offload_with_resident_blocks
from qwennb.stand_ins import build_tiny_pipeline


def test_resident_blocks_get_no_offload_hooks_and_the_output_is_unchanged(monkeypatch):
    pipe = build_tiny_pipeline(seed=2)
    t = pipe.transformer
    kw = dict(prompt="a red fox", num_inference_steps=2, height=64, width=64, output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    stock = t.enable_group_offload
    monkeypatch.setattr(t, "enable_group_offload", lambda **k: stock(**{**k, "use_stream": False}))
    blocks = list(t.transformer_blocks)
    keep = group_offload_with_resident_blocks(t, 1, torch.device("cpu"))
    assert keep == [0] and list(t.transformer_blocks) == blocks  # the same block objects, back in place

    def hooks(m):
        reg = getattr(m, "_diffusers_hook", None)
        return set(reg.hooks) if reg is not None else set()

    assert "group_offloading" not in hooks(blocks[0])
    assert "group_offloading" in hooks(blocks[1])
    got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(got, ref)
