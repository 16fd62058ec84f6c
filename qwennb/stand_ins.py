"""Stand-in Qwen-Image pipelines built entirely in code: no download, no Hugging Face hub.

Two kinds of stand-in share one construction path (every component is built on the meta device from a
config in ``qwennb/configs/<name>/`` and then materialised straight on the target device):

* :func:`build_tiny_pipeline` -- a pipeline of the real classes (``QwenImageTransformer2DModel``,
  ``AutoencoderKLQwenImage``, ``Qwen2_5_VLForConditionalGeneration``, ``FlowMatchEulerDiscreteScheduler``)
  at toy size (``configs/tiny``). It makes a 256x256 image in 8 steps with CFG in about a second on a
  laptop CPU, and its weights are bit-identical for a given seed on any CPU, so tests can compare pixels.
* :func:`build_synthetic_pipeline` -- the real full-size configs with random weights, materialised
  directly on the accelerator in the requested dtype (never a host copy of the weights). Good for
  measuring memory and speed of the real architecture without downloading 57 GB.

Both use :func:`build_tiny_tokenizer`, a byte-level BPE tokenizer learned in code from a built-in
English and Chinese text, with Qwen's special tokens and a ChatML chat template.

Example:
    >>> from qwennb.stand_ins import build_tiny_pipeline
    >>> pipe = build_tiny_pipeline(seed=0)
    >>> image = pipe("a cat", negative_prompt=" ", true_cfg_scale=4.0, height=256, width=256,
    ...              num_inference_steps=8).images[0]
    >>> image.size
    (256, 256)
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_synthetic_pipeline",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "count_parameters",
    "load_component_config",
    "materialize_",
    "template_prefix_tokens",
]

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"

# Qwen2's pre-tokenisation regex (the same as in transformers' Qwen2Tokenizer): words with an optional
# leading non-letter, single digits, punctuation runs, newlines and spaces are pre-tokens of their own.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens in Qwen's own order, so that their ids keep the same offsets from
# ``<|endoftext|>`` as in the real vocabulary (there 151643, 151644, ...). The first three are the ones
# text-to-image needs; the vision ones make the text encoder's image/video token ids point at real tokens.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ChatML, as Qwen uses it: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, and
# ``<|im_start|>assistant\n`` for the generation prompt. Content may be a string or a list of parts
# ({"type": "text", "text": ...}, {"type": "image"}, {"type": "video"}) as in Qwen2.5-VL's template.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# The fixed text the tiny tokenizer's merges are learned from. Changing it changes every token id (and
# then ``configs/tiny/text_encoder.json``'s token ids must follow: a test checks that they agree).
TOKENIZER_CORPUS = """\
Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships \
of the objects and background.
A cat sitting on a wooden table next to a cup of coffee, soft morning light through the window.
A photo of a red car parked on a quiet street in the rain, with reflections on the wet road.
A watercolor painting of a mountain lake at sunrise, with pine trees and a small boat on the water.
A close-up portrait of an old man with a white beard, wearing a blue hat, in warm evening light.
A bowl of fresh fruit on a kitchen counter: apples, oranges, bananas and a bunch of green grapes.
A neon sign that says "OPEN 24 HOURS" above the door of a small shop in a busy city at night.
A dog running on the beach with a ball in its mouth, waves in the background and a clear blue sky.
A cozy reading room with a large window, a soft chair, a lamp and shelves full of old books.
A poster with the text "Hello World" in bold black letters on a bright yellow background.
A cute robot holding a flower in a garden, digital art, high detail, soft shadows, 4k.
The city skyline at dusk, with tall glass buildings, bright lights and a river in the foreground.
Two children flying a kite in a green field on a windy spring day, with white clouds in the sky.
A plate of noodles with vegetables and a pair of chopsticks on a dark wooden table, top view.
A snowy village in the mountains at night, with warm light in the windows and smoke from the chimneys.
An astronaut riding a horse on the moon, photorealistic, dramatic lighting, wide angle lens.
A bookstore sign that reads "Books & Coffee" painted in gold letters on a green wooden board.
A macro photograph of a dew drop on a leaf, with the garden reflected in the water.
A vintage travel poster of a seaside town, with the words "Summer by the Sea" at the top.
The system describes the user's image: the colors, the shapes, the sizes and the text in the picture.
一只可爱的小猫坐在窗边，阳光洒在它的身上，背景是蓝色的天空和白色的云。
一幅中国山水画，远处是高山和瀑布，近处有一座小桥和几棵松树。
一张海报，上面写着"你好，世界"，字体是红色的，背景是黄色的。
夜晚的城市街道，路灯明亮，雨后的地面上有五颜六色的倒影。
一个女孩在花园里读书，身边有一只小狗，画面温暖而安静。
一碗热腾腾的面条，上面有青菜和鸡蛋，放在木桌上。
一家咖啡店的招牌，上面写着"早安"，旁边有一盆绿色的植物。
system
You describe images in detail.
user
Draw a cat on a red sofa.
assistant
A photo of a cat on a red sofa.
user
画一只猫。
assistant
一只猫坐在沙发上。
system
Describe the image.
"""

# Upper bound on the tokenizer's learned vocabulary (256 byte symbols + merges); with min_frequency=2 the
# corpus above stops well before it.
_BPE_VOCAB_LIMIT = 768


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _config_dir(config_dir: str | os.PathLike[str]) -> Path:
    """Resolve a shipped config name (``"tiny"``, ``"qwen-image"``) or a folder path."""
    shipped = CONFIG_ROOT / str(config_dir)
    if shipped.is_dir():
        return shipped
    path = Path(config_dir)
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no config folder {config_dir!r} (looked in {CONFIG_ROOT} and as a path)")


def load_component_config(config_dir: str | os.PathLike[str], component: str) -> dict[str, Any]:
    """Read ``<config_dir>/<component>.json`` as a dict.

    Example:
        >>> load_component_config("tiny", "transformer")["num_layers"]
        2
    """
    with open(_config_dir(config_dir) / f"{component}.json", encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _new_backend_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Learn the BPE merges once per process and return the ``tokenizers`` serialisation."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    tok = _new_backend_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_LIMIT,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    # Added after training, so they follow the learned vocabulary as in Qwen's (ids N, N+1, ...).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def _qwen2_tokenizer_class() -> type:
    # transformers 5 has one tokenizers-backed Qwen2Tokenizer (Qwen2TokenizerFast is an alias of it);
    # transformers 4 has a slow Qwen2Tokenizer and the fast Qwen2TokenizerFast, which is the one we want.
    import transformers

    return getattr(transformers, "Qwen2TokenizerFast", None) or transformers.Qwen2Tokenizer


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small byte-level BPE tokenizer of the class QwenImagePipeline expects (``Qwen2Tokenizer[Fast]``).

    256 byte symbols plus a few hundred merges learned (deterministically) from a built-in English and
    Chinese text with ``tokenizers.trainers.BpeTrainer``, Qwen's pre-tokenisation (regex split + ByteLevel),
    a ByteLevel decoder, Qwen2.5-VL's special tokens after the learned vocabulary (``<|endoftext|>`` is
    the pad token, ``<|im_end|>`` the eos token, as in Qwen2.5-VL) and a ChatML ``chat_template``.

    Example:
        >>> tok = build_tiny_tokenizer()
        >>> tok.decode(tok("a cat")["input_ids"])
        'a cat'
        >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
        ...                         add_generation_prompt=True)
        '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    from tokenizers import Tokenizer

    return wrap_qwen_tokenizer(Tokenizer.from_str(_tiny_tokenizer_json()))


def wrap_qwen_tokenizer(backend: Any) -> PreTrainedTokenizerBase:
    """A ``tokenizers`` backend (Qwen's special tokens already added) as the tokenizer class QwenImagePipeline
    expects: ``<|endoftext|>`` pads, ``<|im_end|>`` ends, ChatML template. Used by the tiny stand-ins and by the
    toy model's training script."""
    tokenizer = _qwen2_tokenizer_class()(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def template_prefix_tokens(tokenizer: PreTrainedTokenizerBase, template: str) -> int:
    """How many tokens ``template`` produces before its ``{}`` (what the pipeline must drop).

    QwenImagePipeline formats each prompt into ``pipe.prompt_template_encode`` and drops the first
    ``pipe.prompt_template_encode_start_idx`` hidden states (34 for Qwen's own tokenizer). This counts
    them for any tokenizer, and checks that the count is stable when a prompt follows (no token
    crosses the ``{}`` boundary).

    Example:
        >>> tok = build_tiny_tokenizer()
        >>> template_prefix_tokens(tok, "<|im_start|>user\\n{}<|im_end|>\\n")  # <|im_start|>, user, \\n
        3
    """
    if template.count("{}") != 1:
        raise ValueError("the template must contain exactly one '{}'")
    prefix = template.split("{}")[0]
    prefix_ids = list(tokenizer(prefix)["input_ids"])
    n = len(prefix_ids)
    for probe in ("a cat", "A red car. 一只猫"):
        ids = list(tokenizer(template.replace("{}", probe))["input_ids"])
        if ids[:n] != prefix_ids:
            raise ValueError(
                f"the template's prefix does not tokenise the same when followed by {probe!r}: "
                f"{prefix_ids} vs {ids[:n]}"
            )
    return n


# --------------------------------------------------------------------------------------------------
# Building modules on the meta device, then materialising them
# --------------------------------------------------------------------------------------------------

_LINEAR_LIKE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _param_role(module: nn.Module, name: str, param: torch.Tensor) -> str:
    """Classify a parameter: "weight" (fan-in matrix / kernel), "embedding", "bias", "ones" or "zeros"."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _LINEAR_LIKE):
        return "weight" if name == "weight" else "bias"
    is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
        "norm" in type(module).__name__.lower()
    )
    if is_norm:
        if name in ("weight", "gamma", "scale"):
            return "ones"
        if name in ("bias", "beta", "shift"):
            return "zeros"
    if param.dim() >= 2:
        return "weight"
    if "bias" in name:
        return "bias"
    raise ValueError(f"don't know how to initialise {type(module).__name__}.{name} {tuple(param.shape)}")


def _fan_in(shape: torch.Size) -> int:
    return int(shape[1] * math.prod(shape[2:])) if len(shape) >= 2 else int(shape[0])


InitFn = Callable[[nn.Module, str, torch.Tensor], None]


def _portable_uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) in float32 on CPU, bit-identical on every CPU.

    ``torch.randn``/``normal_``/``uniform_`` are not: their CPU kernels take vectorised paths (AVX2/AVX512
    vs. the default one) that round differently. Integers from the Mersenne Twister, an exact int->float
    conversion and one multiplication are the same everywhere.
    """
    ints = torch.randint(-(2**23), 2**23, tuple(shape), generator=generator, dtype=torch.int32)
    return ints.to(torch.float32).mul_(bound / 2**23)


def _tiny_init(generator: torch.Generator) -> InitFn:
    """Fan-in scaled uniform weights (PyTorch's default Linear/Conv scale), zero biases, norms at 1."""

    def init(module: nn.Module, name: str, data: torch.Tensor) -> None:
        role = _param_role(module, name, data)
        if role == "weight":
            data.copy_(_portable_uniform(data.shape, 1.0 / math.sqrt(_fan_in(data.shape)), generator))
        elif role == "embedding":
            data.copy_(_portable_uniform(data.shape, math.sqrt(3.0), generator))  # std 1
        elif role == "ones":
            data.fill_(1.0)
        else:
            data.zero_()

    return init


def _normal_init(generator: torch.Generator, std: float) -> InitFn:
    """Weights and embeddings ~ N(0, std) drawn on the target device, biases 0, norm weights 1."""

    def init(module: nn.Module, name: str, data: torch.Tensor) -> None:
        role = _param_role(module, name, data)
        if role in ("weight", "embedding"):
            data.normal_(0.0, std, generator=generator)
        elif role == "ones":
            data.fill_(1.0)
        else:
            data.zero_()

    return init


def _staged_init(inner: InitFn, stage: torch.device) -> InitFn:
    """Fill host tensors by drawing them on ``stage`` (a GPU) and copying back: CPU random draws in bf16 run
    at a few hundred MB/s, which made a host-resident 20B transformer take minutes to build."""

    def init(module: nn.Module, name: str, data: torch.Tensor) -> None:
        if data.device == stage:
            inner(module, name, data)
            return
        tmp = torch.empty_like(data, device=stage)
        inner(module, name, tmp)
        data.copy_(tmp)

    return init


def _synthetic_init(
    dev: torch.device, generators: dict[torch.device, torch.Generator], seed: int, std: float
) -> InitFn:
    """The N(0, std) init for a component materialised on ``dev``. Host-resident components are drawn on the GPU
    when there is one (CPU draws of an 8B text encoder took ~220 s), then copied; one generator per drawing
    device, shared by the components drawn there (``generators`` carries them from one call to the next)."""
    draw = torch.device("cuda") if dev.type == "cpu" and torch.cuda.is_available() else dev
    if draw not in generators:
        generators[draw] = torch.Generator(device=draw).manual_seed(int(seed))
    init = _normal_init(generators[draw], std)
    return init if draw == dev else _staged_init(init, draw)


def _meta_tensors(module: nn.Module) -> list[str]:
    """Names of parameters, buffers and plain tensor attributes (like QwenEmbedRope.pos_freqs) on meta."""
    found = []
    for mod_name, mod in module.named_modules():
        tensors = {**mod._parameters, **mod._buffers}
        tensors.update({k: v for k, v in vars(mod).items() if isinstance(v, torch.Tensor)})
        for name, t in tensors.items():
            if t is not None and t.is_meta:
                found.append(f"{mod_name}.{name}" if mod_name else name)
    return found


def _recompute_rotary_(module: nn.Module) -> None:
    """Recompute RoPE tables that are on meta (when a module was built under ``torch.device("meta")``).

    * transformers' rotary embeddings (``inv_freq``/``original_inv_freq`` buffers of Qwen2.5-VL's LM and
      vision tower) are recomputed with the module's own ``rope_init`` function, as transformers'
      ``_init_weights`` does;
    * diffusers' ``QwenEmbedRope`` keeps ``pos_freqs``/``neg_freqs`` as plain complex tensors (not
      buffers), which are rebuilt by constructing a fresh module of the same class on CPU.
    Tables keep the dtype the module computes them in (float32 / complex64), as in a normally built model.
    """
    for mod in module.modules():
        inv = mod._buffers.get("inv_freq")
        if inv is not None and inv.is_meta:
            with torch.device("cpu"):
                fn = {
                    "axial": getattr(mod, "compute_axial_rope_parameters", None),
                    "default": getattr(mod, "compute_default_rope_parameters", None),
                }.get(getattr(mod, "rope_type", "default"))
                if fn is None:
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                    fn = ROPE_INIT_FUNCTIONS.get(getattr(mod, "rope_type", None))
                if fn is None or not hasattr(mod, "config"):
                    raise RuntimeError(
                        f"can't recompute the RoPE buffers of {type(mod).__name__} built on meta"
                    )
                value, _ = fn(mod.config)
            mod._buffers["inv_freq"] = value
            if "original_inv_freq" in mod._buffers:
                mod._buffers["original_inv_freq"] = value.clone()
        pos = getattr(mod, "pos_freqs", None)
        if isinstance(pos, torch.Tensor) and pos.is_meta:
            with torch.device("cpu"):
                fresh = type(mod)(theta=mod.theta, axes_dim=list(mod.axes_dim), scale_rope=mod.scale_rope)
            mod.pos_freqs, mod.neg_freqs = fresh.pos_freqs, fresh.neg_freqs


@torch.no_grad()
def materialize_(
    module: nn.Module,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    init: InitFn,
) -> nn.Module:
    """Give every meta parameter real storage on ``device`` in ``dtype`` and initialise it in place.

    Parameters are allocated one at a time directly on ``device`` (never a host copy of the model) and
    filled by ``init(owner_module, name, tensor)``; tied parameters stay tied. Buffers with real values
    (RoPE ``inv_freq``, computed on CPU when the module was built under ``accelerate.init_empty_weights()``)
    are moved to ``device`` keeping their dtype, so they equal those of a normally built module; plain
    tensor attributes such as ``QwenEmbedRope.pos_freqs`` stay where they are (diffusers moves them to the
    device itself, as after ``from_pretrained``). RoPE tables left on meta (a module built under
    ``torch.device("meta")``, or after ``to_empty``-style allocation) are recomputed first.

    Example:
        >>> from accelerate import init_empty_weights
        >>> with init_empty_weights():
        ...     lin = nn.Linear(4, 4)
        >>> g = torch.Generator().manual_seed(0)
        >>> materialize_(lin, device="cpu", dtype=torch.float32, init=_normal_init(g, 0.02)).weight.is_meta
        False
    """
    device = torch.device(device)
    _recompute_rotary_(module)
    done: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is None:
                continue
            if id(param) in done:
                mod._parameters[name] = done[id(param)]
                continue
            target = dtype if param.is_floating_point() else param.dtype
            data = torch.empty(param.shape, device=device, dtype=target)
            init(mod, name, data)
            new = nn.Parameter(data, requires_grad=param.requires_grad)
            done[id(param)] = new
            mod._parameters[name] = new
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    left = _meta_tensors(module) if device.type != "meta" else []
    if left:
        raise RuntimeError(f"tensors still on the meta device after materialisation: {left[:5]}")
    return module


def _empty_components(config_dir: str | os.PathLike[str], with_text_encoder: bool = True):
    """Build transformer, VAE and (optionally) text encoder from configs with parameters on meta."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # include_buffers=False: buffers and tensors such as RoPE tables are small and are computed for real.
    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel.from_config(
            load_component_config(config_dir, "transformer")
        )
        vae = AutoencoderKLQwenImage.from_config(load_component_config(config_dir, "vae"))
        text_encoder = None
        if with_text_encoder:
            te_config = Qwen2_5_VLConfig.from_dict(load_component_config(config_dir, "text_encoder"))
            text_encoder = Qwen2_5_VLForConditionalGeneration(te_config)
    return transformer, vae, text_encoder


def _scheduler(config_dir: str | os.PathLike[str]):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(load_component_config(config_dir, "scheduler"))


def _assemble(scheduler, vae, text_encoder, tokenizer, transformer) -> QwenImagePipeline:
    from diffusers import QwenImagePipeline

    for model in (vae, text_encoder, transformer):
        if model is not None:
            model.eval()
            model.requires_grad_(False)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.prompt_template_encode_start_idx = template_prefix_tokens(tokenizer, pipe.prompt_template_encode)
    return pipe


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def build_tiny_pipeline(
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> QwenImagePipeline:
    """A toy-size QwenImagePipeline of the real classes, from ``configs/tiny``, with seeded random weights.

    Each component gets its own generator (seeded from ``seed``) and fan-in scaled uniform weights drawn
    in a CPU-independent way, so one seed gives bit-identical weights on any CPU and images that are
    finite and not flat. Builds in a fraction of a second; 256x256 in 8 steps with CFG takes about a
    second on 2 CPU cores.

    Example:
        >>> pipe = build_tiny_pipeline(seed=0)
        >>> g = torch.Generator().manual_seed(1)
        >>> out = pipe("a red car", negative_prompt=" ", true_cfg_scale=4.0, height=128, width=128,
        ...            num_inference_steps=4, generator=g)
        >>> out.images[0].size
        (128, 128)
    """
    transformer, vae, text_encoder = _empty_components("tiny")
    tokenizer = build_tiny_tokenizer()
    base = 3 * int(seed)
    for offset, model in enumerate((transformer, vae, text_encoder)):
        materialize_(model, device=device, dtype=dtype, init=_tiny_init(_cpu_generator(base + offset)))
    return _assemble(_scheduler("tiny"), vae, text_encoder, tokenizer, transformer)


def build_synthetic_pipeline(
    device: str | torch.device | dict[str, str | torch.device] = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    config_dir: str = "qwen-image",
    with_text_encoder: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    std: float = 0.02,
    transformer: nn.Module | None = None,
) -> QwenImagePipeline:
    """The real architecture (full-size configs by default) with random weights, built on the device.

    Components are constructed on the meta device and every parameter is then allocated directly on
    ``device`` in ``dtype`` and filled there: Linear/Conv weights and embeddings ~ N(0, ``std``), biases 0,
    norm weights 1. RoPE tables keep their exact values. Peak host memory stays small, so this is the way
    to measure the real model's VRAM and speed without its weights. The tokenizer defaults to
    :func:`build_tiny_tokenizer` (its ids are all below the real 152064 vocabulary).

    Args:
        device: where the weights live (``"cuda"``, ``"cuda:1"``, ``"cpu"``), or a dict from component name
            (``"transformer"``, ``"vae"``, ``"text_encoder"``) to device, to place each where a plan keeps it.
        dtype: the floating dtype of the weights.
        config_dir: a folder name under ``qwennb/configs`` or a path.
        with_text_encoder: build the text encoder too (otherwise ``pipe.text_encoder`` is None and the
            pipeline needs ``prompt_embeds``).
        tokenizer: a tokenizer to use instead of the tiny one.
        seed: seeds the device generator used for the weights.
        std: standard deviation of the random weights.
        transformer: a transformer built already (e.g. ``qwennb.loading.build_synthetic_transformer`` in fp8),
            used instead of drawing one.

    Example:
        >>> pipe = build_synthetic_pipeline("cuda", torch.bfloat16)  # doctest: +SKIP
        >>> round(count_parameters(pipe.transformer) / 1e9, 2)  # doctest: +SKIP
        20.43
        >>> tiny = build_synthetic_pipeline("cpu", torch.float32, config_dir="tiny")
        >>> tiny.transformer.img_in.weight.device.type
        'cpu'
    """
    given = transformer
    transformer, vae, text_encoder = _empty_components(config_dir, with_text_encoder=with_text_encoder)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    devices = (
        device if isinstance(device, dict) else dict.fromkeys(("transformer", "vae", "text_encoder"), device)
    )
    generators: dict[torch.device, torch.Generator] = {}
    for name, model in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        if model is None or (name == "transformer" and given is not None):
            continue
        dev = torch.device(devices.get(name, "cpu"))
        materialize_(model, device=dev, dtype=dtype, init=_synthetic_init(dev, generators, seed, std))
    return _assemble(
        _scheduler(config_dir), vae, text_encoder, tokenizer, given if given is not None else transformer
    )


def count_parameters(module: nn.Module | None) -> int:
    """Number of parameters (shared ones counted once); 0 for None.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Tiny vision-language models (prompt enhancement and image description, offline)
# --------------------------------------------------------------------------------------------------

# Smallest and largest image (in pixels) the tiny VL processor passes to the vision tower: 56x56 to 224x224,
# i.e. 4 to 64 image tokens after the 2x2 merge. Large images are resized down to fit.
TINY_VL_MIN_PIXELS = 56 * 56
TINY_VL_MAX_PIXELS = 224 * 224

_TINY_VL_KINDS = {"qwen2.5-vl": "tiny-vl", "qwen2-vl": "tiny-vl2"}


def qwen2vl_image_processor(
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 16384,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> Any:
    """A Qwen2-VL / Qwen2.5-VL image processor built in code (both families share it).

    The defaults are Qwen2.5-VL-7B-Instruct's ``preprocessor_config.json``: 14-pixel patches, 2x2 merge,
    temporal patch 2, 3136 to 12845056 pixels, CLIP mean and std. The torchvision-backed class is used
    when torchvision is installed, else the PIL one (the same numbers, without a warning).

    Example:
        >>> ip = qwen2vl_image_processor(max_pixels=224 * 224)
        >>> ip.merge_size, ip.patch_size
        (2, 14)
    """
    import transformers

    try:
        import torchvision  # noqa: F401

        cls = transformers.Qwen2VLImageProcessor
    except ImportError:
        cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    return cls(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
        image_mean=mean,
        image_std=std,
    )


def build_tiny_vl_processor(
    kind: str = "qwen2.5-vl",
    min_pixels: int = TINY_VL_MIN_PIXELS,
    max_pixels: int = TINY_VL_MAX_PIXELS,
) -> Any:
    """The processor of a tiny VL model: the tiny tokenizer plus a small-image Qwen2-VL image processor.

    It is transformers' ``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor`` where that can be built here (it
    needs torchvision for its video half), else a plain object with the same ``tokenizer``,
    ``image_processor`` and ``chat_template`` attributes, which is all qwennb uses.

    Example:
        >>> proc = build_tiny_vl_processor()
        >>> proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == proc.tokenizer.vocab["<|image_pad|>"]
        True
    """
    from types import SimpleNamespace

    import transformers

    if kind not in _TINY_VL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(_TINY_VL_KINDS)}, got {kind!r}")
    tokenizer = build_tiny_tokenizer()
    image_processor = qwen2vl_image_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    cls = transformers.Qwen2_5_VLProcessor if kind == "qwen2.5-vl" else transformers.Qwen2VLProcessor
    try:
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHATML_TEMPLATE)
    except Exception:  # noqa: BLE001 - e.g. no video processor without torchvision
        return SimpleNamespace(
            tokenizer=tokenizer, image_processor=image_processor, chat_template=CHATML_TEMPLATE
        )


def build_tiny_vl(
    kind: str = "qwen2.5-vl",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """A tiny Qwen2.5-VL (``kind="qwen2.5-vl"``) or Qwen2-VL (``"qwen2-vl"``) chat model and its processor.

    The real ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` classes with the
    configs in ``configs/tiny-vl`` / ``configs/tiny-vl2`` (LM head and vision tower included), seeded
    random weights drawn as for :func:`build_tiny_pipeline`, and :func:`build_tiny_vl_processor`. Its
    answers are random text; it exists so that the enhancement and description code runs anywhere.

    Example:
        >>> model, processor = build_tiny_vl("qwen2-vl", seed=0)
        >>> type(model).__name__, model.get_output_embeddings() is not None
        ('Qwen2VLForConditionalGeneration', True)
    """
    import transformers
    from accelerate import init_empty_weights

    if kind not in _TINY_VL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(_TINY_VL_KINDS)}, got {kind!r}")
    cfg = load_component_config(_TINY_VL_KINDS[kind], "config")
    config = transformers.AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, cfg["architectures"][0])(config)
    materialize_(model, device=device, dtype=dtype, init=_tiny_init(_cpu_generator(int(seed))))
    model.eval()
    model.requires_grad_(False)
    return model, build_tiny_vl_processor(kind)


