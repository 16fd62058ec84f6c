"""The registry of models qwennb knows, their sizes computed from configs, and finding them on disk.

Component configs ship in ``qwennb/configs/<name>/``. Parameter counts are not typed in anywhere:
they come from building each component on the meta device from those configs, once, by
``python -m qwennb.models`` (stored in ``configs/sizes.json`` with a digest of the config they were counted
from, so a changed config is counted again, and a test rebuilds them); ``qwennb models`` and ``qwennb plan``
then answer without importing diffusers or transformers.

Example:
    >>> from qwennb.models import get_model, component_sizes
    >>> get_model("qwen-image").hub_id
    'Qwen/Qwen-Image'
    >>> component_sizes("qwen-image")["transformer"].params
    20430401088
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UnknownModelError

CONFIG_ROOT = "configs"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    hub_id: str | None
    task: str  # "text-to-image", "image-edit" or "vision-language"
    architecture: str  # "MMDiT" or "VL"
    pipeline_class: str
    config_dir: str
    components: tuple[str, ...]
    stand_in: bool = False
    description: str = ""
    aliases: tuple[str, ...] = ()
    licence: str = ""  # shown at download and at load when it restricts use (not Apache-2.0)

    @property
    def unpublished(self) -> bool:
        """No published checkpoint of its own (a stand-in, or the toy models in the package): no hub LoRAs such as
        Lightning's were made for it."""
        return self.stand_in or self.hub_id is None


QWEN_IMAGE_21_LICENCE = (
    "Qwen-Image-2.1's weights are under a non-commercial licence: research and personal use only; read "
    "https://huggingface.co/Qwen/Qwen-Image-2.1 before any other use"
)

