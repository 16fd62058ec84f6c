"""The tuned path for Qwen-Image-2.1's single-stream transformer (``QwenImage21Transformer2DModel``): the same
function as stock diffusers, computed faster on the steps that dominate an image.

How diffusers 0.42.1 runs 2.1 (``QwenImage21Pipeline``): with its default ``use_kv_cache=True`` the first step
prefills (``kv_cache_mode="extract"``: the whole joint text/image sequence, block-causal attention, and the text's
keys and values stored per layer), and every later step is a *cached* step (``"cached"``): only the target image's
tokens go through the blocks, attending without a mask to ``[stored prefix, image]``. True CFG calls the
transformer twice a step, on the same latents tensor and timestep, with the prompt and then the negative prompt,
each with its own KV cache, image-slot mask and (in general different) text length. In a cached step the text
embeddings themselves no longer matter; what differs between the passes is the stored prefix and the image's RoPE
(its frame position is the length of the text in front of it).

``enable_fast_path_21(transformer)`` replaces the model's ``forward``; cached steps (19 of 20) run here:

- **True CFG's two passes as one forward.** The pipeline's cache objects tell the passes apart: once a call with
  cache B has followed one with cache A on the same latents and timestep (the prefill step), every later cached call
  with A computes both passes as one batch of two (all Linears, norms, the MLP) and stores B's output; the call with
  B gets it only if it comes with the same latents tensor (unchanged), the same timestep values, cache B and the same
  image-slot mask. Attention is exact per sample: each half's queries attend, unmasked, to its own prefix and its
  own image tokens (two attention calls, no padding, no mask).
- **RoPE in real arithmetic** (cos/sin tables, built once per image layout) instead of complex numbers in every
  block, so the compiler fuses it with the QK norm.
- **Timestep embedding and modulation once per step**: 2.1 has one modulation shared by all blocks; it is computed
  once for the pair, and its ``1 + scale`` and ``tanh(gate)`` once per forward instead of per block.
- **Regional compile** of one block function shared by all blocks, with the image length and the prefix lengths
  marked dynamic (a new prompt length or image size does not recompile).
- **Packed projections** (``pack=True``; off by default: on an H200 1.290x stock against 1.287x without, within
  the noise, as the GEMMs timed alone say, benchmarks/results/gemm21-nvidia-h200.md): each block's query/key/value
  weights and its SwiGLU's two input weights are moved into one tensor each, the modules' weights becoming views of
  it, so a cached step runs one GEMM for Q, K and V and one for the MLP's two inputs (the same products, fewer and
  larger GEMMs; no extra memory). A block whose weights are no longer packed (a LoRA layer wrapping them, fp8 weights,
  weights replaced by a fused LoRA or an offload) runs its projections one by one, as before;
  ``disable_fast_path_21`` gives every weight its own storage again.

The prefill step, ``use_kv_cache=False`` forwards, padded prompts (``encoder_hidden_states_mask``),
``attention_kwargs`` (LoRA scale), training and hooked blocks (offload, caches) run stock (the plan also compiles
the stock blocks regionally, for the prefill). ``disable_fast_path_21`` restores stock.

Example:
    >>> from qwennb.stand_ins21 import build_tiny21_pipeline
    >>> pipe = build_tiny21_pipeline()
    >>> state = enable_fast_path_21(pipe.transformer, compile=False)
    >>> is_fast21(pipe.transformer)
    True
    >>> disable_fast_path_21(pipe.transformer)
    >>> is_fast21(pipe.transformer)
    False
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .speed import rope_to_real

STATE_ATTR = "_qwennb_fast21"
_IMG_TOKENS_PER_SLOT = 4  # diffusers' 2.1: each vision-language image slot stands for 2x2 latent tokens


@dataclass
class FastPath21State:
    """What :func:`enable_fast_path_21` changed on a transformer, its records and counters."""

    compile: bool
    dynamic: bool
    batch_cfg: bool
    mode: str | None
    backend: str
    options: dict[str, Any]
    pack: bool = False
    stats: dict[str, int] = field(
        default_factory=lambda: {"forwards": 0, "stock": 0, "cached": 0, "cfg_pairs": 0, "cfg_reused": 0}
    )
    # The previous call: (latents, version, timestep values, kv cache, image-slot mask).
    last: tuple[Any, ...] | None = None
    # A learned CFG partnership: (weakref to the first pass's cache, weakref to the second's, its mask).
    partner: tuple[Any, Any, torch.Tensor] | None = None
    # The second pass's output computed with the first: (latents, version, values, cache, mask, shapes, output).
    stash: tuple[Any, ...] | None = None
    rope: dict[Any, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the block


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Real-arithmetic RoPE on ``x`` ``[N, S, H, D]`` with per-sample tables ``[N, S, D]`` (see
    :func:`qwennb.speed.apply_rotary_emb_real`: the same arithmetic as diffusers' complex product)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos[:, :, None, :] + swapped * sin[:, :, None, :]).type_as(x)


def _fast_block21(
    block: Any,
    x: torch.Tensor,
    mods: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    prefix_k: tuple[torch.Tensor, ...],
    prefix_v: tuple[torch.Tensor, ...],
    w_qkv: torch.Tensor | None = None,
    w_mlp: torch.Tensor | None = None,
) -> torch.Tensor:
    """One cached-step block on ``x`` ``[N, T, C]``: ``N = G * B`` rows, ``G = len(prefix_k)`` groups (one per
    CFG pass) of ``B`` samples; group ``g``'s rows attend, unmasked, to its prefix ``prefix_k[g]`` ``[B, P_g, H, D]``
    and to their own image tokens. ``mods``: ``(1 + scale1, tanh(gate1), 1 + scale2, tanh(gate2))``, ``[N, 1, C]``.
    ``w_qkv`` / ``w_mlp``: the block's packed ``[to_q; to_k; to_v]`` and ``[proj; gate_layer]`` weights (views of
    the modules' own, see :func:`_packed`), or None to call the modules.
    The same operations as diffusers' ``QwenImage21TransformerBlock`` with ``QwenImage21AttnProcessor`` decoding."""
    scale1, gate1, scale2, gate2 = mods
    attn = block.attn
    h = block.img_norm1(x) * scale1
    head_dim = attn.inner_dim // attn.heads
    if w_qkv is None:
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    else:
        q, k, v = torch.nn.functional.linear(h, w_qkv).chunk(3, dim=-1)
    q = q.unflatten(-1, (-1, head_dim))
    k = k.unflatten(-1, (-1, head_dim))
    v = v.unflatten(-1, (-1, head_dim))
    q = _rotate(attn.norm_q(q).to(v.dtype), cos, sin)
    k = _rotate(attn.norm_k(k).to(v.dtype), cos, sin)
    processor = attn.processor
    b = x.shape[0] // len(prefix_k)
    outs = []
    for g in range(len(prefix_k)):
        rows = slice(g * b, (g + 1) * b)
        out = dispatch_attention_fn(
            q[rows],
            torch.cat([prefix_k[g], k[rows]], dim=1),
            torch.cat([prefix_v[g], v[rows]], dim=1),
            attn_mask=None,
            dropout_p=0.0,
            backend=getattr(processor, "_attention_backend", None),
            parallel_config=getattr(processor, "_parallel_config", None),
        )
        outs.append(out)
    o = (outs[0] if len(outs) == 1 else torch.cat(outs)).flatten(2, 3).type_as(q)
    o = attn.to_out[1](attn.to_out[0](o))
    x = x + gate1 * o
    h = block.img_norm2(x) * scale2
    if w_mlp is None:
        m = block.img_mlp(h)
    else:
        up, gate = torch.nn.functional.linear(h, w_mlp).chunk(2, dim=-1)
        m = block.img_mlp.out(torch.nn.functional.silu(gate) * up)
    x = x + gate2 * m
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


