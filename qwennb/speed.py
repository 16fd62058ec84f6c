"""The tuned path: a faster Qwen-Image transformer that computes the same function as stock diffusers.

``enable_fast_path(transformer)`` changes how ``QwenImageTransformer2DModel`` runs, not what it computes:

- **RoPE in real arithmetic.** Stock diffusers rotates queries and keys with complex numbers, which
  torch.compile's code generator cannot handle, so it stays in eager ATen inside the compiled blocks.
  :class:`QwenRealRopeAttnProcessor` (a drop-in subclass of diffusers' ``QwenDoubleStreamAttnProcessor2_0``,
  set with ``transformer.set_attn_processor``) does the same rotation on cos/sin tables, and the tables
  are built once per forward (once per image size for the image part) instead of in every block.
- **GELU in the matmul epilogue.** The MLP's up-projection and its tanh-GELU run as one cuBLASLt call
  (``torch._addmm_activation``), which saves a read and a write of the widest activation.
- **Modulation computed once per image.** The 120 modulation vectors of a forward (a 13.6 GB weight read
  at full size) depend only on the timestep. With true CFG the second call of a step reuses the first's
  (bit for bit the same values); given the pipeline's scheduler, the vectors of every step are computed at
  the image's first step in one batched matmul per Linear (rounding-level differences).
- **Regional compile** of one block function shared by all 60 blocks, with the text and image lengths
  marked dynamic from the start, so a new prompt length or image size does not recompile. Diffusers'
  cache hooks (First Block Cache, TaylorSeer) sit outside the compiled region and keep working.
- **True CFG's two passes as one batch** (``batch_cfg``). The pipeline calls the transformer twice a step
  on the same latents; both passes run as one forward: the image tokens as a batch of two, the two texts
  side by side without padding, and each sample attending only to its own tokens (two unmasked attention
  calls), so no padding mask and no slow masked kernel. The last negative-prompt embeddings are kept, so
  later images are paired from their first step (:func:`_cfg_forward` says when a stored half is handed
  out). Under group offload each streamed block is copied once a step instead of twice.
- **Qwen-Image-Edit-2511's ``zero_cond_t``** is covered, as diffusers defines it: the image modulation is taken
  at ``cat([t, t * 0])`` in one matmul, and each image token picks its vectors by ``modulate_index`` (the
  generated image's tokens at t, the reference images' at t=0; text at t). The t=0 vectors are the same at every
  step: with the scheduler they are one more row of the image's table, computed once with it. CFG pairs and
  the compiled block work as above (the index is marked dynamic with the lengths).

Measured on H100s at 1024x1024 with CFG 4: 0.244-0.250 s/step against 0.366-0.370 for stock diffusers and
0.278-0.284 for stock plus ``compile_repeated_blocks`` in the same runs (``benchmarks/NOTES.md``). Options that measured no faster and stay
off: fused Q/K/V projections (:func:`fuse_qkv_`, the separate weights become views of the fused one) and an
attention op that keeps eager's memory layout (:func:`sdpa_bshd`).

Optional and lossy (off by default): fp8 matmuls (:class:`FP8Linear`, ``torch._scaled_mm`` with per-row
activation and per-channel weight scales, Ada/Hopper and newer; with ``fp8="replace"`` the fp8 weights take
the bf16 ones' place, which is how the plan fits 24 GB cards) and step caching (:func:`apply_cache`).

``disable_fast_path(transformer)`` restores stock behaviour. Measurements: ``benchmarks/speed.py``.

On several GPUs, :func:`enable_ulysses` splits each forward's image tokens over a process group (Ulysses
sequence parallelism) with the all-to-alls inside the compiled blocks (``qwennb.parallel`` uses it).

Example:
    >>> from qwennb.stand_ins import build_tiny_pipeline
    >>> pipe = build_tiny_pipeline()
    >>> state = enable_fast_path(pipe.transformer, compile=False)
    >>> type(pipe.transformer.transformer_blocks[0].attn.processor).__name__
    'QwenRealRopeAttnProcessor'
    >>> disable_fast_path(pipe.transformer)
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedRope,
    compute_text_seq_len_from_mask,
)

try:  # functional collectives: traced by torch.compile as graph ops (the all-to-all of Ulysses)
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
except ImportError:  # pragma: no cover - a torch built without distributed
    dist = funcol = None  # type: ignore[assignment]

log = logging.getLogger("qwennb")

STATE_ATTR = "_qwennb_fast"
FP8_MAX = 448.0  # largest finite float8_e4m3fn

RealRope = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# A block's modulation vectors: (image, text), or with zero_cond_t (image at t, text, image at t=0): the reference
# images' tokens take the last.
Mods = tuple[torch.Tensor, ...]
# A CFG pair's RoPE: the image tables, the two texts' tables side by side, and the conditional text's cosine
# table (its length is where the texts split).
PairRope = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- RoPE in real arithmetic


def rope_to_real(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A complex RoPE table ``[S, D/2]`` (``cos + i sin``) as two float32 tables ``[S, D]`` for pairs.

    ``cos`` repeats each angle's cosine for both members of its pair; ``sin`` holds ``-sin, +sin``, so
    that :func:`apply_rotary_emb_real` is two multiplies and an add per element.
    """
    pairs = torch.view_as_real(freqs).float()  # [S, D/2, 2] = (cos, sin)
    cos, sin = pairs[..., 0], pairs[..., 1]
    return (
        torch.stack((cos, cos), dim=-1).flatten(-2).contiguous(),
        torch.stack((-sin, sin), dim=-1).flatten(-2).contiguous(),
    )


def apply_rotary_emb_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, D]`` (pairs interleaved) by the tables of :func:`rope_to_real` (``[S, D]``).

    The same arithmetic as diffusers' ``apply_rotary_emb_qwen(..., use_real=False)``, a complex float32
    product of ``(x[2j], x[2j+1])`` and ``cos + i sin``: ``(x0 c - x1 s, x1 c + x0 s)``; IEEE negation,
    addition order within a pair and commutativity make it the same up to the compiler's choice of
    fused multiply-adds. Real tensors only, so torch.compile fuses it with the QK norm.
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    out = xf * cos[None, :, None, :] + swapped * sin[None, :, None, :]
    return out.type_as(x)


