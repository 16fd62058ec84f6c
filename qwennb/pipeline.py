"""Turn a plan into a loaded diffusers ``QwenImagePipeline``, and read back what is really active.

Every memory and speed choice is applied with diffusers' own mechanisms: ``enable_layerwise_casting``
(fp8 storage), ``enable_group_offload`` / ``apply_group_offloading`` (streams), ``enable_model_cpu_offload``,
``enable_sequential_cpu_offload``, ``set_attention_backend``, ``compile_repeated_blocks``, VAE tiling and
slicing.

Example:
    >>> from qwennb.hardware import detect
    >>> from qwennb.plan import make_plan
    >>> from qwennb.pipeline import build, validate_optimization
    >>> pipe = build(make_plan(detect(), "tiny"))
    >>> validate_optimization(pipe)["components"]["transformer"]["device"]
    'cpu'
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import LoadError, UnknownModelError
from .models import TOY_MODEL_DIR, find_local_models, get_model, inspect_folder
from .plan import MMDIT_CLASSES, Plan, plan_sizes

log = logging.getLogger("qwennb")

TOY_NOTICE = (
    "No Qwen-Image weights found: using the embedded toy model (Qwen-Image's classes at a small size, trained "
    "on a toy world of one flat shape on a plain background; not Qwen-Image). It draws the colour, shape, "
    "position and background a prompt names, in its own words or yours. "
    "Run `qwennb download --model qwen-image` or set QWENNB_MODEL to a model folder for the real model."
)


# Complete local snapshots loaded when no model is named, newest first.
DEFAULT_MODELS = ("qwen-image-2512", "qwen-image")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_model(name: str | None = None, folder: str | None = None) -> tuple[str, str | None, str | None]:
    """Which model to load: ``(registry name, local path or None, notice or None)``.

    Order: ``name`` (a registry name, hub id or folder), the ``QWENNB_MODEL`` environment variable, a
    complete Qwen-Image-2512 or Qwen-Image snapshot on disk (the Hugging Face cache or ``folder``), else
    the embedded ``toy`` model (a folder in the package) with a notice.

    Example:
        >>> resolve_model("tiny")
        ('tiny', None, None)
        >>> resolve_model("toy")[0], resolve_model("toy")[1].endswith("toy_model")
        ('toy', True)
    """
    name = name or os.environ.get("QWENNB_MODEL") or None
    if name:
        if os.path.isdir(name) and Path(name).resolve() == Path(TOY_MODEL_DIR):
            return "toy", TOY_MODEL_DIR, None
        if os.path.isdir(name):
            local = inspect_folder(name)
            if local.architecture != "MMDiT":
                raise LoadError(
                    f"{name} holds no diffusers MMDiT pipeline (architecture {local.architecture})"
                )
            if not local.complete:
                raise LoadError(
                    f"{name} is incomplete (missing {', '.join(local.missing[:3])}); complete it with `qwennb download`"
                )
            try:
                reg = get_model(local.name).name
            except UnknownModelError:
                reg = "qwen-image"
            return reg, str(Path(name).resolve()), None
        spec = get_model(name)
        if spec.stand_in:
            return spec.name, None, None
        if spec.name == "toy":
            return "toy", TOY_MODEL_DIR, None
        if spec.name == "toy-edit":  # assembled from the package's files (qwennb.toy_edit)
            return "toy-edit", None, None
        for m in find_local_models(folder):
            if m.hub_id == spec.hub_id or m.name == spec.name:
                if not m.complete:
                    raise LoadError(
                        f"the local {spec.name} snapshot is incomplete (missing {', '.join(m.missing[:3])}); "
                        f"run `qwennb download --model {spec.name}` to complete it"
                    )
                return spec.name, m.path, None
        if offline():
            raise LoadError(
                f"{spec.hub_id} is not in the local cache and the hub is offline; run `qwennb download --model {spec.name}` where the hub is reachable"
            )
        return spec.name, None, None  # from_pretrained fetches it
    found = {m.name: m for m in find_local_models(folder) if m.complete}
    for default in DEFAULT_MODELS:
        if default in found:
            return default, found[default].path, None
    return "toy", TOY_MODEL_DIR, TOY_NOTICE


def _load_pretrained(plan: Plan, path: str | None, loras: list[tuple[str, float]] | None = None) -> Any:
    import diffusers
    import torch

    spec = get_model(plan.model)
    # Edit models load into their own pipelines (which also read the processor folder); Qwen-Image-Edit's
    # weights would load into the text-to-image pipeline too (same transformer class), without the processor.
    # Qwen-Image-2.1 has its own pipeline class too.
    own_class = spec.task == "image-edit" or spec.pipeline_class == "QwenImage21Pipeline"
    cls = getattr(diffusers, spec.pipeline_class if own_class else "QwenImagePipeline")
    source = path or spec.hub_id
    if source is None:
        raise LoadError(f"{plan.model} has no weights to load")
    kwargs: dict[str, Any] = {
        # `dtype`, not the deprecated `torch_dtype` (diffusers >= 0.42 takes both and warns about the latter)
        "dtype": _torch_dtype(plan.dtype),
        "use_safetensors": True,
        "local_files_only": path is not None or offline(),
    }
    t = plan.components["transformer"]
    if t.quantization:
        from diffusers.quantizers import PipelineQuantizationConfig

        backend_kwargs = (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
            if t.quantization == "nf4"
            else {"load_in_8bit": True}
        )
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit" if t.quantization == "nf4" else "bitsandbytes_8bit",
            quant_kwargs=backend_kwargs,
            components_to_quantize=["transformer"],
        )
    if _stored_form(plan) and not t.quantization:
        # Straight into the stored form: read block by block, quantised to fp8 on the GPU, never a bf16 copy of
        # the whole transformer in host RAM (qwennb.loading).
        from .loading import load_transformer

        folder = path or _snapshot(source, "transformer/*", kwargs["local_files_only"])
        fp8 = t.storage_dtype == "float8_e4m3fn" and bool(getattr(plan, "fp8_matmul", False))
        layerwise = t.storage_dtype == "float8_e4m3fn" and not fp8
        cuda = torch.device("cuda") if torch.cuda.is_available() else None
        kwargs["transformer"] = load_transformer(
            folder,
            kwargs["dtype"],
            fp8=fp8,
            quantize_on=cuda,
            layerwise_fp8=layerwise,
            device=cuda if t.placement == "gpu" and cuda is not None else "cpu",
            gpu_blocks=_gpu_blocks(plan),
            # an fp8 plan's LoRAs are fused into each block before it is quantised
            read_loras=_lora_reader(loras) if loras and lora_needs_fusing(plan) else None,
        )
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"could not load {source}: {first}") from exc


def _lora_reader(loras: list[tuple[str, float]]) -> Any:
    """``read_loras`` for :func:`qwennb.loading.load_transformer`: the LoRAs read and checked against its model."""
    from .lora import read_for_fusing

    return lambda model: read_for_fusing(list(loras), model)


def _stored_form(plan: Plan) -> bool:
    """True when the plan keeps the transformer off the GPU in part, or in fp8 matmul form: then it is loaded
    block by block into that form (host RAM holds only what stays there)."""
    t = plan.components["transformer"]
    stored = t.storage_dtype != plan.dtype and not t.quantization
    # qwennb.loading reads Qwen-Image's MMDiT block by block; another family (2.1) loads whole on the host, and
    # apply_plan casts or offloads it there
    mmdit = plan_sizes(plan)["transformer"].class_name in MMDIT_CLASSES
    return plan.device == "cuda" and mmdit and (stored or t.placement == "group_offload")


def _gpu_blocks(plan: Plan) -> set[int]:
    """The transformer blocks a group-offload plan keeps on the GPU (loaded there directly)."""
    t = plan.components["transformer"]
    if t.placement != "group_offload":
        return set()
    sizes = plan_sizes(plan)  # a folder: its own
    return set(resident_block_indices(sizes["transformer"].blocks, t.resident_blocks or 0))


def _snapshot(repo_id: str, pattern: str, local_only: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id, allow_patterns=[pattern, "model_index.json"], local_files_only=local_only
    )


def _build_stand_in(plan: Plan) -> Any:
    import torch

    from . import stand_ins

    dtype = _torch_dtype(plan.dtype)
    if get_model(plan.model).pipeline_class == "QwenImage21Pipeline":
        from . import stand_ins21

        if plan.model == "tiny-2.1":
            return stand_ins21.build_tiny21_pipeline(
                device="cuda" if plan.device == "cuda" else "cpu", dtype=dtype
            )
        # drawn where the plan keeps it, except what it stores in another dtype (fp8 storage: cast on the host
        # by apply_plan, then moved; drawn in bf16 on a capped GPU it would not fit there)
        on_gpu = {
            n: c.placement == "gpu" and plan.device == "cuda" and c.storage_dtype == plan.dtype
            for n, c in plan.components.items()
        }
        return stand_ins21.build_synthetic21_pipeline(
            device={n: "cuda" if g else "cpu" for n, g in on_gpu.items()}, dtype=dtype
        )
    if plan.model in ("tiny", "tiny-edit"):
        device = "cuda" if plan.device == "cuda" else "cpu"
        build = stand_ins.build_tiny_pipeline if plan.model == "tiny" else stand_ins.build_tiny_edit_pipeline
        pipe = build(seed=0, device=device, dtype=dtype)
        if plan.components["transformer"].placement not in ("gpu", "cpu"):  # offloaded: apply_plan moves it
            pipe.transformer.to("cpu")
        return pipe
    # Synthetic: materialise each component where the plan keeps it, never a full host copy of the rest.
    devices = {}
    for name, comp in plan.components.items():
        on_gpu = plan.device == "cuda" and comp.placement == "gpu" and comp.storage_dtype == plan.dtype
        devices[name] = torch.device("cuda") if on_gpu else torch.device("cpu")
    spec = get_model(plan.model)
    transformer = None
    if _stored_form(plan):
        # block by block into the stored form, as real weights load (qwennb.loading): edit models too (the same
        # transformer class); drawn whole in bf16 first, a 24 GB fp8 edit plan held 54.6 GB of host RAM (round 13)
        from .loading import build_synthetic_transformer

        t = plan.components["transformer"]
        fp8 = t.storage_dtype == "float8_e4m3fn" and bool(getattr(plan, "fp8_matmul", False))
        layerwise = t.storage_dtype == "float8_e4m3fn" and not fp8
        transformer = build_synthetic_transformer(
            spec.config_dir,
            dtype=dtype,
            fp8=fp8,
            device="cuda" if t.placement == "gpu" else "cpu",
            layerwise_fp8=layerwise,
            gpu_blocks=_gpu_blocks(plan),
        )
    if spec.task == "image-edit":
        return stand_ins.build_synthetic_edit_pipeline(
            device=devices, dtype=dtype, config_dir=spec.config_dir, transformer=transformer
        )
    return stand_ins.build_synthetic_pipeline(
        device=devices, dtype=dtype, config_dir=spec.config_dir, transformer=transformer
    )


def _apply_vae_plan(pipe: Any, plan: Plan) -> None:
    """VAE tiling and slicing as planned, and (where measured faster: :func:`qwennb.vae.image_convolutions_measured`)
    its causal 3D convolutions run as 2D ones on single images: exact up to float order (at bf16's rounding floor
    on an H200); an image decodes 4x faster on a CPU and 1.6x on an H200 untiled, tiled no faster there."""
    from .vae import image_convolutions_measured, use_image_convolutions

    if plan.vae_tiling:
        pipe.vae.enable_tiling()
    if plan.vae_slicing:
        pipe.vae.enable_slicing()
    if image_convolutions_measured(plan.device, tiled=plan.vae_tiling):
        use_image_convolutions(pipe.vae)


def apply_plan(pipe: Any, plan: Plan) -> Any:
    """Apply a plan's placement and speed options to a pipeline whose weights are loaded (on any device). Off
    CUDA the pipeline moves to the plan's device and takes what runs there: group offload of the transformer
    (no streams), a step cache, an attention backend and the VAE's options (tiling, slicing, the 2D path for single
    images: :mod:`qwennb.vae`); on CUDA the VAE takes the same options."""
    import torch

    dtype = _torch_dtype(plan.dtype)
    if plan.device != "cuda":
        pipe.to(plan.device)
        t = plan.components["transformer"]
        # diffusers' group offload hooks onto the CPU, without streams (a small model's plan)
        if t.placement == "group_offload":
            group_offload_with_resident_blocks(
                pipe.transformer,
                t.resident_blocks or 0,
                torch.device(plan.device),
                low_cpu_mem_usage=True,
                use_stream=False,
            )
        _apply_vae_plan(pipe, plan)
        if plan.attention_backend and plan.attention_backend != "native":
            pipe.transformer.set_attention_backend(plan.attention_backend)
        if plan.cache:
            from .speed import apply_cache

            apply_cache(pipe.transformer, plan.cache)
        return pipe
    cuda = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = plan.tf32
    torch.backends.cudnn.allow_tf32 = plan.tf32
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    apply_attention_plan(plan)  # before anything is compiled: SDPA's kernel is fixed when a graph is traced

    t, te = plan.components["transformer"], plan.components["text_encoder"]
    # The tuned path and its fp8 layers are written for Qwen-Image's MMDiT (Qwen-Image-Edit-2511's zero_cond_t
    # included). Qwen-Image-2.1 takes diffusers' regional compile (its prefill step runs stock) and, whole on the GPU
    # in bf16, its own tuned path for the cached steps (qwennb.speed21); layerwise fp8 storage otherwise.
    mmdit = type(pipe.transformer).__name__ in MMDIT_CLASSES
    fp8_mm = bool(getattr(plan, "fp8_matmul", False)) and t.storage_dtype == "float8_e4m3fn" and mmdit
    fast = bool(plan.compile and getattr(plan, "fast_path", False)) and mmdit
    # Exact against stock on the CPU; on an H200 (2026-12-01, benchmarks/results/speed21-nvidia-h200.json, four
    # runs) 1.285-1.292x stock's s/step (stock + regional compile: 1.22-1.23x), its final latents as far from
    # stock's as compile alone puts them (12.7% against 12.9%: random weights amplify rounding over 20 steps).
    # On by default; QWENNB_TUNED_21=0 turns it off.
    fast21 = (
        os.environ.get("QWENNB_TUNED_21", "1") != "0"
        and bool(plan.compile and getattr(plan, "fast_path", False))
        and type(pipe.transformer).__name__ == "QwenImage21Transformer2DModel"
        and t.placement == "gpu"
        and not t.quantization
        and t.storage_dtype != "float8_e4m3fn"
    )
    if fast:
        # The tuned path (same math; it compiles its block function) goes on before any offload hooks. With fp8
        # matmuls its FP8Linear layers replace the bf16 Linears, quantised on the GPU a layer at a time, so a
        # transformer held in host RAM never needs a bf16 copy on the card.
        from .speed import enable_fast_path

        enable_fast_path(
            pipe.transformer,
            compile=True,
            fp8="replace" if fp8_mm else False,
            quantize_on=cuda if fp8_mm else None,
            scheduler=pipe.scheduler,
            # experimental: torch.compile's mode for the block function ("reduce-overhead": CUDA graphs), for
            # benchmarks/multigpu.py --cudagraphs; unset (the default) is torch.compile's default mode
            mode=os.environ.get("QWENNB_COMPILE_MODE") or None,
        )
    if t.placement == "model_offload":
        pipe.enable_model_cpu_offload()
    elif t.placement == "sequential_offload":
        pipe.enable_sequential_cpu_offload()
    else:
        if t.storage_dtype == "float8_e4m3fn" and not t.quantization and not fp8_mm:
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        if t.placement == "group_offload":
            group_offload_with_resident_blocks(
                pipe.transformer, t.resident_blocks or 0, cuda, low_cpu_mem_usage=t.low_cpu_mem_usage
            )
        elif not t.quantization:
            pipe.transformer.to(cuda)
        pipe.vae.to(cuda)
        if pipe.text_encoder is not None:
            if te.placement == "gpu":
                pipe.text_encoder.to(cuda)
            elif te.placement in ("group_offload", "model_offload"):
                from diffusers.hooks import apply_group_offloading

                from .loading import pin_in_place

                pipe.text_encoder.to("cpu")
                # Each leaf's weights are page-locked where they lie; diffusers then uses them as they are
                # (low_cpu_mem_usage: no pinned second copy of the 15 GiB encoder).
                pin_in_place(
                    [m for m in pipe.text_encoder.modules() if next(m.parameters(False), None) is not None]
                )
                apply_group_offloading(
                    pipe.text_encoder,
                    onload_device=cuda,
                    offload_type="leaf_level",
                    use_stream=True,
                    low_cpu_mem_usage=True,
                )
            else:  # cpu: encodes there; qwennb.generate moves the embeddings to the GPU
                pipe.text_encoder.to("cpu")
    _apply_vae_plan(pipe, plan)
    if plan.attention_backend and plan.attention_backend != "native":
        pipe.transformer.set_attention_backend(plan.attention_backend)
    if plan.compile and not fast:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    if fast21:
        from .speed21 import enable_fast_path_21

        enable_fast_path_21(pipe.transformer, compile=True)
    if plan.cache:
        from .speed import apply_cache  # after the tuned path: its hooks wrap the compiled blocks

        apply_cache(pipe.transformer, plan.cache)
    return pipe


def is_hooked(module: Any) -> bool:
    """True when diffusers or accelerate hooks move this module's weights (offloading, group offload...)."""
    for m in module.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and getattr(reg, "hooks", None):
            return True
        if getattr(m, "_hf_hook", None) is not None:
            return True
    return False


