"""One image (or a few) on several GPUs: worker processes over torch.distributed, driven from the kernel.

A notebook kernel is one process and NCCL wants one process per GPU, so the kernel (or the CLI) is the
*controller*, never a rank: :class:`WorkerPool` spawns one worker per GPU (``torch.multiprocessing``'s spawn
context), each worker loads the model with the usual plan (:func:`qwennb.plan.make_plan` and
:func:`qwennb.pipeline.build`, so the tuned path runs inside it) and joins a process group (NCCL on GPUs,
gloo on CPUs). Requests go to the workers and results (images, per-step times, peak memory per GPU) and
per-step progress come back through multiprocessing queues. The workers talk to each other only through
torch.distributed.

Modes (how one request uses the ranks; :func:`choose_parallel` picks one and says why):

- **cfg**: true CFG's two passes on two groups of GPUs. Each rank computes one pass a step, then one
  all-gather of the noise prediction (0.5 MB a step at 1024² in bf16) gives every rank both halves; the
  pipeline's own CFG combination and scheduler step then run unchanged and identically on each rank.
- **ulysses**: sequence parallel on qwennb's tuned path (:func:`qwennb.speed.enable_ulysses`): each rank runs
  the tuned, compiled blocks on its contiguous slice of the image tokens and on the whole text (replicated, so
  any prompt length works, with no padding and no mask); two all-to-alls a block inside the compiled graph give
  each rank its share of the heads over the whole sequence for attention and then its tokens back; the output
  is gathered at the end. The same arithmetic as one GPU within rounding. With 4 or 8 GPUs it combines with cfg
  (2 groups of N/2). ``WorkerPool(ulysses_impl="diffusers")`` keeps the former way, diffusers' own
  ``ContextParallelConfig(ulysses_degree=N)`` on its stock forward, with the text padded with masked tokens to a
  multiple of N (stock diffusers fails on an odd prompt length); it is also used where the tuned path cannot run
  (another transformer class, offloaded weights).
- **data**: several images split over the groups; every image keeps the noise it would have in one process
  (the full batch of noise is drawn from the seed, each group keeps its slice).

Stop (the panel's button or Ctrl-C in the kernel) reaches the workers through a shared event; ranks that
compute one image together agree on it with a one-number all-reduce a step, so they stop at the same step.
A worker that dies ends the pool with one :class:`WorkerDiedError`; :meth:`WorkerPool.restart` (or loading
again) starts a fresh one. Closing the pool ends the processes, which frees every GPU.

Example:
    >>> from qwennb.parallel import choose_parallel
    >>> p = choose_parallel(gpus=2, cfg=4.0, width=1024, height=1024, images=1)
    >>> p.mode, p.cfg_degree, p.ulysses_degree
    ('cfg', 2, 1)
    >>> choose_parallel(gpus=2, cfg=1.0, width=1024, height=1024, images=1).mode  # Ulysses measured slower
    'single'
    >>> choose_parallel(gpus=2, cfg=4.0, width=1024, height=1024, images=4).mode
    'data'
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import GenerationError, QwennbError
from .generation import GenerationResult, StepInfo, StopSignal

log = logging.getLogger("qwennb")

# The small model the CPU tests and the benchmark's --smoke mode run on (one name to change when the trained
# toy model becomes the default).
SMALL_MODEL = "tiny"

# NVLink multicast (NVLS) stays off on the lent GPU machines; set in every worker before NCCL starts.
WORKER_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

MODES = ("single", "cfg", "ulysses", "cfg+ulysses", "data")


class ParallelError(QwennbError):
    """A multi-GPU request that cannot run as asked (too few GPUs, degrees that do not divide...)."""


class WorkerDiedError(ParallelError):
    """A worker process ended; the pool is closed and must be restarted."""


class WorkerError(ParallelError):
    """An unexpected error inside a worker (its type and message are in the text)."""


# --------------------------------------------------------------------------- choosing a mode (pure)


@dataclass
class ParallelPlan:
    """How one request uses several GPUs: the mode, its degrees, one sentence of why and what it costs.

    ``cfg_degree * ulysses_degree`` GPUs compute one image together; ``data_degree`` such groups work on
    different images. ``exchanged_mb_per_step`` is what each GPU sends a denoising step (an estimate from the
    sizes, bf16).
    """

    mode: str
    gpus: int
    cfg_degree: int = 1
    ulysses_degree: int = 1
    data_degree: int = 1
    why: str = ""
    cost: str = ""
    exchanged_mb_per_step: float = 0.0

    @property
    def gpus_used(self) -> int:
        return self.cfg_degree * self.ulysses_degree * self.data_degree

    def text(self) -> str:
        return f"{self.mode} on {self.gpus_used} of {self.gpus} GPU(s): {self.why} Cost: {self.cost}"


def image_tokens(width: int, height: int) -> int:
    """Image tokens of a Qwen-Image latent (8× VAE, 2×2 patches): ``(width/16) * (height/16)``.

    Example:
        >>> image_tokens(1024, 1024)
        4096
    """
    return (width // 16) * (height // 16)


def _largest_divisor(n: int, limit: int, ok: Callable[[int], bool]) -> int:
    for d in range(min(n, limit), 1, -1):
        if n % d == 0 and ok(d):
            return d
    return 1


# One image without CFG over 2 GPUs, measured (benchmarks/multigpu.py --only-cfg1, full-size synthetic, 20 steps,
# CFG 1) with the tuned path's Ulysses (compiled blocks, the all-to-alls inside): 1.50x one GPU in the latest run
# (0.104 and 0.128 s/step in two earlier runs of the same code), with final latents 0.77% (relative) from one
# GPU's, so it is not lossless and one CFG-1 image stays on one GPU unless the pool was
# loaded with ulysses=N. (diffusers' context parallelism on its stock forward measured 0.185-0.369 s/step.)
ULYSSES_MEASURED = {
    "card": "H200",
    "gpus": 2,
    "size": 1024,
    "ulysses_s_per_step": 0.081,
    "one_gpu_s_per_step": 0.122,
    "latent_rel_err": 0.0077,
    "source": "benchmarks/results/multigpu-cfg1-nvidia-h200.json",
    "config": "qwennb-ulysses",
    "path": "qwennb's tuned path, compiled",
}


def choose_parallel(
    gpus: int,
    cfg: float,
    width: int,
    height: int,
    images: int = 1,
    *,
    heads: int = 24,
    head_dim: int = 128,
    layers: int = 60,
    text_tokens: int = 32,
    ulysses: int | None = None,
) -> ParallelPlan:
    """Pick how ``gpus`` GPUs share a request of ``images`` images at ``width``×``height`` with ``cfg``.

    Rules: several images go data parallel (nothing exchanged a step, the best scaling); one image with
    CFG > 1 puts the two passes on two groups (one small all-gather a step) and, with 4 or more GPUs, runs
    Ulysses sequence parallel inside each group; one image without CFG stays on one GPU (Ulysses over 2 H200s
    measured 1.50x one GPU but not lossless, :data:`ULYSSES_MEASURED`) unless the pool was loaded with a Ulysses degree. Ulysses
    needs the attention heads (24 for Qwen-Image) and the image tokens to divide by its degree; the largest
    degree that does is used. ``ulysses`` fixes the Ulysses degree (a pool loaded with one). ``heads``,
    ``head_dim``, ``layers`` and ``text_tokens`` describe the model (Qwen-Image's by default).

    Example:
        >>> p = choose_parallel(4, 4.0, 1024, 1024)
        >>> p.mode, p.cfg_degree, p.ulysses_degree, p.gpus_used
        ('cfg+ulysses', 2, 2, 4)
        >>> choose_parallel(1, 4.0, 1024, 1024).mode
        'single'
    """
    if not isinstance(gpus, int) or gpus < 1:
        raise ParallelError(f"gpus must be a whole number of at least 1, got {gpus!r}")
    if not isinstance(images, int) or images < 1:
        raise ParallelError(f"images must be at least 1, got {images!r}")
    tokens = image_tokens(width, height)
    mb = 1024**2
    # One all-gather of the noise prediction (B x tokens x 64 channels, bf16) a step.
    cfg_mb = images * tokens * 64 * 2 / mb

    def ulysses_ok(d: int) -> bool:
        return heads % d == 0 and tokens % d == 0

    def ulysses_mb(d: int, batch: int) -> float:
        # The tuned path's 2 all-to-alls a block: the image tokens' q, k, v (3 x tokens/d x heads x head_dim), then
        # the attention output, each rank's tokens plus the whole text (tokens/d + text, all heads); (d-1)/d leaves.
        return layers * batch * (4 * tokens / d + text_tokens) * heads * head_dim * 2 * (d - 1) / d / mb

    def fixed(d: int | None, limit: int) -> int:
        if d is None:
            return _largest_divisor(limit, limit, ulysses_ok)
        if d < 1 or limit % d:
            raise ParallelError(f"ulysses degree {d} does not divide {limit} GPUs")
        if d > 1 and not ulysses_ok(d):
            raise ParallelError(
                f"ulysses degree {d} needs the {heads} heads and the {tokens} image tokens to divide by it"
            )
        return d

    if gpus == 1:
        return ParallelPlan("single", 1, why="one GPU: nothing to share.", cost="none.")

    def data(groups: int, sp: int, reason: str) -> ParallelPlan:
        per = -(-images // groups)
        idle = gpus - groups * sp
        exchanged = ulysses_mb(sp, per) if sp > 1 else 0.0
        return ParallelPlan(
            "data",
            gpus,
            ulysses_degree=sp,
            data_degree=groups,
            why=reason
            + (f" Each group of {sp} GPUs splits its images' tokens by Ulysses." if sp > 1 else "")
            + (f" {idle} GPU(s) idle." if idle else ""),
            cost=(f"about {exchanged:.0f} MB sent per GPU a step" if sp > 1 else "nothing exchanged a step")
            + f"; every GPU holds the whole model; at best {images / per:.2g}x one GPU's throughput.",
            exchanged_mb_per_step=exchanged,
        )

    if images > 1:
        sp = fixed(ulysses, gpus) if ulysses is not None else 1
        groups = min(gpus // sp, images)
        return data(
            groups,
            sp,
            f"{images} images: each group draws its share with the noise it would have in one process.",
        )
    if cfg > 1:
        if ulysses is not None:
            sp = fixed(ulysses, gpus)
            halves = gpus // sp == 2
        else:
            sp = fixed(None, gpus // 2) if gpus >= 4 and gpus % 2 == 0 else 1
            halves = True
        if halves:
            idle = gpus - 2 * sp
            exchanged = cfg_mb + (ulysses_mb(sp, 1) if sp > 1 else 0.0)
            return ParallelPlan(
                "cfg+ulysses" if sp > 1 else "cfg",
                gpus,
                cfg_degree=2,
                ulysses_degree=sp,
                why="CFG > 1: the conditional and unconditional passes run on different GPUs"
                + (f", each pass split over {sp} GPUs by Ulysses sequence parallelism" if sp > 1 else "")
                + "; the result equals one GPU's within rounding."
                + (
                    f" {idle} GPU(s) idle: no Ulysses degree divides {heads} heads and {tokens} tokens."
                    if idle
                    else ""
                ),
                cost=f"about {exchanged:.1f} MB sent per GPU a step; every GPU holds the whole model; at best "
                f"{2 * sp}x one GPU.",
                exchanged_mb_per_step=exchanged,
            )
    else:
        if ulysses is None:
            m = ULYSSES_MEASURED
            return ParallelPlan(
                "single",
                gpus,
                why="one image without CFG: one GPU draws it, exactly. Ulysses sequence parallelism (a pool loaded "
                f"with ulysses=N) measured {m['one_gpu_s_per_step'] / m['ulysses_s_per_step']:.2f}x one GPU on "
                f"{m['gpus']}x{m['card']} at {m['size']}² ({m['ulysses_s_per_step']} against "
                f"{m['one_gpu_s_per_step']} s/step, {m['source']}, its ranks on {m['path']}) with final latents "
                f"{m['latent_rel_err']:.2%} from one GPU's, so it is opt-in. "
                f"Each rank sends about {ulysses_mb(2, 1):.0f} MB a step.",
                cost="none; the other GPUs idle (several images go data parallel).",
            )
        sp = fixed(ulysses, gpus)
    if sp > 1 and gpus // sp == 1:
        exchanged = ulysses_mb(sp, 1)
        return ParallelPlan(
            "ulysses",
            gpus,
            ulysses_degree=sp,
            why=f"one image{' without CFG' if cfg <= 1 else ''}: its {tokens} image tokens split over {sp} GPUs by "
            "Ulysses on the tuned path (each GPU its slice of the image and the whole text; the result equals one "
            "GPU's within rounding).",
            cost=f"about {exchanged:.0f} MB sent per GPU a step (2 all-to-alls a block); every GPU holds the whole "
            f"model; at best {sp}x one GPU.",
            exchanged_mb_per_step=exchanged,
        )
    if sp > 1:
        return data(1, sp, "one image on one group of GPUs (the pool's groups cannot share it).")
    return ParallelPlan(
        "single",
        gpus,
        why=f"one image and no Ulysses degree up to {gpus} that divides {heads} heads and {tokens} image tokens.",
        cost="none; the other GPUs idle.",
    )


def pad_text_to_multiple(embeds: Any, mask: Any, multiple: int) -> tuple[Any, Any]:
    """Pad text embeddings (B, L, D) with zero tokens to a length that divides by ``multiple``; the mask marks
    the padding False (a mask of ones is made when ``mask`` is None). Returns the inputs unchanged when
    ``L`` already divides.

    Masked keys get no attention weight, and the padded tokens sit after the real ones (their RoPE positions
    do not move), so the image tokens' output is the unpadded one within rounding.

    Example:
        >>> import torch
        >>> e, m = pad_text_to_multiple(torch.ones(1, 5, 3), None, 4)
        >>> tuple(e.shape), m.tolist()
        ((1, 8, 3), [[True, True, True, True, True, False, False, False]])
    """
    import torch

    length = embeds.shape[1]
    extra = (-length) % multiple
    if extra == 0:
        return embeds, mask
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    pad_e = embeds.new_zeros(embeds.shape[0], extra, *embeds.shape[2:])
    pad_m = mask.new_zeros(mask.shape[0], extra)
    return torch.cat([embeds, pad_e], dim=1), torch.cat([mask, pad_m], dim=1)


def split_counts(total: int, groups: int) -> list[int]:
    """How ``total`` images split over ``groups`` (the first groups take the remainder).

    Example:
        >>> split_counts(5, 2), split_counts(1, 4)
        ([3, 2], [1, 0, 0, 0])
    """
    return [total // groups + (1 if g < total % groups else 0) for g in range(groups)]


# --------------------------------------------------------------------------- the worker side


@dataclass
class _Layout:
    """Where a rank sits: ``world = outer * ulysses``; rank = outer_index * ulysses + ulysses_index."""

    rank: int
    world: int
    ulysses: int

    @property
    def outer(self) -> int:
        return self.world // self.ulysses

    @property
    def outer_index(self) -> int:
        return self.rank // self.ulysses

    @property
    def leader(self) -> bool:  # the first rank of its Ulysses group
        return self.rank % self.ulysses == 0


class _EventStop(StopSignal):
    """The worker's stop flag: the controller's shared event; with a process group, the ranks that compute
    one image together agree on it once a step (an all-reduce of one number), so they stop at the same step."""

    def __init__(self, event: Any, group: Any = None, device: Any = None) -> None:
        super().__init__()
        self._shared = event
        self._group = group
        self._device = device
        self._decided = False

    def set(self) -> None:
        self._shared.set()

    def clear(self) -> None:  # the controller clears the shared event before each request
        self._decided = False

    def __bool__(self) -> bool:
        if self._decided:
            return True
        flag = self._shared.is_set()
        if self._group is not None:
            import torch
            import torch.distributed as dist

            t = torch.tensor([1.0 if flag else 0.0], device=self._device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = bool(t.item() > 0)
        self._decided = flag
        return flag


@contextlib.contextmanager
def _cfg_split(transformer: Any, index: int, group: Any) -> Iterator[None]:
    """While active, the transformer's two calls a step (conditional, then unconditional) cost one forward on
    this rank: CFG half ``index`` (0 conditional, 1 unconditional) is computed at the second call, the halves
    are exchanged with one all-gather over ``group``, and the conditional output is written into the tensor
    the first call returned (the pipeline reads it only after the second call)."""
    import torch
    import torch.distributed as dist

    from .speed import expect_cfg

    inner = transformer.forward
    own = transformer.__dict__.get("forward")
    state: dict[str, Any] = {"pending": None}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if state["pending"] is None:
            cfg = transformer.config
            shape = (*hidden.shape[:2], cfg.patch_size**2 * cfg.out_channels)
            out_c = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
            state["pending"] = (args, kwargs, out_c)
            result = out_c
        else:
            first_args, first_kwargs, out_c = state["pending"]
            state["pending"] = None
            mine_args, mine_kwargs = (first_args, first_kwargs) if index == 0 else (args, kwargs)
            with expect_cfg(transformer, False):  # the tuned path must not try to pair passes here
                mine = inner(*mine_args, **mine_kwargs, return_dict=False)[0].contiguous()
            halves = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(halves, mine, group=group)
            out_c.copy_(halves[0])
            result = halves[1]
        if not return_dict:
            return (result,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=result)

    transformer.forward = forward
    try:
        yield
    finally:
        if own is None:
            del transformer.forward
        else:
            transformer.forward = own


@contextlib.contextmanager
def _noise_slice(pipe: Any, start: int, count: int, total: int) -> Iterator[None]:
    """Draw the noise of all ``total`` images as one process would (diffusers' own ``prepare_latents``, same
    generator) and hand this group its ``count`` images from ``start``."""
    own = pipe.__dict__.get("prepare_latents")
    stock = pipe.prepare_latents

    def prepare_latents(batch_size: int, *args: Any, **kwargs: Any) -> Any:
        per_image = batch_size // max(1, count)
        full = stock(total * per_image, *args, **kwargs)
        return full[start * per_image : (start + count) * per_image]

    pipe.prepare_latents = prepare_latents
    try:
        yield
    finally:
        if own is None:
            del pipe.prepare_latents
        else:
            pipe.prepare_latents = own


def _pad_hook(multiple: int) -> Callable[..., Any]:
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        embeds = kwargs.get("encoder_hidden_states")
        if embeds is None or embeds.shape[1] % multiple == 0:
            return None
        e, m = pad_text_to_multiple(embeds, kwargs.get("encoder_hidden_states_mask"), multiple)
        return args, {**kwargs, "encoder_hidden_states": e, "encoder_hidden_states_mask": m}

    return hook


ULYSSES_IMPLS = ("tuned", "diffusers")


def _setup_ulysses(pipe: Any, impl: str, degree: int, mesh: Any) -> str:
    """Turn on Ulysses over ``mesh``'s "ulysses" dimension in a worker; return which way runs.

    ``impl="tuned"``: qwennb's tuned path (:func:`qwennb.speed.enable_ulysses`), compiled as the plan made it, or
    turned on uncompiled where the plan left it off (a CPU plan); a transformer the tuned path cannot take (another
    class, Qwen-Image-Edit-2511's zero_cond_t, hooks already on it) gets diffusers' way instead."""
    from .speed import FastPathState, enable_fast_path, enable_ulysses, is_fast

    tr = pipe.transformer
    if impl == "tuned":
        if not is_fast(tr) and type(tr).__name__ == "QwenImageTransformer2DModel":
            if not getattr(tr.config, "zero_cond_t", False):
                with contextlib.suppress(RuntimeError):  # diffusers hooks (offload) already on it
                    enable_fast_path(tr, compile=False, scheduler=pipe.scheduler)
        if is_fast(tr):
            enable_ulysses(tr, mesh.get_group("ulysses"))
            state: FastPathState = tr._qwennb_fast
            return "tuned path" + (", compiled" if state.compile else ", eager")
    _enable_ulysses(tr, degree, mesh)
    return "diffusers context parallelism"


def _enable_ulysses(transformer: Any, degree: int, mesh: Any) -> None:
    """diffusers' context parallelism (Ulysses over ``mesh``'s "ulysses" dimension) plus text padding."""
    import torch
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh["ring", "ulysses"])
    if torch.cuda.is_available():
        transformer.enable_parallelism(config=config)
    else:
        # diffusers 0.42.1 computes the device index as rank % torch.accelerator.device_count(), which is 0 on
        # a machine without an accelerator (ZeroDivisionError); gloo ranks on CPU use device "cpu" anyway.
        from unittest import mock

        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            transformer.enable_parallelism(config=config)
    transformer.register_forward_pre_hook(_pad_hook(degree), with_kwargs=True)


def _worker_main(
    rank: int,
    world: int,
    ulysses: int,
    init_file: str,
    load: dict[str, Any],
    requests: Any,
    results: Any,
    stop_event: Any,
) -> None:
    """One worker: join the group, load the model, then serve requests until told to close."""
    os.environ.update(WORKER_ENV)
    # Ctrl-C reaches the workers only as the controller's stop event: a terminal's Ctrl-C goes to its whole
    # process group, so the workers leave it (and ignore SIGINT), and no signal handler ever runs a collective.
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    layout = _Layout(rank, world, ulysses)
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        cuda = torch.cuda.is_available() and load.get("device") != "cpu"
        if cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, int(load.get("threads") or 1)))
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        mesh = init_device_mesh(
            "cuda" if cuda else "cpu",
            (layout.outer, 1, ulysses),
            mesh_dim_names=("outer", "ring", "ulysses"),
        )
        from .pipeline import build

        t0 = time.perf_counter()
        plan = load["plan"]  # made once by the controller (the same identical GPUs)
        pipe = build(plan, load.get("path"))
        impl = load.get("ulysses_impl", "tuned")
        if load.get("tuned_path_eager") and (ulysses == 1 or impl == "tuned"):
            from .speed import enable_fast_path, is_fast

            if not is_fast(pipe.transformer):
                enable_fast_path(pipe.transformer, compile=False, scheduler=pipe.scheduler)
        ulysses_way = _setup_ulysses(pipe, impl, ulysses, mesh) if ulysses > 1 else None
        info = {
            "load_s": time.perf_counter() - t0,
            "device": str(device),
            "name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "pid": os.getpid(),
            "arrangement": plan.arrangement,
            "ulysses": ulysses_way,
        }
        results.put(("ready", rank, None, info))
    except BaseException as exc:  # noqa: BLE001 - reported to the controller, then the worker ends
        results.put(("error", rank, None, _describe(exc)))
        return

    outer_group = mesh.get_group("outer") if layout.outer > 1 else None
    ulysses_group = mesh.get_group("ulysses") if ulysses > 1 else None
    import multiprocessing

    parent = multiprocessing.parent_process()
    while True:
        try:
            msg = requests.get(timeout=2)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                break  # the controller is gone (killed): end, which frees the GPU
            continue
        if msg[0] == "close":
            break
        if msg[0] == "info":  # what is really active on this worker's pipeline, and its GPU memory
            try:
                from .pipeline import validate_optimization

                active = validate_optimization(pipe)
                if cuda:
                    active["gpu_memory_allocated_gb"] = round(torch.cuda.memory_allocated() / 1024**3, 2)
                results.put(("result", rank, msg[1], active))
            except Exception as exc:  # noqa: BLE001
                results.put(("error", rank, msg[1], _describe(exc)))
            continue
        _, req_id, job = msg
        try:
            payload = _serve(
                pipe, job, layout, outer_group, ulysses_group, stop_event, results, req_id, device
            )
            results.put(("result", rank, req_id, payload))
        except BaseException as exc:  # noqa: BLE001
            results.put(("error", rank, req_id, _describe(exc)))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _describe(exc: BaseException) -> tuple[str, str]:
    msg = str(exc).strip().splitlines()
    return type(exc).__name__, msg[0] if msg else ""


def _profiled(stack: contextlib.ExitStack, folder: str | None, device: Any) -> Any:
    """With a folder: a torch.profiler (CPU, and CUDA on a GPU) entered on ``stack``; else ``None``."""
    if not folder:
        return None
    from torch.profiler import ProfilerActivity, profile

    gpu = getattr(device, "type", str(device)) == "cuda"
    return stack.enter_context(
        profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])])
    )


def _write_profile(prof: Any, folder: str, rank: int, device: Any) -> None:
    """``rank<R>.txt`` in ``folder``: the operators by device time (CPU time on a CPU), then by CPU time."""
    gpu = getattr(device, "type", str(device)) == "cuda"
    table = prof.key_averages()
    first = table.table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total", row_limit=40)
    by_cpu = table.table(sort_by="self_cpu_time_total", row_limit=25)
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(f"rank {rank} on {device}\n\n{first}\n\nby CPU time\n\n{by_cpu}\n")


def _serve(
    pipe: Any,
    job: dict[str, Any],
    layout: _Layout,
    outer_group: Any,
    ulysses_group: Any,
    stop_event: Any,
    results: Any,
    req_id: int,
    device: Any,
) -> dict[str, Any]:
    import torch

    from .generation import generate

    mode = job["mode"]
    kwargs = dict(job["kwargs"])
    counts = job.get("counts")
    keep: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if mode == "data":
            g = layout.outer_index
            count = counts[g]
            if count == 0:
                return {"result": None, "peak_gb": None}
            kwargs["num_images"] = count
            stack.enter_context(_noise_slice(pipe, sum(counts[:g]), count, sum(counts)))
            group = ulysses_group
        else:
            if mode == "cfg":
                stack.enter_context(_cfg_split(pipe.transformer, layout.outer_index, outer_group))
            group = torch.distributed.group.WORLD if layout.world > 1 else None
        stop = _EventStop(stop_event, group, device)
        report = layout.rank == 0
        prof = _profiled(stack, job.get("profile_dir"), device)

        def on_step(s: StepInfo) -> None:
            keep["latents"] = s.latents
            if report:
                results.put(("step", layout.rank, req_id, (s.step, s.total, s.step_s, s.elapsed_s)))

        result = generate(pipe, job["prompt"], stop=stop, on_step=on_step, **kwargs)
        if prof is not None and getattr(device, "type", str(device)) == "cuda":
            torch.cuda.synchronize(device)  # the profile holds the request's kernels whole
    if prof is not None:
        _write_profile(prof, job["profile_dir"], layout.rank, device)
    latents = keep.get("latents")
    leader = layout.leader and (mode == "data" or layout.rank == 0)
    if not leader:
        result.images = []
    fast = getattr(pipe.transformer, "_qwennb_fast", None)
    return {
        "result": result,
        "peak_gb": result.peak_gpu_memory_gb,
        # the image tokens this rank's blocks ran on (tuned Ulysses only): half of them each on 2 GPUs
        "image_tokens": fast.stats.get("ulysses_image_tokens") if fast is not None and fast.ulysses else None,
        # numpy, pickled by value: a torch tensor would travel as a shared-memory handle that dies with the sender
        "latents": latents.detach().float().cpu().numpy()
        if leader and job.get("return_latents") and latents is not None
        else None,
    }


# --------------------------------------------------------------------------- the controller side


@dataclass
class ParallelResult(GenerationResult):
    """A :class:`GenerationResult` from several GPUs: which mode ran, on how many, and each GPU's peak."""

    parallel_mode: str = "single"
    gpus: int = 1
    peak_gpu_memory_per_gpu_gb: list[float | None] = field(default_factory=list)
    image_tokens_per_gpu: list[int | None] = field(default_factory=list)  # tuned Ulysses: each rank's share
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("final_latents", None)
        return d


class WorkerPool:
    """One worker process per GPU (or per CPU rank over gloo), started, kept and ended by this process.

    ``gpus`` workers each load ``model`` with the usual plan (``overrides`` as for ``make_plan``) and join one
    process group; ``ulysses`` > 1 turns on Ulysses sequence parallelism inside groups of that many ranks (fixed
    while the pool lives): on qwennb's tuned path (``ulysses_impl="tuned"``, the default) or as diffusers' context
    parallelism on its stock forward (``"diffusers"``, the former way, kept to compare); ``info[rank]["ulysses"]``
    says which runs. ``device="cpu"`` runs CPU ranks over gloo (tests; any machine).
    :meth:`generate` takes :func:`qwennb.generate`'s options and a ``parallel`` mode ("cfg", "ulysses",
    "data"), chosen by :func:`choose_parallel` when omitted. ``tuned_path_eager`` turns on qwennb's tuned path
    uncompiled in every worker where the plan left it off (a GPU plan turns it on, compiled), so CPU tests
    cover the tuned path inside the modes. Workers are spawned, so a script starts the pool under
    ``if __name__ == "__main__":``.

    Example:
        >>> pool = WorkerPool(gpus=2, model="tiny", device="cpu")  # doctest: +SKIP
        >>> pool.start().generate("a red fox", steps=2, width=64, height=64, seed=1).parallel_mode  # doctest: +SKIP
        'cfg'
        >>> pool.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        gpus: int = 2,
        model: str = SMALL_MODEL,
        *,
        path: str | None = None,
        overrides: dict[str, Any] | None = None,
        ulysses: int = 1,
        device: str | None = None,
        threads: int | None = None,
        start_timeout_s: float = 900.0,
        tuned_path_eager: bool = False,
        ulysses_impl: str = "tuned",
    ) -> None:
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
            raise ParallelError(f"gpus must be a whole number of at least 1, got {gpus!r}")
        if not isinstance(ulysses, int) or ulysses < 1 or gpus % ulysses:
            raise ParallelError(f"the ulysses degree ({ulysses!r}) must divide the number of GPUs ({gpus})")
        if device not in (None, "cuda", "cpu"):
            raise ParallelError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if ulysses_impl not in ULYSSES_IMPLS:
            raise ParallelError(
                f"ulysses_impl must be one of {', '.join(ULYSSES_IMPLS)}, got {ulysses_impl!r}"
            )
        self.gpus = gpus
        self.model = model
        self.path = path
        self.overrides = dict(overrides or {})
        self.ulysses = ulysses
        self.device = device
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.tuned_path_eager = tuned_path_eager
        self.ulysses_impl = ulysses_impl
        self.info: list[dict[str, Any]] = []
        self.load_s: float | None = None
        self._procs: list[Any] = []
        self._requests: list[Any] = []
        self._results: Any = None
        self._stop: Any = None
        self._tmp: str | None = None
        self._req = 0
        self._plan_cache: Any = None

    # ---------------------------------------------------------------- life cycle

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.exitcode is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _check_machine(self) -> str:
        import torch

        if self.device == "cpu" or (self.device is None and not torch.cuda.is_available()):
            return "cpu"
        n = torch.cuda.device_count()
        if n < self.gpus:
            raise ParallelError(f"{self.gpus} GPUs asked for but this machine has {n}")
        return "cuda"

    def start(self) -> WorkerPool:
        """Spawn the workers and wait until each has loaded the model (returns the pool)."""
        import torch.multiprocessing as mp

        from .models import get_model

        if self.running:
            return self
        self.close()
        if not os.path.isdir(self.model):
            get_model(self.model)  # an unknown name fails here, before anything starts
        device = self._check_machine()
        if self.ulysses > 1 and self._heads() % self.ulysses:
            raise ParallelError(
                f"{self.model} has {self._heads()} attention heads, which do not divide by ulysses={self.ulysses}"
            )
        threads = self.threads or max(1, (os.cpu_count() or 1) // self.gpus)
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="qwennb-pool-")
        self._results = ctx.Queue()
        self._stop = ctx.Event()
        self._requests = [ctx.Queue() for _ in range(self.gpus)]
        load = {
            "model": self.model,
            "path": self.path,
            "plan": self._plan(),
            "device": device,
            "threads": threads,
            "tuned_path_eager": self.tuned_path_eager,
            "ulysses_impl": self.ulysses_impl,
        }
        t0 = time.perf_counter()
        init_file = os.path.join(self._tmp, "rendezvous")
        for rank in range(self.gpus):
            p = ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self.gpus,
                    self.ulysses,
                    init_file,
                    load,
                    self._requests[rank],
                    self._results,
                    self._stop,
                ),
                daemon=True,
                name=f"qwennb-worker-{rank}",
            )
            p.start()
            self._procs.append(p)
        info: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.start_timeout_s
        while len(info) < self.gpus:
            try:
                kind, rank, _, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.close()
                    raise ParallelError(
                        f"the workers did not load within {self.start_timeout_s:.0f} s"
                    ) from None
                self._check_alive("while loading")
                continue
            if kind == "error":
                self.close()
                raise WorkerError(
                    f"GPU worker {rank} could not load {self.model}: {payload[0]}: {payload[1]}"
                )
            if kind == "ready":
                info[rank] = payload
        self.info = [info[r] for r in range(self.gpus)]
        self.load_s = time.perf_counter() - t0
        return self

    def close(self) -> None:
        """End the workers (freeing every GPU); safe to call twice."""
        for q, p in zip(self._requests, self._procs, strict=False):
            if p.exitcode is None:
                with contextlib.suppress(Exception):
                    q.put(("close",))
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.exitcode is None:
                p.terminate()
                p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join(5)
        for q in [*self._requests, self._results]:
            if q is not None:
                with contextlib.suppress(Exception):
                    q.close()
                    q.cancel_join_thread()
        self._procs, self._requests, self._results = [], [], None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def restart(self) -> WorkerPool:
        """Close whatever is left of the pool and start it again."""
        self.close()
        return self.start()

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self.close()

    def _check_alive(self, when: str) -> None:
        for rank, p in enumerate(self._procs):
            code = p.exitcode
            if code is not None:
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                pid = p.pid
                self.close()
                raise WorkerDiedError(
                    f"GPU worker {rank} (pid {pid}) died {when} ({how}); the pool is closed: restart it "
                    "(pool.restart(), or %qwen load again)"
                )

    # ---------------------------------------------------------------- requests

    def _heads(self) -> int:
        """The transformer's attention heads, from the model's shipped config (24 when it has none)."""
        from .models import get_model, load_config

        try:
            return int(load_config(get_model(self.model).config_dir, "transformer")["num_attention_heads"])
        except Exception:  # noqa: BLE001 - a folder or a model without a shipped config: Qwen-Image's
            return 24

    def choose(self, cfg: float, width: int, height: int, images: int) -> ParallelPlan:
        """The mode this pool uses for a request (its Ulysses degree is fixed)."""
        return choose_parallel(
            self.gpus, cfg, width, height, images, heads=self._heads(), ulysses=self.ulysses
        )

    def generate(
        self,
        prompt: str,
        *,
        parallel: str | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        stop: StopSignal | None = None,
        return_latents: bool = False,
        profile_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> ParallelResult:
        """:func:`qwennb.generate` on the pool: the same options and result, plus the mode and each GPU's peak.

        Bad options raise before anything is sent to the workers; ``stop`` (or a first Ctrl-C) ends the run at
        the next step on every worker; a worker that dies raises :class:`WorkerDiedError`. ``profile_dir``: each
        rank runs the request under ``torch.profiler`` and writes ``rank<R>.txt`` there (the operators by
        device time, then by CPU time), to see where a step's time goes (it slows the request).
        """
        from .generation import _sigint_stops, resolve_options
        from .options import validate_generate_options

        if not self.running:
            if self._procs:
                self._check_alive("since the last request")
            raise ParallelError("the worker pool is not running: start it (pool.start()) or load a model")
        self._check_alive("since the last request")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationError("the prompt is empty")
        opts = dict(kwargs)
        # no latent previews come back from the workers (StepInfo.latents is None); the pool runs one request
        # at a time by construction
        opts.pop("preview", None)
        opts.pop("wait", None)
        if opts.get("true_cfg_scale") is not None:
            if opts.get("cfg") is not None and opts["cfg"] != opts["true_cfg_scale"]:
                raise GenerationError("give cfg or true_cfg_scale, not both")
            opts["cfg"] = opts.pop("true_cfg_scale")
        unknown = set(opts) - {
            "negative_prompt", "steps", "cfg", "seed", "width", "height", "aspect", "num_images", "preset",
            "positive_magic", "guidance_scale", "original_prompt",
        }  # fmt: skip
        if unknown:
            raise GenerationError(f"unknown option(s) for a worker pool: {', '.join(sorted(unknown))}")
        plan = self._plan()
        probe = type("_Probe", (), {"qwennb": {"plan": plan}})()
        steps, cfg, width, height = resolve_options(
            probe,
            opts.get("steps"),
            opts.get("cfg"),
            opts.get("width"),
            opts.get("height"),
            opts.get("aspect"),
            opts.get("preset"),
            opts.get("guidance_scale"),
            [],
        )
        images = opts.get("num_images", 1)
        validate_generate_options(
            {"steps": steps, "cfg": cfg, "seed": opts.get("seed"), "num_images": images}
        )
        if opts.get("seed") is None:
            opts["seed"] = random.SystemRandom().randrange(0, 2**32)
        if self.ulysses > 1 and image_tokens(width, height) % self.ulysses:
            raise GenerationError(
                f"{width}x{height} has {image_tokens(width, height)} image tokens, which do not divide by the "
                f"Ulysses degree {self.ulysses}; choose a size whose (width/16)*(height/16) does"
            )
        choice = self.choose(cfg, width, height, images)
        mode = parallel or choice.mode
        if mode == "cfg+ulysses":
            mode = "cfg"
        outer = self.gpus // self.ulysses
        if mode not in ("cfg", "ulysses", "data", "single"):
            raise ParallelError(f"unknown parallel mode {mode!r}; choose cfg, ulysses or data")
        if mode == "cfg" and (cfg <= 1 or outer != 2):
            raise ParallelError(
                "cfg-parallel needs CFG > 1 and two groups of GPUs "
                f"(this pool: {outer} group(s) of {self.ulysses}); use data or ulysses"
            )
        if mode == "ulysses" and (self.ulysses == 1 or outer != 1):
            raise ParallelError(
                f"ulysses over all GPUs needs a pool loaded with ulysses={self.gpus} (this one has {self.ulysses})"
            )
        if mode == "single":
            mode = "data"
        counts = split_counts(images, outer) if mode == "data" else None
        opts.update(steps=steps, cfg=cfg, width=width, height=height)
        opts.pop("aspect", None)
        opts.pop("guidance_scale", None)
        if opts.get("preset") is None:
            opts.pop("preset", None)
        job = {
            "mode": mode,
            "prompt": prompt,
            "kwargs": opts,
            "counts": counts,
            "return_latents": return_latents,
            "profile_dir": os.fspath(profile_dir) if profile_dir is not None else None,
        }
        if profile_dir is not None:
            os.makedirs(profile_dir, exist_ok=True)
        self._req += 1
        req_id = self._req
        stop = stop if stop is not None else StopSignal()
        stop.clear()
        self._stop.clear()
        t0 = time.perf_counter()
        for q in self._requests:
            q.put(("generate", req_id, job))
        try:
            with _sigint_stops(stop):
                payloads = self._collect(req_id, on_step, stop)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait for the workers
            self.close()
            raise
        return self._merge(payloads, mode, counts, choice, time.perf_counter() - t0, parallel is not None)

    def active(self) -> list[dict[str, Any]]:
        """``validate_optimization`` read back from every worker's pipeline (with its GPU memory in use)."""
        if not self.running:
            raise ParallelError("the worker pool is not running: start it (pool.start()) or load a model")
        self._req += 1
        for q in self._requests:
            q.put(("info", self._req))
        done = self._collect(self._req, None, StopSignal())
        return [done[r] for r in sorted(done)]

    def _plan(self) -> Any:
        """The plan the workers load with (made here too, for the defaults and the checks before sending)."""
        if self._plan_cache is None:
            from .hardware import detect
            from .plan import make_plan

            overrides = dict(self.overrides)
            if self._check_machine() == "cpu":
                overrides.setdefault("device", "cpu")
            plan = make_plan(detect(), self.model, overrides or None)
            if self.ulysses > 1 and (
                self.ulysses_impl == "diffusers" or (plan.compile and not getattr(plan, "fast_path", False))
            ):
                # diffusers' context-parallel hooks wrap the stock forward: the tuned path and compile stay off
                # (dynamo fails on the process group the all-to-all takes, measured on 2xH200), and the
                # attention backend must be one with context parallelism ("native": PyTorch SDPA, which also
                # takes the padding mask). The tuned path's Ulysses keeps the plan as it is.
                overrides.setdefault("compile", False)
                overrides.setdefault("attention_backend", "native")
                plan = make_plan(detect(), self.model, overrides or None)
            self._plan_cache = plan
        return self._plan_cache

    def _collect(
        self, req_id: int, on_step: Callable[[StepInfo], None] | None, stop: StopSignal
    ) -> dict[int, dict[str, Any]]:
        done: dict[int, dict[str, Any]] = {}
        errors: dict[int, tuple[str, str]] = {}
        first_error = 0.0
        while len(done) + len(errors) < self.gpus:
            if stop:
                self._stop.set()
            try:
                kind, rank, rid, payload = self._results.get(timeout=0.1)
            except queue.Empty:
                self._check_alive("during generation")
                if errors and time.monotonic() - first_error > 10:
                    rank, (name, text) = next(iter(errors.items()))
                    self.close()
                    raise WorkerError(
                        f"GPU worker {rank} failed ({name}: {text}) while the others kept waiting on it; the pool "
                        "is closed: restart it"
                    ) from None
                continue
            if rid != req_id:
                continue  # left over from an earlier request
            if kind == "step" and on_step is not None:
                step, total, step_s, elapsed = payload
                on_step(StepInfo(step, total, step_s, elapsed, None))
            elif kind == "result":
                done[rank] = payload
            elif kind == "error":
                errors[rank] = payload
                first_error = first_error or time.monotonic()
        if errors:
            name, text = errors[min(errors)]
            import qwennb.errors as qe

            cls = getattr(qe, name, None)
            if isinstance(cls, type) and issubclass(cls, QwennbError):
                raise cls(text)
            raise WorkerError(f"GPU worker {min(errors)} failed: {name}: {text}")
        return done

    def _merge(
        self,
        payloads: dict[int, dict[str, Any]],
        mode: str,
        counts: list[int] | None,
        choice: ParallelPlan,
        wall_s: float,
        asked: bool,
    ) -> ParallelResult:
        import torch

        ranks = sorted(payloads)
        leaders = [
            r
            for r in ranks
            if payloads[r]["result"] is not None and (mode == "data" and r % self.ulysses == 0 or r == 0)
        ]
        results = [payloads[r]["result"] for r in leaders]
        first = results[0]
        images = [im for res in results for im in res.images]
        lat = [payloads[r]["latents"] for r in leaders if payloads[r].get("latents") is not None]
        # A step ends on the pool when every group has ended it.
        n = min(len(r.step_times_s) for r in results)
        step_times = [max(r.step_times_s[i] for r in results) for i in range(n)]
        peaks = [payloads[r]["peak_gb"] for r in ranks]
        known = [p for p in peaks if p is not None]
        notices = list(first.notices)
        if mode == "data" and counts and 0 in counts:
            notices.append(f"{counts.count(0)} GPU group(s) idle: fewer images than groups")
        fields_ = {
            k: getattr(first, k)
            for k in first.__dataclass_fields__
            if k
            not in (
                "images",
                "step_times_s",
                "notices",
                "total_s",
                "peak_gpu_memory_gb",
                "denoise_peak_gpu_memory_gb",
                "num_images",
                "interrupted",
            )
        }
        used = {"cfg": 2 * self.ulysses, "ulysses": self.ulysses, "data": len(results) * self.ulysses}[mode]
        out = ParallelResult(
            images=images,
            step_times_s=step_times,
            notices=notices,
            total_s=wall_s,
            peak_gpu_memory_gb=max(known) if known else None,
            denoise_peak_gpu_memory_gb=max(
                [r.denoise_peak_gpu_memory_gb for r in results if r.denoise_peak_gpu_memory_gb is not None],
                default=None,
            ),
            num_images=sum(r.num_images for r in results),
            interrupted=any(r.interrupted for r in results),
            parallel_mode=mode if not (mode == "cfg" and self.ulysses > 1) else "cfg+ulysses",
            gpus=used,
            peak_gpu_memory_per_gpu_gb=peaks,
            image_tokens_per_gpu=[payloads[r].get("image_tokens") for r in ranks],
            why=f"{mode} (asked for)" if asked else choice.why,
            **fields_,
        )
        out.final_latents = torch.cat([torch.from_numpy(x) for x in lat]) if lat else None  # type: ignore[attr-defined]
        return out


# --------------------------------------------------------------------------- a Session over a pool


@dataclass
class ParallelSession:
    """:class:`qwennb.session.Session`'s interface (load, generate, unload, history, info) over a
    :class:`WorkerPool`, so the magics, the panel and the CLI take several GPUs with one option (``gpus``).

    The kernel holds no pipeline: prompt enhancement and image description, which need the text encoder in
    this process, ask for a one-GPU session.

    Example:
        >>> s = ParallelSession(gpus=2, device="cpu")
        >>> s.loaded
        False
        >>> s.load("tiny").text().splitlines()[1].startswith("loaded tiny on 2 workers")  # doctest: +SKIP
        True
    """

    gpus: int = 2
    ulysses: int = 1
    device: str | None = None
    pool: WorkerPool | None = None
    report: Any = None
    history: list[GenerationResult] = field(default_factory=list)
    max_history: int = 50
    _hardware: Any = None

    @property
    def hardware(self) -> Any:
        if self._hardware is None:
            from .hardware import detect

            self._hardware = detect()
        return self._hardware

    @property
    def pipe(self) -> Any:
        return None

    @property
    def loaded(self) -> bool:
        return self.pool is not None and self.pool.running

    def plan_for(self, model: str | None = None, overrides: Any = None) -> Any:
        from .pipeline import resolve_model
        from .plan import make_plan

        name, _, _ = resolve_model(model)
        return make_plan(self.hardware, name, overrides)

    def load(self, model: str | None = None, overrides: Any = None) -> Any:
        """Resolve the model, start ``gpus`` workers that each load it, and report like ``Session.load``."""
        from .pipeline import resolve_model
        from .plan import OptimizationConfig
        from .session import LoadReport

        name, path, notice = resolve_model(model)
        if isinstance(overrides, OptimizationConfig):
            overrides = overrides.set_fields()
        self.unload()
        pool = WorkerPool(
            gpus=self.gpus,
            model=name,
            path=path,
            overrides=overrides,
            ulysses=self.ulysses,
            device=self.device,
        )
        pool.start()
        self.pool = pool
        import dataclasses

        plan = pool._plan()
        where = f"; on {self.gpus} workers" + (f" (Ulysses {self.ulysses})" if self.ulysses > 1 else "")
        plan = dataclasses.replace(plan, arrangement=plan.arrangement + where)
        self.report = LoadReport(name, path, plan, self.hardware, pool.load_s or 0.0, notice)
        return self.report

    def unload(self) -> None:
        """End the workers: every GPU is freed."""
        if self.pool is not None:
            self.pool.close()
        self.pool = None
        self.report = None

    def require(self) -> Any:
        if self.loaded:
            raise ParallelError(
                "the model lives in GPU worker processes; prompt enhancement and image description need a "
                "one-GPU session (load without gpus)"
            )
        raise QwennbError("no model is loaded: run %qwen load MODEL (or ParallelSession.load())")

    def generate(self, prompt: str, **kwargs: Any) -> ParallelResult:
        """``WorkerPool.generate`` on the loaded pool; the result joins the history."""
        if self.pool is None:
            raise QwennbError("no model is loaded: run %qwen load MODEL (or ParallelSession.load())")
        result = self.pool.generate(prompt, **kwargs)
        self.history.append(result)
        del self.history[: -self.max_history]
        return result

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hardware": self.hardware.to_dict(), "loaded": self.loaded, "gpus": self.gpus}
        if self.report is not None:
            out["model"] = self.report.model
            out["plan"] = self.report.plan
            out["workers"] = list(self.pool.info) if self.pool else []
            if self.loaded:
                active = self.pool.active()
                out["active"] = active[0]
                out["active_per_worker"] = active
        return out


def session_for(current: Any, gpus: Any = 1, ulysses: Any = 1) -> Any:
    """The session to load into for ``gpus`` (and a Ulysses degree): ``current`` when it already fits, else a
    fresh :class:`qwennb.session.Session` (one GPU) or :class:`ParallelSession`, after unloading ``current``.
    Bad values raise :class:`ParallelError` before anything loads.

    Example:
        >>> from qwennb.session import Session
        >>> s = Session()
        >>> session_for(s, 1) is s, type(session_for(s, 2)).__name__
        (True, 'ParallelSession')
    """
    from .session import Session

    for name, v in (("gpus", gpus), ("ulysses", ulysses)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ParallelError(f"{name} must be a whole number of at least 1, got {v!r}")
    if gpus % ulysses:
        raise ParallelError(f"the ulysses degree ({ulysses}) must divide the number of GPUs ({gpus})")
    if gpus == 1:
        if isinstance(current, Session):
            return current
        current.unload()
        return Session()
    if isinstance(current, ParallelSession) and (current.gpus, current.ulysses) == (gpus, ulysses):
        return current
    current.unload()
    return ParallelSession(gpus=gpus, ulysses=ulysses)