def _apply_rotary_emb_stack(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary_emb_real` written with unbind/stack on half-width tables (kept for comparison)."""
    c = cos[..., 0::2][None, :, None, :]
    s = sin[..., 1::2][None, :, None, :]
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


def as_real_rope(image_rotary_emb: Any) -> RealRope | None:
    """Accept RoPE as diffusers passes it (two complex tables) or already real; return the real form."""
    if image_rotary_emb is None:
        return None
    img, txt = image_rotary_emb
    if isinstance(img, torch.Tensor):
        img = rope_to_real(img)
    if isinstance(txt, torch.Tensor):
        txt = rope_to_real(txt)
    return img, txt


@torch.library.custom_op("qwennb::sdpa_bshd", mutates_args=())
def sdpa_bshd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unmasked SDPA on ``[B, S, H, D]`` tensors, returning ``[B, S, H, D]`` (contiguous).

    What diffusers' native backend does in eager mode (permute views into PyTorch SDPA), behind an op
    boundary: inside a compiled graph the inputs keep the layout eager gives them, instead of the one
    inductor would pick for the attention kernel.
    """
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


@sdpa_bshd.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return query.new_empty(query.shape)


class QwenRealRopeAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """``QwenDoubleStreamAttnProcessor2_0`` with RoPE in real arithmetic and optional fused projections.

    Same inputs and outputs as the stock processor. ``image_rotary_emb`` may be diffusers' pair of
    complex tables or ``((img_cos, img_sin), (txt_cos, txt_sin))`` in float32; passing the real form
    (built once per forward) keeps complex numbers out of compiled graphs. When the attention module has
    fused projections (``attn.fused_projections`` with ``to_qkv`` / ``to_added_qkv``, as
    ``Attention.fuse_projections`` or :func:`fuse_qkv_` make them), Q, K and V come from one matmul.

    ``sdpa_op`` (set by :func:`enable_fast_path` when diffusers' global attention backend is PyTorch's
    native one): unmasked attention without a per-processor backend goes through :func:`sdpa_bshd`.

    ``ulysses`` (set by :func:`enable_ulysses`): the image stream holds this rank's slice of the image tokens
    and the text stream the whole text; attention runs on this rank's share of the heads over the whole
    sequence (:func:`_ulysses_attention`).
    """

    rope_style = "pairs"  # or "stack" (the same function written with unbind/stack)
    sdpa_op = False
    ulysses: UlyssesGroup | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("QwenRealRopeAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "QwenRealRopeAttnProcessor does not accept an external attention_mask; pass "
                "encoder_hidden_states_mask to let the processor build the joint mask."
            )
        ulysses = self.ulysses
        if encoder_hidden_states_mask is not None:
            # Under Ulysses the keys are the whole text and every rank's image tokens.
            img_len = hidden_states.shape[1] * (ulysses.degree if ulysses is not None else 1)
            image_mask = torch.ones(
                (hidden_states.shape[0], img_len), dtype=torch.bool, device=hidden_states.device
            )
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        fused = getattr(attn, "fused_projections", False)
        if fused and getattr(attn, "to_qkv", None) is not None:
            img_query, img_key, img_value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            img_query = attn.to_q(hidden_states)
            img_key = attn.to_k(hidden_states)
            img_value = attn.to_v(hidden_states)
        if fused and getattr(attn, "to_added_qkv", None) is not None:
            txt_query, txt_key, txt_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            txt_query = attn.add_q_proj(encoder_hidden_states)
            txt_key = attn.add_k_proj(encoder_hidden_states)
            txt_value = attn.add_v_proj(encoder_hidden_states)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))
        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        rope = as_real_rope(image_rotary_emb)
        if rope is not None:
            rotate = _apply_rotary_emb_stack if self.rope_style == "stack" else apply_rotary_emb_real
            (img_cos, img_sin), (txt_cos, txt_sin) = rope
            img_query = rotate(img_query, img_cos, img_sin)
            img_key = rotate(img_key, img_cos, img_sin)
            txt_query = rotate(txt_query, txt_cos, txt_sin)
            txt_key = rotate(txt_key, txt_cos, txt_sin)

        if ulysses is not None:
            return _ulysses_attention(
                attn,
                self,
                ulysses,
                (img_query, img_key, img_value),
                (txt_query, txt_key, txt_value),
                attention_mask,
            )

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        if (
            self.sdpa_op
            and attention_mask is None
            and self._attention_backend is None
            and self._parallel_config is None
        ):
            joint_hidden_states = sdpa_bshd(joint_query, joint_key, joint_value)
        else:
            joint_hidden_states = dispatch_attention_fn(
                joint_query,
                joint_key,
                joint_value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        joint_hidden_states = joint_hidden_states.flatten(2, 3).to(joint_query.dtype)
        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]

        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output


# --------------------------------------------------------------------------- Ulysses on the tuned path


@dataclass(frozen=True)
class UlyssesGroup:
    """A Ulysses group as the tuned path sees it (:func:`enable_ulysses` makes it).

    ``name`` is the process group's name, which functional collectives take (a constant inside a compiled
    graph, where a ``ProcessGroup`` object is not); ``degree`` its size and ``rank`` this process's index in it.
    """

    name: str
    degree: int
    rank: int
    process_group: Any = field(default=None, compare=False, repr=False)


def _all_to_all(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Chunk ``j`` of ``x`` along dim 0 goes to rank ``j`` of the group; chunk ``j`` of the result came from rank
    ``j``. A functional collective: inside a compiled block it is a graph op, so no graph break."""
    shape = x.shape
    out = funcol.all_to_all_single(x.contiguous().flatten(), None, None, group_name)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out.reshape(shape)


def _ulysses_attention(
    attn: Any,
    processor: QwenRealRopeAttnProcessor,
    group: UlyssesGroup,
    img_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    txt_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of one block under Ulysses, from rotated ``[B, S/N, H, D]`` image and ``[B, L, H, D]`` text
    queries, keys and values; returns the projected image (this rank's tokens) and text (all of it) outputs.

    Every rank holds its contiguous slice of the image tokens and the whole text (computed identically on every
    rank). One all-to-all sends each rank its share of the heads (``H/N``) of every rank's image Q, K and V; the
    text needs no exchange, each rank takes its heads of its own copy. Attention then runs on
    ``[text, image tokens of rank 0, 1, ...]``, the sequence in the order one process has, unmasked (unless the
    text itself has a mask), with whichever attention backend the processor has. A second all-to-all returns to
    each rank its image tokens, and to every rank the text, with all heads. 2 collectives a block."""
    n, r = group.degree, group.rank
    img_q, img_k, img_v = img_qkv
    b, s_loc, heads, _ = img_q.shape
    hl = heads // n
    # Sent: [N (destination = head group), 3, B, S/N, H/N, D]; received: dim 0 the source (= token slice).
    send = torch.stack((img_q, img_k, img_v)).unflatten(3, (n, hl)).permute(3, 0, 1, 2, 4, 5)
    recv = _all_to_all(send, group.name)
    img_q, img_k, img_v = recv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3).unbind(0)  # [B, S, H/N, D]
    heads_here = slice(r * hl, (r + 1) * hl)
    txt_q, txt_k, txt_v = (t[:, :, heads_here] for t in txt_qkv)
    query = torch.cat([txt_q, img_q], dim=1)
    key = torch.cat([txt_k, img_k], dim=1)
    value = torch.cat([txt_v, img_v], dim=1)
    if processor.sdpa_op and attention_mask is None and processor._attention_backend is None:
        out = sdpa_bshd(query, key, value)
    else:
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=processor._attention_backend,
        )
    out = out.to(query.dtype)  # [B, L + S, H/N, D]
    seq_txt = txt_q.shape[1]
    img_out = out[:, seq_txt:].unflatten(1, (n, s_loc)).transpose(0, 1)  # [N (destination), B, S/N, H/N, D]
    txt_out = out[:, :seq_txt].unsqueeze(0).expand(n, -1, -1, -1, -1)  # the text to every rank
    # Received: [N (source = head group), B, S/N + L, H/N, D].
    recv = _all_to_all(torch.cat([img_out, txt_out], dim=2), group.name)
    joint = recv.permute(1, 2, 0, 3, 4).flatten(2, 4)  # [B, S/N + L, H * D], heads in order
    img_attn_output = attn.to_out[0](joint[:, :s_loc].contiguous())
    if len(attn.to_out) > 1:
        img_attn_output = attn.to_out[1](img_attn_output)
    txt_attn_output = attn.to_add_out(joint[:, s_loc:].contiguous())
    return img_attn_output, txt_attn_output


def _ulysses_slice(tokens: int, group: UlyssesGroup) -> slice:
    """This rank's contiguous slice of ``tokens`` image tokens."""
    if tokens % group.degree:
        raise ValueError(
            f"{tokens} image tokens do not divide by the Ulysses degree {group.degree}; choose a size whose "
            "(width/16)*(height/16) does"
        )
    n = tokens // group.degree
    return slice(group.rank * n, (group.rank + 1) * n)


def _gather_tokens(x: torch.Tensor, group: UlyssesGroup) -> torch.Tensor:
    """Every rank's slice of the output ``[B, S/N, C]`` joined in order: ``[B, S, C]`` on every rank."""
    parts = [torch.empty_like(x) for _ in range(group.degree)]
    dist.all_gather(parts, x.contiguous(), group=group.process_group)
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- fused projections


def _fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing ``cat([l(x) for l in linears], -1)``; the originals become views of it."""
    first = linears[0]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = all(lin.bias is not None for lin in linears)
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=first.weight.requires_grad)
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[start : start + n], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=lin.bias.requires_grad)
        start += n
    return fused


def fuse_qkv_(attn: Any) -> None:
    """Fuse Q/K/V of both streams of a Qwen-Image attention module in place, without extra memory.

    Sets ``attn.to_qkv``, ``attn.to_added_qkv`` and ``attn.fused_projections = True`` (diffusers'
    names); ``to_q``/``to_k``/``to_v`` and ``add_*_proj`` keep working as views of the fused weights.
    """
    if getattr(attn, "to_qkv", None) is None:
        attn.to_qkv = _fuse_linears([attn.to_q, attn.to_k, attn.to_v])
    if getattr(attn, "to_added_qkv", None) is None and getattr(attn, "add_q_proj", None) is not None:
        attn.to_added_qkv = _fuse_linears([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
    attn.fused_projections = True


# --------------------------------------------------------------------------- fp8 matmuls


def _quantize_rows(w: torch.Tensor, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[N, K]`` as e4m3 values and per-row scales ``[N, 1]`` (``w ~ q * scale``), computed on ``device``
    (default: where ``w`` is) and returned where ``w`` is."""
    home = w.device
    work = w.detach().to(device) if device is not None else w.detach()
    scale = work.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    q = (work.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.to(home), scale.to(home)


class _FP8Weights(nn.Module):
    """A Linear's weight as e4m3 values (a parameter, ``requires_grad=False``) and per-channel scales ``[1, N]``;
    its bias is shared with the Linear."""

    def __init__(self, linear: nn.Linear, quantize_on: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _quantize_rows(linear.weight, quantize_on)
        self.weight_fp8 = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, N]
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype


class FP8Linear(_FP8Weights):
    """A Linear computed in fp8 (e4m3): per-channel weight scales, per-row (per-token) activation scales.

    ``torch._scaled_mm`` on CUDA (Hopper or newer), accumulating in fp32 and writing the input dtype,
    with the bias added in the epilogue. Lossy: each operand is rounded to 3 mantissa bits. The weights
    are quantised once, from the Linear given (on ``quantize_on`` if given, e.g. the GPU for a Linear held
    in host RAM; the result stays where the Linear is); the Linear itself is not changed, so dropping it
    (``enable_fast_path(..., fp8="replace")``) frees its bf16 weights. The fp8 weight is a parameter
    (``requires_grad=False``) so that offloading hooks and memory reports see it as the layer's weight.

    Example:
        >>> f = FP8Linear(nn.Linear(32, 16))
        >>> f.weight_fp8.dtype, tuple(f.weight_scale.shape)
        (torch.float8_e4m3fn, (1, 16))
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        bias = self.bias.to(self.out_dtype) if self.bias is not None else None
        out = torch._scaled_mm(
            xq,
            self.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=bias,
            out_dtype=self.out_dtype,
        )
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


class FP8WeightLinear(_FP8Weights):
    """A Linear whose weight is stored in fp8 (e4m3, per-channel scales) and computed in the input's dtype.

    For the modulation Linears: they see one row per timestep (the tuned path computes a whole image's
    modulation in one call), so their cost is reading the weight, which fp8 halves; the activations stay exact.

    Example:
        >>> lin = nn.Linear(32, 16)
        >>> x = torch.randn(2, 32)
        >>> bool((FP8WeightLinear(lin)(x) - lin(x)).abs().max() < 0.1)
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight_fp8.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 storage"


def _fp8_targets(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """The (parent, attribute) of every large Linear of a block that fp8 mode replaces.

    The modulation Linears (read once per step, memory-bound) stay in bf16.
    """
    attn = block.attn
    out: list[tuple[nn.Module, str]] = []
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        out.append((attn, "to_qkv"))
    else:
        out += [(attn, "to_q"), (attn, "to_k"), (attn, "to_v")]
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_added_qkv", None) is not None:
        out.append((attn, "to_added_qkv"))
    else:
        out += [(attn, "add_q_proj"), (attn, "add_k_proj"), (attn, "add_v_proj")]
    out += [(attn.to_out, "0"), (attn, "to_add_out")]
    for mlp in (block.img_mlp, block.txt_mlp):
        out += [(mlp.net[0], "proj"), (mlp.net, "2")]
    return out


def fp8_replace_block_(block: nn.Module, quantize_on: Any = None) -> None:
    """Replace a block's large Linears by :class:`FP8Linear` and its modulation Linears by :class:`FP8WeightLinear`
    for good (their bf16 weights are dropped), quantised on ``quantize_on``; layers already replaced are kept.
    ``enable_fast_path(fp8="replace")`` does this to every block; ``qwennb.loading`` does it while loading."""
    for parent, name in _fp8_targets(block):
        if type(parent._modules[name]) is nn.Linear:
            _swap(parent, name, FP8Linear(parent._modules[name], quantize_on))
    for mod in (block.img_mod, block.txt_mod):
        if type(mod[1]) is nn.Linear:
            _swap(mod, "1", FP8WeightLinear(mod[1], quantize_on))


def _swap(parent: nn.Module, name: str, new: nn.Module) -> nn.Module:
    old = parent._modules[name]
    parent._modules[name] = new
    return old


# --------------------------------------------------------------------------- the block and the model


def _feed_forward(ff: nn.Module, x: torch.Tensor, gelu_epilogue: bool = True) -> torch.Tensor:
    """diffusers' FeedForward(gelu-approximate) with the up-projection's bias and GELU in the matmul epilogue."""
    act = ff.net[0]
    proj = getattr(act, "proj", None)
    if (
        gelu_epilogue
        and type(proj) is nn.Linear
        and proj.bias is not None
        and getattr(act, "approximate", None) == "tanh"
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    ):
        x2 = x.reshape(-1, x.shape[-1])
        h = torch._addmm_activation(proj.bias, x2, proj.weight.t(), use_gelu=True)
        h = h.reshape(*x.shape[:-1], proj.out_features)
    else:
        h = act(x)
    for module in list(ff.net)[1:]:
        h = module(h)
    return h


def _modulate_image(
    block: Any,
    x: torch.Tensor,
    mod: torch.Tensor,
    mod_zero: torch.Tensor | None,
    modulate_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block._modulate`` of the image stream. With zero_cond_t (``mod_zero`` and ``modulate_index`` given) each
    token picks its vectors as diffusers' ``_modulate(x, cat([mod, mod_zero]), modulate_index)`` does: index 0 (the
    generated image's tokens) takes ``mod`` (timestep t), index 1 (the reference images') ``mod_zero`` (t=0); the
    same selection and the same arithmetic, without joining the two halves into one tensor."""
    if mod_zero is None:
        return block._modulate(x, mod)
    keep = (modulate_index == 0).unsqueeze(-1)  # [b, S, 1]
    shift, scale, gate = mod.chunk(3, dim=-1)
    shift0, scale0, gate0 = mod_zero.chunk(3, dim=-1)
    shift = torch.where(keep, shift.unsqueeze(1), shift0.unsqueeze(1))
    scale = torch.where(keep, scale.unsqueeze(1), scale0.unsqueeze(1))
    gate = torch.where(keep, gate.unsqueeze(1), gate0.unsqueeze(1))
    return x * (1 + scale) + shift, gate


def _mlp_half(
    block: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    img_mod2: torch.Tensor,
    txt_mod2: torch.Tensor,
    gelu_epilogue: bool,
    img_zero2: torch.Tensor | None = None,
    modulate_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half of a block: each stream's modulated MLP and gated residual."""
    img_modulated2, img_gate2 = _modulate_image(
        block, block.img_norm2(hidden_states), img_mod2, img_zero2, modulate_index
    )
    hidden_states = hidden_states + img_gate2 * _feed_forward(block.img_mlp, img_modulated2, gelu_epilogue)
    txt_modulated2, txt_gate2 = block._modulate(block.txt_norm2(encoder_hidden_states), txt_mod2)
    encoder_hidden_states = encoder_hidden_states + txt_gate2 * _feed_forward(
        block.txt_mlp, txt_modulated2, gelu_epilogue
    )
    return hidden_states, encoder_hidden_states


def _fast_block(
    block: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_mask: torch.Tensor | None,
    mods: Mods,
    rope: RealRope | None,
    gelu_epilogue: bool = True,
    modulate_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``QwenImageTransformerBlock.forward`` on precomputed modulation and real RoPE. With zero_cond_t, ``mods``
    holds a third entry (the image modulation at t=0) and ``modulate_index`` (diffusers') says which tokens take it.
    """
    img_mod1, img_mod2 = mods[0].chunk(2, dim=-1)
    txt_mod1, txt_mod2 = mods[1].chunk(2, dim=-1)
    img_zero1, img_zero2 = mods[2].chunk(2, dim=-1) if len(mods) > 2 else (None, None)

    img_modulated, img_gate1 = _modulate_image(
        block, block.img_norm1(hidden_states), img_mod1, img_zero1, modulate_index
    )
    txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(encoder_hidden_states), txt_mod1)
    img_attn_output, txt_attn_output = block.attn.processor(
        block.attn,
        hidden_states=img_modulated,
        encoder_hidden_states=txt_modulated,
        encoder_hidden_states_mask=encoder_hidden_states_mask,
        image_rotary_emb=rope,
    )
    hidden_states = hidden_states + img_gate1 * img_attn_output
    encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output

    hidden_states, encoder_hidden_states = _mlp_half(
        block,
        hidden_states,
        encoder_hidden_states,
        img_mod2,
        txt_mod2,
        gelu_epilogue,
        img_zero2,
        modulate_index,
    )

    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _pair_attention(
    attn: Any, img: torch.Tensor, txt: torch.Tensor, rope: PairRope
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of a CFG pair: ``img`` ``[2B, S, C]`` (conditional images first), ``txt``
    ``[B, Lc + Lu, C]`` (the two texts side by side, unpadded). The projections run once on both; then each
    sample's query, key and value are normalised, rotated and laid out from its own slices (so the compiler
    writes them straight into the joint buffers, as in a single forward) and it attends over its own text and
    image, unmasked. Returns the two joint outputs ``[B, Lc + S, C]`` and ``[B, Lu + S, C]`` (text first)."""
    (img_cos, img_sin), (txt_cos, txt_sin), cond_table = rope
    lc = cond_table.shape[0]
    b = txt.shape[0]
    head_dim = attn.inner_dim // attn.heads
    iq = attn.to_q(img).unflatten(-1, (-1, head_dim))
    ik = attn.to_k(img).unflatten(-1, (-1, head_dim))
    iv = attn.to_v(img).unflatten(-1, (-1, head_dim))
    tq = attn.add_q_proj(txt).unflatten(-1, (-1, head_dim))
    tk = attn.add_k_proj(txt).unflatten(-1, (-1, head_dim))
    tv = attn.add_v_proj(txt).unflatten(-1, (-1, head_dim))

    def norm(module: Any, x: torch.Tensor) -> torch.Tensor:
        return module(x) if module is not None else x

    processor = attn.processor
    outs = []
    for part, rows in ((slice(None, lc), slice(None, b)), (slice(lc, None), slice(b, None))):
        tc, ts = txt_cos[part], txt_sin[part]
        query = torch.cat(
            [
                apply_rotary_emb_real(norm(attn.norm_added_q, tq[:, part]), tc, ts),
                apply_rotary_emb_real(norm(attn.norm_q, iq[rows]), img_cos, img_sin),
            ],
            dim=1,
        )
        key = torch.cat(
            [
                apply_rotary_emb_real(norm(attn.norm_added_k, tk[:, part]), tc, ts),
                apply_rotary_emb_real(norm(attn.norm_k, ik[rows]), img_cos, img_sin),
            ],
            dim=1,
        )
        value = torch.cat([tv[:, part], iv[rows]], dim=1)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=getattr(processor, "_attention_backend", None),
            parallel_config=getattr(processor, "_parallel_config", None),
        )
        outs.append(out.flatten(2, 3).to(query.dtype))
    return outs[0], outs[1]


def _fast_block_pair(
    block: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    mods: Mods,
    rope: PairRope,
    gelu_epilogue: bool = True,
    modulate_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fast_block` on a CFG pair: ``hidden_states`` ``[2B, S, C]`` (both passes' images: the same
    latents, so the same timestep and modulation), ``encoder_hidden_states`` ``[B, Lc + Lu, C]`` (both
    texts, unpadded). Every op but attention works token by token, so it runs once on both; each sample's
    attention output goes through the output projection and its gated residual on its own, so no copy joins
    them before the residual does. With zero_cond_t both passes' reference tokens take the t=0 vectors
    (``mods[2]``), as ``modulate_index`` (one pass's) says."""
    img_mod, txt_mod = mods[0], mods[1]
    img_zero = mods[2] if len(mods) > 2 else None
    if img_mod.shape[0] != 1:
        img_mod = torch.cat([img_mod, img_mod])
        if img_zero is not None:
            img_zero = torch.cat([img_zero, img_zero])
    if modulate_index is not None and modulate_index.shape[0] != 1:
        modulate_index = torch.cat([modulate_index, modulate_index])
    img_mod1, img_mod2 = img_mod.chunk(2, dim=-1)
    img_zero1, img_zero2 = img_zero.chunk(2, dim=-1) if img_zero is not None else (None, None)
    txt_mod1, txt_mod2 = txt_mod.chunk(2, dim=-1)
    b = encoder_hidden_states.shape[0]
    lc = rope[2].shape[0]
    attn = block.attn

    img_modulated, img_gate1 = _modulate_image(
        block, block.img_norm1(hidden_states), img_mod1, img_zero1, modulate_index
    )
    txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(encoder_hidden_states), txt_mod1)
    out_c, out_u = _pair_attention(attn, img_modulated, txt_modulated, rope)
    lu = out_u.shape[1] - hidden_states.shape[1]
    halves = []
    for out, text_len, rows in ((out_c, lc, slice(None, b)), (out_u, lu, slice(b, None))):
        img_attn_output = attn.to_out[0](out[:, text_len:])
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        gate = img_gate1 if img_gate1.shape[0] == 1 else img_gate1[rows]
        halves.append(hidden_states[rows] + gate * img_attn_output)
    hidden_states = torch.cat(halves)
    txt_attn_output = attn.to_add_out(torch.cat([out_c[:, :lc], out_u[:, :lu]], dim=1))
    encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output

    hidden_states, encoder_hidden_states = _mlp_half(
        block,
        hidden_states,
        encoder_hidden_states,
        img_mod2,
        txt_mod2,
        gelu_epilogue,
        img_zero2,
        modulate_index,
    )
    return encoder_hidden_states, hidden_states


_COMPILED: dict[tuple[Any, ...], Any] = {}


def _compiled_block(mode: str | None, backend: str, pair: bool = False) -> Any:
    key = (mode, backend, pair)
    if key not in _COMPILED:
        fn = _fast_block_pair if pair else _fast_block
        _COMPILED[key] = torch.compile(fn, fullgraph=True, mode=mode, backend=backend)
    return _COMPILED[key]


@dataclass
class FastPathState:
    """What :func:`enable_fast_path` changed on a transformer, and its caches."""

    compile: bool
    dynamic: bool
    fp8: bool | str
    mode: str | None
    cache_modulation: bool
    backend: str = "inductor"
    gelu_epilogue: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    processors: dict[str, Any] = field(default_factory=dict)
    fp8_swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    mod_params: list[torch.Tensor] = field(default_factory=list)
    mods_key: Any = None
    mods: list[Mods | None] = field(default_factory=list)
    img_rope: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
    scheduler: Any = None  # a diffusers scheduler: modulation for all its timesteps at once
    sched_key: Any = None
    sched_values: dict[float, int] = field(default_factory=dict)
    sched_temb: torch.Tensor | None = None  # with zero_cond_t, one more row: t=0's
    sched_mods: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    mod_index: tuple[Any, torch.Tensor] | None = None  # zero_cond_t's modulate_index, per image shapes
    batch_cfg: bool = True
    cfg_last: tuple[Any, ...] | None = None  # the previous call: (latents, version, timestep values, text)
    cfg_guess: torch.Tensor | None = None  # the last negative-prompt text seen: the next pair's partner
    cfg_solo: torch.Tensor | None = None  # a text whose passes come alone (an image without CFG)
    cfg_stash: tuple[Any, ...] | None = None  # (latents, version, values, text, partner, partner's output)
    cfg_hint: bool | None = None  # set by expect_cfg(): False = no CFG, never pair
    single_ran: bool = False  # the compiled single-forward block has run (its graph exists)
    ulysses: UlyssesGroup | None = None  # set by enable_ulysses(): each forward split over the group's ranks
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "forwards": 0,
            "modulation_reused": 0,
            "modulation_from_schedule": 0,
            "cfg_pairs": 0,
            "cfg_self_pairs": 0,
        }
    )

    def real_rope(self, img_freqs: torch.Tensor, txt_freqs: torch.Tensor) -> RealRope:
        # diffusers caches the image table per size (the same tensor object): convert it once.
        if self.img_rope is None or self.img_rope[0] is not img_freqs:
            self.img_rope = (img_freqs, rope_to_real(img_freqs))
        return self.img_rope[1], rope_to_real(txt_freqs)

    def modulate_index(self, img_shapes: Any, device: torch.device) -> torch.Tensor:
        """diffusers' ``modulate_index`` for zero_cond_t, ``[len(img_shapes), S]`` int32: 0 for each sample's first
        shape (the generated image's tokens), 1 for the rest (the reference images'). Built as diffusers builds it
        and kept for the image shapes, so the steps of an image do not rebuild it from a Python list."""
        shapes = tuple(tuple(tuple(int(v) for v in shape) for shape in sample) for sample in img_shapes)
        key = (shapes, torch.device(device))
        if self.mod_index is None or self.mod_index[0] != key:
            rows = [
                [0] * math.prod(sample[0]) + [1] * sum(math.prod(shape) for shape in sample[1:])
                for sample in shapes
            ]
            self.mod_index = (key, torch.tensor(rows, device=device, dtype=torch.int))
        return self.mod_index[1]


