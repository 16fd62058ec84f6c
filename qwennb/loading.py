"""Load a transformer straight into the form a plan stores it in, and pin host weights where they lie.

The plans below 48 GB keep the transformer's blocks in fp8 (``qwennb.speed.FP8Linear``), some on the GPU and
the rest streamed from host RAM. Loading the whole transformer in bf16 first and converting it after would
pass 38 GiB through host RAM; here each block is read (or, for the synthetic stand-in, drawn) in bf16,
quantised to fp8 on the GPU when there is one, and moved to its home before the next block is read, so host
RAM holds only what the plan keeps there plus one block. Streamed weights are then page-locked in place
(:func:`pin_in_place`): one host buffer per module registered with CUDA, so diffusers' group offload finds
them pinned and makes no second copy (and torch's pinned allocator, which rounds each tensor up to a power of
two, is not used).

Example:
    >>> import torch
    >>> from qwennb.loading import pack_in_place
    >>> lin = torch.nn.Linear(4, 3)
    >>> w = lin.weight.detach().clone()
    >>> buf = pack_in_place(lin)
    >>> torch.equal(lin.weight, w), lin.weight.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    (True, True)
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LoadError

ALIGN = 64  # bytes: every tensor packed into a host buffer starts on this boundary


def _host_tensors(module: Any) -> list[Any]:
    seen: set[int] = set()
    out = []
    for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
        if t is not None and t.device.type == "cpu" and id(t) not in seen and t.numel():
            seen.add(id(t))
            out.append(t)
    return out


def pack_in_place(module: Any, recurse: bool = True) -> Any:
    """Move a module's host parameters and buffers into one contiguous host buffer (each tensor becomes a view
    of it, values unchanged); returns the buffer, or None when there is nothing on the host.

    The transient cost is one tensor at a time, not a second copy of the module."""
    import torch

    mods = list(module.modules()) if recurse else [module]
    tensors = [t for m in mods for t in _host_tensors(m)]
    if not tensors:
        return None
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(-(-n // ALIGN) * ALIGN for n in sizes)
    buf = torch.empty(total, dtype=torch.uint8)
    offset = 0
    for t, n in zip(tensors, sizes, strict=True):
        view = buf[offset : offset + n].view(t.dtype).view(t.shape)
        view.copy_(t.data)
        t.data = view
        offset += -(-n // ALIGN) * ALIGN
    module._qwennb_host_buffer = buf  # keeps the buffer (and its registration) alive with the module
    return buf


def pin_in_place(modules: Any) -> float:
    """Page-lock the host weights of each module where they are (:func:`pack_in_place`, then
    ``cudaHostRegister``); returns the GiB pinned. Without CUDA nothing is pinned (0.0)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    cudart = torch.cuda.cudart()
    pinned = 0
    for m in modules:
        buf = pack_in_place(m)
        if buf is None:
            continue
        err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if int(getattr(err, "value", err)) != 0:  # leave it pageable: diffusers then pins on the fly
            continue
        pinned += buf.numel()
        import weakref

        weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
    return pinned / 1024**3


def _store_block_(block: Any, fp8: bool, layerwise_fp8: bool, quantize_on: Any) -> None:
    """A loaded block into its stored form: fp8-matmul layers, or fp8 Linear weights for layerwise casting."""
    import torch

    if fp8:
        from .speed import fp8_replace_block_

        fp8_replace_block_(block, quantize_on)
    elif layerwise_fp8:
        for m in block.modules():
            if type(m) is torch.nn.Linear:
                m.to(torch.float8_e4m3fn)


def build_synthetic_transformer(
    config_dir: str = "qwen-image",
    dtype: Any = None,
    fp8: bool = False,
    device: Any = "cpu",
    seed: int = 0,
    std: float = 0.02,
    layerwise_fp8: bool = False,
    gpu_blocks: set[int] | None = None,
) -> Any:
    """The synthetic stand-in's transformer built block by block into its stored form: each block drawn in
    ``dtype`` (on the GPU when there is one), quantised to fp8 there if ``fp8``, then moved to ``device``, or kept
    on the GPU if its index is in ``gpu_blocks`` (the blocks a plan keeps resident).
    The draws follow the order of a whole-model build, so the bf16 weights equal
    ``stand_ins.build_synthetic_pipeline``'s for the same seed.

    Example:
        >>> import torch
        >>> t = build_synthetic_transformer("tiny", torch.float32)
        >>> t.transformer_blocks[0].attn.to_q.weight.device.type
        'cpu'
        >>> build_synthetic_transformer("tiny", torch.float32, layerwise_fp8=True).transformer_blocks[0].attn.to_q.weight.dtype
        torch.float8_e4m3fn
    """
    import torch

    from .stand_ins import _empty_components, _normal_init, materialize_

    dtype = dtype or torch.bfloat16
    home = torch.device(device)
    draw = torch.device("cuda") if torch.cuda.is_available() else home
    transformer = _empty_components(config_dir, with_text_encoder=False)[0]
    init = _normal_init(torch.Generator(device=draw).manual_seed(int(seed)), std)
    for name, child in transformer.named_children():
        parts = list(child) if name == "transformer_blocks" else [child]
        for i, part in enumerate(parts):
            materialize_(part, device=draw, dtype=dtype, init=init)
            if name == "transformer_blocks":
                _store_block_(part, fp8, layerwise_fp8, None)
            resident = name == "transformer_blocks" and i in (gpu_blocks or ()) and draw.type == "cuda"
            part.to(draw if resident else home)
    transformer.eval()
    transformer.requires_grad_(False)
    return transformer