REGISTRY: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            "qwen-image",
            "Qwen/Qwen-Image",
            "text-to-image",
            "MMDiT",
            "QwenImagePipeline",
            "qwen-image",
            ("transformer", "text_encoder", "vae"),
            description="Qwen-Image 20B MMDiT text-to-image model (about 57 GB in bf16).",
            aliases=("qwen/qwen-image",),
        ),
        ModelSpec(
            "qwen-image-2512",
            "Qwen/Qwen-Image-2512",
            "text-to-image",
            "MMDiT",
            "QwenImagePipeline",
            "qwen-image",
            ("transformer", "text_encoder", "vae"),
            description="Qwen-Image-2512 (Dec 2025): the newest Apache-2.0 text-to-image release, the same "
            "architecture and size as Qwen-Image.",
            aliases=("qwen/qwen-image-2512", "2512"),
        ),
        ModelSpec(
            "qwen-image-2.1",
            "Qwen/Qwen-Image-2.1",
            "text-to-image",
            "MMDiT",
            "QwenImage21Pipeline",
            "qwen-image-2.1",
            ("transformer", "text_encoder", "vae"),
            description="Qwen-Image-2.1 (Sep 2026): a 7.1B single-stream DiT with a Qwen3-VL-8B text encoder, "
            "generation and editing in one model; non-commercial licence.",
            aliases=("qwen/qwen-image-2.1", "2.1"),
            licence=QWEN_IMAGE_21_LICENCE,
        ),
        ModelSpec(
            "qwen-image-edit",
            "Qwen/Qwen-Image-Edit",
            "image-edit",
            "MMDiT",
            "QwenImageEditPipeline",
            "qwen-image-edit",
            ("transformer", "text_encoder", "vae"),
            description="Qwen-Image-Edit: the same size class, trained to edit one input image "
            "(qwennb.edit, %%qwen_edit). The wrong model for text-to-image.",
            aliases=("qwen/qwen-image-edit",),
        ),
        ModelSpec(
            "qwen-image-edit-2511",
            "Qwen/Qwen-Image-Edit-2511",
            "image-edit",
            "MMDiT",
            "QwenImageEditPlusPipeline",
            "qwen-image-edit-2511",
            ("transformer", "text_encoder", "vae"),
            description="Qwen-Image-Edit-2511 (Dec 2025): edits with 1 to 3 reference images; its transformer "
            "keeps the references' timestep at zero (zero_cond_t).",
            aliases=("qwen/qwen-image-edit-2511", "edit-2511"),
        ),
        ModelSpec(
            "qwen-image-edit-2509",
            "Qwen/Qwen-Image-Edit-2509",
            "image-edit",
            "MMDiT",
            "QwenImageEditPlusPipeline",
            "qwen-image-edit-2509",
            ("transformer", "text_encoder", "vae"),
            description="Qwen-Image-Edit-2509 (Sep 2025): edits with 1 to 3 reference images.",
            aliases=("qwen/qwen-image-edit-2509", "edit-2509"),
        ),
        ModelSpec(
            "qwen2-vl-7b",
            "Qwen/Qwen2-VL-7B-Instruct",
            "vision-language",
            "VL",
            "Qwen2VLForConditionalGeneration",
            "qwen2-vl-7b",
            ("model",),
            description="Qwen2-VL 7B Instruct: prompt enhancement and image description.",
            aliases=("qwen/qwen2-vl-7b-instruct",),
        ),
        ModelSpec(
            "qwen2.5-vl-7b",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "vision-language",
            "VL",
            "Qwen2_5_VLForConditionalGeneration",
            "qwen2.5-vl-7b",
            ("model",),
            description="Qwen2.5-VL 7B Instruct (Qwen-Image's own text encoder as a chat model).",
            aliases=("qwen/qwen2.5-vl-7b-instruct",),
        ),
        ModelSpec(
            "toy",
            None,
            "text-to-image",
            "MMDiT",
            "QwenImagePipeline",
            "toy",
            ("transformer", "text_encoder", "vae"),
            description="Embedded toy model (25 MB, in the package): Qwen-Image's own classes at a small size, "
            "trained on a toy world of one flat shape on a plain background (training/toy). It draws the colour, "
            "shape, position and background a prompt names, in English or Chinese, also in words it was not "
            "trained on (93-100% on held-out prompts). Not Qwen-Image.",
        ),
        ModelSpec(
            "tiny",
            None,
            "text-to-image",
            "MMDiT",
            "QwenImagePipeline",
            "tiny",
            ("transformer", "text_encoder", "vae"),
            stand_in=True,
            description="Embedded stand-in: Qwen-Image's classes with tiny configs, built in code. "
            "Its images are noise.",
        ),
        ModelSpec(
            "qwen-image-synthetic",
            None,
            "text-to-image",
            "MMDiT",
            "QwenImagePipeline",
            "qwen-image",
            ("transformer", "text_encoder", "vae"),
            stand_in=True,
            description="Qwen-Image's real configs with random weights: real shapes, speed and memory; "
            "images are noise.",
            aliases=("synthetic",),
        ),
        ModelSpec(
            "tiny-2.1",
            None,
            "text-to-image",
            "MMDiT",
            "QwenImage21Pipeline",
            "tiny-2.1",
            ("transformer", "text_encoder", "vae"),
            stand_in=True,
            description="Qwen-Image-2.1's classes with tiny configs, built in code. Its images are noise.",
        ),
        ModelSpec(
            "qwen-image-2.1-synthetic",
            None,
            "text-to-image",
            "MMDiT",
            "QwenImage21Pipeline",
            "qwen-image-2.1",
            ("transformer", "text_encoder", "vae"),
            stand_in=True,
            description="Qwen-Image-2.1's configs with random weights: real shapes, speed and memory; images "
            "are noise.",
            aliases=("synthetic-2.1",),
        ),
        ModelSpec(
            "tiny-edit",
            None,
            "image-edit",
            "MMDiT",
            "QwenImageEditPlusPipeline",
            "tiny-edit",
            ("transformer", "text_encoder", "vae"),
            stand_in=True,
            description="Embedded edit stand-in: QwenImageEditPlusPipeline's classes (2511's zero_cond_t, a "
            "Qwen2-VL processor) with tiny configs, built in code. Its images are noise.",
        ),
        ModelSpec(
            "toy-edit",
            None,
            "image-edit",
            "MMDiT",
            "QwenImageEditPlusPipeline",
            "toy",
            ("transformer", "text_encoder", "vae"),
            description="Embedded toy edit model (7 MB more, in the package): the toy model's VAE and text encoder "
            "with a transformer fine-tuned on edits of the toy world (recolour, reshape, move, resize, change the "
            "background; training/toy/train_edit.py, 78 CPU and 57.5 H200 minutes), in QwenImageEditPlusPipeline. "
            "An early model, best without CFG (its default, CFG 1): on held-out instructions the asked-for change "
            "shows in 89% of edits and the rest of the picture is kept in 80% (a moved or resized shape is "
            "sometimes redrawn as another). Not Qwen-Image-Edit.",
        ),
        ModelSpec(
            "qwen-image-edit-synthetic",
            None,
            "image-edit",
            "MMDiT",
            "QwenImageEditPlusPipeline",
            "qwen-image-edit-2511",
            ("transformer", "text_encoder", "vae"),
            stand_in=True,
            description="Qwen-Image-Edit-2511's real configs with random weights: real shapes, speed and memory "
            "of editing; images are noise.",
            aliases=("edit-synthetic",),
        ),
    ]
}