def _block_mods(block: Any, temb: torch.Tensor, zero_cond_t: bool) -> Mods:
    """A block's modulation vectors from the time embedding, as ``QwenImageTransformerBlock.forward`` computes them.
    With zero_cond_t, ``temb`` holds ``[2B]`` rows (t's, then t=0's): the image vectors of both halves come from one
    matmul, the text ones from t's half; returned as (image at t, text, image at t=0)."""
    if not zero_cond_t:
        return block.img_mod(temb), block.txt_mod(temb)
    img = block.img_mod(temb)
    n = img.shape[0] // 2
    return img[:n], block.txt_mod(torch.chunk(temb, 2, dim=0)[0]), img[n:]


class _Modulation:
    """The modulation vectors of one forward, computed per block on first use.

    A block skipped by a cache hook never asks for its vectors. With ``cache_modulation`` the vectors are
    kept between forwards, keyed by the timestep's value (their only input besides the weights) and the
    weights' versions: the CFG pass of a step reuses those of the conditional pass (the same values).
    With a scheduler (``enable_fast_path(..., scheduler=pipe.scheduler)``) whose timesteps hold this one
    (as the pipeline passes it: ``bf16(t) / 1000``), the vectors of every step of the image are computed
    at its first step, one batched matmul per Linear instead of one weight read per step.

    With zero_cond_t (Qwen-Image-Edit-2511) ``temb`` is diffusers' doubled embedding (t's rows, then t=0's) and each
    block gets a third vector, the image modulation at t=0, for the reference images' tokens. It is the same at every
    step: the scheduler's table holds it as one more row (t=0), computed with the image's other rows.
    """

    def __init__(
        self,
        state: FastPathState,
        model: Any,
        timestep: torch.Tensor,
        temb: torch.Tensor,
        values: tuple[float, ...] | None = None,
    ) -> None:
        self.state, self.model, self.timestep, self.temb = state, model, timestep, temb
        self.values = values
        self.checked = False
        self.row: int | None = None
        self.zero_cond_t = bool(getattr(model, "zero_cond_t", False))
        self.batch = timestep.shape[0]

    def _schedule_row(self, values: tuple[float, ...], versions: tuple[int, ...]) -> int | None:
        """The row of this timestep in the scheduler's table (built on a new schedule), or None."""
        state, temb = self.state, self.temb
        sched = getattr(state.scheduler, "timesteps", None)
        if sched is None or not isinstance(sched, torch.Tensor) or len(set(values)) != 1:
            return None
        if not (0 < sched.numel() <= 1000):
            return None
        key = (sched, sched._version, temb.dtype, temb.device, versions)
        old = state.sched_key
        if old is None or old[0] is not sched or old[1:] != key[1:]:
            ts = sched.to(device=temb.device, dtype=temb.dtype) / 1000  # what the pipeline passes
            state.sched_values = {v: i for i, v in enumerate(ts.float().cpu().tolist())}
            if self.zero_cond_t:  # the references' t=0 as the last row (diffusers' ``timestep * 0``)
                ts = torch.cat([ts, ts[-1:] * 0])
            state.sched_temb = self.model.time_text_embed(ts, temb, None)
            state.sched_mods = [None] * len(self.model.transformer_blocks)
            state.sched_key = key
        return state.sched_values.get(values[0])

    def get(self, index: int) -> Mods:
        state, temb = self.state, self.temb
        block = self.model.transformer_blocks[index]
        if not state.cache_modulation:
            return _block_mods(block, temb, self.zero_cond_t)
        if not self.checked:
            values = self.values
            if values is None:
                values = tuple(self.timestep.detach().float().cpu().tolist())  # one small device-to-host copy
            versions = tuple(p._version for p in state.mod_params)
            self.row = self._schedule_row(values, versions) if state.scheduler is not None else None
            if self.row is None:
                key = (values, temb.dtype, temb.device, versions)
                if key != state.mods_key or len(state.mods) != len(self.model.transformer_blocks):
                    state.mods = [None] * len(self.model.transformer_blocks)
                    state.mods_key = key
                elif index == 0:
                    state.stats["modulation_reused"] += 1
            else:
                state.stats["modulation_from_schedule"] += 1
            self.checked = True
        if self.row is not None:
            table = state.sched_mods[index]
            if table is None:
                table = state.sched_mods[index] = (
                    block.img_mod(state.sched_temb),
                    block.txt_mod(state.sched_temb),  # (with zero_cond_t its t=0 row goes unused)
                )
            r, batch = self.row, self.batch

            def row(t: torch.Tensor, i: int) -> torch.Tensor:
                return t[i : i + 1].expand(batch, -1) if batch > 1 else t[i : i + 1]

            if self.zero_cond_t:
                return row(table[0], r), row(table[1], r), row(table[0], table[0].shape[0] - 1)
            return row(table[0], r), row(table[1], r)
        mods = state.mods[index]
        if mods is None:
            mods = state.mods[index] = _block_mods(block, temb, self.zero_cond_t)
        return mods


