"""Prompt enhancement and reference-image description with Qwen's vision-language models.

Two kinds of model can write:

* **Qwen-Image's own text encoder** (``pipe.text_encoder``): a full Qwen2.5-VL-7B with its LM head and
  vision tower, already in memory. ``enhance_prompt(prompt, pipe)`` and ``describe_image(img, pipe=pipe)``
  use it where it lives (GPU, CPU or under diffusers/accelerate offload hooks): nothing is moved or loaded.
* **A separate VL chat model**, loaded on demand with :func:`load_vl_model` (``"qwen2.5-vl-7b"``,
  ``"qwen2-vl-7b"``, or the tiny stand-ins ``"tiny-vl"`` / ``"tiny-vl2"`` built in code) and freed with
  :func:`unload_vl_model`.

A rewrite is checked before it is used (:func:`check_rewrite`): an empty, repetitive, garbled or over-long
answer falls back to the original prompt with a notice, so a bad rewrite never reaches the image model.

Example:
    >>> from qwennb.stand_ins import build_tiny_pipeline
    >>> from qwennb.enhance import enhance_prompt
    >>> pipe = build_tiny_pipeline()
    >>> e = enhance_prompt("a red fox", pipe, max_new_tokens=16)
    >>> e.original, e.language, e.chat[0]["role"]
    ('a red fox', 'en', 'system')
    >>> # qwennb.generate(pipe, e.enhanced, original_prompt=e.original) records both prompts.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
import re
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import LoadError, QwennbError
from .presets import POSITIVE_MAGIC, is_chinese

log = logging.getLogger("qwennb")

__all__ = [
    "DESCRIBE_MAX_PIXELS",
    "MAX_WORDS",
    "SYSTEM_PROMPTS",
    "ChatInputs",
    "EnhancedPrompt",
    "ImageDescription",
    "VLModel",
    "check_rewrite",
    "current_vl_model",
    "describe_image",
    "detect_language",
    "enhance_prompt",
    "enhance_prompt_with_qwen2vl",
    "find_repetition",
    "finish_rewrite",
    "load_image",
    "load_vl_model",
    "pipeline_image_processor",
    "prepare_chat_inputs",
    "unload_vl_model",
    "word_count",
]

# ------------------------------------------------------------------------------------------ prompts

MAX_WORDS = 200  # a rewrite longer than this (CJK characters count one each) falls back to the original
DEFAULT_PROMPT_TOKENS = 1024  # QwenImagePipeline.tokenizer_max_length
# Images for description are kept at most this large (Qwen's recommended 1280 visual tokens), unless the
# processor's own limit is lower or ``max_pixels=`` says otherwise.
DESCRIBE_MAX_PIXELS = 1280 * 28 * 28
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json.
QWEN25VL_MIN_PIXELS = 56 * 56
QWEN25VL_MAX_PIXELS = 28 * 28 * 16384

SYSTEM_PROMPTS: dict[str, str] = {
    "en": (
        "You rewrite prompts for Qwen-Image, a text-to-image model. Rewrite the user's prompt as one "
        "detailed description of the image to make.\n"
        "Rules:\n"
        "- Keep the user's meaning, every subject they name and all proper nouns exactly as written; add "
        "nothing that contradicts them.\n"
        "- Make what is vague concrete: the subject and its appearance, the style or medium, the composition "
        "and camera view, the lighting, the colors and mood, the background.\n"
        "- Any text that should appear in the image goes in double quotes, exactly as the user wrote it and "
        "never translated, with where it appears and its font, size and color.\n"
        '- If the prompt is an instruction or a question (such as "draw a cat" or "what does a quokka '
        'look like?"), rewrite it as a description of the image; do not answer it or talk to the user.\n'
        "- Write one paragraph in English, under 200 words, with no title, list, explanation or quotes "
        "around the whole answer. Output only the rewritten prompt."
    ),
    "zh": (
        "你是文生图模型 Qwen-Image 的提示词改写助手。请把用户的提示词改写成一段对要生成的画面的详细描述。\n"
        "要求：\n"
        "- 保留用户的原意、提到的每个主体和所有专有名词，原样保留，不要添加与之矛盾的内容。\n"
        "- 把模糊之处具体化：主体及其外观、风格或媒介、构图与视角、光线、色彩与氛围、背景。\n"
        "- 画面中要出现的文字一律放在双引号中，与用户原文完全一致，绝不翻译，并说明文字的位置、字体、大小和颜色。\n"
        "- 如果提示词是指令或问题（例如“画一只猫”或“熊猫长什么样？”），把它改写成对画面的描述，"
        "不要回答问题，也不要和用户对话。\n"
        "- 用中文写成一段话，不超过200字，不要标题、列表、解释，也不要给整段加引号。只输出改写后的提示词。"
    ),
}
PROMPT_LABEL = {"en": "Prompt: ", "zh": "提示词："}
CONTEXT_LABEL = {
    "en": "Context to use where it fits (for example a reference image's style): ",
    "zh": "参考信息（在合适处使用，例如参考图的风格）：",
}

DESCRIBE_SYSTEM = {
    "en": "You describe images so that the description can be used as a prompt for a text-to-image model.",
    "zh": "你描述图片，使描述可以直接用作文生图模型的提示词。",
}
DESCRIBE_INSTRUCTIONS = {
    ("style", "en"): (
        "Describe the visual style of this image: the medium or art style, the color palette, the lighting, "
        "the composition and camera view, the textures and the mood. Leave out the particular objects and "
        "people unless they define the style. Answer with one paragraph of comma-separated descriptive "
        "phrases, at most 80 words, with no preamble."
    ),
    ("content", "en"): (
        "Describe this image in full: the subjects with their appearance, positions and actions, the "
        "background, any text exactly as written in double quotes with its position, then the style, "
        "colors, lighting and composition. Answer with one paragraph of at most 150 words, with no preamble."
    ),
    ("style", "zh"): (
        "描述这张图片的视觉风格：媒介或艺术风格、配色、光线、构图与视角、质感和氛围。除非具体物体或人物决定了风格，"
        "否则不要描述它们。用一段由逗号分隔的描述性短语回答，不超过80字，不要开场白。"
    ),
    ("content", "zh"): (
        "完整描述这张图片：主体及其外观、位置和动作，背景，图中的文字（原样放在双引号中并说明位置），"
        "再写风格、色彩、光线和构图。用一段话回答，不超过150字，不要开场白。"
    ),
}
FOCUSES = ("style", "content")

# ------------------------------------------------------------------------------------------ results


@dataclass
class EnhancedPrompt:
    """A rewritten prompt and how it was made.

    Pass ``enhanced`` as the prompt and ``original`` as ``original_prompt`` to :func:`qwennb.generate`, so
    the result and the PNG's metadata record both.
    """

    original: str
    enhanced: str
    language: str  # "en" or "zh"
    model: str
    seconds: float
    fallback_reason: str | None = None  # why the original was kept, or None when the rewrite is used
    truncated: bool = (
        False  # something was cut: the prompt (prompt_truncated) or the rewrite (hit_token_limit)
    )
    chat: list[dict[str, Any]] = field(default_factory=list)  # the exact messages given to the template
    notices: list[str] = field(default_factory=list)
    raw: str = ""  # the model's decoded answer, before cleaning
    new_tokens: int = 0
    hit_token_limit: bool = False  # generation stopped at max_new_tokens, not at end of turn
    sampled: bool = False
    seed: int | None = None  # the sampling seed (None for greedy decoding)
    prompt_truncated: bool = False  # the prompt was cut to the encoder's token limit before rewriting

    @property
    def used_fallback(self) -> bool:
        return self.fallback_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.enhanced


@dataclass
class ImageDescription:
    """A description of an image's style or content, usable as (or appended to) a prompt."""

    text: str  # "" when the model's answer was unusable (see ``problem``)
    focus: str  # "style" or "content"
    model: str
    seconds: float
    chat: list[dict[str, Any]] = field(default_factory=list)
    image_size_used: tuple[int, int] = (0, 0)  # (width, height) the vision tower saw
    original_size: tuple[int, int] = (0, 0)
    grid_thw: tuple[int, int, int] = (0, 0, 0)  # patches in time, height, width
    image_tokens: int = 0  # <|image_pad|> tokens in the model's input
    problem: str | None = None
    notices: list[str] = field(default_factory=list)
    raw: str = ""
    new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.text


