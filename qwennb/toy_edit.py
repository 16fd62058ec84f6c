"""The toy edit model (``toy-edit``): the embedded toy model taught to carry out edits of the toy world.

``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509/2511's pipeline) over the toy model's own VAE, text encoder and
tokenizer (``qwennb/toy_model``), a Qwen2-VL processor with small images for the text encoder's vision tower, and a
transformer fine-tuned for edits (``qwennb/toy_edit_model/transformer``, 7 MB in fp16), trained by
``training/toy/train_edit.py`` against the toy's text encoder on recolouring, reshaping, moving and resizing the
shape and changing the background, asked in English or Chinese; the references go to the transformer at the
output's own size (what it was trained with). An early model (``training/toy/EDIT.md``), best without CFG (its
default, CFG 1): the asked-for change shows in 89% of held-out edits and the rest of the picture is kept in 80%
(edit-run18, 120 edits at 128x128 and 256x256, 10 steps); a moved or resized shape is sometimes redrawn as another.
An edit model trained against another text encoder ships it beside its transformer
(``qwennb/toy_edit_model/text_encoder``), and that one is used.

Example:
    >>> from qwennb import toy
    >>> from qwennb.edit import edit
    >>> pipe = assemble_toy_edit()
    >>> source = toy.render(toy.Scene("circle", "red", "left", "large", "white"), 128, 128)
    >>> out = edit(pipe, [source], "make the circle blue", seed=0, steps=4, reference_area=128 * 128)
    >>> out.images[0].size
    (128, 128)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import LoadError
from .models import TOY_MODEL_DIR

TOY_EDIT_DIR = str(Path(__file__).resolve().parent / "toy_edit_model")
# Where each weighted component of toy-edit comes from: its own folder or the toy model's (``compare_models``
# reports what the two share from this).
# The text encoder: the toy's own, unless the edit model ships the one it was trained against.
_OWN_TEXT_ENCODER = (Path(TOY_EDIT_DIR) / "text_encoder" / "config.json").is_file()
COMPONENT_DIRS = {
    "transformer": TOY_EDIT_DIR,
    "text_encoder": TOY_EDIT_DIR if _OWN_TEXT_ENCODER else TOY_MODEL_DIR,
    "vae": TOY_MODEL_DIR,
}
# The text encoder's vision tower sees the source at 56x56 to 112x112 pixels (4 to 16 image tokens): it is the
# toy text encoder's untrained tower, and the source's content reaches the transformer through its latents.
VL_MIN_PIXELS = 56 * 56
VL_MAX_PIXELS = 112 * 112


def assemble_toy_edit(
    device: Any = "cpu",
    dtype: Any = None,
    init_transformer: str | Path | None = None,
    text_encoder: str | Path | None = None,
) -> Any:
    """Build the toy edit pipeline from the shipped weights (``init_transformer``: another transformer
    folder, e.g. the toy text-to-image one to start training from; ``text_encoder``: another text encoder
    folder, e.g. the toy model's own, for a new edit model trained against it).

    Example:
        >>> type(assemble_toy_edit()).__name__
        'QwenImageEditPlusPipeline'
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from .stand_ins import _assemble_edit, build_edit_processor

    dtype = dtype or torch.float32
    folder = (
        Path(init_transformer) if init_transformer else Path(COMPONENT_DIRS["transformer"]) / "transformer"
    )
    if not (folder / "config.json").is_file():
        raise LoadError(f"the toy edit model's transformer is missing ({folder}): reinstall qwennb")
    base = Path(TOY_MODEL_DIR)
    kw = {"use_safetensors": True, "local_files_only": True}
    transformer = QwenImageTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype, **kw)
    vae_folder = Path(COMPONENT_DIRS["vae"]) / "vae"
    vae = AutoencoderKLQwenImage.from_pretrained(str(vae_folder), torch_dtype=dtype, **kw)
    te_folder = Path(text_encoder) if text_encoder else Path(COMPONENT_DIRS["text_encoder"]) / "text_encoder"
    if not (te_folder / "config.json").is_file():
        raise LoadError(f"the toy edit model's text encoder is missing ({te_folder}): reinstall qwennb")
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(te_folder), dtype=dtype, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(base / "tokenizer"), local_files_only=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(base / "scheduler"), local_files_only=True
    )
    processor = build_edit_processor(tokenizer, min_pixels=VL_MIN_PIXELS, max_pixels=VL_MAX_PIXELS)
    pipe = _assemble_edit(scheduler, vae, te, tokenizer, processor, transformer, "QwenImageEditPlusPipeline")
    return pipe.to(device)
