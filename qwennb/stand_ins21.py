"""Stand-ins for Qwen-Image-2.1 (``QwenImage21Pipeline``): its real classes with tiny configs or its real configs
with random weights, built in code like :mod:`qwennb.stand_ins` does for Qwen-Image.

The pipeline's processor is transformers' ``Qwen3VLProcessor`` where it can be built (it needs torchvision for
its video half); otherwise :class:`TextProcessor`, which does what text-to-image asks of it (tokenise the
template with left padding, apply a chat template, expose the tokenizer) and refuses images.

Example:
    >>> pipe = build_tiny21_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, type(pipe.text_encoder).__name__
    ('QwenImage21Pipeline', 'QwenImage21Transformer2DModel', 'Qwen3VLForConditionalGeneration')
    >>> g = torch.Generator().manual_seed(1)
    >>> pipe("a red car", height=64, width=64, num_inference_steps=2, generator=g).images[0].size
    (64, 64)
"""

from __future__ import annotations

from typing import Any

import torch

from .stand_ins import (
    CHATML_TEMPLATE,
    _cpu_generator,
    _synthetic_init,
    _tiny_init,
    build_tiny_tokenizer,
    load_component_config,
    materialize_,
)


class TextProcessor:
    """A text-only stand-in for ``Qwen3VLProcessor`` built on a tokenizer (no torchvision needed)."""

    def __init__(self, tokenizer: Any, chat_template: str = CHATML_TEMPLATE) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def __call__(self, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        if images is not None:
            raise ValueError(
                "this stand-in processor has no image half (install torchvision for Qwen3VLProcessor)"
            )
        return self.tokenizer(text, **kwargs)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        out = self.tokenizer.apply_chat_template(conversation, **kwargs)
        # A processor answers in batches (one list of ids per conversation), as Qwen3VLProcessor does.
        if isinstance(out, list) and out and isinstance(out[0], int):
            return [out]
        return out


def _processor(tokenizer: Any) -> Any:
    import transformers

    try:
        from .stand_ins import qwen2vl_image_processor

        return transformers.Qwen3VLProcessor(
            image_processor=qwen2vl_image_processor(patch_size=16),
            tokenizer=tokenizer,
            video_processor=transformers.Qwen3VLVideoProcessor(),
            chat_template=CHATML_TEMPLATE,
        )
    except Exception:  # noqa: BLE001 - no torchvision: the text-only processor
        return TextProcessor(tokenizer)


def _empty21(config_dir: str) -> tuple[Any, Any, Any]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        transformer = QwenImage21Transformer2DModel.from_config(
            load_component_config(config_dir, "transformer")
        )
        vae = AutoencoderKLQwenImage21.from_config(load_component_config(config_dir, "vae"))
        te_cfg = dict(load_component_config(config_dir, "text_encoder"))
        te_cfg.pop("architectures", None)
        te_cfg.pop("model_type", None)
        text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**te_cfg))
    return transformer, vae, text_encoder


def _assemble21(config_dir: str, transformer: Any, vae: Any, text_encoder: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    for m in (transformer, vae, text_encoder):
        m.eval()
        m.requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(load_component_config(config_dir, "scheduler"))
    return QwenImage21Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        processor=_processor(build_tiny_tokenizer()),
        transformer=transformer,
    )


def build_tiny21_pipeline(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """A tiny ``QwenImage21Pipeline`` from ``configs/tiny-2.1`` with seeded random weights (images are noise)."""
    transformer, vae, text_encoder = _empty21("tiny-2.1")
    base = 3 * int(seed)
    for offset, model in enumerate((transformer, vae, text_encoder)):
        materialize_(model, device=device, dtype=dtype, init=_tiny_init(_cpu_generator(base + offset)))
    return _assemble21("tiny-2.1", transformer, vae, text_encoder)


def build_synthetic21_pipeline(
    device: str | torch.device | dict[str, str | torch.device] = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    config_dir: str = "qwen-image-2.1",
    seed: int = 0,
    std: float = 0.02,
) -> Any:
    """Qwen-Image-2.1's real configs with random weights allocated straight on ``device`` (speed and memory).

    Example:
        >>> pipe = build_synthetic21_pipeline("cuda")  # doctest: +SKIP
    """
    transformer, vae, text_encoder = _empty21(config_dir)
    devices = (
        device if isinstance(device, dict) else dict.fromkeys(("transformer", "vae", "text_encoder"), device)
    )
    generators: dict[torch.device, torch.Generator] = {}
    for name, model in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        dev = torch.device(devices.get(name, "cpu"))
        materialize_(model, device=dev, dtype=dtype, init=_synthetic_init(dev, generators, seed, std))
    return _assemble21(config_dir, transformer, vae, text_encoder)