# The model qwennb plans and loads where no real weights are found (``qwennb plan`` without a GPU plans it).
EMBEDDED_MODEL = "toy"
# Where the toy model's diffusers folder sits in the package (loaded with from_pretrained, as real weights are).
TOY_MODEL_DIR = str(Path(__file__).resolve().parent / "toy_model")


def get_model(name: str) -> ModelSpec:
    """Look a model up by short name, alias or hub id (case-insensitive).

    Example:
        >>> get_model("Qwen/Qwen-Image-Edit").name
        'qwen-image-edit'
    """
    key = name.strip().lower()
    for spec in REGISTRY.values():
        if key == spec.name or key in spec.aliases or (spec.hub_id and key == spec.hub_id.lower()):
            return spec
    known = ", ".join(REGISTRY)
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}")


def load_config(config_dir: str, component: str) -> dict[str, Any]:
    """Read a shipped component config (``configs/<dir>/<component>.json``)."""
    ref = resources.files("qwennb").joinpath(CONFIG_ROOT).joinpath(config_dir).joinpath(f"{component}.json")
    return json.loads(ref.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ComponentSize:
    """Parameter counts of one component, computed on the meta device."""

    name: str
    class_name: str
    params: int
    linear_params: int  # in nn.Linear / nn.Conv weights: what fp8 storage or quantisation shrinks
    blocks: int = 0  # repeated blocks (transformer blocks, decoder layers)
    block_params: int = 0  # parameters of one repeated block
    groups: dict[str, int] = field(default_factory=dict)  # named sub-parts (language model, vision...)

    def gib(self, bytes_per_param: float = 2.0) -> float:
        return self.params * bytes_per_param / 1024**3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bf16_gib"] = round(self.gib(2.0), 3)
        return d


def _count(module: Any) -> tuple[int, int]:
    import torch

    total = linear = 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            total += p.numel()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            linear += m.weight.numel()
    return total, linear


def build_from_config(cfg: dict[str, Any]) -> Any:
    """Build a component from a config dict (diffusers ``_class_name`` or transformers ``architectures``) on the
    meta device: no memory, no weights."""
    import copy

    from accelerate import init_empty_weights

    cfg = copy.deepcopy(cfg)  # transformers fills nested configs in place
    with init_empty_weights(include_buffers=False):
        if "_class_name" in cfg:
            import diffusers

            return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        import transformers

        config = transformers.AutoConfig.for_model(**cfg)
        return getattr(transformers, cfg["architectures"][0])(config)


def build_on_meta(config_dir: str, component: str) -> Any:
    """Build one component from its shipped config on the meta device (no memory, no weights)."""
    return build_from_config(load_config(config_dir, component))


def _measure(module: Any, component: str) -> ComponentSize:
    total, linear = _count(module)
    blocks = block_params = 0
    groups: dict[str, int] = {}
    if hasattr(module, "transformer_blocks"):  # the MMDiT
        blocks = len(module.transformer_blocks)
        block_params = _count(module.transformer_blocks[0])[0]
    else:
        inner = getattr(module, "model", module)
        lm = getattr(inner, "language_model", None)
        layers = getattr(lm, "layers", None) if lm is not None else getattr(inner, "layers", None)
        if layers is not None:
            blocks = len(layers)
            block_params = _count(layers[0])[0]
        for name in ("language_model", "visual"):
            sub = getattr(inner, name, None) or getattr(module, name, None)
            if sub is not None:
                groups[name] = _count(sub)[0]
        if getattr(module, "lm_head", None) is not None:
            groups["lm_head"] = module.lm_head.weight.numel()
        if hasattr(module, "decoder"):
            groups["decoder"] = _count(module.decoder)[0]
    return ComponentSize(component, type(module).__name__, total, linear, blocks, block_params, groups)


# Keys that name a saved copy rather than shape it: a config saved by save_pretrained keeps its sizes.
_NOT_SHAPE = {
    "_diffusers_version",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_commit_hash",
}


def config_digest(cfg: dict[str, Any]) -> str:
    """A digest of what in a config decides the parameter counts (versions and dtypes left out).

    Example:
        >>> config_digest({"a": 1, "torch_dtype": "bfloat16"}) == config_digest({"a": 1})
        True
    """
    import hashlib

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in sorted(x.items()) if k not in _NOT_SHAPE}
        return [clean(v) for v in x] if isinstance(x, list) else x

    return hashlib.sha256(json.dumps(clean(cfg), sort_keys=True).encode()).hexdigest()[:16]


