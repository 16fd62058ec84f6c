"""The plan: how a model should be loaded on a machine, with the numbers that justify each choice.

``make_plan`` is a pure function of (hardware, model, overrides). Nothing is looked up by card name: every
candidate arrangement (an :class:`Arrangement`: where each component lives, storage and matmul dtype, resident
blocks, VAE tiling, the tuned path) is a value, :func:`cost` gives its GPU peak, host RAM peak, load time and
seconds per step and per image (compute at the card's rate for the matmul dtype, streamed bytes over the PCIe
link with the overlap measured, the text encoder's transfer once a prompt, the decode), and the fastest that
fits wins; the "why" sentences quote those numbers. The coefficients were measured on an H100 and an H200
(``benchmarks/results``; ``tests/test_plan_calibration.py`` checks them against the recorded runs).

Example:
    >>> from qwennb.plan import make_plan, describe_machine
    >>> plan = make_plan(describe_machine(gpu_memory_gb=80, compute_capability="9.0"), "qwen-image")
    >>> plan.components["transformer"].placement
    'gpu'
    >>> plan = make_plan(describe_machine(gpu_memory_gb=24), "qwen-image")
    >>> plan.estimated_peak_gpu_gb < 24
    True
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import PlanError
from .hardware import FLASH4_NOT_CHECKED, GPU, TYPICAL_BF16_TFLOPS, Hardware
from .models import (
    ComponentSize,
    ModelSpec,
    component_sizes,
    folder_sizes,
    get_model,
    inspect_folder,
    load_config,
)

GIB = 1024**3

# ---- calibration --------------------------------------------------------------------------------------------
# Times measured on an NVIDIA H100 80GB HBM3 (benchmarks/results/*h100*, 1024x1024, CFG 4) move to another card
# by the ratio of nominal dense bf16 rates (SMs x max clock x the architecture's FLOPs a clock:
# hardware.GPU.peak_bf16_tflops), i.e. a card is assumed to keep the H100's balance of compute, memory
# bandwidth and launch cost. tests/test_plan_calibration.py recomputes each constant from the recorded runs.
H100_TFLOPS = 132 * 1980 * 4096 / 1e6  # 1070.5: the nominal rate those runs are relative to
REF_STEP_TFLOP = 139.14  # one CFG step at 1024x1024: two forwards of transformer_flops (a test checks it)
STOCK_S_PER_STEP = 0.368  # stock diffusers (speed runs 6-8: 0.366-0.370)
TUNED_S_PER_STEP = 0.247  # qwennb's tuned path, CFG's passes batched (runs 5-8: 0.244-0.250)
FP8_S_PER_STEP = 0.208  # the tuned path with fp8 matmuls (run 6)
EAGER_EFFICIENCY = REF_STEP_TFLOP / (STOCK_S_PER_STEP * H100_TFLOPS)
TUNED_EFFICIENCY = REF_STEP_TFLOP / (TUNED_S_PER_STEP * H100_TFLOPS)
# The tuned step's kernel time (profile of run 6): GEMMs 168.1 of 246.0 ms; attention and elementwise stay bf16.
GEMM_SHARE = 168.1 / 246.0
# fp8 GEMMs run at twice the bf16 rate on compute capability 8.9+; the per-token activation quantisation that
# fp8 matmuls add is what the measured fp8 step leaves over (about 0.18 of the bf16 step, 45 ms on the H100).
FP8_RATE = 2.0
FP8_QUANT_SHARE = FP8_S_PER_STEP / TUNED_S_PER_STEP - (1 - GEMM_SHARE) - GEMM_SHARE / FP8_RATE
# fp8 storage with a bf16 upcast before each use (layerwise casting; eager path): tiers run B at 24 GB (54 of 60
# blocks resident, CFG's passes apart) measured 0.619 s/step = stock 0.368 + the offload hooks (0.094, below) + two
# upcasts of the transformer's 20.4 B Linear weights: 0.079 s each.
UPCAST_S_PER_GPARAM = 0.0786 / 20.42
# Group offload with CUDA streams. Copies hide under compute (STREAM_OVERLAP: the share of compute they can hide
# under; runs A-D saw no cost from copies shorter than the compute), and the hooks cost a fixed time a step plus a
# time per block each time it streams: a least-squares fit over the batched-CFG capped runs (H100 tiers runs C and D
# at 24/16/12 GB, H200 at 24 GB; tests/test_plan_calibration.py refits it).
STREAM_OVERLAP = 1.0
# Qwen-Image-2.1's stock blocks (group offload runs them stock, CFG's passes apart) hide none of it: 2.1's capped
# plans measured alone on an H200 (round 12: 12 GB/64 GB streaming 17.1 GB a step in bf16 0.718 s/step, 16/64 9.8 GB
# 0.652, 12/32 2.8 GB in fp8 0.555) are compute + hooks + every copy (within +13/+1/+1%); with the copies hidden
# they were predicted 0.467/0.457/0.506 (-35/-30/-9%). tests/test_plan_calibration.py checks the rows.
STREAM_OVERLAP_BY_CLASS = {"QwenImage21Transformer2DModel": 0.0}
OFFLOAD_STEP_S = 0.087
OFFLOAD_BLOCK_S = 0.00057
# Pinned host-to-device copies reach hardware.PCIE_EFFICIENCY of the link. Pageable ones (streamed weights that the
# host RAM cannot keep pinned: group offload pins them on the fly) are host-bound and do not overlap compute:
# 2.85 GB/s, the mean of the three pageable plan-validation runs on an H200 host (16/12/8 GB caps under a 32 GB
# host budget: 2.91, 2.92, 2.73 GB/s; benchmarks/results/plan-validation-nvidia-h200.json). The link's own rate
# caps it on a slower bus.
PAGEABLE_GBPS = 2.85
# Text encoder, a prompt and its negative: 0.126 s on the GPU (mean of the uncapped tiers runs, 0.10-0.17 s);
# streamed leaf by leaf 0.715 s (mean, 0.67-0.78) = that + 15.45 GiB at 54 GB/s (0.306 s) + 0.283 s of hooks.
TEXT_ENCODE_S = 0.126
TEXT_STREAM_FIXED_S = 0.283
TEXT_TOKENS = 77  # a typical prompt; the FLOP count is insensitive to it
# What a text encoder (or a whole model) computes at on the CPU, bf16: the text encoder on the H200 host's 32 cores
# took 11.85 s for a prompt pair (plan validation, 12 GB cap, 32 GB host), i.e. 0.216 TFLOP/s.
CPU_TFLOPS = 0.216
# VAE decode of a 1024x1024 image (tiers runs, means): 0.102 s whole (0.09-0.14), 0.56 s in tiles (0.48-0.75).
DECODE_S_PER_MP = 0.102 / 1.048576
TILED_DECODE_SLOWDOWN = 5.5
# Loading: never measured on real checkpoints (the GPU runs drew random weights), so an assumption: the
# checkpoint is read at READ_GBPS (an NVMe drive; a warm page cache is faster).
READ_GBPS = 2.0

# Qwen-Image-2.1 on an H200, 1024x1024, CFG 4 (benchmarks/results/speed21-nvidia-h200.json, rounds 10-13): qwennb's
# 2.1 path against stock diffusers in the same runs, medians of the four (qwennb 0.221-0.230, stock 0.284-0.296), for
# the plan's reason (its speed is costed like Qwen-Image's, from the FLOPs).
SPEED21_S_PER_STEP = 0.225
SPEED21_STOCK_S_PER_STEP = 0.290
# FlashAttention-4 against cuDNN's attention on an H200 (benchmarks/results/attention-nvidia-h200.md and the
# qwennb+fa4 rows of edit-nvidia-h200.md / speed21-nvidia-h200.md, session 10): for the plan's reason.
FLASH4_GAIN = (
    "on an H200 its kernel is 1.03-1.05x cuDNN's at 4,000-7,000 tokens and 1.16-1.22x at an edit's 8,500; an edit "
    "step 1.37x -> 1.44x stock, a Qwen-Image-2.1 step 1.28x -> 1.31x"
)

# ---- memory ---------------------------------------------------------------------------------------------------
# GPU memory that is not the weights: CUDA context and allocator slack kept free (GiB + share).
RESERVE_GIB = 1.0
RESERVE_SHARE = 0.03
# Transformer activations a sample (GiB): a constant plus a cost per image token (the denoise peaked 0.40 GiB
# above the weights at 1024x1024 on the H100).
ACT_BASE_GIB = 0.1
ACT_PER_TOKEN_GIB = 0.3 / 4096
# VAE decode without tiling (GiB per megapixel: 4.17 GiB above the weights at 1024x1024), and in tiles.
VAE_DECODE_GIB_PER_MP = 4.0
VAE_TILED_GIB = 0.6
TEXT_ACT_GIB = 0.5  # text encoder activations while encoding one prompt pair
# Per model family, by component class (benchmarks/results/phase-memory-*-nvidia-h200.json, 1024x1024, CFG 4):
# Qwen-Image-2.1's VAE decodes in 6.85 GiB above what is held (Qwen-Image's: 4.13, the 4.0 above; in tiles 0.43
# and 0.27, under VAE_TILED_GIB), and 2.1 on its tuned path peaked 10.64 GiB above its weights
# (plan-validation-qwen-image-2-1-synthetic-nvidia-h200.json), 3.8 more than the decode alone: memory held through
# the steps and the decode (the pipeline's KV cache of the text and the tuned path's records; not measured apart).
VAE_DECODE_GIB_PER_MP_BY_CLASS = {"AutoencoderKLQwenImage21": 6.6}
HELD_GIB_BY_TRANSFORMER_CLASS = {"QwenImage21Transformer2DModel": 3.8}
# The transformer class qwennb's own code is written for: the tuned path and its fp8 matmuls (qwennb.speed) and
# the block-by-block loader (qwennb.loading). Qwen-Image-2.1's has its own tuned path (qwennb.speed21) only.
MMDIT_CLASSES = ("QwenImageTransformer2DModel",)
TEXT_STREAM_GIB = 1.1  # what a streamed text encoder holds at once (its largest leaf, the token embedding)
PROCESS_HOST_GIB = 2.0  # the Python process itself (torch, diffusers, transformers, CUDA context)
HOST_USABLE = 0.9  # share of host RAM a plan may take
HOST_PIN_SHARE = 0.75  # above this share of host RAM, streamed weights stay pageable (pinned on the fly)

# ---- policy ---------------------------------------------------------------------------------------------------
# A lossy arrangement (fp8) is chosen over the fastest exact one only if it is at least this much faster per image.
LOSSY_MIN_GAIN = 1.5
# Arrangements within this share of the fastest count as equal; among them the plan streams the fewest bytes a
# step (less exposed to a slower link or a busy host than the model can see).
TIE_SHARE = 0.03
# The model whole on the CPU is refused above this many seconds a step (unless forced).
CPU_MAX_S_PER_STEP = 30.0
CACHE_MODES = ("first_block", "taylorseer")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 * 4 / 2, "int8": 1.0 + 1 / 1024}
PRESET_DEFAULTS = {
    "tiny": {"steps": 8, "cfg": 4.0, "width": 256, "height": 256},
    "toy": {"steps": 20, "cfg": 4.0, "width": 256, "height": 256},
    # The toy edit model edits best without CFG: 120 held-out edits at 128x128, 20 steps (CPU), right 0.55 / kept
    # 0.64 at CFG 1, 0.42 / 0.53 at 1.5, 0.28 / 0.43 at 2, 0.10 / 0.14 at 4 (training/toy/EDIT.md, session 9); and
    # as well in 10 steps as in 20 or 40 (edit-run9, 180 held-out edits at 128x128 and 256x256: session 10)
    "toy-edit": {"steps": 10, "cfg": 1.0, "width": 256, "height": 256},
    "gpu": {"steps": 20, "cfg": 4.0, "width": 1024, "height": 1024},
}

# Named sets of options, for when speed matters more than exact outputs (or the other way round). Options set
# explicitly win over a mode's. The numbers are H100 measurements (benchmarks/NOTES.md).
MODES: dict[str, tuple[dict[str, Any], str]] = {
    "exact": (
        {"allow_lossy": False},
        "bf16 weights and matmuls only: outputs at the rounding floor of stock diffusers; cards under 48 GB "
        "then stream the transformer in bf16 (several times slower)",
    ),
    "turbo": (
        {"fp8_matmul": True},
        "fp8 weights and fp8 matmuls (compute capability 8.9+), as shipped (fp8 weights quantised while "
        "loading, in 11 s): 0.195 s/step against 0.345 for stock diffusers (H200, 1024x1024, CFG 4; "
        "benchmarks/results/core-turbo-nvidia-h200), 34.8 GiB of weights on the GPU against 57.9 in bf16; the "
        "final latents drift 7.6e-2 from stock's, about 3x the rounding floor measured on the H100",
    ),
    "turbo-cache": (
        {"cache": "taylorseer"},
        "TaylorSeer step cache (predicts 4 of every 5 steps after the first 3): a 50-step 1024x1024 image in "
        "3.9 s against 18.6 for stock (H100, CFG 4; speed run 1); drift 0.27, 11x the rounding floor; little "
        "gain at 20 steps or fewer",
    ),
}


def describe_modes() -> str:
    """The modes, one line each.

    Example:
        >>> describe_modes().splitlines()[0].split()[0]
        'exact'
    """
    return "\n".join(f"{name:<12} {text}" for name, (_, text) in MODES.items())


@dataclass
class OptimizationConfig:
    """User overrides for the plan. ``None`` means "let the plan decide".

    The first ten fields are those of the original project's ``OptimizationConfig`` and keep their
    meaning; the rest reach the modern options. Any field set here wins over the plan's choice, and
    the plan's reasons say so.

    Example:
        >>> cfg = OptimizationConfig(architecture_type="MMDiT", enable_tf32=True, optimal_steps=30)
        >>> cfg.optimal_steps
        30
    """

    architecture_type: str = "MMDiT"
    enable_attention_slicing: bool | None = None
    enable_vae_slicing: bool | None = None
    enable_tf32: bool | None = None
    enable_cudnn_benchmark: bool | None = None
    enable_cpu_offload: bool | None = None
    optimal_steps: int | None = None
    optimal_cfg_scale: float | None = None
    optimal_width: int | None = None
    optimal_height: int | None = None
    # Modern options.
    device: str | None = None  # "cuda", "cpu", "mps"
    dtype: str | None = None  # "bfloat16" or "float32"
    transformer_placement: str | None = None  # gpu, group_offload, model_offload, sequential_offload
    text_encoder_placement: str | None = None  # gpu, group_offload, model_offload, cpu
    storage_dtype: str | None = None  # "float8_e4m3fn" for fp8 storage of the transformer
    quantization: str | None = None  # "nf4" or "int8" (bitsandbytes)
    attention_backend: str | None = None  # a diffusers backend name; "native" is PyTorch SDPA
    compile: bool | None = None  # regional compile of the repeated transformer blocks
    cache: str | None = None  # "first_block" or "taylorseer" (diffusers caches); lossy
    fp8_matmul: bool | None = None  # fp8 matmuls on compute capability 8.9+ (qwennb.speed.FP8Linear); lossy
    enable_vae_tiling: bool | None = None
    allow_lossy: bool | None = None  # may the plan pick fp8/quantised storage to fit memory?
    force: bool = False  # plan the real model on CPU, or a card without bf16 in fp32
    mode: str | None = None  # a named set of the options above (MODES: "exact", "turbo", "turbo-cache")
    # GPUs to spread one request over (identical ones; the plan's ``parallel`` says how: qwennb.parallel).
    gpus: int | None = None
    # Group offload: transformer blocks kept on the GPU (default: as many as fit; none when the whole model fits
    # and group offload was asked for anyway).
    resident_blocks: int | None = None
    # FlashAttention-4 as SDPA's kernel (qwennb.attention): None = on where it can run (flash-attn-4 installed, a
    # card of compute capability 9.x/10.x, SDPA's own choice of kernel), True = required, False = off.
    flash4: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizationConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise PlanError(f"unknown plan option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def set_fields(self) -> dict[str, Any]:
        """The fields the user really set (differ from the defaults)."""
        default = OptimizationConfig()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


@dataclass
class ComponentPlan:
    """Where one component lives and in what form."""

    placement: str  # gpu, group_offload, model_offload, sequential_offload, cpu
    storage_dtype: str
    quantization: str | None = None
    gpu_gb: float = 0.0  # resident on the GPU while the model is in use
    host_gb: float = 0.0  # host RAM this placement needs
    resident_blocks: int | None = None  # group offload: blocks kept on the GPU
    reason: str = ""
    low_cpu_mem_usage: bool = False  # group offload: pin on the fly (host RAM too small for pinned copies)
    streamed_gb_per_step: float = 0.0  # GiB copied to the GPU each denoising step
    streamed_gb_per_prompt: float = 0.0  # GiB copied to the GPU each time a prompt is encoded


@dataclass
class Plan:
    """A complete, explained decision on how to load and run a model: plain data (``qwennb.display`` renders it)."""

    model: str
    hub_id: str | None
    device: str
    gpu_name: str | None
    gpu_memory_gb: float | None
    budget_gb: float | None
    dtype: str
    components: dict[str, ComponentPlan]
    attention_backend: str
    compile: bool
    cache: str | None
    tf32: bool
    cudnn_benchmark: bool
    vae_tiling: bool
    vae_slicing: bool
    attention_slicing: bool
    defaults: dict[str, Any]
    estimated_peak_gpu_gb: float
    estimated_host_ram_gb: float
    estimated_s_per_step: float | None
    arrangement: str
    lossless: bool
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    estimated_for: tuple[int, int] = (1024, 1024)  # the size (width, height) the estimates are for
    fast_path: bool = False  # qwennb.speed's tuned transformer path (with compile, model whole on the GPU)
    fp8_matmul: bool = False  # the tuned path's fp8 matmuls (lossy)
    predicted_s_per_step: float | None = None  # same as estimated_s_per_step
    predicted_s_per_image: float | None = None  # at the defaults: steps x s/step + text encoder + decode
    time_split: dict[str, float] = field(default_factory=dict)  # seconds an image: compute, streaming, ...
    estimated_load_s: float | None = None
    assumptions: list[str] = field(default_factory=list)  # what was assumed about a described machine
    gpus: int = 1  # GPUs one request uses (gpus=N spreads it: see ``parallel``)
    parallel: dict[str, Any] | None = None  # qwennb.parallel.choose_parallel's choice for gpus=N
    source: str | None = None  # the model folder the sizes were read from, if any
    flash4: bool = False  # FlashAttention-4 as SDPA's kernel (qwennb.attention.enable_flash4 at build)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------- describing a machine


def parse_memory(text: str | float | int) -> float:
    """Parse "24GB", "24 GiB", "24576MB" or 24 into GiB (a card's "GB" is GiB).

    Example:
        >>> parse_memory("24GB"), parse_memory("12288 MiB"), parse_memory(16)
        (24.0, 12.0, 16.0)
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        units = {
            "tib": 1024,
            "tb": 1024,
            "gib": 1,
            "gb": 1,
            "g": 1,
            "mib": 1 / 1024,
            "mb": 1 / 1024,
            "m": 1 / 1024,
        }
        unit = next((u for u in units if s.endswith(u)), "")
        number, scale = s[: len(s) - len(unit)], units.get(unit, 1)
        try:
            value = float(number) * scale
        except ValueError:
            raise PlanError(f"cannot read {text!r} as a memory size; write e.g. 24GB or 12288MB") from None
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"memory size must be positive, got {text!r}")
    return value


