"""The plan: how a model should be loaded on a machine, with the memory budget and a reason per choice.

``make_plan`` is a pure function of (hardware, model, overrides). Tiers are not looked up by card
name: every candidate arrangement of the components is costed in GPU memory, host memory and time per
step, and the fastest one that fits the budget wins. The numbers it uses are the model's parameter
counts (computed from its configs), the card's memory, compute rate and PCIe link (read from the
driver), and a few coefficients measured on an H100 (see ``benchmarks/NOTES.md``).

Example:
    >>> from qwennb.plan import make_plan, describe_machine
    >>> plan = make_plan(describe_machine(gpu_memory_gb=80), "qwen-image")
    >>> plan.components["transformer"].placement
    'gpu'
    >>> plan = make_plan(describe_machine(gpu_memory_gb=24), "qwen-image")
    >>> plan.estimated_peak_gpu_gb < 24
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import PlanError
from .hardware import GPU, Hardware
from .models import ComponentSize, component_sizes, get_model, load_config

GIB = 1024**3

# ---- coefficients (measured on one H100 80GB HBM3; see benchmarks/NOTES.md) -------------------------
# Share of the card's nominal dense bf16 rate (SMs x max clock x FLOPs/clock) that stock diffusers
# reaches on the transformer: 0.1845 s a forward at 1024x1024 = 377 TFLOP/s of 1070 nominal on an H100.
EAGER_EFFICIENCY = 0.352
# fp8 storage (layerwise casting) upcasts every weight before use. Measured on an H100 (memory tiers, 24 GB
# cap, 54 of 60 blocks resident): 0.134 s a forward for 20.4 B weights, i.e. about 152 GB of fp8 weights a
# second (a separate copy op predicted 80 ms; the hooks' per-layer casts and launches cost more).
UPCAST_GBPS = 152.0
# Share of the nominal rate that qwennb's tuned path (qwennb.speed: regional compile, real-arithmetic RoPE,
# GELU epilogue, modulation once per image, CFG's passes batched) reaches: 0.244 s/step against stock's 0.366
# in the same run at 1024x1024 with CFG on an H100 (benchmarks/speed.py run 6; benchmarks/NOTES.md).
FAST_EFFICIENCY = EAGER_EFFICIENCY * 0.366 / 0.244
# fp8 matmuls in the tuned path (qwennb.speed.FP8Linear: e4m3 x e4m3, per-token and per-channel scales) against
# its bf16 matmuls: 0.208 against 0.244 s/step at 1024x1024, CFG 4, on an H100 (benchmarks/speed.py, run 6).
FP8_MATMUL_SPEEDUP = 0.244 / 0.208
# The tuned path under block-level group offload runs slower than whole on the GPU even when the copies hide
# under compute (the offload hooks, stream waits and an allocator near its cap): measured on an H100 with a 24 GB
# cap, 6 of 60 fp8 blocks streamed, 0.302 s/step against 0.217 for fp8 matmuls whole on the card.
GROUP_OFFLOAD_OVERHEAD = 0.302 / 0.217
CACHE_MODES = ("first_block", "taylorseer")
# A lossy arrangement (fp8, NF4) is chosen over the fastest exact one only if it is at least this much faster:
# on a 48 GB H100 cap bf16 with the text encoder streamed (0.259 s/step, +0.7 s a prompt) stays the choice over
# fp8 matmuls (0.208-0.217); at 24 GB and below the exact arrangements stream the transformer and are 3-5x slower.
LOSSY_MIN_GAIN = 1.5
# Host RAM of the Python process itself (torch, diffusers, transformers, CUDA context).
PROCESS_HOST_GIB = 2.0
# What a text encoder kept on the CPU computes at (TFLOP/s, bf16 on a many-core host): seconds a prompt.
CPU_TFLOPS = 0.5
# Rate assumed to rank arrangements when the card's compute rate is unknown (a described card).
FALLBACK_TFLOPS = 150.0
# Host-to-device copies from pageable memory run at about a third of the pinned rate (19 vs 54 GB/s).
PAGEABLE_SHARE = 0.35
# GPU memory that is not the weights: CUDA context and allocator slack kept free (GiB + share).
RESERVE_GIB = 1.0
RESERVE_SHARE = 0.03
# Transformer activations at batch 1 (GiB): a constant plus a cost per image token. Measured on an H100
# at 1024x1024 (4096 tokens): the denoise peaked 0.40 GiB above the weights.
ACT_BASE_GIB = 0.1
ACT_PER_TOKEN_GIB = 0.3 / 4096
# VAE decode without tiling (GiB per megapixel), and with tiling (a constant). Measured: the decode of a
# 1024x1024 image peaked 4.17 GiB above the weights, the pipeline's highest point.
VAE_DECODE_GIB_PER_MP = 4.0
VAE_TILED_GIB = 0.6
# Text encoder activations while encoding one prompt pair.
TEXT_ACT_GIB = 0.5
# GPU memory a streamed text encoder holds at once (its largest leaf, the 1 GiB token embedding).
TEXT_STREAM_GIB = 1.1
TEXT_TOKENS = 77  # a typical prompt; the FLOP count is insensitive to it

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
        "fp8 weights and fp8 matmuls (compute capability 8.9+): 0.208 s/step against 0.244 exact and 0.366 "
        "for stock diffusers (1024x1024, CFG 4), half the transformer's memory; the final latents drift 7e-2, "
        "3x the rounding floor",
    ),
    "turbo-cache": (
        {"cache": "taylorseer"},
        "TaylorSeer step cache (predicts 4 of every 5 steps after the first 3): a 50-step 1024x1024 image in "
        "3.9 s against 18.6 for stock; drift 0.27, 11x the rounding floor; little gain at 20 steps or fewer",
    ),
}


def describe_modes() -> str:
    """The modes, one line each.

    Example:
        >>> describe_modes().splitlines()[0].split()[0]
        'exact'
    """
    return "\n".join(f"{name:<12} {text}" for name, (_, text) in MODES.items())


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 * 4 / 2, "int8": 1.0 + 1 / 1024}

PRESET_DEFAULTS = {
    "tiny": {"steps": 8, "cfg": 4.0, "width": 256, "height": 256},
    "gpu": {"steps": 20, "cfg": 4.0, "width": 1024, "height": 1024},
}


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


@dataclass
class Plan:
    """A complete, explained decision on how to load and run a model."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The plan as a small text table, one row per component, then the reasons."""
        lines = [
            f"model   {self.model}" + (f" ({self.hub_id})" if self.hub_id else ""),
            f"device  {self.device}"
            + (f": {self.gpu_name}, {self.gpu_memory_gb:.1f} GiB" if self.gpu_name else ""),
            f"plan    {self.arrangement}; dtype {self.dtype}; "
            f"est. peak {self.estimated_peak_gpu_gb:.1f} GiB GPU"
            + (f" of {self.budget_gb:.1f} usable" if self.budget_gb else "")
            + f", {self.estimated_host_ram_gb:.1f} GiB host",
        ]
        if self.estimated_s_per_step:
            lines.append(f"speed   about {self.estimated_s_per_step:.2f} s/step (estimate) at defaults")
        d = self.defaults
        lines.append(f"defaults {d['steps']} steps, CFG {d['cfg']}, {d['width']}x{d['height']}")
        lines.append("")
        lines.append(f"{'component':<13}{'placement':<26}{'storage':<16}{'GPU GiB':>8}  why")
        for name, c in self.components.items():
            storage = c.quantization or c.storage_dtype
            place = c.placement + (
                f" ({c.resident_blocks} resident)" if c.resident_blocks is not None else ""
            )
            lines.append(f"{name:<13}{place:<26}{storage:<16}{c.gpu_gb:>8.2f}  {c.reason}")
        lines.append("")
        lines += [f"- {r}" for r in self.reasons]
        lines += [f"! {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from .display import plan_html

        return {"text/plain": self.table(), "text/html": plan_html(self)}


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
    host_ram_gb: float = 64.0,
    compute_capability: str | None = None,
    sm_count: int | None = None,
    max_sm_clock_mhz: int | None = None,
    pcie_gen: int | None = 4,
    pcie_width: int | None = 16,
) -> Hardware:
    """A described (not detected) machine, to plan for a card you do not have.

    Example:
        >>> hw = describe_machine(gpu_memory_gb=24, gpu_name="RTX 4090")
        >>> hw.gpus[0].total_memory_gb
        24.0
    """
    gpus = []
    if gpu_memory_gb is not None:
        cc = compute_capability or ("8.9" if bf16 else "7.5")
        gpus.append(
            GPU(
                index=0,
                name=gpu_name or f"GPU with {gpu_memory_gb:g} GiB",
                total_memory_gb=float(gpu_memory_gb),
                free_memory_gb=float(gpu_memory_gb),
                compute_capability=cc,
                bf16=bf16,
                sm_count=sm_count,
                max_sm_clock_mhz=max_sm_clock_mhz,
                pcie_gen=pcie_gen,
                pcie_width=pcie_width,
            )
        )
    return Hardware(
        gpus=gpus,
        host_ram_gb=host_ram_gb,
        host_ram_available_gb=host_ram_gb,
        cpu_count=8,
        mps=False,
        frontend="plain",
        notes=["described machine"],
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


def _budget(gpu: GPU) -> float:
    return gpu.total_memory_gb - RESERVE_GIB - RESERVE_SHARE * gpu.total_memory_gb


def _act_gib(width: int, height: int, batch: int) -> float:
    return ACT_BASE_GIB + ACT_PER_TOKEN_GIB * image_tokens(width, height) * batch


def _vae_gib(width: int, height: int, batch: int, tiled: bool) -> float:
    return VAE_TILED_GIB if tiled else VAE_DECODE_GIB_PER_MP * width * height / 1e6 * batch


@dataclass
class _Candidate:
    name: str
    placement: str
    storage: str
    quant: str | None
    gpu_gb: float
    host_gb: float
    s_per_forward: float | None
    lossless: bool
    resident_blocks: int | None = None
    reason: str = ""
    low_cpu_mem_usage: bool = False
    fp8_matmul: bool = False  # fp8 weights consumed by fp8 matmuls (the tuned path's FP8Linear)
    tuned: bool = False  # s_per_forward already assumes the tuned path (qwennb.speed)


def _weights_gib(size: ComponentSize, dtype_bytes: float, linear_bytes: float | None = None) -> float:
    lb = dtype_bytes if linear_bytes is None else linear_bytes
    return (size.linear_params * lb + (size.params - size.linear_params) * dtype_bytes) / GIB


def _transformer_candidates(
    size: ComponentSize,
    gpu: GPU,
    dtype_bytes: int,
    room: float,
    flops: float,
    cfg: OptimizationConfig,
    host_room: float,
    fp8_mm: bool = False,
    passes: int = 1,
) -> list[_Candidate]:
    """Every arrangement of the transformer, costed. ``room`` is what the budget leaves for its weights.

    Times are seconds per forward; they use an assumed compute rate when the card's is unknown, so
    that arrangements can still be ranked. ``fp8_mm`` adds the arrangements whose fp8 weights feed fp8
    matmuls in the tuned path (whole on the GPU, or streamed by group offload), costed with that path's rate;
    with ``passes`` = 2 (true CFG) the tuned path computes both passes in one forward, so streamed blocks are
    copied once a step, and their time is the step's divided by the passes.
    """
    compute = flops / ((gpu.peak_bf16_tflops or FALLBACK_TFLOPS) * 1e12 * EAGER_EFFICIENCY)
    compute_fp8 = compute * EAGER_EFFICIENCY / FAST_EFFICIENCY / FP8_MATMUL_SPEEDUP
    h2d = gpu.host_to_device_gbps or 25.0
    full_bf16 = _weights_gib(size, dtype_bytes)
    full_fp8 = _weights_gib(size, dtype_bytes, 1)
    upcast = size.linear_params / (UPCAST_GBPS * 1e9)
    block = size.block_params * dtype_bytes / GIB
    block_fp8 = size.block_params * 1 / GIB
    nonblock = full_bf16 - size.blocks * block
    out: list[_Candidate] = []
    dt = "bfloat16" if dtype_bytes == 2 else "float32"

    tuned = cfg.compile is not False  # whole on the GPU, the tuned path is on unless compile is turned off
    out.append(
        _Candidate(
            "bf16 on GPU",
            "gpu",
            dt,
            None,
            full_bf16,
            0.0,
            compute * EAGER_EFFICIENCY / FAST_EFFICIENCY if tuned else compute,
            True,
            reason="fits whole",
            tuned=tuned,
        )
    )
    if cfg.allow_lossy is not False and dtype_bytes == 2:
        out.append(
            _Candidate(
                "fp8 storage on GPU",
                "gpu",
                "float8_e4m3fn",
                None,
                full_fp8,
                0.0,
                compute + upcast,
                False,
                reason="weights stored in fp8, computed in bf16",
            )
        )
    if fp8_mm:
        out.append(
            _Candidate(
                "fp8 matmuls on GPU",
                "gpu",
                "float8_e4m3fn",
                None,
                full_fp8,
                0.0,
                compute_fp8,
                False,
                reason="weights stored in fp8 and multiplied in fp8 (per-token and per-channel scales)",
                fp8_matmul=True,
                tuned=True,
            )
        )
    for storage, blk, lossless, extra, mm in (
        (dt, block, True, 0.0, False),
        ("float8_e4m3fn", block_fp8, False, upcast, False),
        ("float8_e4m3fn", block_fp8, False, 0.0, True),
    ):
        if not lossless and (cfg.allow_lossy is False or dtype_bytes != 2):
            continue
        if mm and not fp8_mm:
            continue
        # Keep as many blocks resident as fit beside two blocks in flight; stream the rest.
        fit = int((room - nonblock - 2 * blk) // blk)
        resident = max(0, min(size.blocks - 1, fit))
        streamed = size.blocks - resident
        # Pinned copies of the streamed blocks beside the model's own: twice their size in host RAM.
        # Where that does not fit, diffusers pins on the fly (low_cpu_mem_usage), at pageable speed.
        pinned = 2 * streamed * blk <= host_room
        rate = h2d if pinned else h2d * PAGEABLE_SHARE
        stream_s = streamed * blk * GIB / (rate * 1e9)
        gpu_gb = nonblock + (resident + 2) * blk
        if mm:  # the tuned path: one stream a step (CFG batched), hooks' overhead on the compute
            per_fwd = max(passes * compute_fp8 * GROUP_OFFLOAD_OVERHEAD, stream_s) / passes
        else:  # eager: each pass streams the blocks again
            per_fwd = max(compute + extra, stream_s + extra)
        label = "fp8 matmuls" if mm else ("fp8" if storage != dt else "bf16")
        out.append(
            _Candidate(
                f"group offload ({label}, {resident}/{size.blocks} blocks resident)",
                "group_offload",
                storage,
                None,
                gpu_gb,
                (2 if pinned else 1) * streamed * blk,
                per_fwd,
                lossless,
                resident_blocks=resident,
                low_cpu_mem_usage=not pinned,
                reason=f"streams {streamed} blocks ({streamed * blk:.1f} GiB) a forward over PCIe "
                + (
                    "from pinned memory, overlapped with compute"
                    if pinned
                    else "pinning on the fly (low host RAM)"
                )
                + ("; fp8 weights multiplied in fp8" if mm else ""),
                fp8_matmul=mm,
                tuned=mm,
            )
        )
    if cfg.allow_lossy is not False:
        nf4 = _weights_gib(size, dtype_bytes, QUANT_BYTES["nf4"])
        out.append(
            _Candidate(
                "NF4 quantised on GPU",
                "gpu",
                dt,
                "nf4",
                nf4,
                0.0,
                compute + upcast * 1.5,
                False,
                reason="bitsandbytes NF4 weights, dequantised per layer",
            )
        )
    seq_stream = full_bf16 * GIB / (h2d * 1e9 * 0.35)  # no streams, per-leaf synchronous copies
    out.append(
        _Candidate(
            "sequential offload",
            "sequential_offload",
            dt,
            None,
            max(block, 0.5),
            full_bf16,
            compute + seq_stream,
            True,
            reason="every layer copied to the GPU when used, without overlap (slowest)",
        )
    )
    return out


def make_plan(
    hardware: Hardware,
    model: str = "qwen-image",
    overrides: OptimizationConfig | dict[str, Any] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> Plan:
    """Decide how to load ``model`` on ``hardware``; raise PlanError when it cannot run.

    ``width``/``height`` size the activation budget (default: the plan's default size).

    Example:
        >>> plan = make_plan(describe_machine(gpu_memory_gb=16), "qwen-image")
        >>> plan.components["text_encoder"].placement != "gpu"
        True
    """
    cfg = (
        overrides
        if isinstance(overrides, OptimizationConfig)
        else OptimizationConfig.from_dict(overrides or {})
    )
    mode_note = None
    if cfg.mode:
        if cfg.mode not in MODES:
            raise PlanError(f"unknown mode {cfg.mode!r}; choose one of: {', '.join(MODES)}")
        options, mode_note = MODES[cfg.mode]
        explicit = cfg.set_fields()
        cfg = replace(cfg, **{k: v for k, v in options.items() if k not in explicit})
    spec = get_model(model)
    if spec.architecture != "MMDiT":
        raise PlanError(f"{spec.name} is a {spec.task} model; plan an image model (qwen-image) instead")
    if cfg.architecture_type and cfg.architecture_type.upper() not in ("MMDIT", "AUTO"):
        raise PlanError(
            f"architecture_type {cfg.architecture_type!r} does not match {spec.name}, which is an MMDiT model"
        )
    reasons: list[str] = []
    warnings: list[str] = []
    if mode_note:
        reasons.append(f"mode {cfg.mode!r}: {mode_note}.")
    if cfg.cache is not None and cfg.cache not in CACHE_MODES:
        raise PlanError(f"unknown cache {cfg.cache!r}; choose one of: {', '.join(CACHE_MODES)}")
    if spec.name == "qwen-image-edit":
        warnings.append(
            "Qwen-Image-Edit is trained to edit an input image: the wrong model for text-to-image; "
            "use qwen-image for text-to-image."
        )
    gpu = hardware.best_gpu
    device = cfg.device or ("cuda" if gpu else ("mps" if hardware.mps else "cpu"))
    if device == "cuda" and gpu is None:
        raise PlanError("device 'cuda' was asked for but no CUDA GPU was found")

    sizes = component_sizes(spec.name)
    tconf = load_config(spec.config_dir, "transformer")
    kind = "tiny" if spec.name == "tiny" or device != "cuda" else "gpu"
    defaults = dict(PRESET_DEFAULTS[kind])
    for key, attr in (
        ("steps", "optimal_steps"),
        ("cfg", "optimal_cfg_scale"),
        ("width", "optimal_width"),
        ("height", "optimal_height"),
    ):
        if getattr(cfg, attr) is not None:
            defaults[key] = getattr(cfg, attr)
            reasons.append(f"{key} {defaults[key]} set by the user ({attr}).")
    w, h = width or defaults["width"], height or defaults["height"]
    if w % 16 or h % 16:
        raise PlanError(f"size {w}x{h} is not a multiple of 16")

    # ---- dtype ----------------------------------------------------------------------------------
    if cfg.dtype and cfg.dtype not in ("bfloat16", "float32"):
        raise PlanError(
            f"dtype {cfg.dtype!r} is not supported: Qwen-Image needs bfloat16 or float32 (fp16 overflows)"
        )
    if device == "cuda":
        assert gpu is not None
        if cfg.dtype == "float32":
            dtype = "float32"
            reasons.append("float32 forced by the user: twice the memory of bf16.")
        elif gpu.bf16:
            dtype = "bfloat16"
            reasons.append(
                f"bf16: {gpu.name} (compute {gpu.compute_capability}) supports it; the model was trained in it."
            )
        elif cfg.force:
            dtype = "float32"
            reasons.append("float32: this card has no bf16 and the plan was forced.")
        else:
            raise PlanError(
                f"{gpu.name} (compute {gpu.compute_capability}) has no bf16, and Qwen-Image in fp16 overflows "
                "(NaN, black images); force float32 (dtype='float32' or --force) at twice the memory"
            )
    elif spec.stand_in and spec.name.startswith("tiny"):  # tiny, tiny-2.1
        dtype = cfg.dtype or "float32"
        reasons.append(f"{dtype} on {device}: the tiny stand-in is small enough for full precision.")
    else:
        if not cfg.force:
            raise PlanError(
                f"no CUDA GPU: {spec.name} ({sum(s.gib() for s in sizes.values()):.0f} GiB in bf16) would take minutes "
                "per step on the CPU; use model 'tiny', or force it (force=True / --force)"
            )
        dtype = cfg.dtype or "bfloat16"
        reasons.append(f"{dtype} on {device}: forced by the user.")
    dbytes = DTYPE_BYTES[dtype]

    # ---- CPU / MPS / tiny: everything in one place ------------------------------------------------
    batch = 1
    if (device != "cuda" or spec.name == "tiny") and cfg.mode in ("turbo", "turbo-cache"):
        warnings.append(f"mode {cfg.mode!r} applies to Qwen-Image on a CUDA GPU; ignored here")
    if device != "cuda" or spec.name == "tiny":
        comps = {
            name: ComponentPlan(
                device if device == "cuda" else "cpu" if device == "cpu" else "gpu",
                dtype,
                gpu_gb=round(s.gib(dbytes), 3) if device != "cpu" else 0.0,
                host_gb=round(s.gib(dbytes), 3) if device == "cpu" else 0.0,
                reason="small enough to sit whole" if spec.name == "tiny" else "forced to run here",
            )
            for name, s in sizes.items()
        }
        for c in comps.values():
            if c.placement == "cuda":
                c.placement = "gpu"
        weights = sum(s.gib(dbytes) for s in sizes.values())
        host_needed = weights if device == "cpu" else 0.0
        if host_needed > hardware.host_ram_gb:
            raise PlanError(
                f"{spec.name} needs {host_needed:.1f} GiB of RAM on the CPU; this machine has {hardware.host_ram_gb:.1f}"
            )
        if spec.name == "tiny":
            reasons.append("tiny stand-in: the real classes with tiny configs; its images are noise.")

        peak = (
            weights + (_act_gib(w, h, 2) * 0.01 if spec.name == "tiny" else _act_gib(w, h, 1))
            if device != "cpu"
            else 0.0
        )
        return Plan(
            model=spec.name,
            hub_id=spec.hub_id,
            device=device,
            gpu_name=gpu.name if gpu and device == "cuda" else None,
            gpu_memory_gb=gpu.total_memory_gb if gpu and device == "cuda" else None,
            budget_gb=round(_budget(gpu), 2) if gpu and device == "cuda" else None,
            dtype=dtype,
            components=comps,
            attention_backend=cfg.attention_backend or "native",
            compile=bool(cfg.compile),
            cache=cfg.cache,
            tf32=bool(cfg.enable_tf32),
            cudnn_benchmark=bool(cfg.enable_cudnn_benchmark),
            vae_tiling=bool(cfg.enable_vae_tiling),
            vae_slicing=bool(cfg.enable_vae_slicing),
            attention_slicing=bool(cfg.enable_attention_slicing),
            defaults=defaults,
            estimated_peak_gpu_gb=round(peak, 2),
            estimated_host_ram_gb=round(host_needed, 2),
            estimated_s_per_step=None,
            arrangement=f"everything on {device} in {dtype}",
            lossless=True,
            reasons=reasons,
            warnings=warnings,
            overrides=cfg.set_fields(),
            estimated_for=(w, h),
        )

    # ---- a CUDA GPU: cost the arrangements ---------------------------------------------------------
    assert gpu is not None
    budget = _budget(gpu)
    reasons.append(
        f"budget: {budget:.1f} of {gpu.total_memory_gb:.1f} GiB usable "
        f"({RESERVE_GIB:.1f} GiB + {RESERVE_SHARE:.0%} kept for the CUDA context and allocator slack)."
    )
    t_size, e_size, v_size = sizes["transformer"], sizes["text_encoder"], sizes["vae"]
    vae_gb = v_size.gib(dbytes)
    text_gb = e_size.gib(dbytes)
    # The tuned path (on by default) runs true CFG's two passes as one batch: twice the activations.
    act = _act_gib(w, h, batch * (2 if defaults["cfg"] > 1 and cfg.compile is not False else 1))
    vae_tiling = bool(cfg.enable_vae_tiling)
    decode = _vae_gib(w, h, batch, vae_tiling)
    if cfg.enable_vae_tiling is None and decode > 0.25 * budget:
        # Decided before the arrangement: the memory a whole-image decode would take goes to resident blocks.
        vae_tiling = True
        decode = _vae_gib(w, h, batch, True)
        reasons.append(
            f"VAE tiling on: decoding {w}x{h} at once would take {_vae_gib(w, h, batch, False):.1f} GiB, over a "
            "quarter of the budget; tiles take about 0.6."
        )
    flops = transformer_flops(tconf, w, h)
    host_free = hardware.host_ram_gb

    # Text encoder: resident beside everything if it fits, else streamed in while encoding.
    # Transformer: the fastest arrangement that fits what is left.
    # fp8 matmuls (qwennb.speed.FP8Linear) need compute capability 8.9+ (Ada, Hopper, Blackwell) and the tuned
    # path, which compiles; they are lossy, so only asked for or where nothing lossless fits.
    cc = float(gpu.compute_capability or 0)
    fp8_mm_ok = dbytes == 2 and cc >= 8.9 and cfg.compile is not False and cfg.allow_lossy is not False
    if cfg.fp8_matmul and not fp8_mm_ok:
        why = (
            f"compute capability 8.9 or newer (this card: {cc:g})"
            if cc < 8.9
            else "compile (the tuned path) and allow_lossy"
            if dbytes == 2
            else "bf16 weights"
        )
        warnings.append(f"fp8_matmul needs {why}; ignored")

    def pick_transformer(room: float, host_room: float) -> _Candidate | None:
        cands = _transformer_candidates(
            t_size,
            gpu,
            dbytes,
            room,
            flops,
            cfg,
            host_room,
            fp8_mm_ok and cfg.fp8_matmul is not False,
            2 if defaults["cfg"] > 1 else 1,
        )
        cands = [c for c in cands if c.gpu_gb <= room]
        if cfg.fp8_matmul and fp8_mm_ok:
            cands = [c for c in cands if c.fp8_matmul]
        if cfg.quantization:
            cands = [c for c in cands if c.quant == cfg.quantization]
        if cfg.storage_dtype:
            cands = [c for c in cands if c.storage == cfg.storage_dtype and c.quant is None]
        if cfg.transformer_placement:
            cands = [c for c in cands if c.placement == cfg.transformer_placement]
        if not cands:
            return None
        best = min(cands, key=lambda c: c.s_per_forward)
        lossless = [c for c in cands if c.lossless]
        if lossless:
            best_lossless = min(lossless, key=lambda c: c.s_per_forward)
            # Keep exact outputs unless a lossy arrangement is clearly faster.
            if best_lossless.s_per_forward <= LOSSY_MIN_GAIN * best.s_per_forward:
                return best_lossless
        return best

    text_place = cfg.text_encoder_placement
    forced_offload = bool(cfg.enable_cpu_offload) or cfg.transformer_placement == "model_offload"
    options: list[tuple[str, _Candidate, float, float]] = []
    if forced_offload:
        # The original project's enable_cpu_offload: diffusers' model offload of every component.
        t_gb = t_size.gib(dbytes)
        peak = max(text_gb + TEXT_ACT_GIB, t_gb + act, vae_gb + decode)
        tc = _Candidate(
            "model offload",
            "model_offload",
            dtype,
            None,
            t_gb,
            t_gb,
            flops / ((gpu.peak_bf16_tflops or FALLBACK_TFLOPS) * 1e12 * EAGER_EFFICIENCY),
            True,
            reason="moved to the GPU for the denoise and back to the CPU after (enable_cpu_offload)",
        )
        options.append(("model_offload", tc, peak, t_gb + text_gb + vae_gb))
    else:
        for tp in [text_place] if text_place else ["gpu", "group_offload", "cpu"]:
            text_host = {"gpu": 0.0, "group_offload": 2 * text_gb, "model_offload": text_gb, "cpu": text_gb}[
                tp
            ]
            if tp == "gpu":
                text_phase = 0.0
            elif tp == "group_offload":
                # While encoding, the text encoder's layers stream through beside the transformer.
                text_phase = TEXT_STREAM_GIB + TEXT_ACT_GIB
            elif tp == "model_offload":
                text_phase = text_gb + TEXT_ACT_GIB
            else:
                text_phase = 0.0
            room = budget - vae_gb - max(act, decode, text_phase) - (text_gb if tp == "gpu" else 0.0)
            tc = pick_transformer(room, host_free * 0.9 - text_host)
            if tc is None:
                continue
            peak = tc.gpu_gb + vae_gb + max(act, decode, text_phase) + (text_gb if tp == "gpu" else 0.0)
            options.append((tp, tc, peak, tc.host_gb + text_host))
    if not options:
        need = nonblock_min = t_size.gib(1) / t_size.blocks * 3 + vae_gb + max(act, decode)
        del nonblock_min
        raise PlanError(
            f"{spec.name} does not fit {gpu.name} ({gpu.total_memory_gb:.1f} GiB) even streamed: about "
            f"{need:.1f} GiB is needed at {w}x{h}; try a smaller size"
        )
    # The fastest wins: time per step, plus the text encoder's cost once a prompt spread over the steps (a
    # streamed encoder copies its 15 GiB once; one on the CPU computes for seconds). Among equals, the text
    # encoder placement that copies least.
    text_order = {"gpu": 0, "group_offload": 1, "model_offload": 2, "cpu": 3}
    h2d = gpu.host_to_device_gbps or 25.0
    text_flops = 2 * e_size.params * 2 * TEXT_TOKENS  # prompt and negative prompt
    text_cost = {
        "gpu": 0.0,
        "group_offload": text_gb * GIB / (h2d * 1e9),
        "model_offload": text_gb * GIB / (h2d * PAGEABLE_SHARE * 1e9),
        "cpu": text_flops / (CPU_TFLOPS * 1e12),
    }
    passes = 2 if defaults["cfg"] > 1 else 1

    def per_step(o: tuple[str, _Candidate, float, float]) -> float:
        return o[1].s_per_forward * passes + text_cost[o[0]] / defaults["steps"]

    fits_host = [o for o in options if o[3] <= host_free * 0.9] or options
    rank = lambda o: (round(per_step(o), 3), text_order[o[0]])  # noqa: E731
    tp, tc, peak, host = min(fits_host, key=rank)
    lossless_opts = [o for o in fits_host if o[1].lossless]
    if lossless_opts and not cfg.fp8_matmul:
        # As within each text placement: exact outputs unless a lossy arrangement is clearly faster.
        best_exact = min(lossless_opts, key=rank)
        if per_step(best_exact) <= LOSSY_MIN_GAIN * per_step((tp, tc, peak, host)):
            tp, tc, peak, host = best_exact
    # Loading peaks above the steady state: a transformer that is streamed or stored in fp8 passes through host
    # RAM whole in its load dtype before it is cast and pinned (measured on an H100 host: 72.5 GiB at the 24,
    # 16 and 12 GB caps against 69 GiB from this sum), plus about 2 GiB for the Python process itself.
    text_host = 0.0 if tp == "gpu" else text_gb * (2 if tp == "group_offload" else 1)
    staged = tc.placement != "gpu" or tc.storage != dtype
    host = max(host, (t_size.gib(dbytes) if staged else 0.0) + text_host) + PROCESS_HOST_GIB
    if host > host_free * 0.9:
        warnings.append(
            f"this arrangement wants about {host:.0f} GiB of host RAM; the machine has {host_free:.0f} GiB"
        )

    comps: dict[str, ComponentPlan] = {}
    comps["transformer"] = ComponentPlan(
        tc.placement,
        tc.storage,
        tc.quant,
        round(tc.gpu_gb, 2),
        round(tc.host_gb, 2),
        tc.resident_blocks,
        tc.reason,
        tc.low_cpu_mem_usage,
    )
    text_reason = {
        "gpu": "fits beside the transformer: no copies per prompt",
        "group_offload": "streamed onto the GPU only while a prompt is encoded (once a prompt), then leaves room",
        "model_offload": "moved onto the GPU to encode, back to the CPU after",
        "cpu": "encodes on the CPU (slow: seconds a prompt) so the GPU keeps the transformer",
    }
    if forced_offload:
        tp = "model_offload"
    comps["text_encoder"] = ComponentPlan(
        tp,
        dtype,
        gpu_gb=round(text_gb if tp == "gpu" else (TEXT_STREAM_GIB if tp == "group_offload" else 0.0), 2),
        host_gb=round(0.0 if tp == "gpu" else text_gb * (2 if tp == "group_offload" else 1), 2),
        reason=text_reason[tp],
    )
    comps["vae"] = ComponentPlan(
        "gpu" if not forced_offload else "model_offload",
        dtype,
        gpu_gb=round(vae_gb, 2),
        reason="small (0.24 GiB); decodes " + ("in tiles" if vae_tiling else "the whole image at once"),
    )
    if peak > budget and not forced_offload:
        raise PlanError(f"no arrangement of {spec.name} fits {budget:.1f} GiB at {w}x{h}")
    if forced_offload and peak > budget:
        raise PlanError(
            f"model offload needs {peak:.1f} GiB (the whole transformer at once) but the budget is {budget:.1f} GiB; "
            "leave enable_cpu_offload unset so the plan can stream blocks"
        )

    # ---- speed options ------------------------------------------------------------------------------
    all_gpu = tc.placement == "gpu" and tc.quant is None
    attention = cfg.attention_backend or "native"
    if cfg.attention_backend:
        reasons.append(f"attention backend {attention!r} set by the user.")
    else:
        reasons.append(
            "attention: PyTorch SDPA ('native'); it picks the fastest kernel for the card (cuDNN on Hopper), "
            "and diffusers' other backends measured slower on an H100."
        )
    # The tuned path (qwennb.speed) needs the transformer whole on the GPU in its compute dtype, no hooks; or
    # an fp8-matmul arrangement (its FP8Linear layers are the tuned path's), streamed blocks included.
    whole_on_gpu = all_gpu and tc.storage == dtype and device == "cuda"
    fp8_mm = tc.fp8_matmul
    if fp8_mm:
        reasons.append(
            "fp8 matmuls"
            + (" (asked for)" if cfg.fp8_matmul else ": the fastest arrangement that fits")
            + ": the blocks' large Linears hold e4m3 weights with per-channel scales and multiply e4m3 "
            "activations with per-token scales (torch._scaled_mm); the modulation weights are stored in fp8 "
            "too. On an H100 at 1024x1024 with CFG: 0.208 s/step against 0.244 in bf16, and with a 24 GB cap "
            "(streamed blocks) about 0.29-0.30; outputs drift about 3x the rounding floor (relative error of the "
            "final latents 7e-2 after 20 steps)."
        )
    # Default: on where the tuned path applies (the model whole on the GPU, or fp8 matmuls). Measured on an H100
    # (1024x1024, CFG 4): 0.244-0.250 s/step against stock's 0.366-0.370 in the same runs (1.48-1.50x), the
    # first image 17-25 s later (one compile), drift at the rounding floor.
    compile_ = bool(cfg.compile) if cfg.compile is not None else (whole_on_gpu or fp8_mm)
    fast = compile_ and (whole_on_gpu or fp8_mm)
    if cfg.compile is None and not compile_:
        reasons.append(
            "compile off: the transformer is not whole on the GPU, where regional compile is untested with "
            "offloading; turn it on with compile=True."
        )
    elif compile_ and not (all_gpu or fp8_mm):
        warnings.append("compile with offloading or quantisation is untested; it may recompile or fall back")
    if fast:
        reasons.append(
            "compile "
            + ("(default)" if cfg.compile is None else "(asked for)")
            + ": qwennb's tuned path (regional compile of one block function shared by all blocks, RoPE in "
            "real arithmetic, GELU in the matmul epilogue, modulation once per image, CFG's two passes as one "
            "batch); same math as stock, drift at the rounding floor. On an H100 at 1024x1024 with CFG: "
            "0.244-0.250 s/step against 0.366-0.370 for stock diffusers in the same runs (1.48-1.50x) and "
            "0.278-0.284 for stock plus compile_repeated_blocks; the first image of a session costs 17-25 s more "
            "(one compile), a few seconds in later sessions (cached). compile=False turns it off."
        )
    tf32 = True if cfg.enable_tf32 is None else cfg.enable_tf32
    cudnn = True if cfg.enable_cudnn_benchmark is None else cfg.enable_cudnn_benchmark
    if cfg.enable_attention_slicing:
        warnings.append(
            "attention slicing does not apply to Qwen-Image's transformer (SDPA is already memory-efficient); ignored"
        )
    if cfg.cache:
        warnings.append(f"cache {cfg.cache!r} reuses work between steps: faster, but outputs change")

    lossless = tc.lossless and not cfg.cache and not fp8_mm
    passes = 2 if defaults["cfg"] > 1 else 1
    s_fwd = tc.s_per_forward * (EAGER_EFFICIENCY / FAST_EFFICIENCY if fast and not tc.tuned else 1.0)
    s_step = s_fwd * passes if gpu.peak_bf16_tflops else None
    desc = tc.name
    text_short = {
        "gpu": "text encoder on GPU",
        "group_offload": "text encoder streamed",
        "model_offload": "text encoder offloaded",
        "cpu": "text encoder on CPU",
    }[comps["text_encoder"].placement]
    arrangement = f"transformer {desc}, {text_short}" + (", VAE tiled" if vae_tiling else "")
    if tc.placement == "gpu" and tc.quant is None and tc.lossless and tp == "gpu":
        reasons.append(
            f"everything fits on the GPU in {dtype} ({peak:.1f} of {budget:.1f} GiB): no memory savers, nothing copied per step."
        )
    else:
        reasons.append(f"transformer: {tc.name}: {tc.reason}.")
        reasons.append(f"text encoder: {comps['text_encoder'].reason}.")
        if not tc.lossless:
            reasons.append(
                "this storage rounds the weights: outputs differ slightly from bf16 (allow_lossy=False refuses it)."
            )
    whole = flops / (
        (gpu.peak_bf16_tflops or FALLBACK_TFLOPS) * 1e12 * (FAST_EFFICIENCY if fast else EAGER_EFFICIENCY)
    )
    if s_fwd > 1.05 * whole:
        reasons.append(f"cost: about {s_fwd / whole:.1f}x the time per step of the model held whole in bf16.")
    return Plan(
        model=spec.name,
        hub_id=spec.hub_id,
        device="cuda",
        gpu_name=gpu.name,
        gpu_memory_gb=gpu.total_memory_gb,
        budget_gb=round(budget, 2),
        dtype=dtype,
        components=comps,
        attention_backend=attention,
        compile=compile_,
        cache=cfg.cache,
        tf32=tf32,
        cudnn_benchmark=cudnn,
        vae_tiling=vae_tiling,
        vae_slicing=bool(cfg.enable_vae_slicing),
        attention_slicing=False,
        defaults=defaults,
        estimated_peak_gpu_gb=round(peak, 2),
        estimated_host_ram_gb=round(host, 2),
        estimated_s_per_step=round(s_step, 3) if s_step is not None else None,
        arrangement=arrangement,
        lossless=lossless,
        reasons=reasons,
        warnings=warnings,
        overrides=cfg.set_fields(),
        estimated_for=(w, h),
        fast_path=fast,
        fp8_matmul=fp8_mm,
    )


def _phase_peak(plan: Plan, width: int, height: int, batch: int) -> float:
    """What the plan's components hold on the GPU at the highest point of a generation at this size."""
    comps = plan.components
    t, te, vae = comps["transformer"], comps["text_encoder"], comps["vae"]
    act = _act_gib(width, height, batch * (2 if plan.fast_path else 1))  # CFG batched on the tuned path
    decode = _vae_gib(width, height, batch, plan.vae_tiling)
    if t.placement == "model_offload":  # one component on the GPU at a time
        return max(te.host_gb + TEXT_ACT_GIB, t.gpu_gb + act, vae.gpu_gb + decode)
    text_phase = {
        "group_offload": TEXT_STREAM_GIB + TEXT_ACT_GIB,
        "model_offload": te.host_gb + TEXT_ACT_GIB,
    }.get(te.placement, 0.0)
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