@cache
def stored_sizes() -> dict[str, dict[str, Any]]:
    """The parameter counts shipped in ``configs/sizes.json``, keyed by config digest (written by
    ``python -m qwennb.models``, which builds every shipped config on the meta device; a test checks them)."""
    try:
        ref = resources.files("qwennb").joinpath(CONFIG_ROOT).joinpath("sizes.json")
        return json.loads(ref.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # pragma: no cover - a broken install
        return {}


def size_of_config(cfg: dict[str, Any], component: str) -> ComponentSize:
    """Parameter counts of a component config: the stored counts when the config's shape is a known one, else
    counted on a meta-device build of the config itself (a fine-tune or a small model saved to a folder)."""
    digest = config_digest(cfg)
    stored = stored_sizes().get(digest)
    if stored is not None:
        keep = {k: v for k, v in stored.items() if k in ComponentSize.__dataclass_fields__}
        return ComponentSize(**{**keep, "name": component})
    if (digest, component) not in _MEASURED:  # a meta build per config, not per call (plans re-read folders)
        _MEASURED[(digest, component)] = _measure(build_from_config(cfg), component)
    return _MEASURED[(digest, component)]


_MEASURED: dict[tuple[str, str], ComponentSize] = {}


@cache
def _size_of(config_dir: str, component: str) -> ComponentSize:
    return size_of_config(load_config(config_dir, component), component)


def component_sizes(name: str) -> dict[str, ComponentSize]:
    """Parameter counts for every component of a registry model, from its configs (stored, see
    :func:`stored_sizes`; counted on the meta device for a config not stored).

    Example:
        >>> sizes = component_sizes("qwen-image")
        >>> sizes["vae"].params
        126892531
    """
    spec = get_model(name)
    if spec.architecture == "VL":
        return {"model": _size_of(spec.config_dir, "config")}
    return {c: _size_of(spec.config_dir, c) for c in spec.components}


def folder_sizes(path: str | os.PathLike[str]) -> dict[str, ComponentSize]:
    """Parameter counts of a diffusers model folder's components, from the folder's own ``config.json`` files.

    Example:
        >>> import json, tempfile, pathlib
        >>> from qwennb.models import load_config
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for c in ("transformer", "text_encoder", "vae"):
        ...     (d / c).mkdir()
        ...     _ = (d / c / "config.json").write_text(json.dumps(load_config("tiny", c)))
        >>> folder_sizes(d)["transformer"].params == component_sizes("tiny")["transformer"].params
        True
    """
    out: dict[str, ComponentSize] = {}
    for comp in ("transformer", "text_encoder", "vae"):
        try:
            cfg = json.loads((Path(path) / comp / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out[comp] = size_of_config(cfg, comp)
    return out


def write_stored_sizes() -> dict[str, dict[str, Any]]:
    """Count every shipped config on the meta device and write ``configs/sizes.json`` (run after adding one)."""
    out: dict[str, dict[str, Any]] = {}
    root = Path(str(resources.files("qwennb").joinpath(CONFIG_ROOT)))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.json")):
            cfg = json.loads(f.read_text(encoding="utf-8"))
            if "_class_name" not in cfg and "architectures" not in cfg:
                continue
            if "Scheduler" in cfg.get("_class_name", ""):
                continue
            digest = config_digest(cfg)
            out[digest] = {
                **asdict(_measure(build_from_config(cfg), f.stem)),
                "source": f"{folder.name}/{f.name}",
            }
    (root / "sizes.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    stored_sizes.cache_clear()
    return out


# --------------------------------------------------------------------------- finding models on disk


@dataclass
class LocalModel:
    """A model snapshot found on disk (Hugging Face cache or a folder)."""

    name: str  # registry name, or the folder's name when unknown
    path: str
    hub_id: str | None
    architecture: str  # "MMDiT", "UNet", "VL" or "unknown"
    pipeline_class: str | None
    task: str
    complete: bool
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_model_index(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``model_index.json`` of a diffusers folder, or None."""
    p = Path(path) / "model_index.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def architecture_of(path: str | os.PathLike[str]) -> str:
    """MMDiT, UNet or VL for a model folder, from its ``model_index.json`` or ``config.json``.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
        ...      "unet": ["diffusers", "UNet2DConditionModel"]}))
        >>> architecture_of(d)
        'UNet'
    """
    index = read_model_index(path)
    if index is not None:
        if "unet" in index:
            return "UNet"
        transformer = index.get("transformer")
        if transformer or "QwenImage" in str(index.get("_class_name", "")):
            return "MMDiT"
        return "unknown"
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    if "vision_config" in cfg:
        return "VL"
    return "unknown"


def missing_files(path: str | os.PathLike[str]) -> list[str]:
    """Files a diffusers snapshot names but does not have (component configs, weight shards)."""
    root = Path(path)
    index = read_model_index(root)
    if index is None:
        return [] if (root / "config.json").exists() else ["model_index.json"]
    missing: list[str] = []
    for comp, value in index.items():
        if comp.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = root / comp
        if not sub.is_dir():
            missing.append(f"{comp}/")
            continue
        if comp in ("tokenizer", "processor", "scheduler"):
            continue
        if not (sub / "config.json").exists():
            missing.append(f"{comp}/config.json")
        shard_indexes = list(sub.glob("*.safetensors.index.json"))
        for idx in shard_indexes:
            try:
                shards = set(json.loads(idx.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError):
                missing.append(f"{comp}/{idx.name} (unreadable)")
                continue
            missing += [f"{comp}/{s}" for s in sorted(shards) if not (sub / s).exists()]
        if not shard_indexes and not list(sub.glob("*.safetensors")):
            missing.append(f"{comp}/*.safetensors")
    return missing


def _spec_for(index: dict[str, Any] | None, hub_id: str | None) -> ModelSpec | None:
    if hub_id:
        try:
            return get_model(hub_id)
        except UnknownModelError:
            pass
    if index is not None:
        cls = index.get("_class_name", "")
        for spec in REGISTRY.values():
            if not spec.stand_in and spec.pipeline_class == cls:
                return spec
    return None


def inspect_folder(path: str | os.PathLike[str], hub_id: str | None = None) -> LocalModel:
    """Describe a model folder: which model, which architecture, whether it is complete."""
    index = read_model_index(path)
    spec = _spec_for(index, hub_id)
    if spec is not None and not hub_id and spec.pipeline_class == "QwenImageEditPlusPipeline":
        # 2509 and 2511 share a pipeline class; 2511's transformer keeps the references' timestep at zero.
        try:
            tconf = json.loads((Path(path) / "transformer" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tconf = {}
        spec = get_model("qwen-image-edit-2511" if tconf.get("zero_cond_t") else "qwen-image-edit-2509")
    missing = missing_files(path)
    return LocalModel(
        name=spec.name if spec else Path(path).name,
        path=str(path),
        hub_id=hub_id or (spec.hub_id if spec else None),
        architecture=architecture_of(path),
        pipeline_class=(index or {}).get("_class_name") or (spec.pipeline_class if spec else None),
        task=spec.task if spec else "unknown",
        complete=not missing,
        missing=missing,
    )


def find_local_models(
    folder: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> list[LocalModel]:
    """Registry models present in the Hugging Face cache, or the model(s) in ``folder``.

    Nothing is fetched: this only reads the disk, so it works offline.

    Example:
        >>> find_local_models("/nonexistent")
        []
    """
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            return []
        if (root / "model_index.json").exists() or (root / "config.json").exists():
            return [inspect_folder(root)]
        return [inspect_folder(p) for p in sorted(root.iterdir()) if (p / "model_index.json").exists()]
    found: list[LocalModel] = []
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return found
    from huggingface_hub import constants

    try:
        cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return found
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        try:
            spec = get_model(repo.repo_id)
        except UnknownModelError:
            continue
        # The newest revision is the one a load without a revision would use.
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        if revisions:
            found.append(inspect_folder(revisions[0].snapshot_path, hub_id=spec.hub_id))
    return found


if __name__ == "__main__":  # pragma: no cover - maintenance: python -m qwennb.models
    for digest, entry in write_stored_sizes().items():
        print(digest, entry["source"], entry["params"])
