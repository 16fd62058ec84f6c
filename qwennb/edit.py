"""Images in, images out: Qwen-Image-Edit (2511, 2509, the first release), image-to-image and inpainting.

``edit(pipe, images, instruction)`` runs a loaded edit pipeline (``QwenImageEditPlusPipeline`` for 2509/2511,
up to 3 reference images; ``QwenImageEditPipeline`` for the first release, one image) and returns the same
:class:`~qwennb.generation.GenerationResult` as ``generate``: per-step times, the seed, and a PNG whose
provenance names every input image by its sha256. ``generate(pipe, prompt, init_image=..., strength=...,
mask=...)`` does image-to-image and inpainting with ``QwenImageImg2ImgPipeline`` / ``QwenImageInpaintPipeline``
built from the loaded pipeline's own components (``from_pipe``: nothing is loaded again).

Images may be PIL images, numpy arrays (``uint8``, ``uint16`` scaled to 8 bits, or floats in 0..1), file paths or
the bytes of an image file. Every input is checked, and refused with one line, before any model is touched: a
missing file, something that is not an image, a mask of another size, too many reference images, a strength
outside (0, 1]. The output size defaults to the (first) input's, rounded to a multiple of 16, and the result says so
in one notice; nothing is resized without a notice.

Example:
    >>> from PIL import Image
    >>> from qwennb.edit import edit, load_edit_pipeline
    >>> pipe = load_edit_pipeline("tiny-edit")
    >>> result = edit(pipe, Image.new("RGB", (100, 60), "red"), "make it blue", steps=2, seed=3)
    >>> result.images[0].size, result.seed, len(result.step_times_s)
    ((96, 64), 3, 2)
    >>> result.notices[0]
    'output 96x64: the input image 100x60 rounded to multiples of 16'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GenerationError
from .presets import round16

EDIT_PIPELINES = {"QwenImageEditPlusPipeline": 3, "QwenImageEditPipeline": 1}
MIN_SIDE = 16
MAX_SIDE = 8192
# The reference area the edit models were trained with (diffusers' VAE_IMAGE_SIZE): each reference is resized
# to about 1 megapixel, keeping its aspect ratio, before the VAE encodes it.
MODEL_REFERENCE_AREA = 1024 * 1024
MIN_REFERENCE_AREA, MAX_REFERENCE_AREA = 16 * 16, 4096 * 4096


class ImageInputError(GenerationError):
    """An input image, mask or strength that cannot be used (raised before anything loads)."""


# --------------------------------------------------------------------------- reading images


@dataclass
class InputImage:
    """One input image, read and described: where it came from and the sha256 of its RGB pixels."""

    image: Any  # PIL.Image.Image (RGB, or L for a mask)
    source: str  # a path, "bytes", "PIL image" or "array"
    role: str = "image"

    @property
    def sha256(self) -> str:
        return image_sha256(self.image)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def describe(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "source": self.source,
            "width": self.image.width,
            "height": self.image.height,
            "sha256": self.sha256,
        }


def image_sha256(image: Any) -> str:
    """sha256 of an image's decoded pixels (with its mode and size), the same for a file, its bytes or a PIL copy.

    Example:
        >>> from PIL import Image
        >>> image_sha256(Image.new("RGB", (2, 2))) == image_sha256(Image.new("RGB", (2, 2)))
        True
    """
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def read_image(value: Any, role: str = "image", mode: str = "RGB") -> InputImage:
    """Read an image given as a PIL image, a numpy array, a path or bytes; one clear line when it cannot.

    Example:
        >>> import numpy as np
        >>> read_image(np.zeros((32, 48, 3), dtype=np.uint8)).size
        (48, 32)
        >>> read_image("no/such.png")
        Traceback (most recent call last):
        ...
        qwennb.edit.ImageInputError: image no/such.png: no such file
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, InputImage):
        return value
    if isinstance(value, Image.Image):
        image, source = value, "PIL image"
    elif type(value).__module__ == "numpy" and hasattr(value, "shape"):
        image, source = _from_array(value, role), "array"
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        source = str(value)
        if not path.is_file():
            raise ImageInputError(f"{role} {value}: no such file")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, ValueError):
            raise ImageInputError(f"{role} {value}: not an image PIL can read") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        source = "bytes"
        try:
            with Image.open(io.BytesIO(bytes(value))) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, ValueError):
            raise ImageInputError(f"{role}: these {len(value)} bytes are not an image PIL can read") from None
    else:
        raise ImageInputError(
            f"{role} must be a PIL image, a numpy array, a file path or image bytes, got {type(value).__name__}"
        )
    w, h = image.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
        raise ImageInputError(f"{role} is {w}x{h}; sides from {MIN_SIDE} to {MAX_SIDE} pixels are accepted")
    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_to_8bit(image, role)
    if image.mode != mode:
        if (
            mode == "RGB"
            and image.mode in ("RGBA", "LA", "PA")
            or (image.mode == "P" and "transparency" in image.info)
        ):
            # Transparent pixels over white, not over whatever colour they happen to hold.
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        image = image.convert(mode)
    return InputImage(image, source, role)