def describe_machine(
    gpu_memory_gb: float | None = None,
    gpu_name: str | None = None,
    bf16: bool = True,
    host_ram_gb: float | None = None,
    compute_capability: str | None = None,
    sm_count: int | None = None,
    max_sm_clock_mhz: int | None = None,
    pcie_gen: int | None = None,
    pcie_width: int | None = None,
    tflops: float | None = None,
    gpu_count: int = 1,
) -> Hardware:
    """A described (not detected) machine, to plan for a card you do not have (``gpu_count`` identical ones).

    What is not given is assumed, and each assumption is recorded (``Hardware.notes``, then
    ``Plan.assumptions``) with the ``qwennb plan`` flag that changes it: host RAM 64 GiB, compute capability
    8.9 (7.5 without bf16), PCIe gen 4 x16, and the dense bf16 rate typical of the compute capability.

    Example:
        >>> hw = describe_machine(gpu_memory_gb=24, gpu_name="RTX 4090")
        >>> hw.gpus[0].total_memory_gb, hw.gpus[0].peak_bf16_tflops
        (24.0, 165.0)
        >>> [n for n in hw.notes if n.startswith("assumed")][0]
        'assumed host RAM 64 GiB (--host-ram)'
    """
    notes = ["described machine"]

    def assume(value: Any, default: Any, text: str) -> Any:
        if value is None:
            notes.append(f"assumed {text.format(default)}")
            return default
        return value

    host = float(assume(host_ram_gb, 64.0, "host RAM {:g} GiB (--host-ram)"))
    gpus = []
    if gpu_memory_gb is not None:
        cc = str(
            assume(
                compute_capability, "8.9" if bf16 else "7.5", "compute capability {} (--compute-capability)"
            )
        )
        gen = assume(pcie_gen, 4, "PCIe gen {} (--pcie-gen)")
        width = assume(pcie_width, 16, "PCIe x{} (--pcie-width)")
        rate = tflops
        if rate is None and not (sm_count and max_sm_clock_mhz):
            typical = TYPICAL_BF16_TFLOPS.get(cc, 100.0)
            rate = assume(
                None, typical, "{:g} TFLOP/s dense bf16, typical of compute capability " + cc + " (--tflops)"
            )
        gpus.append(
            GPU(
                index=0,
                name=gpu_name or f"GPU with {gpu_memory_gb:g} GiB",
                total_memory_gb=float(gpu_memory_gb),
                free_memory_gb=float(gpu_memory_gb),
                compute_capability=cc,
                bf16=bf16,
                sm_count=None if tflops is not None else sm_count,
                max_sm_clock_mhz=None if tflops is not None else max_sm_clock_mhz,
                pcie_gen=gen,
                pcie_width=width,
                bf16_tflops=rate,
            )
        )
        gpus += [replace(gpus[0], index=i) for i in range(1, max(1, int(gpu_count)))]
    return Hardware(
        gpus=gpus,
        host_ram_gb=host,
        host_ram_available_gb=host,
        cpu_count=8,
        mps=False,
        frontend="plain",
        notes=notes,
    )