def _plain_linears(linears: tuple[Any, ...]) -> bool:
    return all(
        type(lin) is torch.nn.Linear
        and lin.bias is None
        and type(lin.weight) is torch.nn.Parameter
        and type(lin.weight.data) is torch.Tensor
        and lin.weight.is_contiguous()
        for lin in linears
    )


def _packed(linears: tuple[Any, ...]) -> torch.Tensor | None:
    """The linears' weights as one ``[sum(out), in]`` tensor without a copy, when they are plain, bias-free
    ``nn.Linear`` weights lying one after another in one storage (as :func:`_pack` left them); else None, also
    when autograd would need the weights' own gradients (the packed view is detached)."""
    if not _plain_linears(linears):
        return None
    if torch.is_grad_enabled() and any(lin.weight.requires_grad for lin in linears):
        return None
    first = linears[0].weight
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    rows = 0
    for lin in linears:
        w = lin.weight
        if (
            w.untyped_storage().data_ptr() != storage
            or w.storage_offset() != offset + rows * first.shape[1]
            or w.shape[1] != first.shape[1]
            or w.dtype != first.dtype
            or w.device != first.device
        ):
            return None
        rows += w.shape[0]
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))


def _pack(linears: tuple[Any, ...]) -> bool:
    """Move the linears' weights into one tensor, each module's weight a view of its rows (the values unchanged,
    no extra memory once the old storages are freed). False, changing nothing, where they cannot be packed."""
    if _packed(linears) is not None:
        return True
    if not _plain_linears(linears) or len({(lin.weight.dtype, lin.weight.device) for lin in linears}) != 1:
        return False
    if linears[0].weight.device.type == "meta":
        return False
    with torch.no_grad():
        packed = torch.cat([lin.weight.detach() for lin in linears])
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = packed[start : start + n]
            start += n
    return True