def fuse_lora_layers_(
    module: Any, prefix: str, loras: list[tuple[Any, dict[str, tuple[Any, Any]]]], compute_on: Any = None
) -> int:
    """Add ``scale * B @ A`` of each LoRA (``(info, {layer: (A, B)})`` from :func:`qwennb.lora.read_for_fusing`; the
    scale is ``info.scale``) into the Linear weights of ``module``, the transformer's part named
    ``prefix`` (``"transformer_blocks.3"``; ``""``: the transformer itself, its blocks left out), in float32 and
    rounded once to the weight's dtype (``compute_on``: where to multiply, e.g. the GPU). Returns the layers changed.

    The weights of loading the LoRAs with diffusers and fusing them (``qwennb.lora.fuse_before_quantising``; tested to 1e-5
    relative in float32, every key layout), without PEFT layers or a whole bf16 transformer in memory; in bf16 the
    sum is rounded once.
    """
    import torch

    done = 0
    for info, pairs in loras:
        for name, (a, b) in pairs.items():
            if prefix:
                if not name.startswith(prefix + "."):
                    continue
                sub = name[len(prefix) + 1 :]
            elif name.startswith("transformer_blocks."):
                continue
            else:
                sub = name
            w = module.get_submodule(sub).weight
            dev = compute_on if compute_on is not None else w.device
            delta = b.to(dev, torch.float32) @ a.to(dev, torch.float32)
            w.data = (w.data.to(dev, torch.float32) + info.scale * delta).to(w.dtype).to(w.device)
            done += 1
    return done


def load_transformer(
    folder: str | os.PathLike[str],
    dtype: Any,
    fp8: bool,
    quantize_on: Any = None,
    layerwise_fp8: bool = False,
    device: Any = "cpu",
    gpu_blocks: set[int] | None = None,
    read_loras: Callable[[Any], list[tuple[Any, dict[str, tuple[Any, Any]]]]] | None = None,
) -> Any:
    """A ``QwenImageTransformer2DModel`` read from a diffusers folder's ``transformer/`` safetensors, block by
    block, into its stored form (fp8 blocks when ``fp8``; quantised on ``quantize_on``, e.g. the GPU): everything
    on ``device``, except blocks whose index is in ``gpu_blocks``, which go to ``quantize_on``. Host RAM peaks at
    what stays there plus one block in ``dtype``.

    ``read_loras(model)`` (the model still on the meta device) gives LoRAs to fuse into each block's weights before
    it is stored, as an fp8 plan needs them (``lambda m: qwennb.lora.read_for_fusing(specs, m)``;
    :func:`fuse_lora_layers_`); their infos are on the model as ``_qwennb_fused_loras``.

    Example:
        >>> import tempfile, torch
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> d = tempfile.mkdtemp()
        >>> build_tiny_pipeline().transformer.save_pretrained(d + "/transformer")
        >>> t = load_transformer(d, torch.float32, fp8=True)
        >>> type(t.transformer_blocks[0].img_mlp.net[2]).__name__
        'FP8Linear'
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    root = Path(folder) / "transformer"
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadError(f"{root} has no readable config.json") from exc
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{root} has no .safetensors weights")
    with init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel.from_config(config)
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            where.update(dict.fromkeys(sf.keys(), f))

    def block_of(key: str) -> int | None:
        parts = key.split(".")
        return int(parts[1]) if parts[0] == "transformer_blocks" else None

    def load(keys: list[str]) -> None:
        for f, group in itertools.groupby(sorted(keys, key=lambda k: str(where[k])), key=lambda k: where[k]):
            with safe_open(str(f), framework="pt") as sf:
                for k in group:
                    set_module_tensor_to_device(model, k, "cpu", value=sf.get_tensor(k), dtype=dtype)

    # read and checked against the model's layers (still on the meta device) before any weight is read
    fused = read_loras(model) if read_loras is not None else []
    load([k for k in where if block_of(k) is None])
    if fused:
        fuse_lora_layers_(model, "", fused, quantize_on)
    for name, child in model.named_children():
        if name != "transformer_blocks":
            child.to(device)
    by_block: dict[int, list[str]] = {}
    for k in where:
        b = block_of(k)
        if b is not None:
            by_block.setdefault(b, []).append(k)
    for i, block in enumerate(model.transformer_blocks):
        load(by_block.get(i, []))
        if fused:
            fuse_lora_layers_(block, f"transformer_blocks.{i}", fused, quantize_on)
        _store_block_(block, fp8, layerwise_fp8, quantize_on)
        block.to(quantize_on if quantize_on is not None and i in (gpu_blocks or ()) else device)
    from .stand_ins import _meta_tensors, _recompute_rotary_

    _recompute_rotary_(model)
    left = _meta_tensors(model)
    if left:
        raise LoadError(f"{root}: weights missing for {', '.join(left[:3])}")
    model.eval()
    model.requires_grad_(False)
    if fused:
        model._qwennb_fused_loras = [info for info, _ in fused]
    return model