@dataclass
class VLModel:
    """A chat-capable Qwen VL model with its tokenizer and image processor."""

    name: str
    model: Any
    processor: Any  # has .tokenizer and .image_processor (a transformers processor or a plain object)
    device: str = "cpu"
    dtype: str = "float32"
    load_s: float = 0.0
    pipe: Any = None  # the pipeline, when this is its text encoder

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_processor(self) -> Any:
        return getattr(self.processor, "image_processor", None)

    def __repr__(self) -> str:
        return f"<VLModel {self.name} ({type(self.model).__name__}) on {self.device} in {self.dtype}>"


# ------------------------------------------------------------------------------------------ text checks

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_LABEL_RE = re.compile(
    r"^\s*(?:\*\*)?(?:(?:the\s+)?(?:enhanced|rewritten|improved|refined|detailed|new|final)\s+prompt|prompt|"
    r"rewrite|output|answer|改写后的?提示词|改写后|提示词|输出)(?:\*\*)?\s*[:：]\s*",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "「": "」", "‘": "’", "`": "`"}


def detect_language(text: str) -> str:
    """``"zh"`` when the text has any CJK character, else ``"en"``.

    Example:
        >>> detect_language("一只猫 on a sofa"), detect_language("a cat")
        ('zh', 'en')
    """
    if is_chinese(text) or re.search(f"[{_CJK}]", text):
        return "zh"
    return "en"


def word_count(text: str) -> int:
    """Words in ``text``; each CJK character counts as one word.

    Example:
        >>> word_count("a red fox, 一只猫")
        6
    """
    return len(_TOKEN_RE.findall(text))


def find_repetition(text: str) -> str | None:
    """Why ``text`` looks degenerate (a word, phrase or character repeated over and over), or None.

    Flags one word four or more times in a row, a phrase of 2 to 8 words three or more times in a row,
    one character ten or more times in a row, and long texts with very few distinct words.

    Example:
        >>> find_repetition("a cat cat cat cat")
        "the word 'cat' repeated 4 times in a row"
        >>> find_repetition("a cat on a mat, a dog on a log") is None
        True
    """
    run = re.search(r"(\S)\1{9,}", text)
    if run:
        return f"the character {run.group(1)!r} repeated {len(run.group(0))} times in a row"
    words = [w.lower() for w in _TOKEN_RE.findall(text)]
    for n in range(1, 9):
        need = 4 if n == 1 else 3
        i = 0
        while i + n * need <= len(words):
            gram = words[i : i + n]
            k = 1
            while words[i + k * n : i + (k + 1) * n] == gram:
                k += 1
            if k >= need:
                what = f"the word {gram[0]!r}" if n == 1 else f"the {n}-word phrase {' '.join(gram)!r}"
                return f"{what} repeated {k} times in a row"
            i += 1
    if len(words) >= 24 and len(set(words)) / len(words) < 0.25:
        return f"only {len(set(words))} distinct words in {len(words)}"
    return None


def _garbled(text: str) -> str | None:
    if "\ufffd" in text:
        return "it contains undecodable bytes"
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return None
    ok = sum(1 for c in chars if unicodedata.category(c)[0] in "LNP")
    if ok / len(chars) < 0.8:
        return "it is mostly symbols"
    return None


def _strip_wrapping(text: str) -> str:
    for _ in range(3):
        text = text.strip()
        m = _LABEL_RE.match(text)
        if m:
            text = text[m.end() :]
            continue
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1] and text[0] not in text[1:-1]:
            text = text[1:-1]
            continue
        break
    return text.strip()