# --------------------------------------------------------------------------------------------------
# Edit pipelines (Qwen-Image-Edit, -2509, -2511): the same components plus a Qwen2-VL processor
# --------------------------------------------------------------------------------------------------


def _edit_processor_class() -> type:
    """transformers' ``Qwen2VLProcessor``, accepting no video processor (the Edit pipelines only send images).

    Its constructor checks every part's class, and without torchvision the video processor's class cannot be
    looked up at all; this subclass skips that one check when no video processor is given. Everything the
    pipelines call (``__call__`` with ``text`` and ``images``) is transformers' own code.
    """
    import transformers

    class Qwen2VLImageOnlyProcessor(transformers.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen2VLImageOnlyProcessor


_VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def align_vision_token_ids(text_encoder: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Point the text encoder's image/video/vision token ids at ``tokenizer``'s: a full-size config (ids near
    151655) paired with the small stand-in tokenizer would find no image tokens in the prompt ("Image features
    and image tokens do not match, tokens: 0"). Returns the ids set.

    Example:
        >>> from qwennb.stand_ins import build_tiny_edit_pipeline
        >>> pipe = build_tiny_edit_pipeline()
        >>> pipe.text_encoder.config.image_token_id = 151655
        >>> align_vision_token_ids(pipe.text_encoder, pipe.tokenizer)["image_token_id"]
        570
    """
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in _VISION_TOKENS.items()}
    configs = [text_encoder.config, getattr(getattr(text_encoder, "model", None), "config", None)]
    configs += [getattr(c, "text_config", None) for c in list(configs)]
    for cfg in {id(c): c for c in configs if c is not None}.values():
        for key, value in ids.items():
            if hasattr(cfg, key) and isinstance(value, int) and value >= 0:
                setattr(cfg, key, value)
    return ids


def build_edit_processor(tokenizer: PreTrainedTokenizerBase | None = None, **image_kwargs: Any) -> Any:
    """The Qwen2-VL processor the Edit pipelines call: a tokenizer plus Qwen2-VL's image processor.

    ``image_kwargs`` go to :func:`qwen2vl_image_processor` (default: Qwen2.5-VL-7B-Instruct's numbers).

    Example:
        >>> from PIL import Image
        >>> proc = build_edit_processor(max_pixels=224 * 224)
        >>> out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>blue"], images=[Image.new("RGB", (112, 56))],
        ...            return_tensors="pt")
        >>> out["image_grid_thw"].tolist()  # 4 x 8 patches of 14 pixels, merged 2x2 into 8 image tokens
        [[1, 4, 8]]
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return _edit_processor_class()(
        image_processor=qwen2vl_image_processor(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=CHATML_TEMPLATE,
    )


def _edit_pipeline_class(name: str) -> type:
    import diffusers

    if name not in ("QwenImageEditPlusPipeline", "QwenImageEditPipeline"):
        raise ValueError(f"not an edit pipeline: {name!r}")
    return getattr(diffusers, name)


def _assemble_edit(
    scheduler, vae, text_encoder, tokenizer, processor, transformer, pipeline_class: str
) -> Any:
    for model in (vae, text_encoder, transformer):
        if model is not None:
            model.eval()
            model.requires_grad_(False)
    cls = _edit_pipeline_class(pipeline_class)
    pipe = cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    # The pipelines drop the system part of their template (64 tokens with Qwen's tokenizer); count it for
    # this tokenizer. QwenImageEditPipeline's template puts the image before "{}": only the system part counts.
    template = pipe.prompt_template_encode.replace("<|vision_start|><|image_pad|><|vision_end|>{}", "{}")
    pipe.prompt_template_encode_start_idx = template_prefix_tokens(tokenizer, template)
    return pipe


def build_tiny_edit_pipeline(
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pipeline_class: str = "QwenImageEditPlusPipeline",
    config_dir: str = "tiny-edit",
) -> Any:
    """A toy-size ``QwenImageEditPlusPipeline`` (or ``QwenImageEditPipeline``) of the real classes.

    The components of :func:`build_tiny_pipeline` (same seeds, so the same weights) from ``configs/tiny-edit``,
    whose transformer has 2511's ``zero_cond_t``, plus :func:`build_edit_processor` with small images
    (56x56 to 224x224 for the vision tower). Its edits are noise: it runs the edit code path anywhere.

    Example:
        >>> from PIL import Image
        >>> pipe = build_tiny_edit_pipeline()
        >>> out = pipe(image=[Image.new("RGB", (128, 96), "red")], prompt="make it blue", negative_prompt=" ",
        ...            true_cfg_scale=4.0, width=128, height=96, num_inference_steps=2)
        >>> out.images[0].size
        (128, 96)
    """
    transformer, vae, text_encoder = _empty_components(config_dir)
    tokenizer = build_tiny_tokenizer()
    base = 3 * int(seed)
    for offset, model in enumerate((transformer, vae, text_encoder)):
        materialize_(model, device=device, dtype=dtype, init=_tiny_init(_cpu_generator(base + offset)))
    processor = build_edit_processor(tokenizer, min_pixels=TINY_VL_MIN_PIXELS, max_pixels=TINY_VL_MAX_PIXELS)
    return _assemble_edit(
        _scheduler(config_dir), vae, text_encoder, tokenizer, processor, transformer, pipeline_class
    )


def build_synthetic_edit_pipeline(
    device: str | torch.device | dict[str, str | torch.device] = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    config_dir: str = "qwen-image-edit-2511",
    pipeline_class: str = "QwenImageEditPlusPipeline",
    seed: int = 0,
    std: float = 0.02,
    transformer: nn.Module | None = None,
) -> Any:
    """Qwen-Image-Edit's real architecture (2511's configs by default) with random weights, built on the device.

    As :func:`build_synthetic_pipeline` (nothing passes through host RAM unless ``device`` says so; ``transformer``:
    one built already, e.g. in its stored form by ``qwennb.loading.build_synthetic_transformer``), wrapped in
    the edit pipeline with :func:`build_edit_processor` at Qwen2.5-VL's real image sizes.

    Example:
        >>> pipe = build_synthetic_edit_pipeline("cuda")  # doctest: +SKIP
        >>> type(pipe).__name__  # doctest: +SKIP
        'QwenImageEditPlusPipeline'
    """
    base = build_synthetic_pipeline(
        device=device, dtype=dtype, config_dir=config_dir, seed=seed, std=std, transformer=transformer
    )
    align_vision_token_ids(base.text_encoder, base.tokenizer)
    processor = build_edit_processor(base.tokenizer)
    return _assemble_edit(
        base.scheduler,
        base.vae,
        base.text_encoder,
        base.tokenizer,
        processor,
        base.transformer,
        pipeline_class,
    )