class _ModRef:
    """Passed to a block as its ``temb``: where to get its modulation vectors."""

    __slots__ = ("modulation", "index", "pair")

    def __init__(self, modulation: _Modulation, index: int, pair: bool = False) -> None:
        self.modulation, self.index, self.pair = modulation, index, pair


def _block_forward(block: Any, state: FastPathState) -> Any:
    """The replacement ``forward`` of one block: stock signature; the work runs in :func:`_fast_block`."""
    stock = type(block).forward

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        temb: Any,
        image_rotary_emb: Any = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zero_cond_t = bool(block.zero_cond_t)
        if joint_attention_kwargs or (modulate_index is not None) != zero_cond_t:
            # (diffusers passes modulate_index exactly when the block has zero_cond_t; anything else: stock)
            if isinstance(temb, _ModRef):
                temb = temb.modulation.temb
            return stock(
                block,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                temb,
                image_rotary_emb,
                joint_attention_kwargs,
                modulate_index,
            )
        if isinstance(temb, _ModRef):
            mods = temb.modulation.get(temb.index)
        else:
            mods = _block_mods(block, temb, zero_cond_t)
        if isinstance(temb, _ModRef) and temb.pair:  # a CFG pair (see _model_forward)
            if state.compile and state.dynamic:
                torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
                torch._dynamo.maybe_mark_dynamic(encoder_hidden_states, 1)
                for t in (*image_rotary_emb[0], *image_rotary_emb[1], image_rotary_emb[2]):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                if modulate_index is not None:
                    torch._dynamo.maybe_mark_dynamic(modulate_index, 1)
            fn = _compiled_block(state.mode, state.backend, pair=True) if state.compile else _fast_block_pair
            return fn(
                block,
                hidden_states,
                encoder_hidden_states,
                mods,
                image_rotary_emb,
                state.gelu_epilogue,
                modulate_index,
            )
        rope = as_real_rope(image_rotary_emb)
        if state.compile:
            if state.dynamic:
                torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
                torch._dynamo.maybe_mark_dynamic(encoder_hidden_states, 1)
                if rope is not None:
                    for t in (*rope[0], *rope[1]):
                        torch._dynamo.maybe_mark_dynamic(t, 0)
                if modulate_index is not None:
                    torch._dynamo.maybe_mark_dynamic(modulate_index, 1)
            fn = _compiled_block(state.mode, state.backend)
            state.single_ran = True
        else:
            fn = _fast_block
        return fn(
            block,
            hidden_states,
            encoder_hidden_states,
            encoder_hidden_states_mask,
            mods,
            rope,
            state.gelu_epilogue,
            modulate_index,
        )

    forward._qwennb_fast = True  # type: ignore[attr-defined]
    return forward