def check_rewrite(raw: str, max_words: int = MAX_WORDS) -> tuple[str, str | None]:
    """Clean a model's rewrite and say whether it is usable: ``(cleaned text, reason or None)``.

    Cleaning drops a leading "Enhanced prompt:"-style label or a short "Here is...:" line, quotes around
    the whole answer and line breaks. The answer is refused (with the reason) when it is empty, repeats a
    word or phrase over and over, is garbled, or is longer than ``max_words`` words (CJK characters count
    one each).

    Example:
        >>> check_rewrite('Enhanced prompt: "A red fox in a misty forest at dawn, soft light."')
        ('A red fox in a misty forest at dawn, soft light.', None)
        >>> check_rewrite("   ")
        ('', 'the rewrite is empty')
        >>> check_rewrite("fox fox fox fox fox")[1]
        "the rewrite is repetitive: the word 'fox' repeated 5 times in a row"
    """
    text = (raw or "").replace("\r", "")
    for special in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"):
        text = text.split(special)[0] if special != "<|im_start|>" else text.replace(special, "")
    lines = [ln.strip() for ln in text.strip().split("\n")]
    # "Sure! Here is the rewritten prompt:" on a line of its own.
    if len(lines) > 1 and lines[0].endswith((":", "：")) and len(lines[0].split()) <= 12:
        lines = lines[1:]
    text = " ".join(ln for ln in lines if ln)
    text = re.sub(r"\s+", " ", _strip_wrapping(text)).strip()
    if not text or not _TOKEN_RE.search(text):
        return "", "the rewrite is empty"
    rep = find_repetition(text)
    if rep:
        return text, f"the rewrite is repetitive: {rep}"
    bad = _garbled(text)
    if bad:
        return text, f"the rewrite is garbled: {bad}"
    n = word_count(text)
    if n > max_words:
        return text, f"the rewrite is too long: {n} words, the cap is {max_words}"
    return text, None


def finish_rewrite(
    raw: str,
    prompt: str,
    language: str = "en",
    *,
    positive_magic: bool = True,
    max_words: int = MAX_WORDS,
    hit_token_limit: bool = False,
    token_ids: list[int] | None = None,
) -> tuple[str, str | None, list[str]]:
    """Turn a model's decoded answer into the prompt to use: ``(prompt, fallback reason or None, notices)``.

    An answer cut at ``max_new_tokens`` (``hit_token_limit``) is trimmed back to its last full sentence;
    then :func:`check_rewrite` cleans and judges it (a single token id repeated 16 times in ``token_ids``
    is refused too). A usable rewrite gets the positive-magic suffix of ``language``
    (``qwennb.presets.POSITIVE_MAGIC``); an unusable one gives back ``prompt`` unchanged, with the reason.

    Example:
        >>> finish_rewrite("Enhanced prompt: A red fox in a misty birch forest at dawn.", "a red fox")[:2]
        ('A red fox in a misty birch forest at dawn, Ultra HD, 4K, cinematic composition.', None)
        >>> finish_rewrite("", "a red fox")[:2]
        ('a red fox', 'the rewrite is empty')
    """
    notices: list[str] = []
    candidate = raw
    if hit_token_limit:
        candidate = _trim_to_sentence(raw.strip())
        notices.append("the rewrite reached max_new_tokens and was cut back to its last full sentence")
    cleaned, reason = check_rewrite(candidate, max_words=max_words)
    if reason is None and token_ids and _token_run(token_ids) >= 16:
        reason = f"the rewrite is repetitive: one token repeated {_token_run(token_ids)} times in a row"
    if reason is not None:
        notices.append(f"kept the original prompt: {reason}")
        return prompt, reason, notices
    return (_with_magic(cleaned, language) if positive_magic else cleaned), None, notices


def _token_run(ids: list[int]) -> int:
    best = cur = 0
    prev = None
    for t in ids:
        cur = cur + 1 if t == prev else 1
        prev = t
        best = max(best, cur)
    return best