def input_device(model: Any, pipe: Any = None) -> Any:
    """Where a module's inputs must go: the pipeline's execution device when hooks move the module, else the
    device of its own parameters."""
    import torch

    if is_hooked(model):
        if pipe is not None:
            return pipe._execution_device
        for m in model.modules():
            dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if dev is not None:
                return torch.device(dev)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resident_block_indices(n_blocks: int, resident: int) -> list[int]:
    """Which of ``n_blocks`` stay on the GPU when ``resident`` of them fit: spread evenly, so that every streamed
    block is computed between resident ones and its copy overlaps their compute.

    Example:
        >>> resident_block_indices(10, 5)
        [0, 2, 4, 6, 8]
        >>> resident_block_indices(6, 0), resident_block_indices(3, 5)
        ([], [0, 1, 2])
    """
    resident = max(0, min(n_blocks, resident))
    if resident == 0:
        return []
    step = n_blocks / resident
    return sorted({min(n_blocks - 1, int(i * step)) for i in range(resident)})


def group_offload_with_resident_blocks(
    transformer: Any, resident: int, device: Any, low_cpu_mem_usage: bool = False, use_stream: bool = True
) -> list[int]:
    """diffusers' block-level group offload with CUDA streams, keeping ``resident`` blocks on the GPU.

    Group offload is applied with the resident blocks out of the list (an empty placeholder takes each one's
    place, so diffusers never copies them to the host), so diffusers' stream prefetching and its lazy
    execution-order tracing are used unchanged on the streamed ones; the resident blocks come back without hooks
    and go to the GPU for good (they may already be there: the loader puts them there). The prefetch chain only
    links the blocks that still stream, so each copy starts a resident block earlier. Streamed blocks are pinned
    in place first (:func:`qwennb.loading.pin_in_place`) unless ``low_cpu_mem_usage``. ``use_stream=False`` (a CPU
    onload device, where there are no CUDA streams) onloads each block synchronously. Returns the resident
    indices.
    """
    import torch
    from diffusers.hooks import HookRegistry

    from .loading import pin_in_place

    blocks = transformer.transformer_blocks
    keep = resident_block_indices(len(blocks), resident)
    if not low_cpu_mem_usage:
        # The streamed blocks are page-locked where they lie; diffusers' group offload (told low_cpu_mem_usage, so
        # it makes no pinned copies of its own) finds them pinned and copies them asynchronously.
        pin_in_place([b for i, b in enumerate(blocks) if i not in set(keep)])
    resident_blocks = {i: blocks[i] for i in keep}
    for i in keep:
        blocks[i] = torch.nn.Module()
    transformer.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=use_stream,
        low_cpu_mem_usage=True,
    )
    # The lazy prefetch hook listed the placeholders among the layers whose execution it traces: forget them.
    lazy = HookRegistry.check_if_exists_or_initialize(transformer).get_hook("lazy_prefetch_group_offloading")
    for i in keep:
        blocks[i] = resident_blocks[i]
        if lazy is not None:
            lazy._layer_execution_tracker_module_names.discard(f"transformer_blocks.{i}")
        blocks[i].to(device)
    return keep