def _time_embedding(
    model: Any, state: FastPathState, timestep: torch.Tensor, x: torch.Tensor, img_shapes: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The time embedding as diffusers' forward makes it: (what the blocks get, what ``norm_out`` gets, the
    ``modulate_index``). With zero_cond_t the blocks get the embedding of ``cat([t, t * 0])`` (the reference images'
    tokens are modulated at t=0), ``norm_out`` its first half, and the index says which tokens are the references'."""
    if not model.zero_cond_t:
        temb = model.time_text_embed(timestep, x, None)
        return temb, temb, None
    index = state.modulate_index(img_shapes, timestep.device)
    temb = model.time_text_embed(torch.cat([timestep, timestep * 0], dim=0), x, None)
    return temb, temb.chunk(2, dim=0)[0], index


def _single_forward(
    model: Any,
    state: FastPathState,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_mask: torch.Tensor | None,
    timestep: torch.Tensor,
    img_shapes: Any,
    values: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """One transformer forward on the tuned path: real RoPE once, modulation from the cache.

    Under Ulysses (:func:`enable_ulysses`) this rank runs the blocks on its contiguous slice of the image tokens
    (and their rows of the image RoPE tables) and on the whole text; the output's slices are gathered at the end,
    so every rank returns the whole output."""
    group = state.ulysses
    if group is not None:
        rows = _ulysses_slice(hidden_states.shape[1], group)
        hidden_states = hidden_states[:, rows]  # img_in works token by token: slicing first is exact
        state.stats["ulysses_image_tokens"] = (
            rows.stop - rows.start
        )  # what this rank's blocks ran on, last forward
    hidden_states = model.img_in(hidden_states)
    timestep = timestep.to(hidden_states.dtype)
    encoder_hidden_states = model.txt_in(model.txt_norm(encoder_hidden_states))
    text_seq_len, _, encoder_hidden_states_mask = compute_text_seq_len_from_mask(
        encoder_hidden_states, encoder_hidden_states_mask
    )
    temb, temb_out, modulate_index = _time_embedding(model, state, timestep, hidden_states, img_shapes)
    img_freqs, txt_freqs = model.pos_embed(
        img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device
    )
    rope = state.real_rope(img_freqs, txt_freqs)
    if group is not None:
        (img_cos, img_sin), txt_rope = rope
        rope = ((img_cos[rows], img_sin[rows]), txt_rope)
        if modulate_index is not None:  # which of this rank's image tokens are the references'
            modulate_index = modulate_index[:, rows]
    modulation = _Modulation(state, model, timestep, temb, values)
    for index, block in enumerate(model.transformer_blocks):
        encoder_hidden_states, hidden_states = block(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            temb=_ModRef(modulation, index),
            image_rotary_emb=rope,
            modulate_index=modulate_index,
        )
    hidden_states = model.norm_out(hidden_states, temb_out)
    out = model.proj_out(hidden_states)
    return _gather_tokens(out, group) if group is not None else out


def _pair_forward(
    model: Any,
    state: FastPathState,
    hidden_states: torch.Tensor,
    text_cond: torch.Tensor,
    text_uncond: torch.Tensor,
    timestep: torch.Tensor,
    img_shapes: Any,
    values: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional forwards of a CFG step as one: the latents go through the blocks as a
    batch of two (the same values, so the same modulation), the two texts side by side without padding, and
    each sample attends only to its own tokens (:func:`_pair_attention`). The same math as two calls."""
    b = hidden_states.shape[0]
    x = model.img_in(hidden_states)
    timestep = timestep.to(x.dtype)
    txt_c = model.txt_in(model.txt_norm(text_cond))
    txt_u = model.txt_in(model.txt_norm(text_uncond))
    lc, lu = txt_c.shape[1], txt_u.shape[1]
    temb, temb_out, modulate_index = _time_embedding(model, state, timestep, x, img_shapes)
    img_freqs, txt_freqs = model.pos_embed(img_shapes, max_txt_seq_len=max(lc, lu), device=x.device)
    img_rope, (cos, sin) = state.real_rope(img_freqs, txt_freqs)
    rope = (img_rope, (torch.cat([cos[:lc], cos[:lu]]), torch.cat([sin[:lc], sin[:lu]])), cos[:lc])
    modulation = _Modulation(state, model, timestep, temb, values)
    x = torch.cat([x, x])
    txt = torch.cat([txt_c, txt_u], dim=1)
    for index, block in enumerate(model.transformer_blocks):
        txt, x = block(
            hidden_states=x,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=None,
            temb=_ModRef(modulation, index, pair=True),
            image_rotary_emb=rope,
            modulate_index=modulate_index,
        )
    x = model.norm_out(x, temb_out if b == 1 else torch.cat([temb_out, temb_out]))
    out = model.proj_out(x)
    return out[:b], out[b:]


def _same_text(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same text embeddings: the same tensor, or equal values (one small comparison on the device)."""
    if a is b:
        return True
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _cfg_forward(
    model: Any,
    state: FastPathState,
    hidden_states: torch.Tensor,
    text: torch.Tensor,
    timestep: torch.Tensor,
    img_shapes: Any,
) -> torch.Tensor:
    """A forward that batches true CFG's two passes of a step.

    Diffusers' pipeline calls the transformer twice a step on the same latents tensor and timestep, first with
    the prompt's embeddings, then with the negative prompt's. qwennb keeps the last negative-prompt embeddings
    it saw (learned from a second pass on the same latents) and computes each first pass together with them
    (:func:`_pair_forward`); the stored second output is returned only to a call with the same latents tensor,
    unchanged, the same timestep and equal negative embeddings (the same tensor, or equal values). So from the
    second image on, every step is one forward, the first included; a new negative prompt is learned at its
    first step. A first pass that comes alone (an image without CFG) marks its text as solo: plain forwards.

    Before the compiled single-block graph exists, a pass that has no partner runs as a pair with itself, so a
    session's first images compile one graph, not two.
    """
    values = tuple(timestep.detach().float().cpu().tolist())  # one small device-to-host copy a call
    version = hidden_states._version

    def same_call(rec: tuple[Any, ...] | None) -> bool:
        return rec is not None and rec[0] is hidden_states and rec[1] == version and rec[2] == values

    stash, state.cfg_stash = state.cfg_stash, None
    if stash is not None:
        if same_call(stash) and _same_text(stash[4], text):
            state.cfg_guess, state.cfg_last = text, None
            return stash[5]
        if not same_call(stash):  # the step moved on without the second pass: its text comes alone
            state.cfg_solo = stash[3]
    last, state.cfg_last = state.cfg_last, None
    if same_call(last) and last is not None and last[3] is not text:
        state.cfg_guess = text  # a second pass not foreseen (a session's first image, a new negative prompt)
        if state.cfg_solo is last[3]:
            state.cfg_solo = None  # its first text has a partner after all
        return _plain_forward(model, state, hidden_states, text, timestep, img_shapes, values, solo=False)
    if last is not None and last[3] is text and not same_call(last):
        state.cfg_solo = text  # back on new latents with no second pass between: this image has no CFG
    state.cfg_last = (hidden_states, version, values, text)
    guess = state.cfg_guess
    solo = state.cfg_hint is False or state.cfg_solo is text
    if (
        not solo
        and guess is not None
        and guess.shape[0] == text.shape[0]
        and guess.dtype == text.dtype
        and guess.device == text.device
        and not _same_text(guess, text)  # the negative text itself, on new latents: nothing to pair
    ):
        out_c, out_u = _pair_forward(model, state, hidden_states, text, guess, timestep, img_shapes, values)
        state.cfg_stash = (hidden_states, version, values, text, guess, out_u)
        state.stats["cfg_pairs"] += 1
        return out_c
    return _plain_forward(model, state, hidden_states, text, timestep, img_shapes, values, solo=solo)


def _plain_forward(
    model: Any,
    state: FastPathState,
    hidden_states: torch.Tensor,
    text: torch.Tensor,
    timestep: torch.Tensor,
    img_shapes: Any,
    values: tuple[float, ...],
    solo: bool,
) -> torch.Tensor:
    """One pass without a partner: a single forward, or (while only the pair graph is compiled, and the pass
    may be part of a CFG step) the pass paired with itself, which costs a forward but no compile."""
    if not solo and state.compile and not state.single_ran:
        out, _ = _pair_forward(model, state, hidden_states, text, text, timestep, img_shapes, values)
        state.stats["cfg_self_pairs"] += 1
        return out
    return _single_forward(model, state, hidden_states, text, None, timestep, img_shapes, values)


@contextlib.contextmanager
def expect_cfg(transformer: Any, cfg: bool) -> Any:
    """Tell the tuned path whether the next pipeline call uses true CFG (``qwennb.generate`` does).

    Without CFG, no pass is paired (otherwise the first step of an image without CFG computes one pair
    in vain before qwennb sees that no second pass comes). A no-op on a transformer without the tuned path.

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> pipe = build_tiny_pipeline()
        >>> state = enable_fast_path(pipe.transformer, compile=False)
        >>> with expect_cfg(pipe.transformer, False):
        ...     state.cfg_hint
        False
        >>> disable_fast_path(pipe.transformer)
    """
    state = getattr(transformer, STATE_ATTR, None)
    if state is None:
        yield
        return
    old, state.cfg_hint = state.cfg_hint, bool(cfg)
    try:
        yield
    finally:
        state.cfg_hint = old


def _model_forward(model: Any, state: FastPathState) -> Any:
    """The replacement ``forward`` of the transformer: real RoPE once per forward, modulation once per step."""
    stock = type(model).forward

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        timestep: torch.Tensor = None,
        img_shapes: Any = None,
        guidance: torch.Tensor = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: Any = None,
        additional_t_cond: Any = None,
        return_dict: bool = True,
    ) -> Any:
        unsupported = (
            guidance is not None
            or attention_kwargs
            or controlnet_block_samples is not None
            or additional_t_cond is not None
            or type(model.pos_embed) is not QwenEmbedRope
            or (torch.is_grad_enabled() and model.gradient_checkpointing)
        )
        if unsupported:
            if state.ulysses is not None:
                raise NotImplementedError(
                    "this forward (guidance, attention_kwargs, controlnet, zero_cond_t, a custom RoPE or training) "
                    "is not on the tuned path, and the tuned path's Ulysses covers only that path"
                )
            return stock(
                model,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                timestep=timestep,
                img_shapes=img_shapes,
                guidance=guidance,
                attention_kwargs=attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                additional_t_cond=additional_t_cond,
                return_dict=return_dict,
            )
        state.stats["forwards"] += 1
        pairable = (
            state.batch_cfg
            and state.ulysses is None  # under Ulysses each pass is its own forward
            and encoder_hidden_states_mask is None
            and hidden_states.dtype != torch.float16
            and not getattr(model, "is_cache_enabled", False)
            and not hidden_states.is_inference()  # no version counters to prove the latents unchanged
            and not encoder_hidden_states.is_inference()
        )
        if not pairable:
            output = _single_forward(
                model,
                state,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                timestep,
                img_shapes,
            )
        else:
            output = _cfg_forward(model, state, hidden_states, encoder_hidden_states, timestep, img_shapes)
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)

    forward._qwennb_fast = True  # type: ignore[attr-defined]
    return forward