def _trim_to_sentence(text: str) -> str:
    """Cut a text that stopped mid-sentence back to its last full sentence (when that keeps most of it)."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|[。！？]", text)]
    if ends and ends[-1] >= 0.5 * len(text):
        return text[: ends[-1]]
    return text


def _with_magic(text: str, language: str) -> str:
    magic = POSITIVE_MAGIC[language]
    if magic.strip(" ,，.").rstrip("。") in text:
        return text
    return text.rstrip(" ,，.。;；!！") + magic


# ------------------------------------------------------------------------------------------ images


def load_image(image: Any) -> Any:
    """An RGB PIL image from a PIL image, a path, raw bytes or a numpy array. URLs are refused.

    Example:
        >>> from PIL import Image
        >>> load_image(Image.new("L", (8, 8))).mode
        'RGB'
        >>> load_image("https://example.com/cat.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qwennb.errors.QwennbError: URLs are not fetched: download the image and pass its path or bytes ...
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        im = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        try:
            im = Image.open(io.BytesIO(bytes(image)))
            im.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise QwennbError(f"the bytes given are not an image PIL can read ({exc})") from None
    elif isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if isinstance(text, str) and (
            re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) or text.startswith("data:")
        ):
            raise QwennbError(
                f"URLs are not fetched: download the image and pass its path or bytes (got {text[:80]!r})"
            )
        path = Path(text).expanduser()
        if not path.is_file():
            raise QwennbError(f"no image file at {text}")
        try:
            im = Image.open(path)
            im.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise QwennbError(f"{text} is not an image PIL can read ({exc})") from None
    elif hasattr(image, "__array__"):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
    else:
        raise QwennbError(f"an image must be a PIL image, a path or bytes, not {type(image).__name__}")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as they are
        pass
    return im.convert("RGB")


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of ``factor``, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise QwennbError(f"the image's aspect ratio must be under 200:1, got {width}x{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pixel_limits(image_processor: Any) -> tuple[int, int]:
    size = getattr(image_processor, "size", None) or {}
    if not isinstance(size, dict):
        size = {k: getattr(size, k, None) for k in ("shortest_edge", "longest_edge")}
    lo = getattr(image_processor, "min_pixels", None) or size.get("shortest_edge") or size.get("min_pixels")
    hi = getattr(image_processor, "max_pixels", None) or size.get("longest_edge") or size.get("max_pixels")
    return int(lo or QWEN25VL_MIN_PIXELS), int(hi or QWEN25VL_MAX_PIXELS)


def pipeline_image_processor(pipe: Any) -> Any:
    """An image processor for a QwenImagePipeline's text encoder (diffusers ships none for text-to-image).

    A ``processor/`` folder in the pipeline's snapshot is used when there is one (Qwen-Image-Edit has it);
    otherwise a ``Qwen2VLImageProcessor`` is built with Qwen2.5-VL's real defaults: 14-pixel patches,
    2x2 merge, temporal patch 2, 3136 to 12845056 pixels, CLIP mean/std (sizes read from the encoder's
    vision config where it has them).

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> pipeline_image_processor(build_tiny_pipeline()).patch_size
        14
    """
    from .stand_ins import qwen2vl_image_processor

    path = (getattr(pipe, "qwennb", None) or {}).get("path")
    if path and (Path(path) / "processor" / "preprocessor_config.json").is_file():
        try:
            cls = type(qwen2vl_image_processor())
            return cls.from_pretrained(str(Path(path) / "processor"), local_files_only=True)
        except (OSError, ValueError) as exc:  # fall back to the defaults below
            log.debug("could not read %s/processor: %s", path, exc)
    vc = getattr(getattr(pipe.text_encoder, "config", None), "vision_config", None)
    return qwen2vl_image_processor(
        patch_size=int(getattr(vc, "patch_size", 14) or 14),
        temporal_patch_size=int(getattr(vc, "temporal_patch_size", 2) or 2),
        merge_size=int(getattr(vc, "spatial_merge_size", 2) or 2),
    )


# ------------------------------------------------------------------------------------------ chat inputs


@dataclass
class ChatInputs:
    """What is handed to ``model.generate``: the rendered chat, its tokens and the image tensors."""

    text: str  # the chat as rendered by the template, image placeholders expanded
    tensors: dict[str, Any]  # input_ids, attention_mask [, pixel_values, image_grid_thw, mm_token_type_ids]
    image_tokens: int = 0
    grid_thw: tuple[int, int, int] = (0, 0, 0)
    image_size_used: tuple[int, int] = (0, 0)

    @property
    def input_ids(self) -> list[int]:
        return self.tensors["input_ids"][0].tolist()


def _chat_template(tokenizer: Any) -> str:
    from .stand_ins import CHATML_TEMPLATE

    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, Any]], has_image: bool) -> str:
    from .stand_ins import CHATML_TEMPLATE

    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=_chat_template(tokenizer)
    )
    if has_image and text.count("<|image_pad|>") != 1:  # a text-only template: use Qwen's ChatML one
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=CHATML_TEMPLATE
        )
    return text


def prepare_chat_inputs(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    image: Any = None,
    image_processor: Any = None,
    max_pixels: int | None = None,
    model: Any = None,
) -> ChatInputs:
    """Render ``messages`` with the tokenizer's chat template and tokenize them, with at most one image.

    With an image, the image is resized so that both sides are multiples of patch x merge (28) and its area
    is within the processor's [min_pixels, min(max_pixels, ``max_pixels``)], the image processor turns it
    into patches (``pixel_values``) and a grid ``(t, h, w)``, and the single ``<|image_pad|>`` of the
    rendered chat is expanded to ``t*h*w / merge**2`` copies, one per merged patch the vision tower will
    return. ``mm_token_type_ids`` (1 on image tokens) is added when ``model``'s forward takes it.

    Example:
        >>> from PIL import Image
        >>> from qwennb.stand_ins import build_tiny_vl_processor
        >>> proc = build_tiny_vl_processor()
        >>> msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        >>> ci = prepare_chat_inputs(proc.tokenizer, msgs, image=Image.new("RGB", (112, 56)),
        ...                          image_processor=proc.image_processor)
        >>> ci.grid_thw, ci.image_tokens, ci.image_size_used
        ((1, 4, 8), 8, (112, 56))
    """
    import torch

    text = _render(tokenizer, messages, image is not None)
    tensors: dict[str, Any] = {}
    n_image = 0
    grid: tuple[int, int, int] = (0, 0, 0)
    size_used = (0, 0)
    if image is not None:
        if image_processor is None:
            raise QwennbError("describing an image needs an image processor")
        im = load_image(image)
        patch = int(getattr(image_processor, "patch_size", 14))
        merge = int(getattr(image_processor, "merge_size", 2))
        lo, hi = _pixel_limits(image_processor)
        if max_pixels is not None:
            hi = max(lo, min(hi, int(max_pixels)))
        h, w = _smart_resize(im.height, im.width, patch * merge, lo, hi)
        if (w, h) != im.size:
            from PIL import Image

            im = im.resize((w, h), Image.Resampling.BICUBIC)
        feats = image_processor(images=[im], return_tensors="pt")
        grid_t = feats["image_grid_thw"]
        grid = tuple(int(x) for x in grid_t[0].tolist())  # type: ignore[assignment]
        n_image = grid[0] * grid[1] * grid[2] // merge**2
        size_used = (grid[2] * patch, grid[1] * patch)
        head, tail = text.split("<|image_pad|>", 1)
        text = head + "<|image_pad|>" * n_image + tail
        tensors["pixel_values"] = feats["pixel_values"]
        tensors["image_grid_thw"] = grid_t
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    tensors["input_ids"] = enc["input_ids"]
    tensors["attention_mask"] = enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
    if image is not None:
        pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        got = int((tensors["input_ids"] == pad_id).sum())
        if got != n_image:
            raise QwennbError(
                f"the tokenizer split the image placeholders: {got} tokens for {n_image} patches"
            )
        if model is not None and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            tensors["mm_token_type_ids"] = (tensors["input_ids"] == pad_id).to(torch.int32)
    return ChatInputs(text, tensors, n_image, grid, size_used)