def apply_attention_plan(plan: Plan) -> bool:
    """Turn FlashAttention-4 on when the plan chose it (``plan.flash4``); returns whether it is on.

    A failure (the plan saw flash-attn-4 installed, but it does not load) is a warning, not a failed load: attention
    then stays on SDPA's own kernel.

    Example:
        >>> from qwennb.plan import describe_machine, make_plan
        >>> apply_attention_plan(make_plan(describe_machine(host_ram_gb=8), "tiny"))
        False
    """
    if not getattr(plan, "flash4", False):
        return False
    from .attention import enable_flash4

    try:
        enable_flash4()
    except Exception as exc:  # noqa: BLE001 - a broken install of an optional kernel must not stop the load
        warnings.warn(
            f"FlashAttention-4 could not be turned on ({exc}); attention stays on SDPA's own kernel",
            stacklevel=2,
        )
        return False
    return True


def build(plan: Plan, path: str | None = None, loras: list[tuple[str, float]] | None = None) -> Any:
    """Load the pipeline a plan describes and apply the plan; returns a ``QwenImagePipeline``.

    ``path`` is a local snapshot (from :func:`resolve_model`); without it real models come from the
    Hugging Face cache or hub. The plan, the model name and the load time are attached to the pipeline
    (``pipe.qwennb``) so that generation and ``validate_optimization`` can report them.

    ``loras`` (``(source, scale)`` pairs) go on with the weights: fused into the bf16 weights before an fp8
    plan quantises them (a LoRA beside fp8 weights gives grid artifacts), as PEFT layers otherwise.

    Example:
        >>> from qwennb.plan import make_plan, describe_machine
        >>> pipe = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
        >>> type(pipe).__name__
        'QwenImagePipeline'
    """
    t0 = time.perf_counter()
    spec = get_model(plan.model)
    if path is None and spec.name == "toy":  # its weights ship in the package: no hub id to fetch them from
        path = TOY_MODEL_DIR
    if spec.name == "toy-edit" and path is None:  # the toy model's parts with the shipped edit transformer
        from .toy_edit import assemble_toy_edit

        pipe = assemble_toy_edit(dtype=_torch_dtype(plan.dtype))
    else:
        pipe = _build_stand_in(plan) if spec.stand_in else _load_pretrained(plan, path, loras)
    # an fp8 plan's LoRAs: fused into each block while it loads into fp8 on a GPU (qwennb.loading), else here
    fused_at_load = getattr(pipe.transformer, "_qwennb_fused_loras", None)
    fused: dict[str, Any] = {}
    if fused_at_load:
        fused = {i.name: i for i in fused_at_load}
    elif loras and lora_needs_fusing(plan):
        from .lora import fuse_before_quantising

        fused = {i.name: i for i in fuse_before_quantising(pipe, list(loras))}
    apply_plan(pipe, plan)
    pipe.set_progress_bar_config(disable=True)
    pipe.qwennb = {"model": plan.model, "path": path, "plan": plan, "load_s": time.perf_counter() - t0}
    if fused:
        pipe.qwennb["loras"] = fused
    elif loras:
        from .lora import add

        for source, scale in loras:
            add(pipe, source, scale)
        pipe.qwennb["load_s"] = time.perf_counter() - t0
    return pipe