def is_fast(transformer: Any) -> bool:
    """True when :func:`enable_fast_path` is active on ``transformer``."""
    return getattr(transformer, STATE_ATTR, None) is not None


def _native_attention_is_global() -> bool:
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry.get_active_backend()[0]
        return str(getattr(backend, "value", backend)) == "native"
    except Exception:  # noqa: BLE001 - private API: assume another backend, use diffusers' dispatch
        return False


def enable_fast_path(
    transformer: Any,
    compile: bool = True,
    dynamic: bool = True,
    fp8: bool | str = False,
    fuse_qkv: bool = False,
    cache_modulation: bool = True,
    gelu_epilogue: bool = True,
    sdpa_op: bool | None = False,
    rope_style: str = "pairs",
    mode: str | None = None,
    backend: str = "inductor",
    scheduler: Any = None,
    quantize_on: Any = None,
    batch_cfg: bool = True,
) -> FastPathState:
    """Switch a ``QwenImageTransformer2DModel`` to the tuned path (see the module docstring).

    ``compile`` compiles the shared block function (``fullgraph=True``; ``mode`` and ``backend`` are
    torch.compile's, tests use ``backend="aot_eager"``); ``dynamic`` marks the text and image lengths
    dynamic from the first call, so one compile serves every prompt and size. ``fuse_qkv`` (off: it
    measured 2 ms a step slower on an H100), ``gelu_epilogue``, ``cache_modulation``, ``sdpa_op`` (off: no
    measurable gain; ``None`` turns it on when diffusers' global attention backend is PyTorch's native
    one) and ``rope_style`` ("pairs", or "stack": 7.6 ms a step slower) select the pieces. ``scheduler``
    (the pipeline's) lets the modulation of a whole image be computed at its first step.
    ``batch_cfg`` computes true CFG's two passes of a step as one batch (:func:`_cfg_forward`; exact per
    sample, no padding mask); diffusers' cache hooks and masked (padded) texts turn it off for that call.

    ``fp8`` (lossy): ``True`` or ``"copy"`` computes the blocks' large Linears in fp8 (:class:`FP8Linear`)
    and keeps the bf16 Linears, so :func:`disable_fast_path` can restore them (adds half their size);
    ``"replace"`` also stores the modulation Linears in fp8 (:class:`FP8WeightLinear`) and drops the bf16
    weights: the transformer's blocks then take half the memory, for good. ``quantize_on`` is where the
    weights are quantised (e.g. ``"cuda"`` for a transformer held in host RAM; the fp8 weights stay where
    the bf16 ones were). Call it on a model whose weights sit on one device in
    one dtype, before any diffusers hooks (cache, offload) are added. Idempotent for the same options;
    returns the :class:`FastPathState` stored on the model.
    """
    if sdpa_op is None:
        sdpa_op = _native_attention_is_global()
    if fp8 not in (False, True, "copy", "replace"):
        raise ValueError(f"fp8 must be False, True, 'copy' or 'replace', got {fp8!r}")
    if rope_style not in ("pairs", "stack"):
        raise ValueError(f"rope_style must be 'pairs' or 'stack', got {rope_style!r}")
    options = {
        "compile": compile,
        "dynamic": dynamic,
        "fp8": fp8,
        "quantize_on": str(quantize_on) if quantize_on is not None else None,
        "batch_cfg": batch_cfg,
        "fuse_qkv": fuse_qkv,
        "cache_modulation": cache_modulation,
        "gelu_epilogue": gelu_epilogue,
        "sdpa_op": sdpa_op,
        "rope_style": rope_style,
        "mode": mode,
        "backend": backend,
        "scheduler": id(scheduler) if scheduler is not None else None,
    }
    state = getattr(transformer, STATE_ATTR, None)
    if state is not None:
        if state.options == options:
            return state
        disable_fast_path(transformer)
    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None):
            raise RuntimeError(
                "enable_fast_path must run before diffusers hooks (cache, offload, casting) are added"
            )
    state = FastPathState(
        compile=compile,
        dynamic=dynamic,
        fp8=fp8,
        mode=mode,
        cache_modulation=cache_modulation,
        backend=backend,
        gelu_epilogue=gelu_epilogue,
        options=options,
        scheduler=scheduler,
        batch_cfg=batch_cfg,
    )
    state.processors = dict(transformer.attn_processors)
    new = {}
    for name, proc in state.processors.items():
        p = QwenRealRopeAttnProcessor()
        p._attention_backend = getattr(proc, "_attention_backend", None)
        p._parallel_config = getattr(proc, "_parallel_config", None)
        p.sdpa_op = sdpa_op
        p.rope_style = rope_style
        new[name] = p
    transformer.set_attn_processor(new)
    for block in blocks:
        if fuse_qkv:
            fuse_qkv_(block.attn)
        elif getattr(block.attn, "fused_projections", False):
            block.attn.fused_projections = False  # fused weights stay as views; the processor skips them
        if fp8 == "replace":
            fp8_replace_block_(block, quantize_on)
        elif fp8:
            for parent, name in _fp8_targets(block):
                old = parent._modules[name]
                state.fp8_swaps.append((parent, name, _swap(parent, name, FP8Linear(old, quantize_on))))
        block.forward = _block_forward(block, state)
    state.mod_params = [p for b in blocks for m in (b.img_mod, b.txt_mod) for p in m.parameters()]
    transformer.forward = _model_forward(transformer, state)
    setattr(transformer, STATE_ATTR, state)
    return state