# ------------------------------------------------------------------------------------------ models

TINY_VL = {"tiny-vl": "qwen2.5-vl", "tiny-vl2": "qwen2-vl"}
_CURRENT: VLModel | None = None


def current_vl_model() -> VLModel | None:
    """The VL model loaded with :func:`load_vl_model`, or None."""
    return _CURRENT


def _input_device(model: Any, pipe: Any = None) -> Any:
    from .pipeline import input_device

    return input_device(model, pipe)


def _lm_head_missing_from_checkpoint(pipe: Any) -> bool:
    """True when the pipeline's text encoder was loaded from a snapshot whose weights have no ``lm_head``."""
    path = (getattr(pipe, "qwennb", None) or {}).get("path")
    if not path:
        return False
    folder = Path(path) / "text_encoder"
    if getattr(getattr(pipe.text_encoder, "config", None), "tie_word_embeddings", False):
        return False
    keys: set[str] = set()
    indexes = list(folder.glob("*.safetensors.index.json"))
    try:
        if indexes:
            for idx in indexes:
                keys.update(json.loads(idx.read_text(encoding="utf-8"))["weight_map"])
        else:
            from safetensors import safe_open

            for f in folder.glob("*.safetensors"):
                with safe_open(str(f), framework="pt") as st:
                    keys.update(st.keys())
    except (OSError, ValueError, KeyError):
        return False
    return bool(keys) and not any(k.endswith("lm_head.weight") for k in keys)


def _no_head_error(what: str) -> QwennbError:
    return QwennbError(
        f"{what} has no language-model head (lm_head), so it cannot write text; load a chat model instead: "
        "qwennb.enhance.load_vl_model('qwen2.5-vl-7b') or 'qwen2-vl-7b' (CLI: --model qwen2.5-vl-7b)"
    )


def _check_can_write(vl: VLModel) -> None:
    model = vl.model
    if model is None:
        raise QwennbError(f"{vl.name} was unloaded; load it again with load_vl_model({vl.name!r})")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "generate"):
        raise _no_head_error(f"{vl.name} ({type(model).__name__})")
    if vl.pipe is not None and _lm_head_missing_from_checkpoint(vl.pipe):
        raise _no_head_error(f"{vl.name} (its checkpoint's text encoder has no lm_head weights)")


def _vision_tower(model: Any) -> Any:
    return getattr(model, "visual", None) or getattr(getattr(model, "model", None), "visual", None)


def _pipeline_vl(pipe: Any) -> VLModel:
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise QwennbError(
            "this pipeline has no text encoder and tokenizer to write with; pass model='qwen2.5-vl-7b' "
            "(or load one with qwennb.enhance.load_vl_model)"
        )
    info = getattr(pipe, "qwennb", None) or {}
    te = pipe.text_encoder
    p = next(te.parameters(), None)
    processor = SimpleNamespace(tokenizer=pipe.tokenizer, image_processor=None)
    return VLModel(
        name=f"{info.get('model') or 'pipeline'} text encoder",
        model=te,
        processor=processor,
        device=str(_input_device(te, pipe)),
        dtype=str(p.dtype).replace("torch.", "") if p is not None else "none",
        pipe=pipe,
    )


def _as_vl(model: Any) -> VLModel:
    if isinstance(model, VLModel):
        return model
    if isinstance(model, str):
        if _CURRENT is not None and _canonical(model) == _CURRENT.name:
            return _CURRENT
        return load_vl_model(model)
    if isinstance(model, tuple) and len(model) == 2:
        m, proc = model
        return VLModel(
            getattr(m.config, "name_or_path", "") or type(m).__name__, m, proc, str(_input_device(m))
        )
    if hasattr(model, "forward") and hasattr(model, "config"):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise _no_head_error(type(model).__name__)
        raise QwennbError("pass a model with its processor: model=(model, processor), or a registry name")
    raise QwennbError(
        f"model must be a registry name, a VLModel or (model, processor), not {type(model).__name__}"
    )


def _select(model: Any, pipe: Any, prefer_vl: bool = False) -> VLModel:
    if model is not None:
        return _as_vl(model)
    if prefer_vl and _CURRENT is not None:
        return _CURRENT
    if pipe is not None:
        return _pipeline_vl(pipe)
    if _CURRENT is not None:
        return _CURRENT
    raise QwennbError(
        "no model to write with: pass pipe=<a loaded Qwen-Image pipeline> (its text encoder is used), or "
        "load a VL model with qwennb.enhance.load_vl_model('qwen2.5-vl-7b') "
        "(or 'qwen2-vl-7b'; 'tiny-vl' offline)"
    )