def lora_needs_fusing(plan: Plan) -> bool:
    """True when the plan stores the transformer in fp8 (layerwise casting or fp8 matmuls): LoRAs must then be
    fused into the bf16 weights before quantising, and changing them means reloading."""
    t = plan.components["transformer"]
    return t.storage_dtype == "float8_e4m3fn" and not t.quantization


def _module_report(module: Any) -> dict[str, Any]:
    from collections import Counter

    devices: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for p in module.parameters():
        devices[str(p.device.type)] += p.numel()
        dtypes[str(p.dtype).replace("torch.", "")] += p.numel()
    names: set[str] = set()
    for m in module.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None:
            names.update(getattr(reg, "hooks", {}).keys())
        if getattr(m, "_hf_hook", None) is not None:
            names.add("accelerate_offload")
    hooks = sorted(names)
    return {
        "device": devices.most_common(1)[0][0] if devices else "none",
        "devices": dict(devices),
        "storage_dtype": dtypes.most_common(1)[0][0] if dtypes else "none",
        "hooks": hooks,
        "params": sum(devices.values()),
    }


def validate_optimization(pipe: Any) -> dict[str, Any]:
    """What is really active on a loaded pipeline, read back from its modules (not from the plan).

    Returns per component the device holding most parameters, the storage dtype, and the diffusers or
    accelerate hooks installed (group offloading, layerwise casting, offload); plus the attention
    backend, whether the repeated blocks are compiled, VAE tiling/slicing, how many VAE convolutions take the 2D
    path for single images (:mod:`qwennb.vae`) and the TF32/cuDNN flags.
    """
    import torch

    out: dict[str, Any] = {"components": {}}
    for name in ("transformer", "text_encoder", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            out["components"][name] = _module_report(module)
    tr = pipe.transformer
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        global_backend = str(_AttentionBackendRegistry.get_active_backend()[0].value)
    except Exception:  # noqa: BLE001 - private API: report what we can
        global_backend = "unknown"
    backends = set()
    for m in tr.modules():
        proc = getattr(m, "processor", None)
        if proc is not None and hasattr(proc, "_attention_backend"):
            backends.add(
                str(getattr(proc._attention_backend, "value", proc._attention_backend) or global_backend)
            )
    out["attention_backend"] = ",".join(sorted(backends)) or global_backend
    from .attention import flash4_active

    if flash4_active():
        out["attention_backend"] += " (FlashAttention-4)"
    blocks = getattr(tr, "transformer_blocks", [])
    out["compiled_blocks"] = sum(1 for b in blocks if getattr(b, "_compiled_call_impl", None) is not None)
    from .speed import is_fast

    out["fast_path"] = bool(is_fast(tr))
    if out["fast_path"]:  # the tuned path compiles one shared block function instead of each block
        out["compiled_blocks"] = len(blocks)
    out["vae_tiling"] = bool(getattr(pipe.vae, "use_tiling", False))
    out["vae_slicing"] = bool(getattr(pipe.vae, "use_slicing", False))
    from .vae import image_convolutions

    out["vae_image_convolutions"] = image_convolutions(pipe.vae)
    out["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    out["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    info = getattr(pipe, "qwennb", {})
    out["model"] = info.get("model")
    plan = info.get("plan")
    if plan is not None:
        mismatches = []
        for name, comp in plan.components.items():
            got = out["components"].get(name)
            if got is None:
                continue
            want_hook = {
                "group_offload": "group_offloading",
                "model_offload": "accelerate_offload",
                "sequential_offload": "accelerate_offload",
            }.get(comp.placement)
            if want_hook and want_hook not in got["hooks"]:
                mismatches.append(f"{name}: plan says {comp.placement} but no {want_hook} hook is installed")
            if (
                comp.placement == "gpu"
                and plan.device == "cuda"
                and got["device"] != "cuda"
                and not comp.quantization
            ):
                mismatches.append(f"{name}: plan says gpu but its weights are on {got['device']}")
            fp8_layers = got["storage_dtype"] == "float8_e4m3fn"  # FP8Linear weights (fp8 matmuls)
            if (
                comp.storage_dtype == "float8_e4m3fn"
                and "layerwise_casting" not in got["hooks"]
                and not fp8_layers
            ):
                mismatches.append(
                    f"{name}: plan says fp8 storage but neither layerwise casting nor fp8 layers are active"
                )
        out["matches_plan"] = not mismatches
        out["mismatches"] = mismatches
    return out