def _wide_to_8bit(image: Any, role: str) -> Any:
    """A one-channel image of more than 8 bits (a 16-bit grayscale PNG opens as ``I;16``; TIFFs as ``I`` or ``F``)
    as 8-bit ``L``, its range scaled: PIL's own conversion clips at 255, which turns a 16-bit photo white."""
    import numpy as np
    from PIL import Image

    a = np.asarray(image, dtype=np.float64)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # unsigned 16 bits
        a = a / 257.0
    elif not np.isfinite(a).all() or a.min() < 0:
        raise ImageInputError(f"{role} holds {image.mode}-mode values below 0 or not finite")
    elif image.mode == "F" and a.max() <= 1.0:
        a = a * 255.0
    elif a.max() > 255:
        if image.mode == "F" or a.max() > 65535:
            raise ImageInputError(
                f"{role} holds {image.mode}-mode values up to {a.max():g}; give 8 or 16 bits a channel "
                "(or floats in 0..1)"
            )
        a = a / 257.0  # 16-bit values in a 32-bit image
    return Image.fromarray(np.round(a).astype(np.uint8), "L")


def _from_array(a: Any, role: str) -> Any:
    import numpy as np
    from PIL import Image

    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageInputError(f"{role} array has shape {tuple(a.shape)}; expected HxW, HxWx3 or HxWx4")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageInputError(
                f"{role} array holds floats outside 0..1; give uint8 (0..255) or floats in 0..1"
            )
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype == np.uint16:  # OpenCV's and imageio's 16-bit PNGs: scaled, as PIL's I;16
        a = np.round(a / 257.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ImageInputError(f"{role} array holds values outside 0..255")
        a = a.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def read_mask(value: Any, size: tuple[int, int]) -> InputImage:
    """A mask (white: redraw, black: keep) of exactly ``size``; refused with one line otherwise."""
    mask = read_image(value, role="mask", mode="L")
    if mask.size != tuple(size):
        raise ImageInputError(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; they must match"
        )
    return mask


def check_strength(strength: Any) -> float:
    """A strength in (0, 1]: the share of the denoising that redraws the init image.

    Example:
        >>> check_strength(1.5)
        Traceback (most recent call last):
        ...
        qwennb.edit.ImageInputError: strength must be above 0 and at most 1 (the share of the image redrawn), got 1.5
    """
    if (
        not isinstance(strength, (int, float))
        or isinstance(strength, bool)
        or not math.isfinite(strength)
        or not 0 < strength <= 1
    ):
        raise ImageInputError(
            f"strength must be above 0 and at most 1 (the share of the image redrawn), got {strength!r}"
        )
    return float(strength)


def max_references(model_or_pipe: Any) -> int:
    """How many reference images an edit model takes: 3 for 2509/2511, 1 for the first Qwen-Image-Edit."""
    if isinstance(model_or_pipe, str):
        from .models import get_model

        cls = get_model(model_or_pipe).pipeline_class
    else:
        cls = type(model_or_pipe).__name__
    if cls not in EDIT_PIPELINES:
        raise ImageInputError(
            f"{model_or_pipe if isinstance(model_or_pipe, str) else cls} is not an edit model; "
            "load qwen-image-edit-2511, qwen-image-edit-2509, qwen-image-edit, toy-edit or tiny-edit"
        )
    return EDIT_PIPELINES[cls]


def is_edit_pipeline(pipe: Any) -> bool:
    return type(pipe).__name__ in EDIT_PIPELINES


def check_edit_inputs(model_or_pipe: Any, images: Any, instruction: Any) -> list[InputImage]:
    """Read and check an edit's images and instruction before anything loads; one line per problem.

    Example:
        >>> from PIL import Image
        >>> check_edit_inputs("qwen-image-edit-2511", [Image.new("RGB", (64, 64))] * 4, "x")
        Traceback (most recent call last):
        ...
        qwennb.edit.ImageInputError: qwen-image-edit-2511 takes 1 to 3 reference images, got 4
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise ImageInputError("the edit instruction is empty")
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    limit = max_references(model_or_pipe)
    if not items or len(items) > limit:
        name = model_or_pipe if isinstance(model_or_pipe, str) else type(model_or_pipe).__name__
        span = "1 to 3 reference images" if limit == 3 else "exactly 1 input image"
        raise ImageInputError(f"{name} takes {span}, got {len(items)}")
    return [read_image(x, role=f"image {i + 1}" if len(items) > 1 else "image") for i, x in enumerate(items)]


# --------------------------------------------------------------------------- sizes and tokens


def default_output_size(image: InputImage | Any) -> tuple[tuple[int, int], str | None]:
    """The output size for an input (its own, rounded to multiples of 16) and the one-line notice that says so.

    Example:
        >>> from PIL import Image
        >>> default_output_size(Image.new("RGB", (1000, 750)))
        ((992, 752), 'output 992x752: the input image 1000x750 rounded to multiples of 16')
    """
    w, h = image.size
    w2, h2 = round16(w), round16(h)
    name = role_name(getattr(image, "role", "image"))
    if (w2, h2) == (w, h):
        return (w, h), f"output {w}x{h}: the size of {name}"
    return (w2, h2), f"output {w2}x{h2}: {name} {w}x{h} rounded to multiples of 16"


def role_name(role: str) -> str:
    """How a notice names an input: "the input image", "the init image", "image 2"."""
    return {"image": "the input image", "init image": "the init image", "mask": "the mask"}.get(role, role)


def reference_size(width: int, height: int, area: int = MODEL_REFERENCE_AREA) -> tuple[int, int]:
    """The size a reference image goes to the VAE at (QwenImageEditPlusPipeline: ``area`` pixels, multiples of 32).

    Example:
        >>> reference_size(1000, 750)
        (1184, 896)
    """
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    return tuple(calculate_dimensions(area, width / height))  # type: ignore[return-value]


def reference_tokens(sizes: list[tuple[int, int]], area: int = MODEL_REFERENCE_AREA) -> int:
    """Image tokens the transformer sees for the reference images, on top of the output's.

    Example:
        >>> reference_tokens([(1024, 1024)] * 3)  # three 1-megapixel references: 3 x 4096 tokens
        12288
    """
    from .plan import image_tokens

    return sum(image_tokens(*reference_size(w, h, area)) for w, h in sizes)


def planning_size(width: int, height: int, extra_tokens: int) -> tuple[int, int]:
    """A size of the output's width whose image tokens cover the output's and ``extra_tokens`` more.

    The plan sizes its activation budget from a width and height; an edit's sequence also holds the reference
    images' tokens, so it is planned at this taller size (the VAE decode estimate is then an over-estimate,
    which also covers encoding the references).

    Example:
        >>> planning_size(1024, 1024, 4096)
        (1024, 2048)
    """
    cols = max(1, width // 16)
    rows = math.ceil(((width // 16) * (height // 16) + extra_tokens) / cols)
    return width, rows * 16


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _reference_area(pipe: Any, area: int) -> Any:
    """Run QwenImageEditPlusPipeline with its references resized to ``area`` pixels instead of 1 megapixel.

    The pipeline reads the area from its module's ``VAE_IMAGE_SIZE`` at call time; it is set for this call only
    (under a lock) and put back afterwards.
    """
    if type(pipe).__name__ != "QwenImageEditPlusPipeline" or area == MODEL_REFERENCE_AREA:
        yield
        return
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    with _PATCH_LOCK:
        old = mod.VAE_IMAGE_SIZE
        mod.VAE_IMAGE_SIZE = int(area)
        try:
            yield
        finally:
            mod.VAE_IMAGE_SIZE = old


# --------------------------------------------------------------------------- jobs that generate() runs


@dataclass
class ImageJob:
    """What ``generate`` needs to run an edit, img2img or inpainting instead of text-to-image."""

    task: str  # "edit", "img2img", "inpaint"
    pipeline: Any  # the pipeline to call
    base: Any  # the loaded pipeline (text encoder, plan)
    inputs: list[InputImage]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    strength: float | None = None
    extra_tokens: int = 0  # reference tokens on top of the output's
    reference_area: int | None = None
    condition_images: list[Any] = field(default_factory=list)  # what the text encoder sees (edit)
    mask: InputImage | None = None
    keep_unmasked: bool = True

    def encode(self, text: str, n: int, device: Any) -> tuple[Any, Any]:
        """Prompt embeddings on ``device``; for an edit the text encoder also sees the images."""
        import torch

        from .generation import _encode
        from .pipeline import input_device

        if self.task != "edit":
            return _encode(self.base, text, n, device)
        pipe = self.pipeline
        te_device = input_device(pipe.text_encoder, pipe) if pipe.text_encoder is not None else device
        # EditPlus takes a list and numbers its images ("Picture 1: ..."); the first Edit takes one image.
        plus = type(pipe).__name__ == "QwenImageEditPlusPipeline"
        images = self.condition_images if plus else self.condition_images[0]
        with (
            warnings.catch_warnings()
        ):  # the Qwen2-VL processor's note on padding without truncation: noise here
            warnings.filterwarnings("ignore", message=".*max_length. is ignored when .padding")
            embeds, mask = pipe.encode_prompt(text, image=images, device=te_device, num_images_per_prompt=n)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds.to(device), mask.to(device)

    def steps_run(self, steps: int) -> int:
        """Denoising steps that run: img2img and inpainting start ``strength`` of the way from the end
        (diffusers' ``get_timesteps``; at least one for any strength above 0)."""
        if self.strength is None:
            return steps
        return steps - int(max(steps - min(steps * self.strength, steps), 0))

    def run(self, **kwargs: Any) -> Any:
        with _reference_area(self.pipeline, self.reference_area or MODEL_REFERENCE_AREA):
            return self.pipeline(**kwargs, **self.call_kwargs)

    def finish(self, images: list[Any]) -> list[Any]:
        """Inpainting: put the unmasked pixels of the input back exactly (diffusers' ``apply_overlay``)."""
        if self.task != "inpaint" or not self.keep_unmasked or self.mask is None:
            return images
        out = []
        for im in images:
            init = self.inputs[0].image
            mask = self.mask.image
            if init.size != im.size:
                init = init.resize(im.size)
                mask = mask.resize(im.size)
            out.append(self.pipeline.image_processor.apply_overlay(mask, init, im))
        return out


def _derived(pipe: Any, class_name: str) -> Any:
    """``class_name`` built from the loaded pipeline's components with ``from_pipe`` (cached on the pipeline)."""
    import diffusers

    info = getattr(pipe, "qwennb", None)
    cache = info.setdefault("derived", {}) if isinstance(info, dict) else {}
    if class_name not in cache:
        from diffusers.utils import logging as dlog

        cls = getattr(diffusers, class_name)
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # from_pipe re-casts the shared modules and warns about it; nothing moves
        try:
            derived = cls.from_pipe(pipe)
        finally:
            dlog.set_verbosity(level)
        derived.set_progress_bar_config(disable=True)
        if hasattr(pipe, "prompt_template_encode_start_idx"):  # stand-ins count their own template
            derived.prompt_template_encode_start_idx = pipe.prompt_template_encode_start_idx
        cache[class_name] = derived
    return cache[class_name]


def image_job(
    pipe: Any,
    init_image: Any,
    strength: float | None,
    mask: Any,
    width: int | None,
    height: int | None,
    notices: list[str],
    keep_unmasked: bool = True,
) -> tuple[ImageJob, int, int]:
    """Check img2img / inpainting inputs and build the job; returns it with the output width and height."""
    if init_image is None:
        raise ImageInputError("strength and mask need an init image (init_image=...)")
    if is_edit_pipeline(pipe):
        raise ImageInputError(
            f"{type(pipe).__name__} edits with instructions: use qwennb.edit(pipe, images, instruction); "
            "img2img and inpainting run on a text-to-image model (qwen-image)"
        )
    init = read_image(init_image, role="init image")
    m = read_mask(mask, init.size) if mask is not None else None
    s = check_strength(0.6 if strength is None else strength)
    if strength is None:
        notices.append("strength 0.6 (the pipeline's default): 60% of the denoising redraws the init image")
    width, height = _output_size(init, width, height, notices)
    task = "inpaint" if m is not None else "img2img"
    target = _derived(pipe, "QwenImageInpaintPipeline" if m else "QwenImageImg2ImgPipeline")
    kwargs: dict[str, Any] = {"image": init.image, "strength": s}
    if m is not None:
        kwargs["mask_image"] = m.image
    job = ImageJob(task, target, pipe, [init], kwargs, strength=s, mask=m, keep_unmasked=keep_unmasked)
    return job, width, height


def _output_size(
    first: InputImage, width: int | None, height: int | None, notices: list[str]
) -> tuple[int, int]:
    if width is None and height is None:
        (width, height), note = default_output_size(first)
        if note:
            notices.append(note)
        return width, height
    if width is None or height is None:
        raise ImageInputError("give both width and height, or neither (then the input's size is used)")
    if (width, height) != first.size:
        notices.append(
            f"output {width}x{height} as asked; {role_name(first.role)} is {first.size[0]}x{first.size[1]} "
            "and is resized to it"
        )
    return width, height


def edit_job(
    pipe: Any,
    images: Any,
    instruction: str,
    width: int | None,
    height: int | None,
    notices: list[str],
    reference_area: int | None = None,
) -> tuple[ImageJob, int, int]:
    """Check an edit's inputs against the loaded pipeline and build the job; returns it with the output size."""
    inputs = check_edit_inputs(pipe, images, instruction)
    width, height = _output_size(inputs[0], width, height, notices)
    plus = type(pipe).__name__ == "QwenImageEditPlusPipeline"
    if reference_area is None:
        info = getattr(pipe, "qwennb", {})
        plan = info.get("plan")
        if info.get("model") == "toy-edit":  # trained with the references at the output's own size
            reference_area = width * height
        elif plan and info.get("model") == "tiny-edit":
            reference_area = plan.defaults["width"] * plan.defaults["height"]
        else:
            reference_area = MODEL_REFERENCE_AREA
    if (
        not isinstance(reference_area, int)
        or isinstance(reference_area, bool)
        or not MIN_REFERENCE_AREA <= reference_area <= MAX_REFERENCE_AREA
    ):
        raise ImageInputError(
            f"reference_area must be a pixel count from {MIN_REFERENCE_AREA} to {MAX_REFERENCE_AREA}, "
            f"got {reference_area!r}"
        )
    if not plus and reference_area != MODEL_REFERENCE_AREA:
        raise ImageInputError(
            "QwenImageEditPipeline always sizes its input at 1 megapixel; reference_area is for 2509/2511"
        )
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

    cond = []
    ref_sizes = []
    for x in inputs:
        w, h = x.size
        if plus:
            cw, ch = reference_size(w, h, CONDITION_IMAGE_SIZE)
        else:  # QwenImageEditPipeline shows the text encoder its 1-megapixel image
            cw, ch = reference_size(w, h, MODEL_REFERENCE_AREA)
        cond.append(pipe.image_processor.resize(x.image, ch, cw))
        ref_sizes.append(reference_size(w, h, reference_area))
    for x, (rw, rh) in zip(inputs, ref_sizes, strict=True):
        w, h = x.size
        drift = abs((rw / rh) / (width / height) - 1)
        if drift > 0.005 and x is inputs[0]:
            notices.append(
                f"{role_name(x.role)} reaches the model at {rw}x{rh} (aspect {rw / rh:.3f}) but the output is "
                f"{width}x{height} (aspect {width / height:.3f}): content may shift or stretch by up to "
                f"{drift * 100:.1f}%; give a size of the image's aspect to avoid it"
            )
    job = ImageJob(
        "edit",
        pipe,
        pipe,
        inputs,
        {"image": [x.image for x in inputs] if plus else inputs[0].image},
        extra_tokens=sum(_tokens(w, h) for w, h in ref_sizes),
        reference_area=reference_area,
        condition_images=cond,
    )
    return job, width, height


def _tokens(w: int, h: int) -> int:
    from .plan import image_tokens

    return image_tokens(w, h)


# --------------------------------------------------------------------------- the public calls


def edit(
    pipe: Any,
    images: Any,
    instruction: str,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    reference_area: int | None = None,
    on_step: Any = None,
    stop: Any = None,
) -> Any:
    """Edit one image (or combine up to 3 references with 2509/2511) by an instruction; a ``GenerationResult``.

    ``images``: one image or a list (PIL, numpy, path or bytes). The output size defaults to the first image's,
    rounded to multiples of 16 (a notice says it). ``reference_area`` (pixels) is the size the references go to
    the VAE at: the model's 1 megapixel by default (the tiny stand-in uses its default size). ``cfg`` is
    ``true_cfg_scale`` (the model's default: 4, the toy edit model's 1), with " " as negative prompt when none is
    given. Bad inputs raise :class:`ImageInputError` before the pipeline runs. The saved PNG records each input's sha256.

    Example:
        >>> from PIL import Image
        >>> pipe = load_edit_pipeline("tiny-edit")
        >>> r = edit(pipe, [Image.new("RGB", (64, 64), c) for c in ("red", "blue")], "swap them", steps=2, seed=1)
        >>> [x["sha256"][:8] for x in r.inputs] == [image_sha256(Image.new("RGB", (64, 64), c))[:8]
        ...                                        for c in ("red", "blue")]
        True
    """
    from .generation import generate

    if not is_edit_pipeline(pipe):
        raise ImageInputError(
            f"{type(pipe).__name__} is not an edit pipeline; load an edit model (qwen-image-edit-2511, "
            "qwen-image-edit-2509, qwen-image-edit, toy-edit), or use generate(..., init_image=) for img2img"
        )
    notices: list[str] = []
    job, width, height = edit_job(pipe, images, instruction, width, height, notices, reference_area)
    return generate(
        pipe,
        instruction,
        negative_prompt=negative_prompt,
        steps=steps,
        cfg=cfg,
        seed=seed,
        width=width,
        height=height,
        on_step=on_step,
        stop=stop,
        _job=job,
        _notices=notices,
    )


TOY_EDIT_NOTICE = (
    "No Qwen-Image-Edit weights found: using the embedded toy edit model (toy-edit; an early model that edits the "
    "toy world of flat shapes only: the asked-for change shows in most edits, but a moved or resized shape is "
    "sometimes redrawn as another). Run `qwennb download --model "
    "qwen-image-edit-2511` or pass --model."
)
EDIT_PREFERENCE = ("qwen-image-edit-2511", "qwen-image-edit-2509", "qwen-image-edit")


def resolve_edit_model(
    name: str | None = None, folder: str | None = None
) -> tuple[str, str | None, str | None]:
    """Which edit model to load: ``(registry name, local path or None, notice or None)``.

    ``name`` (registry name, hub id or folder) must be an edit model; without it, the newest complete edit
    snapshot on disk (2511, then 2509, then the first release), else the embedded ``toy-edit`` with a notice.

    Example:
        >>> resolve_edit_model("tiny-edit")
        ('tiny-edit', None, None)
    """
    from .models import find_local_models, get_model
    from .pipeline import resolve_model

    if name:
        reg, path, notice = resolve_model(name, folder)
        if get_model(reg).task != "image-edit":
            raise ImageInputError(
                f"{reg} is a {get_model(reg).task} model; edits need an edit model "
                f"({', '.join(EDIT_PREFERENCE)}, toy-edit or tiny-edit)"
            )
        return reg, path, notice
    local = {m.name: m for m in find_local_models(folder) if m.complete}
    for reg in EDIT_PREFERENCE:
        if reg in local:
            return reg, local[reg].path, None
    return "toy-edit", None, TOY_EDIT_NOTICE


def load_edit_pipeline(model: str = "toy-edit", hardware: Any = None, overrides: Any = None) -> Any:
    """Plan and load an edit model by registry name (stand-ins are built in code).

    Example:
        >>> type(load_edit_pipeline("tiny-edit")).__name__
        'QwenImageEditPlusPipeline'
    """
    from .hardware import detect
    from .pipeline import build

    name, path, _ = resolve_edit_model(model)
    plan = plan_edit(hardware or detect(), name, overrides, references=max_references(name))
    return build(plan, path)


def plan_edit(
    hardware: Any,
    model: str,
    overrides: Any = None,
    width: int | None = None,
    height: int | None = None,
    references: int = 1,
    reference_area: int = MODEL_REFERENCE_AREA,
) -> Any:
    """``make_plan`` for an edit model, its activation budget counting ``references`` reference images' tokens.

    The plan is made for a size whose image tokens are the output's plus the references' (see
    :func:`planning_size`), and a reason line says so. Stand-ins are planned as the stand-in they are built
    like (``tiny-edit`` as ``tiny``, ``toy-edit`` as ``toy``, ``qwen-image-edit-synthetic`` as
    ``qwen-image-synthetic``).

    Example:
        >>> from qwennb.plan import describe_machine
        >>> plan = plan_edit(describe_machine(gpu_memory_gb=80), "qwen-image-edit-2511", references=3)
        >>> plan.model, plan.estimated_for
        ('qwen-image-edit-2511', (1024, 4096))
    """
    from .models import get_model, load_config
    from .plan import PRESET_DEFAULTS, _defaults, _resolve, make_plan, replace

    spec = get_model(model)
    if spec.task != "image-edit":
        raise ImageInputError(f"{spec.name} is a {spec.task} model, not an edit model")
    if not 1 <= references <= max_references(spec.name):
        raise ImageInputError(
            f"{spec.name} takes 1 to {max_references(spec.name)} reference images, got {references}"
        )
    base = {"tiny-edit": "tiny", "toy-edit": "toy", "qwen-image-edit-synthetic": "qwen-image-synthetic"}.get(
        spec.name, spec.name
    )
    first = make_plan(hardware, base, overrides)
    w = width or first.defaults["width"]
    h = height or first.defaults["height"]
    area = first.defaults["width"] * first.defaults["height"] if spec.name == "tiny-edit" else reference_area
    if spec.name == "toy-edit":  # its references go in at the output's own size
        area = w * h
    extra = reference_tokens([(w, h)] * references, area)
    pw, ph = planning_size(w, h, extra)
    plan = make_plan(hardware, base, overrides, pw, ph)
    warnings = [x for x in plan.warnings if "wrong model for text-to-image" not in x]
    reasons = list(plan.reasons) + [
        f"edit: activations budgeted for {w}x{h} plus {references} reference image(s) of about "
        f"{area / 1e6:.2f} MP ({extra} more image tokens), i.e. as a {pw}x{ph} image."
    ]
    if load_config(spec.config_dir, "transformer").get("zero_cond_t") and plan.fast_path:
        reasons.append(
            f"{spec.name}'s transformer keeps the references' timestep at zero (zero_cond_t): the tuned path "
            "modulates their tokens at t=0, computed once per image, and batches CFG as for text-to-image."
        )
    # an edit model with defaults of its own (toy-edit: CFG 1) keeps them, the user's settings applied as make_plan does
    defaults = (
        _defaults(_resolve(overrides)[0], False, [], spec.name)
        if spec.name in PRESET_DEFAULTS
        else plan.defaults
    )
    return replace(
        plan, model=spec.name, hub_id=spec.hub_id, reasons=reasons, warnings=warnings, defaults=defaults
    )


def plan_for_model(hardware: Any, model: str, overrides: Any = None) -> Any:
    """``make_plan`` for a text-to-image model; for an edit model :func:`plan_edit` with room for its most
    reference images (3 for 2509/2511).

    Example:
        >>> from qwennb.plan import describe_machine
        >>> plan_for_model(describe_machine(host_ram_gb=8), "tiny-edit").model
        'tiny-edit'
    """
    from .models import get_model
    from .plan import make_plan

    if get_model(model).task == "image-edit":
        return plan_edit(hardware, model, overrides, references=max_references(model))
    return make_plan(hardware, model, overrides)


# --------------------------------------------------------------------------- text-to-image and edit together


@dataclass
class SwapReport:
    """What a text-to-image model and an edit model have in common, and what moving between them costs."""

    first: str
    second: str
    shared: list[str]  # components with the same configs (and the same files, where both are on disk)
    swapped: list[str]  # components that differ and must be replaced
    unverified: list[str]  # same configs, but the weight files could not be compared
    swap_gib: float  # bf16 weights to load when moving from one to the other
    details: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"{self.first} <-> {self.second}:"]
        for c in self.shared:
            lines.append(f"  {c}: shared ({self.details.get(c, 'same files')})")
        for c in self.unverified:
            lines.append(f"  {c}: same architecture; {self.details.get(c, 'files not compared')}")
        for c in self.swapped:
            lines.append(f"  {c}: swapped ({self.details.get(c, 'different')})")
        lines.append(f"  moving between them loads {self.swap_gib:.1f} GiB of bf16 weights")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def _file_ids(folder: str | None, component: str) -> dict[str, str] | None:
    """Weight files of a snapshot's component -> their content id (the Hugging Face cache's blob name, a sha256)."""
    if not folder:
        return None
    sub = Path(folder) / component
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        return None
    ids = {}
    for f in files:
        blob = Path(os.path.realpath(f)).name
        if len(blob) != 64 or any(ch not in "0123456789abcdef" for ch in blob):
            return None  # not a cache snapshot: no content id without hashing gigabytes
        ids[f.name] = blob
    return ids