def _canonical(name: str) -> str:
    key = name.strip().lower()
    if key in TINY_VL:
        return key
    if os.path.isdir(name):
        return str(Path(name).resolve())
    from .models import get_model

    return get_model(name).name


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def load_vl_model(
    name: str = "qwen2.5-vl-7b",
    device: str | None = None,
    dtype: Any = None,
) -> VLModel:
    """Load a VL chat model for enhancement and description (one at a time; it becomes the current one).

    ``name``: ``"qwen2.5-vl-7b"``, ``"qwen2-vl-7b"`` (or their hub ids), a folder holding one, or the tiny
    stand-ins ``"tiny-vl"`` (Qwen2.5-VL classes) and ``"tiny-vl2"`` (Qwen2-VL) built in code. Memory is
    checked first: the model's size in ``dtype`` (bf16 by default), computed from its config, against the
    GPU's free memory (``qwennb.hardware.detect()``); when it does not fit the load is refused with the
    numbers, and ``device="cpu"`` places it in host RAM instead (slow). Weights load with
    ``from_pretrained(..., use_safetensors=True)``, from the local Hugging Face cache without the network
    when they are there (or when HF_HUB_OFFLINE is set), with ``AutoProcessor``.

    Example:
        >>> vl = load_vl_model("tiny-vl")
        >>> type(vl.model).__name__
        'Qwen2_5_VLForConditionalGeneration'
        >>> unload_vl_model()
        True
    """
    global _CURRENT
    import torch

    t0 = time.perf_counter()
    key = _canonical(name)
    if (
        _CURRENT is not None
        and _CURRENT.name == key
        and (device is None or _CURRENT.device.startswith(device))
    ):
        return _CURRENT
    if _CURRENT is not None:
        unload_vl_model()
    if isinstance(dtype, str):
        names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        found = getattr(torch, names.get(dtype.lower(), dtype.lower()), None)
        if not isinstance(found, torch.dtype):
            raise QwennbError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
        dtype = found
    if key in TINY_VL:
        from .stand_ins import build_tiny_vl

        dev = device or "cpu"
        model, processor = build_tiny_vl(TINY_VL[key], seed=0, device=dev, dtype=dtype or torch.float32)
        _CURRENT = VLModel(key, model, processor, str(torch.device(dev)), _dtype_name(dtype or torch.float32))
        _CURRENT.load_s = time.perf_counter() - t0
        return _CURRENT

    dtype = dtype or torch.bfloat16
    class_name, need_gib, spec = _vl_size(name, dtype)
    dev = _choose_device(key, need_gib, device, dtype)  # memory first: refuse before touching any file
    source, local = _vl_source(name, spec, need_gib)
    import transformers

    cls = getattr(transformers, class_name)
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": local}
    major = int(transformers.__version__.split(".")[0])
    kwargs["dtype" if major >= 5 else "torch_dtype"] = dtype
    if dev != "cpu":
        kwargs["device_map"] = dev
    try:
        model = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"could not load {source}: {first}") from exc
    model.eval()
    model.requires_grad_(False)
    processor = _load_processor(source, local)
    _CURRENT = VLModel(key, model, processor, dev, _dtype_name(dtype), time.perf_counter() - t0)
    return _CURRENT


def _vl_size(name: str, dtype: Any) -> tuple[str, float, Any]:
    """(class name, size in GiB for ``dtype``, registry spec or None) of a VL model name or folder."""
    import torch

    from .models import component_sizes, get_model

    nbytes = torch.tensor([], dtype=dtype).element_size()
    if os.path.isdir(name):
        try:
            cfg = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise LoadError(f"{name} has no readable config.json") from None
        if "vision_config" not in cfg:
            raise LoadError(f"{name} holds no vision-language model (its config has no vision_config)")
        # Checkpoints ship in bf16: scale the size on disk to the requested dtype.
        on_disk = sum(f.stat().st_size for f in Path(name).glob("*.safetensors"))
        return cfg["architectures"][0], on_disk / 1024**3 * nbytes / 2, None
    spec = get_model(name)
    if spec.architecture != "VL":
        raise QwennbError(
            f"{spec.name} is an image model, not a VL chat model; pass it as pipe= (its text encoder is "
            "used) or choose qwen2.5-vl-7b / qwen2-vl-7b"
        )
    return spec.pipeline_class, component_sizes(spec.name)["model"].gib(nbytes), spec


def _vl_source(name: str, spec: Any, need_gib: float) -> tuple[str, bool]:
    """(where to load from, local_files_only): a folder, the local cache, else the hub when online."""
    from .models import find_local_models
    from .pipeline import offline

    if spec is None:
        return str(Path(name).resolve()), True
    for m in find_local_models():
        if m.hub_id == spec.hub_id and m.complete:
            return m.path, True
    if offline():
        raise LoadError(
            f"{spec.hub_id} is not in the local cache and the hub is offline; fetch it where the hub is "
            f"reachable with `hf download {spec.hub_id}`"
        )
    log.warning("%s is not cached locally: downloading it (about %.0f GB)", spec.hub_id, need_gib * 1.074)
    return str(spec.hub_id), False


def _choose_device(key: str, need_gib: float, device: str | None, dtype: Any) -> str:
    from .hardware import detect

    hw = detect()
    gpu = hw.best_gpu
    headroom = 1.5  # activations, KV cache and the CUDA context
    what = f"{key} needs {need_gib:.1f} GiB in {_dtype_name(dtype)}"
    if device is not None and device.startswith("cpu"):
        if hw.host_ram_available_gb and need_gib + 1.0 > hw.host_ram_available_gb:
            raise QwennbError(f"{what} but the host has {hw.host_ram_available_gb:.1f} GiB of RAM available")
        return "cpu"
    if gpu is None:
        raise QwennbError(
            f"{what} and this machine has no CUDA GPU; pass device='cpu' (CLI: --device cpu) to run it in "
            f"host RAM ({hw.host_ram_available_gb:.1f} GiB available; slow), or use the pipeline's text "
            "encoder (pipe=)"
        )
    if need_gib + headroom > gpu.free_memory_gb:
        raise QwennbError(
            f"{what} (+{headroom:.1f} GiB to run) but GPU {gpu.index} ({gpu.name}) has "
            f"{gpu.free_memory_gb:.1f} of {gpu.total_memory_gb:.1f} GiB free; free memory (unload the "
            "pipeline), use the pipeline's text encoder (pipe=), or pass device='cpu' (CLI: --device cpu; slow)"
        )
    return device or f"cuda:{gpu.index}"


def _load_processor(source: str, local: bool) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(source, local_files_only=local)
    except Exception as exc:  # noqa: BLE001 - e.g. the video half needs torchvision: build the two we use
        log.debug("AutoProcessor failed (%s); loading the tokenizer and image processor", exc)
    from .stand_ins import qwen2vl_image_processor

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    try:
        image_processor = type(qwen2vl_image_processor()).from_pretrained(source, local_files_only=local)
    except (OSError, ValueError):
        image_processor = qwen2vl_image_processor()
    return SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor)


def unload_vl_model() -> bool:
    """Forget the current VL model and free its memory; True if one was loaded.

    Memory is only returned when nothing else holds a reference to the model (drop your own ``VLModel``
    variables too).
    """
    global _CURRENT
    if _CURRENT is None:
        return False
    _CURRENT.model = None
    _CURRENT.processor = None
    _CURRENT = None
    from .generation import free_memory

    free_memory()
    return True