# --------------------------------------------------------------------------- cost model


def image_tokens(width: int, height: int) -> int:
    """Image tokens the transformer sees: one per 16x16 pixels (VAE /8, then 2x2 patches)."""
    return (width // 16) * (height // 16)


def transformer_flops(
    config: dict[str, Any], width: int, height: int, text_tokens: int = TEXT_TOKENS
) -> float:
    """FLOPs of one transformer forward at batch 1 (dense matmuls and attention).

    Example:
        >>> from qwennb.models import load_config
        >>> round(transformer_flops(load_config("qwen-image", "transformer"), 1024, 1024) / 1e12, 1)
        69.6
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s_img = image_tokens(width, height)
    s = s_img + text_tokens
    if "context_in_dim" in config:  # Qwen-Image-2.1: one stream, SwiGLU MLP (3 matmuls), shared modulation
        r = config.get("mlp_ratio", 3)
        per_block = 8 * s * d * d + 2 * 3 * s * d * r * d + 2 * 2 * s * s * d
        outside = 2 * s_img * config["in_channels"] * d * 2 + 2 * text_tokens * config["context_in_dim"] * d
        return config["num_layers"] * per_block + outside
    per_block = (
        8 * s_img * d * d  # image QKV + out
        + 16 * s_img * d * d  # image MLP (4x)
        + 8 * text_tokens * d * d
        + 16 * text_tokens * d * d
        + 2 * 2 * d * 6 * d  # modulation (image and text)
        + 2 * 2 * s * s * d  # QK^T and PV
    )
    outside = (
        2 * s_img * config["in_channels"] * d
        + 2 * text_tokens * config["joint_attention_dim"] * d
        + 2 * s_img * d * config["patch_size"] ** 2 * (config.get("out_channels") or 16)
    )
    return config["num_layers"] * per_block + outside


def _act_gib(width: int, height: int, batch: int) -> float:
    return ACT_BASE_GIB + ACT_PER_TOKEN_GIB * image_tokens(width, height) * batch


def _vae_gib(width: int, height: int, batch: int, tiled: bool, vae_class: str = "") -> float:
    per_mp = VAE_DECODE_GIB_PER_MP_BY_CLASS.get(vae_class, VAE_DECODE_GIB_PER_MP)
    return VAE_TILED_GIB if tiled else per_mp * width * height / 1e6 * batch


def _held_gib(transformer_class: str) -> float:
    """What a model family holds on the GPU from its first step to the end of the decode, beyond the weights."""
    return HELD_GIB_BY_TRANSFORMER_CLASS.get(transformer_class, 0.0)


def _budget(gpu: GPU) -> float:
    return gpu.total_memory_gb - RESERVE_GIB - RESERVE_SHARE * gpu.total_memory_gb


@dataclass(frozen=True)
class Arrangement:
    """One way to hold the model on a machine: a value that :func:`cost` prices.

    Example:
        >>> Arrangement("group_offload", "float8_e4m3fn", "float8", resident_blocks=54, text_encoder="group_offload").lossless
        False
    """

    transformer: str = "gpu"  # gpu, group_offload, model_offload, sequential_offload
    storage: str = "bfloat16"  # the transformer's stored dtype (float8_e4m3fn: fp8)
    matmul: str = "bfloat16"  # the dtype its matmuls run in ("float8": qwennb.speed.FP8Linear)
    resident_blocks: int | None = None  # group offload: blocks kept on the GPU
    text_encoder: str = "gpu"  # gpu, group_offload (streamed once a prompt), model_offload, cpu
    vae_tiling: bool = False
    tuned: bool = True  # qwennb's tuned path (compiled, CFG's two passes as one batch)
    pinned: bool = True  # streamed weights in pinned host memory (else pageable, pinned on the fly)
    quantization: str | None = None  # "nf4"/"int8" (bitsandbytes), only when asked for

    @property
    def lossless(self) -> bool:
        return self.storage in ("bfloat16", "float32") and self.matmul != "float8" and not self.quantization

    def describe(self, blocks: int) -> str:
        form = (
            "fp8 matmuls"
            if self.matmul == "float8"
            else ("fp8" if self.storage == "float8_e4m3fn" else "bf16")
        )
        form = self.quantization or (form if self.storage != "float32" else "fp32")
        where = {
            "gpu": f"{form} on GPU",
            "group_offload": f"group offload ({form}, {self.resident_blocks}/{blocks} blocks resident)",
            "model_offload": "model offload",
            "sequential_offload": "sequential offload",
        }[self.transformer]
        text = {
            "gpu": "text encoder on GPU",
            "group_offload": "text encoder streamed",
            "model_offload": "text encoder offloaded",
            "cpu": "text encoder on CPU",
        }[self.text_encoder]
        return f"transformer {where}, {text}" + (", VAE tiled" if self.vae_tiling else "")


@dataclass(frozen=True)
class Setting:
    """What arrangements are costed against: the model's sizes, the card, the host and the generation."""

    sizes: dict[str, ComponentSize]
    dtype: str
    gpu: GPU
    host_gb: float
    forward_flops: float  # one transformer forward at (width, height)
    width: int
    height: int
    steps: int
    passes: int  # 2 with true CFG
    assumed_tflops: float = 150.0  # used only when the card's rate is unknown

    @property
    def tflops(self) -> float:
        return self.gpu.peak_bf16_tflops or self.assumed_tflops

    @property
    def h2d_gbps(self) -> float:
        return self.gpu.host_to_device_gbps or 27.1  # PCIe gen 4 x16

    @property
    def pageable_gbps(self) -> float:
        return min(PAGEABLE_GBPS, self.h2d_gbps)


@dataclass(frozen=True)
class Cost:
    """What an arrangement costs: memory peaks (GiB), load time and seconds a step and an image."""

    gpu_peak_gb: float
    host_peak_gb: float
    load_s: float
    compute_s: float  # a denoising step's compute
    stream_s: float  # a step's copies that do not hide under compute
    offload_s: float  # a step's offload hooks
    text_s: float  # encoding a prompt (and its negative), copies included
    decode_s: float
    steps: int
    streamed_gb_per_step: float
    text_streamed_gb: float  # copied once a prompt
    weights_gpu_gb: dict[str, float] = field(default_factory=dict)
    weights_host_gb: dict[str, float] = field(default_factory=dict)
    # Host RAM once loaded (what pinning is decided on); host_peak_gb also counts the load. None: the same.
    host_steady_gb: float | None = None

    @property
    def host_after_load_gb(self) -> float:
        return self.host_peak_gb if self.host_steady_gb is None else self.host_steady_gb

    @property
    def s_per_step(self) -> float:
        return self.compute_s + self.stream_s + self.offload_s

    @property
    def s_per_image(self) -> float:
        return self.steps * self.s_per_step + self.text_s + self.decode_s

    def split(self) -> dict[str, float]:
        """Seconds an image, by where they go."""
        n = self.steps
        return {
            "compute": round(n * self.compute_s, 2),
            "streaming": round(n * self.stream_s, 2),
            "offload_hooks": round(n * self.offload_s, 2),
            "text_encoder": round(self.text_s, 2),
            "decode": round(self.decode_s, 2),
        }


def _stored_gib(
    size: ComponentSize, storage_bytes: float, dtype_bytes: int, params: int | None = None
) -> float:
    """GiB of ``params`` (default: all) when the Linear weights take ``storage_bytes`` and the rest the dtype's."""
    n = size.params if params is None else params
    linear_share = size.linear_params / size.params if size.params else 1.0
    return n * (linear_share * storage_bytes + (1 - linear_share) * dtype_bytes) / GIB


def cost(a: Arrangement, st: Setting) -> Cost:
    """GPU peak, host RAM peak, load time and time per step and per image of arrangement ``a``.

    Example:
        >>> st = setting(describe_machine(24, compute_capability="9.0", tflops=H100_TFLOPS, pcie_gen=5), "qwen-image")
        >>> c = cost(Arrangement("group_offload", "float8_e4m3fn", "float8", 54, "group_offload"), st)
        >>> round(c.s_per_step, 2), round(c.streamed_gb_per_step, 1)
        (0.3, 1.9)
    """
    t, te, vae = st.sizes["transformer"], st.sizes["text_encoder"], st.sizes["vae"]
    db = DTYPE_BYTES[st.dtype]
    scale = H100_TFLOPS / st.tflops  # seconds here for a second of the H100's compute
    base = (
        st.forward_flops
        * st.passes
        / (st.tflops * 1e12 * (TUNED_EFFICIENCY if a.tuned else EAGER_EFFICIENCY))
    )
    compute = base
    if a.matmul == "float8":
        compute = base * (1 - GEMM_SHARE + GEMM_SHARE / FP8_RATE + FP8_QUANT_SHARE)
    elif a.storage == "float8_e4m3fn" or a.quantization:
        upcast = UPCAST_S_PER_GPARAM * t.linear_params / 1e9 * scale
        compute += st.passes * upcast * (1.5 if a.quantization else 1.0)
    storage_bytes = QUANT_BYTES[a.quantization] if a.quantization else DTYPE_BYTES[a.storage]
    whole = _stored_gib(t, storage_bytes, db)
    blk = _stored_gib(t, storage_bytes, db, t.block_params) if t.blocks else whole
    nonblock = whole - t.blocks * blk
    streamed = {"group_offload": t.blocks - (a.resident_blocks or 0), "sequential_offload": t.blocks}.get(
        a.transformer, 0
    )
    t_gpu = {
        "group_offload": nonblock + ((a.resident_blocks or 0) + min(2, streamed)) * blk,
        "sequential_offload": max(blk, 0.5),
    }.get(a.transformer, whole)
    stream_passes = 1 if a.tuned else st.passes
    pageable = st.pageable_gbps * 1e9
    rate = st.h2d_gbps * 1e9 if a.pinned else pageable
    stream_gb = streamed * blk * stream_passes
    copies = stream_gb * GIB / rate
    if a.transformer == "sequential_offload":  # per-leaf synchronous copies: nothing hides
        stream_s = whole * GIB * st.passes / pageable
    elif a.transformer == "model_offload":  # the transformer moves on and off once an image
        stream_s = 2 * whole * GIB / pageable / st.steps
    elif not a.pinned:  # pinned on the fly, on the host thread: nothing hides
        stream_s = copies
    else:
        stream_s = max(0.0, copies - STREAM_OVERLAP_BY_CLASS.get(t.class_name, STREAM_OVERLAP) * compute)
    offload_s = OFFLOAD_STEP_S + OFFLOAD_BLOCK_S * streamed * stream_passes if streamed else 0.0

    te_gb, vae_gb = te.gib(db), vae.gib(db)
    encode = TEXT_ENCODE_S * scale
    text_flops = 2 * 2 * te.params * TEXT_TOKENS  # a prompt and its negative
    text_s, text_streamed = {
        "gpu": (encode, 0.0),
        "group_offload": (encode + te_gb * GIB / (st.h2d_gbps * 1e9) + TEXT_STREAM_FIXED_S, te_gb),
        "model_offload": (encode + 2 * te_gb * GIB / pageable, te_gb),
        "cpu": (text_flops / (CPU_TFLOPS * 1e12), 0.0),
    }[a.text_encoder]
    mp = st.width * st.height / 1e6
    decode = DECODE_S_PER_MP * mp * scale * (TILED_DECODE_SLOWDOWN if a.vae_tiling else 1.0)

    held = _held_gib(t.class_name)
    act = _act_gib(st.width, st.height, st.passes if a.tuned else 1) + held
    dec = _vae_gib(st.width, st.height, 1, a.vae_tiling, vae.class_name) + held
    text_phase = {"group_offload": TEXT_STREAM_GIB + TEXT_ACT_GIB, "model_offload": te_gb + TEXT_ACT_GIB}.get(
        a.text_encoder, TEXT_ACT_GIB if a.text_encoder == "gpu" else 0.0
    )
    te_gpu = te_gb if a.text_encoder == "gpu" else 0.0
    if a.transformer == "model_offload":  # one component on the GPU at a time
        peak = max(te_gb + TEXT_ACT_GIB, whole + act, vae_gb + dec)
    else:
        peak = t_gpu + vae_gb + te_gpu + max(act, dec, text_phase)
    # Host RAM: weights that live there (streamed blocks, a text encoder off the GPU, each held once: loaded
    # straight into their stored form and pinned in place), plus one block in the load dtype while loading.
    t_host = {"group_offload": streamed * blk, "sequential_offload": whole, "model_offload": whole}.get(
        a.transformer, 0.0
    )
    te_host = 0.0 if a.text_encoder == "gpu" else te_gb
    staging = (t.block_params or t.params) * db / GIB
    host = steady = PROCESS_HOST_GIB + t_host + te_host + staging
    if t.class_name not in MMDIT_CLASSES:
        # qwennb.loading reads only Qwen-Image's MMDiT block by block; another family (2.1) is loaded by diffusers'
        # from_pretrained, every component whole in host RAM in the load dtype, before apply_plan moves, casts or
        # offloads it (an H200 run of 2.1's 16 and 12 GB plans: 30.6 GiB of host RSS against 23.6 and 20.2 counted
        # without this). Once loaded, the host keeps what the arrangement leaves there (pinned in place).
        host = max(steady, PROCESS_HOST_GIB + (t.params + te.params + vae.params) * db / GIB)
    read = (t.params * db + te.params * db + vae.params * db) / (READ_GBPS * 1e9)
    load = read + (peak - max(act, dec, text_phase)) * GIB / (st.h2d_gbps * 1e9)
    return Cost(
        gpu_peak_gb=peak,
        host_peak_gb=host,
        host_steady_gb=steady,
        load_s=load,
        compute_s=compute,
        stream_s=stream_s,
        offload_s=offload_s,
        text_s=text_s,
        decode_s=decode,
        steps=st.steps,
        streamed_gb_per_step=stream_gb if a.transformer != "sequential_offload" else whole * st.passes,
        text_streamed_gb=text_streamed,
        weights_gpu_gb={"transformer": t_gpu, "text_encoder": te_gpu, "vae": vae_gb},
        weights_host_gb={"transformer": t_host, "text_encoder": te_host, "vae": 0.0},
    )


def setting(
    hardware: Hardware,
    model: str = "qwen-image",
    width: int = 1024,
    height: int = 1024,
    steps: int = 20,
    cfg: float = 4.0,
) -> Setting:
    """The :class:`Setting` of a registry model (or a model folder) on a machine's best GPU, in bf16.

    Example:
        >>> st = setting(describe_machine(24, host_ram_gb=64), "qwen-image")
        >>> st.tflops, round(st.h2d_gbps, 1), st.passes
        (165.0, 27.1, 2)
    """
    sizes, tconf, _ = _model_facts(model)
    gpu = hardware.best_gpu
    if gpu is None:
        raise PlanError("no GPU to cost arrangements on")
    flops = transformer_flops(tconf, width, height)
    return Setting(
        sizes, "bfloat16", gpu, hardware.host_ram_gb, flops, width, height, steps, 2 if cfg > 1 else 1
    )


def _model_facts(model: str) -> tuple[dict[str, ComponentSize], dict[str, Any], ModelSpec]:
    """Sizes, transformer config and registry entry of a registry name or a model folder (sized from its own
    configs)."""
    if os.path.isdir(model):
        from .models import TOY_MODEL_DIR

        local = inspect_folder(model)
        try:
            spec = get_model(
                "toy" if os.path.realpath(model) == os.path.realpath(TOY_MODEL_DIR) else local.name
            )
        except Exception:  # noqa: BLE001 - an unknown folder of Qwen-Image's classes
            spec = get_model("qwen-image")
        sizes = folder_sizes(model)
        missing = {"transformer", "text_encoder", "vae"} - set(sizes)
        if missing:
            raise PlanError(f"{model} has no config for {', '.join(sorted(missing))}: cannot size it")
        with open(os.path.join(model, "transformer", "config.json"), encoding="utf-8") as f:
            return sizes, json.load(f), spec
    spec = get_model(model)
    return component_sizes(spec.name), load_config(spec.config_dir, "transformer"), spec


def candidates(st: Setting, cfg: OptimizationConfig, budget: float) -> list[Arrangement]:
    """Every arrangement the overrides allow, with as many transformer blocks resident as the budget holds
    (``resident_blocks`` caps them; group offload asked for although the whole model fits streams every block).

    Example:
        >>> st = setting(describe_machine(24, host_ram_gb=64), "qwen-image")
        >>> arrs = candidates(st, OptimizationConfig(allow_lossy=False), 22.3)
        >>> all(a.lossless for a in arrs), max(a.resident_blocks or 0 for a in arrs) < 60
        (True, True)
    """
    dt = st.dtype
    fp8_ok = (
        dt == "bfloat16"
        and st.gpu.capability >= (8, 9)
        and cfg.compile is not False
        and st.sizes["transformer"].class_name in MMDIT_CLASSES
    )
    forms: list[tuple[str, str, bool, str | None]] = [(dt, dt, cfg.compile is not False, None)]
    if cfg.allow_lossy is not False and dt == "bfloat16":
        forms.append(("float8_e4m3fn", dt, False, None))
        if fp8_ok and cfg.fp8_matmul is not False:
            forms.append(("float8_e4m3fn", "float8", True, None))
    if cfg.quantization:
        forms.append((dt, dt, False, cfg.quantization))
    if cfg.fp8_matmul and fp8_ok:
        forms = [f for f in forms if f[1] == "float8"]
    if cfg.storage_dtype:
        forms = [f for f in forms if f[0] == cfg.storage_dtype and f[3] is None]
    if cfg.quantization:
        forms = [f for f in forms if f[3] == cfg.quantization]
    forced = bool(cfg.enable_cpu_offload) or cfg.transformer_placement == "model_offload"
    if forced:
        forms = [(dt, dt, False, None)]
    places = (
        ["model_offload"] if forced else [cfg.transformer_placement or p for p in ("gpu", "group_offload")]
    )
    texts = (
        ["model_offload"]
        if forced
        else [cfg.text_encoder_placement]
        if cfg.text_encoder_placement
        else [
            "gpu",
            "group_offload",
            "cpu",
        ]
    )
    tilings = [bool(cfg.enable_vae_tiling)] if cfg.enable_vae_tiling is not None else [False, True]
    blocks = st.sizes["transformer"].blocks
    out: list[Arrangement] = []
    for (storage, matmul, tuned, quant), place, text, tiled in itertools.product(
        forms, sorted(set(places)), texts, tilings
    ):
        tuned_here = tuned and (place == "gpu" or matmul == "float8")
        a = Arrangement(place, storage, matmul, None, text, tiled, tuned_here, True, quant)
        if place == "group_offload":
            free = budget - cost(replace(a, resident_blocks=0), st).gpu_peak_gb
            blk = (
                cost(replace(a, resident_blocks=1), st).gpu_peak_gb
                - cost(replace(a, resident_blocks=0), st).gpu_peak_gb
            )
            fit = int(free // blk) if blk > 0 else 0
            asked = cfg.transformer_placement == "group_offload"
            if fit >= blocks and not asked:  # whole fits: that is the "gpu" arrangement
                continue
            if cfg.resident_blocks is not None:
                fit = min(fit, cfg.resident_blocks)
            elif fit >= blocks:  # asked for although the whole fits: every block streams
                fit = 0
            a = replace(a, resident_blocks=max(0, min(fit, blocks)))
        if place in ("group_offload", "sequential_offload", "model_offload") or text != "gpu":
            a = replace(a, pinned=cost(a, st).host_after_load_gb <= HOST_PIN_SHARE * st.host_gb)
        out.append(a)
    if cfg.transformer_placement is None and not forced and not out:
        out.append(Arrangement("sequential_offload", dt, dt, None, "cpu", True, False, False))
    return out


@dataclass(frozen=True)
class Choice:
    """The chosen arrangement with its cost, the alternatives it was chosen over, and why."""

    arrangement: Arrangement
    cost: Cost
    reasons: list[str]
    warnings: list[str]


def select(st: Setting, cfg: OptimizationConfig, budget: float) -> Choice:
    """The fastest arrangement that fits the GPU budget and the host RAM, exact unless a lossy one is clearly
    faster, and the sentences that say why, from the numbers.

    Example:
        >>> st = setting(describe_machine(24, host_ram_gb=64), "qwen-image")
        >>> choice = select(st, OptimizationConfig(), 22.3)
        >>> choice.arrangement.text_encoder, choice.cost.gpu_peak_gb <= 22.3
        ('group_offload', True)
    """
    costed = [(a, cost(a, st)) for a in candidates(st, cfg, budget)]
    on_gpu = [ac for ac in costed if ac[1].gpu_peak_gb <= budget]
    if not on_gpu:
        need = min((c.gpu_peak_gb for _, c in costed), default=float("nan"))
        raise PlanError(
            f"no arrangement fits {budget:.1f} GiB usable of {st.gpu.total_memory_gb:g} GiB: the smallest needs "
            f"{need:.1f} GiB at {st.width}x{st.height}; try a smaller size or a larger card"
        )
    fits = [ac for ac in on_gpu if ac[1].host_peak_gb <= HOST_USABLE * st.host_gb]
    warnings = []
    host_warning = False
    if (
        not fits
    ):  # none fits the host: those within 1 GiB of the least host RAM, chosen among as usual, with a warning
        least = min(c.host_peak_gb for _, c in on_gpu)
        fits = [ac for ac in on_gpu if ac[1].host_peak_gb <= least + 1]
        host_warning = True
    fastest = min(fits, key=lambda ac: ac[1].s_per_image)
    exact = [ac for ac in fits if ac[0].lossless]
    pool = fits
    if exact and not cfg.fp8_matmul:
        best_exact = min(exact, key=lambda ac: ac[1].s_per_image)
        if best_exact[1].s_per_image <= LOSSY_MIN_GAIN * fastest[1].s_per_image:
            pool = exact
    top = min(pool, key=lambda ac: ac[1].s_per_image)
    near = [ac for ac in pool if ac[1].s_per_image <= (1 + TIE_SHARE) * top[1].s_per_image]
    a, c = min(near, key=lambda ac: (round(ac[1].streamed_gb_per_step, 1), ac[1].s_per_image))
    if host_warning:
        why = (
            " (while loading: this model is read whole into host RAM before it is placed, "
            f"{c.host_after_load_gb:.0f} GiB once loaded)"
            if st.sizes["transformer"].class_name not in MMDIT_CLASSES
            else ""
        )
        warnings.append(
            f"this arrangement needs about {c.host_peak_gb:.0f} GiB of host RAM{why}; the machine has "
            f"{st.host_gb:.0f} GiB"
        )
    if a.quantization:
        warnings.append(
            f"{a.quantization} (bitsandbytes), as asked: no plan picks it by itself, and its time per step is an "
            "estimate (dequantising at 1.5x the matmul cost), never measured on a GPU"
        )
    return Choice(a, c, _why(st, a, c, fits, fastest, pool, budget), warnings)


def _why(
    st: Setting,
    a: Arrangement,
    c: Cost,
    fits: list[tuple[Arrangement, Cost]],
    fastest: tuple[Arrangement, Cost],
    pool: list[tuple[Arrangement, Cost]],
    budget: float,
) -> list[str]:
    """The reasons, each quoting the numbers that decided it."""
    blocks = st.sizes["transformer"].blocks
    split = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in c.split().items() if v)
    if c.host_peak_gb > HOST_USABLE * st.host_gb:  # select's fallback: nothing fits the host RAM
        head = "least host RAM (nothing fits the host)"
        count = f"chosen among the {len(fits)} within 1 GiB of the least; see the warning."
    else:
        head = "fastest that fits"
        count = f"{len(fits)} arrangement{'s' if len(fits) != 1 else ''} fit{'' if len(fits) != 1 else 's'}."
    out = [
        f"{head}: {c.s_per_image:.1f} s an image at {st.steps} steps ({split}), "
        f"{c.gpu_peak_gb:.1f} of {budget:.1f} GiB on the GPU, {c.host_peak_gb:.0f} GiB host RAM; {count}"
    ]
    whole = cost(Arrangement(), st)  # bf16 whole on the GPU, tuned path: this card's best case
    ratio = c.s_per_step / whole.s_per_step
    if ratio > 1.02:
        out.append(
            f"cost: {ratio:.2f}x the {whole.s_per_step:.2f} s a step of the model whole on this card in bf16 on the tuned path "
            f"({c.s_per_step:.2f}: compute {c.compute_s:.2f}, copies not hidden {c.stream_s:.2f}, "
            f"offload hooks {c.offload_s:.2f})."
        )
    if a.transformer == "group_offload":
        streamed = blocks - (a.resident_blocks or 0)
        rate = st.h2d_gbps if a.pinned else st.pageable_gbps
        how = (
            f"{rate:.0f} GB/s pinned"
            if a.pinned
            else f"{rate:.3g} GB/s, pageable: host RAM is too tight to pin them"
        )
        out.append(
            f"transformer: {a.resident_blocks} of {blocks} blocks stay on the GPU; {streamed} stream "
            f"({c.streamed_gb_per_step:.1f} GiB a step at {how} = {c.streamed_gb_per_step * GIB / (rate * 1e9):.2f} s,"
            f" {'hidden under' if c.stream_s == 0 else 'longer than'} {c.compute_s:.2f} s of compute)."
        )
        if not a.pinned:  # the host is what costs most here: say what more RAM would buy
            pinned = cost(replace(a, pinned=True), st)
            need = math.ceil(pinned.host_after_load_gb / HOST_PIN_SHARE / 8) * 8
            out.append(
                f"host RAM: with {need} GB or more the streamed blocks stay pinned and a step takes about "
                f"{pinned.s_per_step:.2f} s instead of {c.s_per_step:.2f} (`--host-ram {need}GB` to see that plan)."
            )
    other = [ac for ac in pool if ac[0].text_encoder != a.text_encoder and ac[0].matmul == a.matmul]
    if other:
        o, oc = min(other, key=lambda ac: ac[1].s_per_image)
        here = {"gpu": "kept on the GPU", "group_offload": "streamed once a prompt", "cpu": "on the CPU"}.get(
            a.text_encoder, a.text_encoder
        )
        there = {"gpu": "on the GPU", "group_offload": "streamed", "cpu": "on the CPU"}.get(
            o.text_encoder, ""
        )
        detail = (
            f", {o.resident_blocks} blocks resident and {oc.streamed_gb_per_step:.1f} GiB streamed a step"
            if o.transformer == "group_offload"
            else ""
        )
        out.append(
            f"text encoder {here} ({c.text_s:.2f} s a prompt): with it {there}{detail}, an image would take "
            f"{oc.s_per_image:.1f} s"
            + (
                f" (within {TIE_SHARE:.0%}: the plan streams less each step)"
                if oc.s_per_image < c.s_per_image
                else ""
            )
            + "."
        )
    if not a.lossless:
        exact = [ac for ac in fits if ac[0].lossless]
        if exact:
            e = min(exact, key=lambda ac: ac[1].s_per_image)
            out.append(
                f"lossy storage: {e[1].s_per_image / c.s_per_image:.2f}x faster than the best exact arrangement "
                f"({e[0].describe(blocks)}, {e[1].s_per_image:.1f} s an image); exact is kept unless a lossy one is "
                f"{LOSSY_MIN_GAIN}x faster; outputs differ slightly from bf16 (allow_lossy=False refuses it)."
            )
        else:
            out.append("lossy storage: no exact arrangement fits; outputs differ slightly from bf16.")
    elif fastest[0] is not a and not fastest[0].lossless:
        out.append(
            f"exact bf16 kept: the fastest lossy arrangement ({fastest[0].describe(blocks)}) would be "
            f"{c.s_per_image / fastest[1].s_per_image:.2f}x faster, under the {LOSSY_MIN_GAIN}x that lossy needs."
        )
    if a.vae_tiling:
        out.append(
            f"VAE tiled: decode {c.decode_s:.2f} s instead of {c.decode_s / TILED_DECODE_SLOWDOWN:.2f}, and "
            f"{_vae_gib(st.width, st.height, 1, False) - VAE_TILED_GIB:.1f} GiB less at the decode."
        )
    return out


def _resolve(overrides: OptimizationConfig | dict[str, Any] | None) -> tuple[OptimizationConfig, list[str]]:
    """The overrides as a config with its mode expanded (options set explicitly win), and the mode's note."""
    cfg = (
        overrides
        if isinstance(overrides, OptimizationConfig)
        else OptimizationConfig.from_dict(overrides or {})
    )
    notes = []
    if cfg.mode:
        if cfg.mode not in MODES:
            raise PlanError(f"unknown mode {cfg.mode!r}; choose one of: {', '.join(MODES)}")
        options, text = MODES[cfg.mode]
        explicit = cfg.set_fields()
        cfg = replace(cfg, **{k: v for k, v in options.items() if k not in explicit})
        notes.append(f"mode {cfg.mode!r}: {text}.")
    if cfg.cache is not None and cfg.cache not in CACHE_MODES:
        raise PlanError(f"unknown cache {cfg.cache!r}; choose one of: {', '.join(CACHE_MODES)}")
    if cfg.flash4 is not None and not isinstance(cfg.flash4, bool):
        raise PlanError(f"flash4 is True, False or None (where it can run), got {cfg.flash4!r}")
    for name, low in (("gpus", 1), ("resident_blocks", 0)):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise PlanError(f"{name} is a whole number of at least {low}, got {value!r}")
    if cfg.dtype and cfg.dtype not in ("bfloat16", "float32"):
        raise PlanError(
            f"dtype {cfg.dtype!r} is not supported: Qwen-Image needs bfloat16 or float32 (fp16 overflows)"
        )
    if cfg.architecture_type and cfg.architecture_type.upper() not in ("MMDIT", "AUTO"):
        raise PlanError(
            f"architecture_type {cfg.architecture_type!r} does not match Qwen-Image, an MMDiT model"
        )
    return cfg, notes


def _defaults(cfg: OptimizationConfig, small: bool, reasons: list[str], model: str = "") -> dict[str, Any]:
    defaults = dict(PRESET_DEFAULTS[model if model in PRESET_DEFAULTS else "tiny" if small else "gpu"])
    for key, attr in (
        ("steps", "optimal_steps"),
        ("cfg", "optimal_cfg_scale"),
        ("width", "optimal_width"),
        ("height", "optimal_height"),
    ):
        if getattr(cfg, attr) is not None:
            defaults[key] = getattr(cfg, attr)
            reasons.append(f"{key} {defaults[key]} set by the user ({attr}).")
    return defaults


def _gpu_dtype(gpu: GPU, cfg: OptimizationConfig, reasons: list[str]) -> str:
    if cfg.dtype == "float32":
        reasons.append("float32 forced by the user: twice the memory of bf16.")
        return "float32"
    if gpu.bf16:
        reasons.append(
            f"bf16: {gpu.name} (compute {gpu.compute_capability}) supports it; the model was trained in it."
        )
        return "bfloat16"
    if cfg.force:
        reasons.append("float32: this card has no bf16 and the plan was forced.")
        return "float32"
    raise PlanError(
        f"{gpu.name} (compute {gpu.compute_capability}) has no bf16, and Qwen-Image in fp16 overflows "
        "(NaN, black images); force float32 (dtype='float32' or --force) at twice the memory"
    )


def make_plan(
    hardware: Hardware,
    model: str = "qwen-image",
    overrides: OptimizationConfig | dict[str, Any] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> Plan:
    """Decide how to load ``model`` (a registry name or a model folder) on ``hardware``; raise PlanError when it
    cannot run. ``width``/``height`` size the activations (default: the plan's default size).

    A small model (under 1 B parameters: ``toy``, ``tiny``, a small folder) sits whole on its device in float32
    unless memory or speed options are asked for (:data:`ARRANGING`: placements, resident blocks, fp8, quantisation,
    compile, a step cache); on a GPU it is then planned as a large model is (:func:`select` with those options
    forced, in bf16 for fp8 or quantised forms), so that each arrangement can be checked on it. What cannot apply
    (fp8 before compute capability 8.9, quantisation without bitsandbytes, GPU-only options on a CPU) is said in
    ``warnings``; group offload and step caches apply on the CPU too.

    Example:
        >>> plan = make_plan(describe_machine(gpu_memory_gb=16), "qwen-image")
        >>> plan.components["text_encoder"].placement != "gpu"
        True
    """
    plan = _make_plan(hardware, model, overrides, width, height)
    return _with_flash4(plan, hardware)


def _with_flash4(plan: Plan, hardware: Hardware) -> Plan:
    """Decide FlashAttention-4 for a CUDA plan (``flash4`` option: None = where it can run, True = required)."""
    asked = plan.overrides.get("flash4")
    gpu = hardware.best_gpu
    if plan.device != "cuda" or gpu is None:
        if asked:
            raise PlanError("flash4: FlashAttention-4 runs on a CUDA GPU of compute capability 9.x or 10.x")
        return plan
    if plan.attention_backend not in ("native", "", None):
        if asked:
            raise PlanError(
                f"flash4 and attention_backend={plan.attention_backend!r}: FA4 is SDPA's kernel ('native'); pick one"
            )
        return plan
    from .attention import PACKAGE, capability_supported

    major = gpu.capability[0]
    if not capability_supported(major):
        if asked:
            raise PlanError(
                f"flash4: FlashAttention-4 runs on compute capability 9.x and 10.x; {gpu.name} is "
                f"{gpu.compute_capability}"
            )
        return plan
    missing = hardware.flash4_missing
    if asked is False:
        plan.reasons.append("attention: FlashAttention-4 off (asked for); SDPA picks its kernel.")
        return plan
    described = missing == FLASH4_NOT_CHECKED
    if missing and not (asked and described):
        if asked:
            raise PlanError(f"flash4: {missing}")
        plan.reasons.append(
            f"attention: FlashAttention-4 would run on this card ({FLASH4_GAIN}) but is not used: {missing}."
        )
        return plan
    plan.flash4 = True
    if asked:
        why = "(asked for; not checked on a described machine)" if described else "(asked for)"
    else:
        why = f"(default: {PACKAGE} is installed)"
    plan.reasons.append(
        f"attention: FlashAttention-4 {why}: "
        f"PyTorch's FA4 as SDPA's flash kernel, cuDNN's turned off for the process; {FLASH4_GAIN}; it rounds as "
        "cuDNN's kernel does; flash4=False turns it off."
    )
    return plan


def _make_plan(
    hardware: Hardware,
    model: str,
    overrides: OptimizationConfig | dict[str, Any] | None,
    width: int | None,
    height: int | None,
) -> Plan:
    cfg, reasons = _resolve(overrides)
    sizes, tconf, spec = _model_facts(model)
    if spec.architecture != "MMDiT":
        raise PlanError(f"{spec.name} is a {spec.task} model; plan an image model (qwen-image) instead")
    warnings = []
    if spec.task == "image-edit":
        warnings.append(
            "Qwen-Image-Edit is trained to edit an input image: the wrong model for text-to-image; "
            "use qwen-image for text-to-image."
        )
    gpu = hardware.best_gpu
    device = cfg.device or ("cuda" if gpu else ("mps" if hardware.mps else "cpu"))
    if device == "cuda" and gpu is None:
        raise PlanError("device 'cuda' was asked for but no CUDA GPU was found")
    small = sum(s.params for s in sizes.values()) < 1e9  # a stand-in or a toy: its own small defaults
    defaults = _defaults(cfg, small, reasons, spec.name)
    w, h = width or defaults["width"], height or defaults["height"]
    if w % 16 or h % 16:
        raise PlanError(f"size {w}x{h} is not a multiple of 16")
    flops = transformer_flops(tconf, w, h)
    passes = 2 if defaults["cfg"] > 1 else 1
    given = cfg.set_fields()
    if device == "cuda" and small:
        cfg, arranged = _plan_small_on_gpu(
            hardware, spec, model, sizes, tconf, cfg, defaults, (w, h), flops, passes, reasons, warnings
        )
        if arranged is not None:
            return arranged
    if device != "cuda" or small:
        whole = _plan_whole(
            hardware, spec, model, sizes, device, cfg, defaults, (w, h), flops * passes, reasons, warnings
        )
        whole.overrides = given  # as given, with those a small model's GPU plan dropped (its warnings say so)
        return whole
    assert gpu is not None
    dtype = _gpu_dtype(gpu, cfg, reasons)
    return _plan_arranged(
        hardware,
        gpu,
        spec,
        model,
        sizes,
        tconf,
        cfg,
        defaults,
        (w, h),
        flops,
        passes,
        dtype,
        reasons,
        warnings,
    )


# Options that arrange a model on a GPU (where its parts live, their form, the tuned path, a step cache): a small
# model sits whole unless one of them is asked for (OptimizationConfig's names).
ARRANGING = (
    "transformer_placement",
    "text_encoder_placement",
    "resident_blocks",
    "storage_dtype",
    "quantization",
    "fp8_matmul",
    "enable_cpu_offload",
    "compile",
    "cache",
)


def _arranging(cfg: OptimizationConfig) -> list[str]:
    """The arranging options set in ``cfg`` (``False`` and ``None`` leave the model whole), as ``name=value``."""
    return [f"{k}={getattr(cfg, k)!r}" for k in ARRANGING if getattr(cfg, k) not in (None, False)]


def _fp8_ok(gpu: GPU, dtype: str, cfg: OptimizationConfig) -> bool:
    return gpu.capability >= (8, 9) and dtype == "bfloat16" and cfg.compile is not False


def _small_on_gpu(
    cfg: OptimizationConfig, gpu: GPU, name: str, warnings: list[str]
) -> tuple[OptimizationConfig, str | None]:
    """A small model on a GPU: the overrides that can apply (those that cannot are dropped with a warning) and the
    dtype to plan it in, or ``None`` when nothing arranging is left (it sits whole, as without overrides)."""
    if cfg.quantization and importlib.util.find_spec("bitsandbytes") is None:
        warnings.append(
            f"quantization={cfg.quantization!r}: not applied: {name} would be quantised by bitsandbytes, which is "
            "not installed"
        )
        cfg = replace(cfg, quantization=None)
    lossy = bool(cfg.fp8_matmul or cfg.storage_dtype or cfg.quantization)
    dtype = cfg.dtype or ("bfloat16" if lossy and gpu.bf16 else "float32")
    if cfg.fp8_matmul and not _fp8_ok(gpu, dtype, cfg):
        warnings.append(
            f"fp8_matmul needs compute capability 8.9 or newer, bf16 and compile (this card: {gpu.compute_capability}); ignored"
        )
        cfg = replace(cfg, fp8_matmul=None)
        if not (cfg.storage_dtype or cfg.quantization):
            dtype = cfg.dtype or "float32"
    return cfg, dtype if _arranging(cfg) else None


def _plan_small_on_gpu(
    hardware: Hardware,
    spec: ModelSpec,
    model: str,
    sizes: dict[str, ComponentSize],
    tconf: dict[str, Any],
    cfg: OptimizationConfig,
    defaults: dict[str, Any],
    size: tuple[int, int],
    flops: float,
    passes: int,
    reasons: list[str],
    warnings: list[str],
) -> tuple[OptimizationConfig, Plan | None]:
    """A small model on a GPU with memory or speed options asked for (:data:`ARRANGING`): planned as a large model
    is, by :func:`select` with those options forced. Returns the options left once those that cannot apply here
    are dropped (with a warning), and the plan, or ``None`` when nothing arranging is left (it then sits whole)."""
    gpu = hardware.best_gpu
    assert gpu is not None
    w, h = size
    cfg, dtype = _small_on_gpu(cfg, gpu, spec.name, warnings)
    if dtype is None:
        return cfg, None
    reasons.append(
        f"{spec.name} is small enough to sit whole, but {', '.join(_arranging(cfg))} was asked for: "
        f"planned as a large model is, in {dtype}"
        + ("" if cfg.dtype else " (bf16 for the fp8 or quantised forms)" if dtype == "bfloat16" else "")
        + "; its text encoder stays on the GPU unless placed (the costs are Qwen-Image's 7B encoder's) and "
        "TF32 stays off unless asked for (as when it sits whole)."
    )
    asked = cfg.set_fields()
    plan = _plan_arranged(
        hardware,
        gpu,
        spec,
        model,
        sizes,
        tconf,
        replace(
            cfg,
            text_encoder_placement=cfg.text_encoder_placement or "gpu",
            enable_tf32=bool(cfg.enable_tf32),
        ),
        defaults,
        (w, h),
        flops,
        passes,
        dtype,
        reasons,
        warnings,
    )
    plan.overrides = asked  # the options as given (not the text encoder and TF32 defaults added above)
    return cfg, plan


def _plan_arranged(
    hardware: Hardware,
    gpu: GPU,
    spec: ModelSpec,
    model: str,
    sizes: dict[str, ComponentSize],
    tconf: dict[str, Any],
    cfg: OptimizationConfig,
    defaults: dict[str, Any],
    size: tuple[int, int],
    flops: float,
    passes: int,
    dtype: str,
    reasons: list[str],
    warnings: list[str],
) -> Plan:
    """The model on a GPU in an arrangement chosen by :func:`select` from the costed candidates (the overrides
    forced): any large model, and a small one when memory or speed options were asked for."""
    w, h = size
    budget = _budget(gpu)
    assumed = [n[len("assumed ") :] for n in hardware.notes if n.startswith("assumed ")]
    rate = TYPICAL_BF16_TFLOPS.get(gpu.compute_capability, 150.0)
    if gpu.peak_bf16_tflops is None:
        assumed.append(f"{rate:g} TFLOP/s dense bf16 (this card's rate is unknown)")
    if gpu.host_to_device_gbps is None:
        assumed.append("PCIe gen 4 x16 (this card's link is unknown)")
    st = Setting(sizes, dtype, gpu, hardware.host_ram_gb, flops, w, h, defaults["steps"], passes, rate)
    if cfg.fp8_matmul and not _fp8_ok(gpu, dtype, cfg):
        warnings.append(
            f"fp8_matmul needs compute capability 8.9 or newer, bf16 and compile (this card: {gpu.compute_capability}); ignored"
        )
        cfg = replace(cfg, fp8_matmul=None)
    elif cfg.fp8_matmul and sizes["transformer"].class_name not in MMDIT_CLASSES:
        warnings.append(
            f"fp8_matmul is qwennb's tuned path for Qwen-Image's transformer; {spec.name} "
            f"({sizes['transformer'].class_name}) has none (storage_dtype='float8_e4m3fn' stores its weights in "
            "fp8 and multiplies in bf16); ignored"
        )
        cfg = replace(cfg, fp8_matmul=None)
    choice = select(st, cfg, budget)
    reasons.append(
        f"budget: {budget:.1f} of {gpu.total_memory_gb:.1f} GiB usable ({RESERVE_GIB:.1f} GiB + "
        f"{RESERVE_SHARE:.0%} kept for the CUDA context and allocator slack); card at {st.tflops:g} TFLOP/s dense "
        f"bf16, host link {st.h2d_gbps:.0f} GB/s."
    )
    reasons += choice.reasons
    plan = _plan_on_gpu(
        spec,
        model,
        gpu,
        budget,
        dtype,
        cfg,
        defaults,
        (w, h),
        st,
        choice,
        reasons,
        warnings + choice.warnings,
        assumed,
    )
    return _over_gpus(plan, cfg, hardware, tconf)


def _over_gpus(plan: Plan, cfg: OptimizationConfig, hardware: Hardware, tconf: dict[str, Any]) -> Plan:
    """``gpus=N`` (N > 1): how one request spreads over N identical GPUs, chosen by
    :func:`qwennb.parallel.choose_parallel` (CFG-parallel, Ulysses or both; data parallel for several images),
    with its reason and cost; each GPU holds the arrangement planned above. N must not exceed the identical GPUs.
    """
    if not cfg.gpus or cfg.gpus <= 1:
        return plan
    best = hardware.best_gpu
    same = [g for g in hardware.gpus if (g.name, g.total_memory_gb) == (best.name, best.total_memory_gb)]
    if cfg.gpus > len(same):
        raise PlanError(f"gpus={cfg.gpus}: this machine has {len(same)} GPU(s) like {best.name}")
    from .parallel import choose_parallel

    par = choose_parallel(
        cfg.gpus,
        plan.defaults["cfg"],
        *plan.estimated_for,
        heads=int(tconf.get("num_attention_heads", 24)),
        head_dim=int(tconf.get("attention_head_dim", 128)),
        layers=int(tconf.get("num_layers", 60)),
    )
    plan.gpus = par.gpus_used
    plan.parallel = asdict(par)
    plan.reasons.append(f"gpus={cfg.gpus}: {par.text()}")
    return plan


def _plan_whole(
    hardware: Hardware,
    spec: ModelSpec,
    model: str,
    sizes: dict[str, ComponentSize],
    device: str,
    cfg: OptimizationConfig,
    defaults: dict[str, Any],
    size: tuple[int, int],
    step_flops: float,
    reasons: list[str],
    warnings: list[str],
) -> Plan:
    """Everything in one place: the CPU, MPS, or a GPU for a small model asked for no memory or speed option.
    Refused from the numbers (seconds a step on the CPU, RAM), not from the model's name. On the CPU the
    transformer may take diffusers' group offload (asked for: the same hooks, onto the CPU); options that need a
    GPU are listed in a warning as not applied."""
    gpu = hardware.best_gpu if device == "cuda" else None
    dtype = cfg.dtype or ("float32" if sum(s.params for s in sizes.values()) < 1e9 else "bfloat16")
    db = DTYPE_BYTES[dtype]
    weights = sum(s.gib(db) for s in sizes.values())
    if device == "cpu":
        s_step = step_flops / (CPU_TFLOPS * 1e12)
        if s_step > CPU_MAX_S_PER_STEP and not cfg.force:
            raise PlanError(
                f"no CUDA GPU: {spec.name} ({weights:.0f} GiB in {dtype}) would take about {s_step:.0f} s a step on "
                "the CPU; use model 'tiny', describe a card to plan for it, or force it (force=True / --force)"
            )
        if weights + PROCESS_HOST_GIB > hardware.host_ram_gb:
            raise PlanError(
                f"{spec.name} needs {weights + PROCESS_HOST_GIB:.1f} GiB of RAM on the CPU; this machine has "
                f"{hardware.host_ram_gb:.1f}"
            )
    if cfg.mode in ("turbo", "turbo-cache"):
        warnings.append(f"mode {cfg.mode!r} applies to Qwen-Image on a CUDA GPU; ignored here")
    # diffusers' group offload runs on the CPU too (onto the CPU, without streams): the same hooks as on a GPU.
    offload = device == "cpu" and cfg.transformer_placement == "group_offload"
    asked = {
        "transformer_placement": cfg.transformer_placement if not offload else None,
        "text_encoder_placement": cfg.text_encoder_placement,
        "resident_blocks": cfg.resident_blocks if not offload else None,
        "storage_dtype": cfg.storage_dtype,
        "quantization": cfg.quantization,
        "fp8_matmul": cfg.fp8_matmul if cfg.mode not in ("turbo", "turbo-cache") else None,
        "enable_cpu_offload": cfg.enable_cpu_offload,
        "compile": cfg.compile if device != "cuda" else None,
    }
    ignored = [f"{k}={v!r}" for k, v in asked.items() if v not in (None, False)]
    if ignored:
        warnings.append(
            f"{', '.join(ignored)}: not applied: {spec.name} runs whole on {device} ({weights:.2f} GiB in {dtype})"
            + (
                "; fp8 needs a CUDA GPU of compute capability 8.9+, quantisation bitsandbytes and CUDA, offloading "
                "a GPU, the tuned path and compile CUDA"
                if device != "cuda"
                else ""
            )
        )
    place = "cpu" if device == "cpu" else "gpu"
    comps = {
        name: ComponentPlan(
            place,
            dtype,
            gpu_gb=round(s.gib(db), 3) if device != "cpu" else 0.0,
            host_gb=round(s.gib(db), 3) if device == "cpu" else 0.0,
            reason=f"small enough to sit whole ({s.gib(db):.2f} GiB)"
            if weights < 1
            else "forced to run here",
        )
        for name, s in sizes.items()
    }
    arrangement = f"everything on {device} in {dtype}"
    if offload:
        t = sizes["transformer"]
        kept = max(0, min(t.blocks, cfg.resident_blocks or 0))
        comps["transformer"] = replace(
            comps["transformer"],
            placement="group_offload",
            resident_blocks=kept,
            reason=f"group offload as asked: diffusers' hooks onload {t.blocks - kept} of {t.blocks} blocks onto "
            "the CPU, one at a time (no copies here: the same hooks as on a GPU, without streams)",
        )
        arrangement = (
            f"transformer group offload ({dtype}, {kept}/{t.blocks} blocks resident), everything on {device}"
        )
    reasons.append(f"{dtype} on {device}: {weights:.2f} GiB of weights, everything in one place.")
    if spec.name == "tiny":
        reasons.append("tiny stand-in: the real classes with tiny configs; its images are noise.")
    if spec.name == "toy":
        reasons.append(
            "toy model: Qwen-Image's classes at a small size, trained on a toy world of flat shapes (not Qwen-Image)."
        )
    peak = weights + _act_gib(*size, 1) * (0.01 if weights < 1 else 1) if device != "cpu" else 0.0
    return Plan(
        model=spec.name,
        hub_id=spec.hub_id,
        device=device,
        gpu_name=gpu.name if gpu else None,
        gpu_memory_gb=gpu.total_memory_gb if gpu else None,
        budget_gb=round(_budget(gpu), 2) if gpu else None,
        dtype=dtype,
        components=comps,
        attention_backend=cfg.attention_backend or "native",
        compile=bool(cfg.compile) and device == "cuda",
        cache=cfg.cache,
        tf32=bool(cfg.enable_tf32),
        cudnn_benchmark=bool(cfg.enable_cudnn_benchmark),
        vae_tiling=bool(cfg.enable_vae_tiling),
        vae_slicing=bool(cfg.enable_vae_slicing),
        attention_slicing=bool(cfg.enable_attention_slicing),
        defaults=defaults,
        estimated_peak_gpu_gb=round(peak, 2),
        estimated_host_ram_gb=round((weights if device == "cpu" else 0.0) + PROCESS_HOST_GIB, 2),
        estimated_s_per_step=None,
        arrangement=arrangement,
        lossless=not cfg.cache,
        reasons=reasons,
        warnings=warnings,
        overrides=cfg.set_fields(),
        estimated_for=size,
        source=model if os.path.isdir(model) else None,
    )


def _plan_on_gpu(
    spec: ModelSpec,
    model: str,
    gpu: GPU,
    budget: float,
    dtype: str,
    cfg: OptimizationConfig,
    defaults: dict[str, Any],
    size: tuple[int, int],
    st: Setting,
    choice: Choice,
    reasons: list[str],
    warnings: list[str],
    assumed: list[str],
) -> Plan:
    """The plan of a chosen arrangement: components, speed options and their reasons."""
    a, c = choice.arrangement, choice.cost
    tsize = st.sizes["transformer"]
    t_reason = {
        "gpu": "fits whole",
        "group_offload": f"{a.resident_blocks} of {tsize.blocks} blocks resident, the rest streamed each step",
        "model_offload": "moved to the GPU for the denoise and back to the CPU after (enable_cpu_offload)",
        "sequential_offload": "every layer copied to the GPU when used, without overlap (slowest)",
    }[a.transformer]
    text_reason = {
        "gpu": "fits beside the transformer: no copies per prompt",
        "group_offload": "streamed onto the GPU only while a prompt is encoded (once a prompt), then leaves room",
        "model_offload": "moved onto the GPU to encode, back to the CPU after",
        "cpu": "encodes on the CPU (slow: seconds a prompt) so the GPU keeps the transformer",
    }[a.text_encoder]
    comps = {
        "transformer": ComponentPlan(
            a.transformer,
            a.storage,
            a.quantization,
            round(c.weights_gpu_gb["transformer"], 2),
            round(c.weights_host_gb["transformer"], 2),
            a.resident_blocks if a.transformer == "group_offload" else None,
            t_reason + ("; fp8 weights multiplied in fp8" if a.matmul == "float8" else ""),
            not a.pinned and a.transformer == "group_offload",
            round(c.streamed_gb_per_step, 2),
        ),
        "text_encoder": ComponentPlan(
            a.text_encoder,
            dtype,
            gpu_gb=round(
                c.weights_gpu_gb["text_encoder"]
                or (TEXT_STREAM_GIB if a.text_encoder == "group_offload" else 0.0),
                2,
            ),
            host_gb=round(c.weights_host_gb["text_encoder"], 2),
            reason=text_reason,
            streamed_gb_per_prompt=round(c.text_streamed_gb, 2),
        ),
        "vae": ComponentPlan(
            "gpu" if a.transformer != "model_offload" else "model_offload",
            dtype,
            gpu_gb=round(c.weights_gpu_gb["vae"], 2),
            reason=f"small ({c.weights_gpu_gb['vae']:.2f} GiB); decodes "
            + ("in tiles" if a.vae_tiling else "the whole image at once"),
        ),
    }
    fp8_mm = a.matmul == "float8"
    fast = a.tuned and (a.transformer == "gpu" and a.storage == dtype and not a.quantization or fp8_mm)
    compile_ = bool(cfg.compile) if cfg.compile is not None else fast
    if cfg.attention_backend:
        reasons.append(f"attention backend {cfg.attention_backend!r} set by the user.")
    else:
        reasons.append(
            "attention: PyTorch SDPA ('native'); it picks the fastest kernel for the card (cuDNN on Hopper), "
            "and diffusers' other backends measured slower on an H100."
        )
    if fp8_mm:
        reasons.append(
            "fp8 matmuls"
            + (" (asked for)" if cfg.fp8_matmul else "")
            + ": the blocks' large Linears hold e4m3 weights "
            "with per-channel scales and multiply e4m3 activations with per-token scales (torch._scaled_mm); on an "
            f"H100 at 1024x1024 with CFG {FP8_S_PER_STEP} s/step against {TUNED_S_PER_STEP} in bf16; outputs drift "
            "about 3x the rounding floor."
        )
    if fast and tsize.class_name == "QwenImage21Transformer2DModel":
        reasons.append(
            "compile "
            + ("(default)" if cfg.compile is None else "(asked for)")
            + ": qwennb's Qwen-Image-2.1 path (qwennb.speed21: CFG's two passes as one forward in the KV-cached "
            "steps, RoPE in real arithmetic, one compiled block function; the prefill step runs stock, regionally "
            f"compiled); same math as stock; {SPEED21_S_PER_STEP} s/step against {SPEED21_STOCK_S_PER_STEP} for "
            "stock diffusers on an H200 at 1024x1024 with CFG (medians of four runs); the first image of a session "
            "costs more (one compile)."
        )
    elif fast:
        reasons.append(
            "compile "
            + ("(default)" if cfg.compile is None else "(asked for)")
            + ": qwennb's tuned path (regional "
            "compile of one block function, RoPE in real arithmetic, modulation once per image, CFG's two passes as "
            f"one batch); same math as stock; {TUNED_S_PER_STEP} s/step against {STOCK_S_PER_STEP} for stock "
            "diffusers on an H100 at 1024x1024 with CFG; the first image of a session costs 17-25 s more (one compile)."
        )
    elif cfg.compile is None:
        reasons.append(
            "compile off: the transformer is not whole on the GPU in bf16 or in fp8 matmuls; compile=True turns it on."
        )
    elif compile_:
        warnings.append("compile with offloading or quantisation is untested; it may recompile or fall back")
    if cfg.enable_attention_slicing:
        warnings.append(
            "attention slicing does not apply to Qwen-Image's transformer (SDPA is already memory-efficient); ignored"
        )
    if cfg.cache:
        warnings.append(f"cache {cfg.cache!r} reuses work between steps: faster, but outputs change")
    return Plan(
        model=spec.name,
        hub_id=spec.hub_id,
        device="cuda",
        gpu_name=gpu.name,
        gpu_memory_gb=gpu.total_memory_gb,
        budget_gb=round(budget, 2),
        dtype=dtype,
        components=comps,
        attention_backend=cfg.attention_backend or "native",
        compile=compile_,
        cache=cfg.cache,
        tf32=True if cfg.enable_tf32 is None else cfg.enable_tf32,
        cudnn_benchmark=True if cfg.enable_cudnn_benchmark is None else cfg.enable_cudnn_benchmark,
        vae_tiling=a.vae_tiling,
        vae_slicing=bool(cfg.enable_vae_slicing),
        attention_slicing=False,
        defaults=defaults,
        estimated_peak_gpu_gb=round(c.gpu_peak_gb, 2),
        estimated_host_ram_gb=round(c.host_peak_gb, 2),
        estimated_s_per_step=round(c.s_per_step, 3),
        arrangement=a.describe(tsize.blocks),
        lossless=a.lossless and not cfg.cache,
        reasons=reasons,
        warnings=warnings,
        overrides=cfg.set_fields(),
        estimated_for=size,
        fast_path=fast,
        fp8_matmul=fp8_mm,
        predicted_s_per_step=round(c.s_per_step, 3),
        predicted_s_per_image=round(c.s_per_image, 2),
        time_split=c.split(),
        estimated_load_s=round(c.load_s, 1),
        assumptions=assumed,
        source=model if os.path.isdir(model) else None,
    )


def plan_sizes(plan: Plan) -> dict[str, ComponentSize]:
    """The parameter counts a plan was made from: its folder's own configs, or its registry model's."""
    from .models import component_sizes, folder_sizes

    return folder_sizes(plan.source) if plan.source else component_sizes(plan.model)


def _phase_peak(plan: Plan, width: int, height: int, batch: int) -> float:
    """What the plan's components hold on the GPU at the highest point of a generation at this size."""
    comps = plan.components
    t, te, vae = comps["transformer"], comps["text_encoder"], comps["vae"]
    sizes = plan_sizes(plan)
    held = _held_gib(sizes["transformer"].class_name)
    # CFG batched on the tuned path
    act = _act_gib(width, height, batch * (2 if plan.fast_path else 1)) + held
    decode = _vae_gib(width, height, batch, plan.vae_tiling, sizes["vae"].class_name) + held
    if t.placement == "model_offload":  # one component on the GPU at a time
        return max(te.host_gb + TEXT_ACT_GIB, t.gpu_gb + act, vae.gpu_gb + decode)
    text_phase = {
        "group_offload": TEXT_STREAM_GIB + TEXT_ACT_GIB,
        "model_offload": te.host_gb + TEXT_ACT_GIB,
    }.get(te.placement, TEXT_ACT_GIB if te.placement == "gpu" else 0.0)
    resident = t.gpu_gb + vae.gpu_gb + (te.gpu_gb if te.placement == "gpu" else 0.0)
    return resident + max(act, decode, text_phase)


def with_size(plan: Plan, width: int, height: int, batch: int = 1) -> float:
    """Estimated peak GPU memory (GiB) of ``plan`` for one generation at ``width``x``height``.

    It is the plan's own estimate moved by the change in activations and decode memory, so at the size the
    plan was made for it equals ``plan.estimated_peak_gpu_gb``.
    """
    if plan.device != "cuda":
        return plan.estimated_peak_gpu_gb
    w0, h0 = plan.estimated_for
    return plan.estimated_peak_gpu_gb + _phase_peak(plan, width, height, batch) - _phase_peak(plan, w0, h0, 1)


__all__ = [
    "OptimizationConfig",
    "Plan",
    "ComponentPlan",
    "Arrangement",
    "Cost",
    "Setting",
    "cost",
    "setting",
    "candidates",
    "select",
    "make_plan",
    "describe_machine",
    "describe_modes",
    "MODES",
    "parse_memory",
    "transformer_flops",
    "image_tokens",
    "with_size",
    "replace",
]