def compare_models(
    first: str, second: str, first_path: str | None = None, second_path: str | None = None
) -> SwapReport:
    """Which components two models share (text encoder, VAE) and which are swapped, with the swap's cost.

    Components are the same when their shipped configs are equal and, where both snapshots are in the Hugging
    Face cache, their weight files have the same content ids (sha256); without snapshots the weights are not
    compared and the report says so. qwennb loads each model whole: sharing is reported, not yet exploited.

    Example:
        >>> r = compare_models("qwen-image", "qwen-image-edit-2511")
        >>> r.swapped, r.unverified
        (['transformer'], ['text_encoder', 'vae'])
    """
    from .models import component_sizes, get_model, load_config

    a, b = get_model(first), get_model(second)
    sizes = component_sizes(b.name)
    shared, swapped, unverified, details = [], [], [], {}

    def verdict(comp: str) -> tuple[list[str], str]:
        """Which list the component goes to, and why."""
        if load_config(a.config_dir, comp) != load_config(b.config_dir, comp):
            return swapped, "different configs"
        ia, ib = _file_ids(first_path, comp), _file_ids(second_path, comp)
        if ia is not None and ib is not None:
            if ia == ib:
                return shared, "same configs and the same weight files (sha256)"
            return swapped, "same architecture, different weights"
        if comp == "transformer" and a.name != b.name:
            return swapped, "each model's own weights"  # what makes them different models
        if {a.name, b.name} == {"toy", "toy-edit"}:
            from .models import TOY_MODEL_DIR
            from .toy_edit import COMPONENT_DIRS

            if COMPONENT_DIRS[comp] == TOY_MODEL_DIR:
                return shared, "the same file in the package (toy-edit loads the toy model's)"
            return swapped, "toy-edit has its own in the package (the one it was trained with)"
        if a.stand_in and b.stand_in:
            return shared, "same configs and seeds: the same weights"
        return unverified, "weights not compared (both snapshots must be in the Hugging Face cache)"

    gib = 0.0
    for comp in ("transformer", "text_encoder", "vae"):
        where, details[comp] = verdict(comp)
        where.append(comp)
        if where is not shared:  # loaded anew on a switch (or possibly: not verified)
            gib += sizes[comp].gib(2.0)
    return SwapReport(a.name, b.name, shared, swapped, unverified, round(gib, 2), details)


# --------------------------------------------------------------------------- provenance


def load_provenance(png: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything qwennb stored in a PNG it saved: parameters, task, strength and the inputs' sha256.

    Example:
        >>> load_provenance("missing.png")  # doctest: +SKIP
    """
    from .generation import read_metadata

    return read_metadata(png)


class _CallableModule(types.ModuleType):
    """``qwennb.edit`` is this module once it is imported; calling it calls :func:`edit`, so that
    ``qwennb.edit(pipe, images, instruction)`` works whichever of the two the name holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return edit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "ImageInputError",
    "InputImage",
    "check_edit_inputs",
    "check_strength",
    "compare_models",
    "default_output_size",
    "edit",
    "image_sha256",
    "load_edit_pipeline",
    "load_provenance",
    "max_references",
    "plan_edit",
    "read_image",
    "read_mask",
    "reference_size",
    "reference_tokens",
]