# ------------------------------------------------------------------------------------------ generation


def _eos_ids(tokenizer: Any) -> list[int]:
    ids = []
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _run_generate(
    vl: VLModel,
    inputs: ChatInputs,
    *,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
    repetition_penalty: float,
) -> tuple[list[int], bool]:
    """Generate on the model where it lives; returns (new token ids, stopped at max_new_tokens)."""
    import torch

    model, tokenizer = vl.model, vl.tokenizer
    device = _input_device(model, vl.pipe)
    tensors = {k: v.to(device) for k, v in inputs.tensors.items()}
    eos = _eos_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "repetition_penalty": repetition_penalty,
    }
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    saved = [(m, m.rope_deltas) for m in model.modules() if hasattr(m, "rope_deltas")]
    was_training = model.training
    model.eval()
    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            if sample:
                torch.manual_seed(int(seed or 0))
            out = model.generate(**tensors, **kwargs)
    finally:
        for m, value in saved:  # the pipeline's encoder must not carry generation state into encode_prompt
            m.rope_deltas = value
        model.train(was_training)
    new = out[0, tensors["input_ids"].shape[1] :].tolist()
    ended = bool(new) and new[-1] in eos
    if ended:
        new = new[:-1]
    return new, (not ended and len(new) >= max_new_tokens)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _check_number(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise QwennbError(f"{name} must be from {lo:g} to {hi:g}, got {value!r}")


# ------------------------------------------------------------------------------------------ public API


def enhance_prompt(
    prompt: str,
    pipe: Any = None,
    *,
    model: Any = None,
    context: str | None = None,
    max_new_tokens: int = 256,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    language: str | None = None,
    positive_magic: bool = True,
    max_words: int = MAX_WORDS,
    max_prompt_tokens: int | None = None,
    repetition_penalty: float = 1.05,
) -> EnhancedPrompt:
    """Rewrite a short prompt into a detailed one with a Qwen VL model.

    With ``pipe`` the pipeline's own text encoder and tokenizer write (nothing is loaded or moved); with
    ``model`` (a name for :func:`load_vl_model`, a :class:`VLModel` or ``(model, processor)``) a separate
    VL model does. The chat is a system prompt of ours (keep meaning and proper nouns; make subject, style,
    composition and lighting concrete; quote any text to render, never translated; under 200 words; rewrite
    instructions, don't answer them) in Chinese for prompts with CJK characters, else in English, then the
    prompt and ``context`` (e.g. a reference image's style from :func:`describe_image`) as the user turn.

    Decoding is greedy (the same prompt gives the same rewrite); ``sample=True`` samples with
    ``temperature``/``top_p`` from ``seed`` (drawn and recorded when None). The positive-magic suffix of
    the prompt's language is appended to a usable rewrite. A prompt longer than the encoder's limit
    (``pipe.tokenizer_max_length``, 1024 tokens) is cut, with a notice. An empty, repetitive, garbled or
    over-long rewrite (see :func:`check_rewrite`) falls back to the prompt, with ``fallback_reason`` set.

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> pipe = build_tiny_pipeline()
        >>> e = enhance_prompt("一只猫", pipe, max_new_tokens=8)
        >>> e.language, e.chat[0]["content"].startswith("你是")
        ('zh', True)
    """
    import random

    if not isinstance(prompt, str) or not prompt.strip():
        raise QwennbError("the prompt is empty")
    _check_number("max_new_tokens", max_new_tokens, 1, 4096)
    _check_number("max_words", max_words, 1, 10000)
    if sample:
        _check_number("temperature", temperature, 1e-3, 5.0)
        _check_number("top_p", top_p, 1e-3, 1.0)
    language = language or detect_language(prompt)
    if language not in SYSTEM_PROMPTS:
        raise QwennbError(f"language must be 'en' or 'zh', got {language!r}")
    vl = _select(model, pipe)
    _check_can_write(vl)
    tokenizer = vl.tokenizer
    notices: list[str] = []
    limit = int(max_prompt_tokens or getattr(vl.pipe, "tokenizer_max_length", None) or DEFAULT_PROMPT_TOKENS)
    text = prompt.strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > limit
    if truncated:
        text = _decode(tokenizer, ids[:limit]).strip()
        notices.append(
            f"the prompt has {len(ids)} tokens and the text encoder reads at most {limit}: "
            f"only its first {limit} tokens were rewritten"
        )
    user = PROMPT_LABEL[language] + text
    if context and context.strip():
        user += "\n" + CONTEXT_LABEL[language] + context.strip()
    chat = [{"role": "system", "content": SYSTEM_PROMPTS[language]}, {"role": "user", "content": user}]
    if sample and seed is None:
        seed = random.SystemRandom().randrange(0, 2**31)
    if vl.pipe is not None and _input_device(vl.model, vl.pipe).type == "cpu":
        n = sum(p.numel() for p in vl.model.parameters())
        if n > 1e9:
            notices.append("the text encoder lives on the CPU: the rewrite runs there and is slow")
    inputs = prepare_chat_inputs(tokenizer, chat, model=vl.model)
    t0 = time.perf_counter()
    new, hit_limit = _run_generate(
        vl,
        inputs,
        max_new_tokens=int(max_new_tokens),
        sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
    )
    seconds = time.perf_counter() - t0
    raw = _decode(tokenizer, new)
    enhanced, reason, more = finish_rewrite(
        raw,
        text,
        language,
        positive_magic=positive_magic,
        max_words=max_words,
        hit_token_limit=hit_limit,
        token_ids=new,
    )
    notices += more
    for n in notices:
        log.info(n)
    return EnhancedPrompt(
        original=prompt,
        enhanced=enhanced,
        language=language,
        model=vl.name,
        seconds=seconds,
        fallback_reason=reason,
        truncated=truncated or hit_limit,
        prompt_truncated=truncated,
        chat=chat,
        notices=notices,
        raw=raw,
        new_tokens=len(new),
        hit_token_limit=hit_limit,
        sampled=sample,
        seed=seed if sample else None,
    )


def enhance_prompt_with_qwen2vl(
    prompt: str, context: str | None = None, model: Any = None, *, pipe: Any = None, **kwargs: Any
) -> str:
    """The original project's name: the enhanced prompt as a string (the prompt itself on fallback).

    ``model``: a name (``"qwen2-vl-7b"``, ``"qwen2.5-vl-7b"``, ``"tiny-vl"``...), a :class:`VLModel` or
    ``(model, processor)``; by default the VL model loaded with :func:`load_vl_model`, else the text encoder
    of ``pipe``. Other keyword arguments go to :func:`enhance_prompt`.

    Example:
        >>> _ = load_vl_model("tiny-vl2")
        >>> isinstance(enhance_prompt_with_qwen2vl("a cat", max_new_tokens=8), str)
        True
        >>> _ = unload_vl_model()
    """
    vl = _select(model, pipe, prefer_vl=True)
    return enhance_prompt(prompt, model=vl, context=context, **kwargs).enhanced


def describe_image(
    image: Any,
    focus: str = "style",
    *,
    model: Any = None,
    pipe: Any = None,
    max_new_tokens: int = 200,
    max_pixels: int | None = None,
    language: str = "en",
    max_words: int = MAX_WORDS,
) -> ImageDescription:
    """Describe a reference image's style (palette, lighting, composition, medium) or its full content.

    ``image``: a PIL image, a path or raw bytes (URLs are refused). ``focus="style"`` describes how the
    image looks, for use as ``context=`` of :func:`enhance_prompt` or appended to a prompt;
    ``focus="content"`` describes everything in it, usable as a prompt on its own. The model is ``model``
    (as for :func:`enhance_prompt`), else ``pipe``'s text encoder (Qwen2.5-VL, vision tower included; the
    image processor is built with Qwen2.5-VL's defaults as diffusers ships none), else the loaded VL model.
    Images are resized to the processor's pixel limits, at most ``max_pixels`` (default
    :data:`DESCRIBE_MAX_PIXELS`, about 1280 visual tokens). Decoding is greedy.

    Example:
        >>> from PIL import Image
        >>> d = describe_image(Image.new("RGB", (640, 480), "orange"), model="tiny-vl", max_new_tokens=8)
        >>> d.focus, d.image_size_used
        ('style', (252, 168))
        >>> _ = unload_vl_model()
    """
    if focus not in FOCUSES:
        raise QwennbError(f"focus must be one of {', '.join(FOCUSES)}, got {focus!r}")
    if language not in DESCRIBE_SYSTEM:
        raise QwennbError(f"language must be 'en' or 'zh', got {language!r}")
    _check_number("max_new_tokens", max_new_tokens, 1, 4096)
    im = load_image(image)  # refuse bad input before anything runs
    vl = _select(model, pipe)
    _check_can_write(vl)
    if _vision_tower(vl.model) is None:
        raise QwennbError(f"{vl.name} has no vision tower; use qwen2.5-vl-7b or qwen2-vl-7b")
    image_processor = vl.image_processor
    if image_processor is None:
        image_processor = pipeline_image_processor(vl.pipe) if vl.pipe is not None else None
    if image_processor is None:
        from .stand_ins import qwen2vl_image_processor

        image_processor = qwen2vl_image_processor()
    chat = [
        {"role": "system", "content": DESCRIBE_SYSTEM[language]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": DESCRIBE_INSTRUCTIONS[(focus, language)]},
            ],
        },
    ]
    limit = DESCRIBE_MAX_PIXELS if max_pixels is None else int(max_pixels)
    inputs = prepare_chat_inputs(
        vl.tokenizer, chat, image=im, image_processor=image_processor, max_pixels=limit, model=vl.model
    )
    notices = []
    if inputs.image_size_used != im.size:
        notices.append(
            f"the image was resized from {im.width}x{im.height} to "
            f"{inputs.image_size_used[0]}x{inputs.image_size_used[1]} for the vision tower"
        )
    t0 = time.perf_counter()
    new, hit_limit = _run_generate(
        vl,
        inputs,
        max_new_tokens=int(max_new_tokens),
        sample=False,
        temperature=1.0,
        top_p=1.0,
        seed=None,
        repetition_penalty=1.05,
    )
    seconds = time.perf_counter() - t0
    raw = _decode(vl.tokenizer, new)
    text, problem = check_rewrite(_trim_to_sentence(raw.strip()) if hit_limit else raw, max_words=max_words)
    if problem is not None:
        problem = problem.replace("the rewrite", "the description")
        notices.append(f"no usable description: {problem}")
        text = ""
    return ImageDescription(
        text=text,
        focus=focus,
        model=vl.name,
        seconds=seconds,
        chat=chat,
        image_size_used=inputs.image_size_used,
        original_size=im.size,
        grid_thw=inputs.grid_thw,
        image_tokens=inputs.image_tokens,
        problem=problem,
        notices=notices,
        raw=raw,
        new_tokens=len(new),
    )


# ------------------------------------------------------------------------------------------ CLI


def _is_vl_name(name: str) -> bool:
    if name.strip().lower() in TINY_VL:
        return True
    if os.path.isdir(name):
        from .models import architecture_of

        return architecture_of(name) == "VL"
    from .errors import UnknownModelError
    from .models import get_model

    try:
        return get_model(name).architecture == "VL"
    except UnknownModelError:
        return False


def _cli_model(name: str | None, device: str | None) -> dict[str, Any]:
    """``{"model": VLModel}`` for a VL model name, else ``{"pipe": pipeline}`` loaded as ``qwennb generate``
    would load it."""
    if name and _is_vl_name(name):
        return {"model": load_vl_model(name, device=device)}
    from .hardware import detect
    from .pipeline import build, resolve_model
    from .plan import make_plan

    reg, path, notice = resolve_model(name)
    if notice:
        print(f"qwennb: {notice}", file=sys.stderr)
    return {"pipe": build(make_plan(detect(), reg), path)}