def enable_ulysses(transformer: Any, group: Any = None) -> UlyssesGroup:
    """Split every forward of a transformer on the tuned path over the ranks of ``group`` (Ulysses sequence
    parallelism); ``group`` is a ``torch.distributed`` process group (default: the whole world), joined already.

    Each rank runs the tuned, compiled blocks on its contiguous slice of the image tokens and on the whole text
    (replicated: a few dozen tokens, computed identically on every rank, so no padding and no mask), with the
    all-to-alls inside the blocks' attention (:func:`_ulysses_attention`, functional collectives, so one compiled
    graph a block); the output is gathered at the end, and every rank returns the whole output. Every rank must
    make the same calls with the same inputs (the pipeline does, with the same seed). Needs
    :func:`enable_fast_path` first, attention heads and image tokens that divide by the group's size, and no step
    cache (First Block Cache would decide on each rank's slice). CFG's two passes are not batched
    (``batch_cfg``) while it is on. :func:`disable_ulysses` (or :func:`disable_fast_path`) undoes it.
    """
    state: FastPathState | None = getattr(transformer, STATE_ATTR, None)
    if state is None:
        raise RuntimeError("enable_ulysses needs the tuned path: call enable_fast_path(transformer) first")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("enable_ulysses needs a torch.distributed process group (init_process_group)")
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(
            "a step cache decides on each rank's slice of the tokens and would part the ranks: disable it "
            "(transformer.disable_cache()) before enable_ulysses"
        )
    pg = group if group is not None else dist.group.WORLD
    degree, rank = dist.get_world_size(pg), dist.get_rank(pg)
    heads = int(transformer.config.num_attention_heads)
    if heads % degree:
        raise ValueError(f"{heads} attention heads do not divide by the Ulysses degree {degree}")
    processors = list(transformer.attn_processors.values())
    if not all(isinstance(p, QwenRealRopeAttnProcessor) for p in processors):
        raise RuntimeError(
            "enable_ulysses needs the tuned path's attention processors (set_attn_processor ran since)"
        )
    spec = UlyssesGroup(pg.group_name, degree, rank, pg)
    for proc in processors:
        proc.ulysses = spec
    state.ulysses = spec
    state.cfg_last = state.cfg_stash = None
    return spec