def _unpack(linears: tuple[Any, ...]) -> None:
    """Give packed weights their own storage again (``save_pretrained`` refuses tensors that share one)."""
    if _packed(linears) is None:
        return
    with torch.no_grad():
        for lin in linears:
            lin.weight.data = lin.weight.detach().clone()


def _block_linears(block: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    attn, mlp = block.attn, block.img_mlp
    return (attn.to_q, attn.to_k, attn.to_v), (mlp.proj, mlp.gate_layer)


_COMPILED: dict[Any, Any] = {}


def _compiled_block21(mode: str | None, backend: str) -> Any:
    key = (mode, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_fast_block21, fullgraph=True, mode=mode, backend=backend)
    return _COMPILED[key]


# --------------------------------------------------------------------------- the forward


def _layout(img_mask: torch.Tensor, img_shapes: Any) -> tuple[torch.Tensor, int, int]:
    """The joint sequence's image positions (diffusers' ``image_pad_mask``), the prefix length, the target's."""
    repeats = torch.where(img_mask, _IMG_TOKENS_PER_SLOT, 1)[0]
    image_pad_mask = torch.repeat_interleave(img_mask[0], repeats)
    target = math.prod(img_shapes[0][-1])
    return image_pad_mask, int(image_pad_mask.shape[0]) - target, target


def _target_rope(
    model: Any, state: FastPath21State, img_mask: torch.Tensor, img_shapes: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The target image's RoPE tables (real, ``[T, D]``) and the prefix length, cached per image layout."""
    shapes = tuple(tuple(int(v) for v in s) for s in img_shapes[0])
    key = (id(img_mask), img_mask._version, shapes, str(device))
    hit = state.rope.get(key)
    if hit is not None and hit[0]() is img_mask:
        return hit[1]
    image_pad_mask, prefix_len, _ = _layout(img_mask, img_shapes)
    freqs = model.pos_embed(img_shapes[0], image_pad_mask, device=device)[prefix_len:]
    cos, sin = rope_to_real(freqs)
    value = (cos, sin, prefix_len)
    while len(state.rope) >= 8:
        state.rope.pop(next(iter(state.rope)))
    state.rope[key] = (weakref.ref(img_mask), value)
    return value


def _cached_forward(
    model: Any,
    state: FastPath21State,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    img_shapes: Any,
    groups: list[tuple[Any, torch.Tensor]],
) -> torch.Tensor:
    """A cached step's forward for one or more passes (``groups``: ``(kv cache, image-slot mask)`` each) on the
    same latents and timestep; returns the outputs of the passes stacked on the batch axis, in order."""
    b = hidden_states.shape[0]
    target = math.prod(img_shapes[0][-1])
    x = model.img_in(hidden_states[:, -target:])  # the target's tokens: the only ones a cached step computes
    t = timestep.to(x.dtype)
    t = torch.cat([t, t.new_zeros(1)], dim=0)  # diffusers' causal_condition row (t=0), as stock computes it
    temb = model.time_text_embed(t, x)
    mod1, mod2 = model.modulation(temb)[:-1].chunk(2, dim=-1)  # shared by every block; the target's rows
    scale1, gate1 = mod1.chunk(2, dim=-1)
    scale2, gate2 = mod2.chunk(2, dim=-1)
    n = len(groups)
    mods = tuple(
        (m if n == 1 else m.repeat(n, 1))[:, None]
        for m in (1 + scale1, gate1.tanh(), 1 + scale2, gate2.tanh())
    )
    tables = [_target_rope(model, state, mask, img_shapes, x.device) for _, mask in groups]
    cos = torch.cat([c[None].expand(b, -1, -1) for c, _, _ in tables])
    sin = torch.cat([s[None].expand(b, -1, -1) for _, s, _ in tables])
    if n > 1:
        x = x.repeat(n, 1, 1)
    fn = _compiled_block21(state.mode, state.backend) if state.compile else _fast_block21
    # CUDA graphs (reduce-overhead, max-autotune): the block function is one graph replayed for every block, each
    # replay writing the same output buffer; each call is marked a new step and its output copied out of the buffer
    graphs = state.compile and state.mode in ("reduce-overhead", "max-autotune")
    for index, block in enumerate(model.transformer_blocks):
        caches = [cache.get_layer(index).get() for cache, _ in groups]
        pk = tuple(c[0] for c in caches)
        pv = tuple(c[1] for c in caches)
        if state.compile and state.dynamic:
            torch._dynamo.maybe_mark_dynamic(x, 1)
            torch._dynamo.maybe_mark_dynamic(cos, 1)
            torch._dynamo.maybe_mark_dynamic(sin, 1)
            for p in (*pk, *pv):
                torch._dynamo.maybe_mark_dynamic(p, 1)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if state.pack:
            qkv, mlp = _block_linears(block)
            x = fn(block, x, mods, cos, sin, pk, pv, _packed(qkv), _packed(mlp))
        else:
            x = fn(block, x, mods, cos, sin, pk, pv)
        if graphs:
            x = x.clone()
    # norm_out: the scale of the target's rows (their own timestep), as diffusers' AdaLayerNormContinuous
    scale = model.norm_out.linear(model.norm_out.silu(temb).to(x.dtype))[:-1]
    x = model.norm_out.norm(x) * (1 + (scale if n == 1 else scale.repeat(n, 1))[:, None])
    return model.proj_out(x)


def _hooked(model: Any) -> bool:
    blocks = model.transformer_blocks
    for block in (blocks[0], blocks[-1]):
        for m in block.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None and getattr(registry, "hooks", None):
                return True
            if getattr(m, "_hf_hook", None) is not None:
                return True
    return False


def _populated(cache: Any) -> bool:
    layers = getattr(cache, "layer_caches", None)
    return bool(layers) and all(layer.k is not None for layer in layers)


def _model_forward21(model: Any, state: FastPath21State) -> Any:
    """The replacement ``forward``: cached steps on the tuned path, everything else stock."""
    stock = type(model).forward

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: Any,
        img_mask: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        kv_cache: Any = None,
        kv_cache_mode: str | None = None,
        return_dict: bool = True,
    ) -> Any:
        state.stats["forwards"] += 1
        trackable = (
            kv_cache is not None
            and encoder_hidden_states_mask is None
            and not attention_kwargs
            and not hidden_states.is_inference()  # (version counters prove the latents and mask unchanged)
            and not img_mask.is_inference()
            and not (torch.is_grad_enabled() and model.gradient_checkpointing)
            and not getattr(model, "is_cache_enabled", False)
            and model.config.causal_condition
            and img_mask.shape[1] == encoder_hidden_states.shape[1] + math.prod(img_shapes[0][-1]) // 4
        )
        stash, state.stash = state.stash, None
        last, state.last = state.last, None
        output = None
        if trackable:
            values = tuple(timestep.detach().float().cpu().tolist())
            version = hidden_states._version
            shapes = tuple(tuple(int(v) for v in s) for s in img_shapes[0])
            same_step = (
                last is not None and last[0] is hidden_states and last[1] == version and last[2] == values
            )
            if same_step and last[3] is not kv_cache:
                # a second pass after a first on the same latents: the pipeline's CFG pattern, learned
                state.partner = (weakref.ref(last[3]), weakref.ref(kv_cache), img_mask)
            state.last = (hidden_states, version, values, kv_cache, img_mask)
            if kv_cache_mode == "cached" and _populated(kv_cache) and not _hooked(model):
                if (
                    stash is not None
                    and stash[0] is hidden_states
                    and stash[1] == version
                    and stash[2] == values
                    and stash[3] is kv_cache
                    and (stash[4] is img_mask or torch.equal(stash[4], img_mask))
                    and stash[5] == shapes
                ):
                    state.stats["cfg_reused"] += 1
                    output = stash[6]
                else:
                    partner = state.partner
                    second = partner[1]() if partner is not None and partner[0]() is kv_cache else None
                    state.stats["cached"] += 1
                    if (
                        state.batch_cfg
                        and second is not None
                        and second is not kv_cache
                        and _populated(second)
                    ):
                        groups = [(kv_cache, img_mask), (second, partner[2])]
                        both = _cached_forward(model, state, hidden_states, timestep, img_shapes, groups)
                        b = hidden_states.shape[0]
                        output = both[:b]
                        state.stash = (hidden_states, version, values, second, partner[2], shapes, both[b:])
                        state.stats["cfg_pairs"] += 1
                    else:
                        output = _cached_forward(
                            model, state, hidden_states, timestep, img_shapes, [(kv_cache, img_mask)]
                        )
        if output is None:
            state.stats["stock"] += 1
            return stock(
                model,
                hidden_states,
                encoder_hidden_states,
                timestep,
                img_shapes,
                img_mask,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                attention_kwargs=attention_kwargs,
                kv_cache=kv_cache,
                kv_cache_mode=kv_cache_mode,
                return_dict=return_dict,
            )
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)

    forward._qwennb_fast21 = True  # type: ignore[attr-defined]
    return forward