def disable_ulysses(transformer: Any) -> None:
    """Undo :func:`enable_ulysses`: each forward runs whole on this rank again."""
    state: FastPathState | None = getattr(transformer, STATE_ATTR, None)
    if state is None or state.ulysses is None:
        return
    for proc in transformer.attn_processors.values():
        if isinstance(proc, QwenRealRopeAttnProcessor):
            proc.ulysses = None
    state.ulysses = None


def disable_fast_path(transformer: Any) -> None:
    """Undo :func:`enable_fast_path` (stock processors, forwards and Linears back); remove cache hooks first.

    Fused projections stay (the stock processor reads the views of the fused weights), and so do the fp8
    layers of ``fp8="replace"`` (their bf16 weights are gone; they run in the stock block too).
    """
    state: FastPathState | None = getattr(transformer, STATE_ATTR, None)
    if state is None:
        return
    for block in transformer.transformer_blocks:
        registry = getattr(block, "_diffusers_hook", None)  # (hooks copy the wrapped forward's attributes)
        if registry is not None and getattr(registry, "hooks", None):
            raise RuntimeError(
                "remove diffusers hooks (e.g. transformer.disable_cache()) before disable_fast_path"
            )
    for block in transformer.transformer_blocks:
        fwd = block.__dict__.get("forward")
        if fwd is not None and not getattr(fwd, "_qwennb_fast", False):
            raise RuntimeError(
                "remove diffusers hooks (e.g. transformer.disable_cache()) before disable_fast_path"
            )
        block.__dict__.pop("forward", None)
    for parent, name, old in reversed(state.fp8_swaps):
        parent._modules[name] = old
    state.fp8_swaps.clear()
    transformer.set_attn_processor(dict(state.processors))
    transformer.__dict__.pop("forward", None)
    setattr(transformer, STATE_ATTR, None)


# --------------------------------------------------------------------------- step caches (lossy)

CACHE_MODES = ("first_block", "taylorseer")


def cache_config(mode: str) -> Any:
    """The diffusers cache config for a qwennb cache mode.

    ``first_block``: First Block Cache, threshold 0.05 (diffusers' default): a step whose first block's
    output moved less than that reuses the other blocks' residual. ``taylorseer``: TaylorSeer in its lite
    form (whole steps predicted from a first-order Taylor expansion of the output; full computation for
    the first 3 steps and then every 5th), which hooks only outside the blocks and so composes with the
    compiled path.
    """
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if mode == "first_block":
        return FirstBlockCacheConfig(threshold=0.05)
    if mode == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=5, disable_cache_before_step=3, max_order=1, use_lite_mode=True
        )
    raise ValueError(f"unknown cache mode {mode!r}; choose one of: {', '.join(CACHE_MODES)}")


def apply_cache(transformer: Any, mode: str) -> None:
    """Enable a diffusers step cache (``transformer.enable_cache``); ``transformer.disable_cache()`` undoes it."""
    transformer.enable_cache(cache_config(mode))


__all__ = [
    "QwenRealRopeAttnProcessor",
    "FP8Linear",
    "FP8WeightLinear",
    "FastPathState",
    "apply_rotary_emb_real",
    "rope_to_real",
    "as_real_rope",
    "fuse_qkv_",
    "fp8_replace_block_",
    "enable_fast_path",
    "disable_fast_path",
    "enable_ulysses",
    "disable_ulysses",
    "UlyssesGroup",
    "expect_cfg",
    "is_fast",
    "apply_cache",
    "cache_config",
    "CACHE_MODES",
]