def is_fast21(transformer: Any) -> bool:
    """True when :func:`enable_fast_path_21` is active on ``transformer``."""
    return getattr(transformer, STATE_ATTR, None) is not None


def enable_fast_path_21(
    transformer: Any,
    compile: bool = True,
    dynamic: bool = True,
    batch_cfg: bool = True,
    mode: str | None = None,
    backend: str = "inductor",
    pack: bool = False,
) -> FastPath21State:
    """Switch a ``QwenImage21Transformer2DModel`` to the tuned path (see the module docstring).

    ``compile`` compiles the shared block function (``fullgraph=True``; ``mode`` and ``backend`` are torch.compile's,
    tests use ``backend="aot_eager"``); ``dynamic`` marks the image and prefix lengths dynamic from the first call.
    ``batch_cfg`` computes true CFG's two passes of a cached step as one batch. Idempotent for the same options;
    returns the :class:`FastPath21State` stored on the model.
    """
    if type(transformer).__name__ != "QwenImage21Transformer2DModel":
        raise TypeError(
            f"enable_fast_path_21 is for QwenImage21Transformer2DModel, not {type(transformer).__name__}"
        )
    options = {
        "compile": compile,
        "dynamic": dynamic,
        "batch_cfg": batch_cfg,
        "mode": mode,
        "backend": backend,
        "pack": pack,
    }
    state = getattr(transformer, STATE_ATTR, None)
    if state is not None:
        if state.options == options:
            return state
        disable_fast_path_21(transformer)
    state = FastPath21State(
        compile=compile,
        dynamic=dynamic,
        batch_cfg=batch_cfg,
        mode=mode,
        backend=backend,
        options=options,
        pack=pack,
    )
    if pack:
        for block in transformer.transformer_blocks:
            for linears in _block_linears(block):
                _pack(linears)
    transformer.forward = _model_forward21(transformer, state)
    setattr(transformer, STATE_ATTR, state)
    return state


def disable_fast_path_21(transformer: Any) -> None:
    """Undo :func:`enable_fast_path_21` (the stock ``forward`` back)."""
    state = getattr(transformer, STATE_ATTR, None)
    if state is None:
        return
    if state.pack:
        for block in transformer.transformer_blocks:
            for linears in _block_linears(block):
                _unpack(linears)
    fwd = transformer.__dict__.get("forward")
    if fwd is not None and getattr(fwd, "_qwennb_fast21", False):
        transformer.__dict__.pop("forward", None)
    setattr(transformer, STATE_ATTR, None)


__all__ = ["FastPath21State", "enable_fast_path_21", "disable_fast_path_21", "is_fast21"]
