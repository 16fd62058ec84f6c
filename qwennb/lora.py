"""LoRAs on a loaded pipeline: add one or several, set their scales, disable, remove, list.

Every format goes through diffusers' own loader: ``QwenImageLoraLoaderMixin.lora_state_dict`` converts
Kohya (``lora_unet_...``), ComfyUI (``diffusion_model....``), the Lightning release's layout
(``transformer_blocks....lora_down/lora_up`` with ``alpha``) and PEFT ``default.`` keys into diffusers'
layout, and ``load_lora_weights`` puts PEFT LoRA layers on the transformer. qwennb adds what diffusers
leaves out:

- **Safetensors only.** A ``.bin``, ``.pt``, ``.pth``, ``.ckpt`` or ``.pkl`` file is refused with the reason:
  those are pickles, and unpickling a file can run code.
- **Alpha from the metadata.** diffusers saves a trained LoRA's tensors raw and its ``lora_alpha`` in the file's
  ``lora_adapter_metadata``; it is folded into the weights (:func:`fold_alpha`), so such a file loads at the
  strength it was trained at, as the same weights in kohya's layout with an ``alpha`` key do.
- **Keys checked first.** A LoRA whose modules are not in the transformer (or have other shapes) is refused
  in one line naming the first keys that do not match, instead of being loaded in part.
- **Provenance.** Each LoRA is recorded with its name, source, sha256 and scale; generation copies this into
  the result and the PNG, and ``generate(pipe, loras=...)`` loads them again.
- **Arrangements.** bf16 (weights on the card or streamed by group offload): PEFT layers, scales change
  without reloading; with a compiled plan :func:`add` prepares diffusers' hotswap
  (``enable_lora_hotswap``) before the first LoRA so that a later ``add(..., hotswap=True)`` replaces its
  weights without recompiling. fp8 or quantised transformers: the LoRAs are fused into the bf16 weights before
  quantising (:func:`fuse_before_quantising`, called by ``pipeline.build(plan, loras=...)``), because a LoRA
  applied next to fp8 weights gives grid artifacts (ModelTC/Qwen-Image-Lightning#32); changing them there means
  reloading, which :class:`qwennb.session.Session` does.

Example:
    >>> import tempfile, os
    >>> from qwennb.stand_ins import build_tiny_pipeline
    >>> from qwennb import lora
    >>> pipe = build_tiny_pipeline()
    >>> path = os.path.join(tempfile.mkdtemp(), "style.safetensors")
    >>> lora.save_random_lora(pipe.transformer, path, rank=4, layout="kohya")
    >>> info = lora.add(pipe, path, scale=0.5)
    >>> info.name, info.format, info.rank, info.scale
    ('style', 'kohya', 4, 0.5)
    >>> [i.name for i in lora.list_loras(pipe)]
    ['style']
    >>> lora.remove(pipe, "style"); lora.list_loras(pipe)
    []
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import QwennbError

log = logging.getLogger("qwennb")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_REASON = "it is a pickle, and loading a pickle can run code; use a .safetensors file"
# The rank hotswapping pads every LoRA to (Lightning's rank; a LoRA of a higher rank raises it at its first load).
HOTSWAP_RANK = 64


class LoraError(QwennbError, ValueError):
    """A LoRA that cannot be loaded as asked (pickle, keys that do not match, unknown name...)."""


class _Digest:
    """A :class:`LoraInfo`'s ``sha256``: a string, or while the file is still being hashed in the background a
    ``Future`` of one, which the first read waits for and replaces by its result. :func:`add` hashes a file it
    has not seen off the loading path (the hash is only needed when an image records its LoRAs), so a hotswap
    does not wait for it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        if obj is None:
            raise AttributeError(self.attr)  # no default: dataclasses asks the class
        value = obj.__dict__[self.attr]
        if isinstance(value, Future):
            value = value.result()
            obj.__dict__[self.attr] = value
        return value

    def __set__(self, obj: Any, value: str | Future[str]) -> None:
        obj.__dict__[self.attr] = value


@dataclass
class LoraInfo:
    """One LoRA on a pipeline: what was loaded, from where, and at which scale."""

    name: str  # the adapter name
    source: str  # what was given: a path, a folder or a hub id
    path: str  # the local .safetensors file read
    sha256: str = _Digest()  # type: ignore[assignment]  # read: the hex digest (waits while it is computed)
    scale: float = 1.0
    format: str = "diffusers"  # diffusers, kohya, comfyui or lightning
    rank: int = 0
    modules: int = 0  # how many Linear layers it changes
    fused: bool = False  # fused into the weights (fp8/quantised plans): removing it means reloading

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What a PNG keeps: enough to load it again and to check it is the same file."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "scale": self.scale}

    def __str__(self) -> str:
        state = " (fused)" if self.fused else ""
        return (
            f"{self.name}: scale {self.scale:g}, {self.format}, rank {self.rank}, {self.modules} layers, "
            f"sha256 {self.sha256[:12]}{state}"
        )


# --------------------------------------------------------------------------- finding and reading the file


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise LoraError(
            "LoRAs need the peft package: pip install 'qwennb[lora]' (or pip install peft)"
        ) from None


def _refuse_pickle(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(f"{name} refused: {PICKLE_REASON}")


def _hub_parts(source: str) -> tuple[str, str | None] | None:
    """``owner/repo`` or ``owner/repo/path/in/repo.safetensors`` as (repo id, file or None); None if not hub-like."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") < 1:
        return None
    parts = source.split("/")
    if not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts):
        return None
    repo = "/".join(parts[:2])
    return repo, ("/".join(parts[2:]) or None)


def _pick_in_folder(folder: Path, weight_name: str | None, source: str) -> Path:
    if weight_name:
        _refuse_pickle(weight_name)
        f = folder / weight_name
        if not f.is_file():
            raise LoraError(f"{source} has no file {weight_name}")
        return f
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = sorted(p.name for p in folder.rglob("*") if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise LoraError(f"{source} holds only {pickles[0]}, refused: {PICKLE_REASON}")
        raise LoraError(f"{source} holds no .safetensors file")
    names = ", ".join(str(p.relative_to(folder)) for p in files[:4])
    raise LoraError(
        f"{source} holds several .safetensors files ({names}); name one, e.g. {source}/{files[0].name}"
    )


def _hub_file(repo: str, filename: str | None, source: str) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    from .pipeline import offline

    fetch_cmd = f"`qwennb download --lora {source}`"  # owner/repo/FILE.safetensors
    if filename is None:
        if offline():
            raise LoraError(
                f"{source}: name the file inside the repository (e.g. {repo}/FILE.safetensors) when the hub is "
                f"offline, or run {fetch_cmd} where it is reachable"
            )
        try:
            # a client made now, as download.py's: the endpoint as configured at the call, not at import
            files = [f for f in HfApi().list_repo_files(repo) if f.endswith(".safetensors")]
        except Exception as exc:  # noqa: BLE001 - hub errors are many; one line says which
            raise LoraError(f"{source}: cannot list the repository: {_first_line(exc)}") from None
        if len(files) != 1:
            listed = ", ".join(files[:4]) or "none"
            raise LoraError(f"{repo} has {len(files)} .safetensors files ({listed}); name one as {repo}/FILE")
        filename = files[0]
    _refuse_pickle(filename)
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=offline()))
    except Exception as exc:  # noqa: BLE001
        if offline():
            raise LoraError(
                f"{repo}/{filename} is not in the local cache and the hub is offline; run {fetch_cmd} "
                "where the hub is reachable"
            ) from None
        raise LoraError(f"cannot fetch {repo}/{filename}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_file(source: str | os.PathLike[str], weight_name: str | None = None) -> Path:
    """The local ``.safetensors`` file a LoRA source names: a file, a folder holding one, or a hub id
    (``owner/repo`` or ``owner/repo/FILE.safetensors``, fetched through huggingface_hub; refused offline with
    the command that fetches it). Pickle files are refused with the reason.

    Example:
        >>> resolve_file("style.ckpt")
        Traceback (most recent call last):
        qwennb.lora.LoraError: style.ckpt refused: it is a pickle, and loading a pickle can run code; use a .safetensors file
    """
    text = os.fspath(source)
    _refuse_pickle(text)
    p = Path(text).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise LoraError(f"{text}: LoRA weights load from .safetensors files only")
        return p
    if p.is_dir():
        return _pick_in_folder(p, weight_name, text)
    hub = _hub_parts(text)
    if hub is None or text.endswith(".safetensors") and p.parent.is_dir():
        raise LoraError(f"no LoRA file at {text}")
    repo, filename = hub
    return _hub_file(repo, weight_name or filename, text)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_PENDING: dict[tuple[str, int, int], Future[str]] = {}
_SHA_LOCK = threading.Lock()
_HASHER: ThreadPoolExecutor | None = None


def _stat_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _hash_file(path: str | os.PathLike[str]) -> str:
    """Read a whole file for its sha256: the one place qwennb does (the tests count the calls). hashlib lets go
    of the GIL on large buffers, so this runs beside other Python work in a background thread."""
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file (cached by path, size and modification time: a file is read for its hash once).

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(delete=False); _ = f.write(b"abc"); f.close()
        >>> file_sha256(f.name)[:16]
        'ba7816bf8f01cfea'
    """
    key = _stat_key(path)
    with _SHA_LOCK:
        pending = _SHA_PENDING.get(key)
    if pending is not None:
        return pending.result()
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _hash_file(path)
    return _SHA_CACHE[key]


def _hash_in_background(path: str | os.PathLike[str], key: tuple[str, int, int]) -> str:
    try:  # Linux: this thread only, so the load and the next image's Python thread keep their cores first
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
    digest = _hash_file(path)
    try:
        same = _stat_key(path) == key
    except OSError:
        same = False
    with _SHA_LOCK:
        _SHA_PENDING.pop(key, None)
        if same:
            _SHA_CACHE[key] = digest
    if not same:
        raise LoraError(f"{path} changed while it was loaded: its sha256 is unknown; add the LoRA again")
    return digest


def sha256_soon(path: str | os.PathLike[str], key: tuple[str, int, int] | None = None) -> str | Future[str]:
    """A file's sha256 if known (cached by path, size and modification time), else a ``Future`` of it computed
    in a background thread (one at a time; a second call for the same file shares it). ``key``: the file's
    :func:`_stat_key` when it was read, so that a file changed since then is not given the new content's hash."""
    key = key or _stat_key(path)
    global _HASHER
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
        if key not in _SHA_PENDING:
            if _HASHER is None:
                _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwennb-sha256")
            _SHA_PENDING[key] = _HASHER.submit(_hash_in_background, path, key)
        return _SHA_PENDING[key]


def detect_format(keys: Any) -> str:
    """Which layout a LoRA state dict uses: ``kohya``, ``comfyui``, ``lightning`` or ``diffusers`` (PEFT).

    Example:
        >>> detect_format(["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"])
        'kohya'
        >>> detect_format(["transformer_blocks.0.attn.to_q.lora_down.weight", "transformer_blocks.0.attn.to_q.alpha"])
        'lightning'
    """
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(".lora_down." in k for k in keys):
        return "lightning"
    return "diffusers"


def read_state_dict(path: str | os.PathLike[str], device: Any = "cpu") -> dict[str, Any]:
    """A ``.safetensors`` file's tensors, read straight to ``device`` (the CPU by default; safetensors' own
    ``load_file(device=...)``: no host copy to move afterwards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from None


def adapter_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The transformer's LoRA config that diffusers keeps in a ``.safetensors`` file's metadata
    (``lora_adapter_metadata``: ``r``, ``lora_alpha``, ``alpha_pattern``, ``use_rslora``...), written by
    ``save_lora_weights(..., transformer_lora_adapter_metadata=...)`` (keys prefixed ``transformer.``) and by
    ``transformer.save_lora_adapter`` (no prefix); None when the file has none.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
        >>> save_file({"x": torch.zeros(1)}, f, metadata={"lora_adapter_metadata": '{"transformer.lora_alpha": 8}'})
        >>> adapter_config(f)
        {'lora_alpha': 8}
    """
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
    except (SafetensorError, OSError, ValueError):
        return None
    try:
        config = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    if any(k.startswith("transformer.") for k in config):
        config = {
            k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")
        }
    return config


def fold_alpha(state_dict: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """Multiply each ``lora_B`` of a diffusers-layout state dict by its layer's alpha / rank (alpha / sqrt(rank)
    with ``use_rslora``), alpha from ``config`` (:func:`adapter_config`: ``alpha_pattern`` first, then
    ``lora_alpha``): the state dict alone then scales as the file was trained. Without a config, or where
    alpha equals the rank, nothing changes (PEFT's default alpha is the rank).

    Example:
        >>> import torch
        >>> sd = {"transformer.a.lora_A.weight": torch.ones(4, 2), "transformer.a.lora_B.weight": torch.ones(2, 4)}
        >>> fold_alpha(sd, {"lora_alpha": 8})["transformer.a.lora_B.weight"][0, 0].item()
        2.0
    """
    if not config or config.get("lora_alpha") is None and not config.get("alpha_pattern"):
        return state_dict
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    out = dict(state_dict)
    for key, a in state_dict.items():
        m = _LORA_KEY.match(key)
        if m is None or m.group(2) != "A" or getattr(a, "ndim", 0) != 2:
            continue
        b_key = f"transformer.{m.group(1)}.lora_B.weight"
        if b_key not in out:
            continue
        layer_alpha = patterns.get(get_pattern_key(list(patterns), m.group(1)), alpha)
        if layer_alpha is None:
            continue
        rank = int(a.shape[0])
        scale = float(layer_alpha) / (math.sqrt(rank) if rslora else rank)
        if scale != 1.0:
            out[b_key] = out[b_key] * scale
    return out


def to_diffusers(
    state_dict: dict[str, Any], source: str = "the LoRA", *, consume: bool = False
) -> dict[str, Any]:
    """Convert any supported layout to diffusers' (``transformer.<module>.lora_A/B.weight``, alpha folded in),
    with diffusers' own ``QwenImageLoraLoaderMixin.lora_state_dict``. ``consume=True`` hands ``state_dict`` to
    the converter, which empties it as it goes, so each tensor it rescales is freed as soon as it is replaced
    (one copy of the LoRA in memory, not two)."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    try:
        sd = QwenImageLoraLoaderMixin.lora_state_dict(state_dict if consume else dict(state_dict))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LoraError(f"{source}: cannot convert its keys: {_first_line(exc)}") from None
    bad = [k for k in sd if "lora" not in k]
    if bad:
        raise LoraError(f"{source}: keys that are not LoRA weights, first: {', '.join(bad[:3])}")
    if not any(k.startswith("transformer.") for k in sd):
        sd = {f"transformer.{k}": v for k, v in sd.items()}
    return sd


_LORA_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")


def _target(module: Any) -> tuple[int, int] | None:
    """(in, out) features of a Linear (also when PEFT has wrapped it already), else None."""
    base = getattr(module, "base_layer", module)
    fin, fout = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout
    return None


def check_keys(transformer: Any, state_dict: dict[str, Any], source: str = "the LoRA") -> tuple[int, int]:
    """Refuse (one line) a converted LoRA whose modules are missing from the transformer or have other shapes;
    returns (rank, number of layers).

    Example:
        >>> import torch
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> t = build_tiny_pipeline().transformer
        >>> check_keys(t, {"transformer.blocks.0.q.lora_A.weight": torch.zeros(4, 8),
        ...                "transformer.blocks.0.q.lora_B.weight": torch.zeros(8, 4)}, "x.safetensors")
        Traceback (most recent call last):
        qwennb.lora.LoraError: x.safetensors does not match the QwenImageTransformer2DModel: 1 of 1 layers differ, first keys: blocks.0.q.lora_A.weight (no such layer)
    """
    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for k, v in state_dict.items():
        m = _LORA_KEY.match(k)
        if m is None:
            bad.append(f"{k.removeprefix('transformer.')} (not a lora_A/lora_B weight)")
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    rank = 0
    for name, ab in pairs.items():
        key = f"{name}.lora_A.weight"
        if set(ab) != {"A", "B"}:
            bad.append(f"{key} (lora_{'B' if 'A' in ab else 'A'} is missing)")
            continue
        shape = _target(modules.get(name)) if name in modules else None
        if shape is None:
            bad.append(f"{key} ({'no such layer' if name not in modules else 'not a Linear layer'})")
            continue
        a, b = ab["A"], ab["B"]
        fin, fout = shape
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fin or b.shape[0] != fout or a.shape[0] != b.shape[1]:
            bad.append(f"{key} (shape {tuple(a.shape)}/{tuple(b.shape)} for a {fin}->{fout} layer)")
            continue
        rank = max(rank, int(a.shape[0]))
    if bad:
        raise LoraError(
            f"{source} does not match the {type(transformer).__name__}: {len(bad)} of {len(pairs) or len(bad)} "
            f"layers differ, first keys: {', '.join(bad[:3])}"
        )
    if not pairs:
        raise LoraError(f"{source} holds no LoRA weights")
    return rank, len(pairs)


def adapter_name(source: str | os.PathLike[str], taken: Any = ()) -> str:
    """A PEFT adapter name from a file name (letters, digits and ``_``), unique among ``taken``.

    Example:
        >>> adapter_name("/x/Qwen-Image-Lightning-8steps-V2.0.safetensors")
        'Qwen_Image_Lightning_8steps_V2_0'
    """
    stem = Path(os.fspath(source)).name
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    base = re.sub(r"[^A-Za-z0-9_]", "_", stem).strip("_") or "lora"
    if base[0].isdigit():
        base = "lora_" + base
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


# --------------------------------------------------------------------------- the pipeline's LoRAs


def _registry(pipe: Any) -> dict[str, LoraInfo]:
    info = getattr(pipe, "qwennb", None)
    if info is None:
        info = {}
        try:
            pipe.qwennb = info
        except AttributeError:  # pragma: no cover
            return {}
    return info.setdefault("loras", {})


def list_loras(pipe: Any) -> list[LoraInfo]:
    """The LoRAs on a pipeline, in the order they were added."""
    return list(_registry(pipe).values())


def lora_records(pipe: Any) -> list[dict[str, Any]]:
    """What generation records about the pipeline's LoRAs (disabled ones are left out)."""
    if getattr(pipe, "qwennb", {}).get("loras_disabled"):
        return []
    return [i.record() for i in list_loras(pipe)]


def _quantised(transformer: Any) -> str | None:
    """Why LoRA layers cannot sit on this transformer (fp8 layers or layerwise fp8 casting), or None. NF4/int8
    (bitsandbytes) layers take PEFT's own LoRA layers."""
    import torch

    for m in transformer.modules():
        if hasattr(m, "weight_fp8"):
            return "its Linear layers compute in fp8"
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and "layerwise_casting" in getattr(reg, "hooks", {}):
            return "it stores its weights in fp8"
    p = next(transformer.parameters(), None)
    if p is not None and p.dtype == torch.float8_e4m3fn:
        return "it stores its weights in fp8"
    return None


def _plan(pipe: Any) -> Any:
    return getattr(pipe, "qwennb", {}).get("plan")


def _invalidate_fast_path(transformer: Any) -> None:
    """The tuned path keeps modulation vectors keyed by weight versions; a LoRA or a scale changes the function
    without changing those versions, so drop them."""
    from .speed import STATE_ATTR

    state = getattr(transformer, STATE_ATTR, None)
    if state is None:
        return
    state.mods_key = None
    state.mods = []
    state.sched_key = None
    state.sched_mods = []
    state.sched_temb = None


BASES_ATTR = (
    "_qwennb_lora_bases"  # {adapter: [(module, its scaling at scale 1)]}: hotswap-prepared LoRAs only
)


def _record_bases(transformer: Any, name: str) -> None:
    """After a load or hotswap of ``name``: remember each layer's scaling at scale 1 when PEFT keeps it as a tensor
    (``enable_lora_hotswap`` makes it one, so a compiled graph reads it instead of baking a float in)."""
    import torch

    found = []
    for module in transformer.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and isinstance(scaling.get(name), torch.Tensor):
            found.append((module, scaling[name].detach().clone()))
    bases = getattr(transformer, BASES_ATTR, {})
    if found:
        bases[name] = found
    else:
        bases.pop(name, None)
    setattr(transformer, BASES_ATTR, bases)


def _apply_scales(pipe: Any) -> None:
    """Set every live LoRA's scale. diffusers' ``set_adapters`` writes each layer's scaling as a Python float, which
    a compiled graph bakes in (a new scale would recompile it): for LoRAs whose scalings are tensors (a compiled
    plan prepared hotswap), the tensors are written in place instead, or made tensors again after ``set_adapters``."""
    reg = _registry(pipe)
    live = [i for i in reg.values() if not i.fused]
    tr = pipe.transformer
    bases = getattr(tr, BASES_ATTR, {})
    for n in [n for n in bases if n not in reg]:
        bases.pop(n)
    if live:
        disabled = bool(getattr(pipe, "qwennb", {}).get("loras_disabled"))
        active = set(tr.active_adapters()) if hasattr(tr, "active_adapters") else set()
        in_place = (
            not disabled
            and all(i.name in bases for i in live)
            and active == {i.name for i in live}
            and all(isinstance(m.scaling.get(i.name), type(b)) for i in live for m, b in bases[i.name][:1])
        )
        if in_place:
            for i in live:
                for module, base in bases[i.name]:
                    module.scaling[i.name].copy_(base * float(i.scale))
        else:
            pipe.set_adapters([i.name for i in live], [float(i.scale) for i in live])
            for i in live:
                for module, base in bases.get(i.name, []):
                    module.scaling[i.name] = base * float(i.scale)
            if disabled:
                pipe.disable_lora()
    _invalidate_fast_path(tr)


def _restore_streaming(pipe: Any) -> None:
    """diffusers re-applies group offload to every block after loading a LoRA; put the plan's resident blocks
    back on the GPU. (Written for GPU plans; not run on a GPU yet.)"""
    plan = _plan(pipe)
    if plan is None or plan.device != "cuda":
        return
    t = plan.components.get("transformer")
    if t is None or t.placement != "group_offload" or not t.resident_blocks:
        return
    import torch
    from diffusers.hooks import HookRegistry

    from .pipeline import group_offload_with_resident_blocks

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    for hook in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
        registry.remove_hook(hook, recurse=True)
    pipe.transformer.to("cpu")
    group_offload_with_resident_blocks(
        pipe.transformer, t.resident_blocks, torch.device("cuda"), low_cpu_mem_usage=t.low_cpu_mem_usage
    )


class _Stages:
    """Wall and CPU (this thread's) seconds per stage of a LoRA load: what :func:`last_load_timings` reports."""

    STAGES = ("hash", "read", "convert", "check", "copy", "scales", "sync")

    def __init__(self) -> None:
        self.wall: dict[str, float] = dict.fromkeys(self.STAGES, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(self.STAGES, 0.0)
        self.t0, self.c0 = time.perf_counter(), time.thread_time()

    @contextmanager
    def __call__(self, stage: str) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - t0
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.thread_time() - c0

    def done(self) -> dict[str, dict[str, float]]:
        out = {}
        for kind, d, now in (
            ("wall", self.wall, time.perf_counter() - self.t0),
            ("cpu", self.cpu, time.thread_time() - self.c0),
        ):
            out[kind] = {f"{k}_s": v for k, v in d.items()}
            out[kind]["other_s"] = max(0.0, now - sum(d.values()))
            out[kind]["total_s"] = now
        return out


def last_load_timings(pipe: Any, cpu: bool = False) -> dict[str, float]:
    """Seconds per stage of the last :func:`add` on ``pipe`` (wall time, or with ``cpu=True`` the CPU time of
    the calling thread): ``hash_s`` (waiting for the file's sha256: 0 when it is cached or computed in the
    background), ``read_s`` (safetensors to the transformer's device), ``convert_s`` (diffusers' key conversion,
    alpha folded in), ``check_s`` (keys and shapes against the transformer), ``copy_s`` (diffusers'
    ``load_lora_weights``: new PEFT layers, or a hotswap's copies into the loaded ones), ``scales_s``,
    ``sync_s`` (waiting for the device to finish), ``other_s`` and ``total_s``. Empty before the first.

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> last_load_timings(build_tiny_pipeline())
        {}
    """
    t = getattr(pipe, "qwennb", {}).get("lora_timings") or {}
    return dict(t.get("cpu" if cpu else "wall", {}))


def _load_device(transformer: Any, path: Path) -> Any:
    """Where to read a LoRA's tensors: the transformer's device when all its weights are on one accelerator with
    room to spare (converting and copying then happen there, with no per-tensor host-to-device copies in
    diffusers' loader), else the CPU (streamed, offloaded or CPU weights)."""
    import torch

    devices = {p.device for p in transformer.parameters()}
    if len(devices) != 1:
        return torch.device("cpu")
    (device,) = devices
    if device.type in ("cpu", "meta"):
        return torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # the file's tensors, and the converter's rescaled copies while it goes, plus a margin
        if free < 2 * path.stat().st_size + (1 << 30):
            return torch.device("cpu")
    return device


def _prepare(
    source: str | os.PathLike[str],
    transformer: Any,
    weight_name: str | None,
    stages: _Stages,
    need_sha256: bool,
) -> tuple[dict[str, Any], Path, str | Future[str], str, int, int]:
    text = os.fspath(source)
    path = resolve_file(text, weight_name)
    with stages("read"):
        key = _stat_key(path)
        # A file not hashed yet is hashed beside the load (a second read, from the page cache), not before it
        digest = sha256_soon(path, key)
        device = _load_device(transformer, path)
        raw = read_state_dict(path, device)
    with stages("convert"):
        fmt = detect_format(raw)
        sd = to_diffusers(raw, text, consume=True)
        del raw
        if fmt == "diffusers":
            # diffusers keeps a trained LoRA's alpha in the file's metadata, not in its tensors: a state dict
            # handed to load_lora_weights alone would load at rank/alpha of its strength.
            sd = fold_alpha(sd, adapter_config(path))
    with stages("check"):
        rank, layers = check_keys(transformer, sd, text)
    if need_sha256 and isinstance(digest, Future):
        with stages("hash"):
            digest = digest.result()
    return sd, path, digest, fmt, rank, layers


def prepare(
    source: str | os.PathLike[str], transformer: Any, weight_name: str | None = None
) -> tuple[dict[str, Any], Path, str, str, int, int]:
    """Read, convert and check a LoRA against a transformer before anything changes:
    ``(diffusers state dict, file, sha256, format, rank, layers)``; the tensors are on the transformer's device
    when it has room (see :func:`add`)."""
    sd, path, digest, fmt, rank, layers = _prepare(source, transformer, weight_name, _Stages(), True)
    return sd, path, str(digest), fmt, rank, layers


def add(
    pipe: Any,
    source: str | os.PathLike[str],
    scale: float = 1.0,
    name: str | None = None,
    *,
    weight_name: str | None = None,
    hotswap: bool = False,
    sha256: str | None = None,
) -> LoraInfo:
    """Load a LoRA onto the pipeline's transformer at ``scale``; returns its :class:`LoraInfo`.

    ``source``: a ``.safetensors`` file, a folder holding one, or a hub id (``owner/repo[/FILE]``). Several
    LoRAs add up, each with its own scale. ``hotswap=True`` replaces the weights of the LoRA called ``name`` in
    place (no recompile of a compiled transformer; the new rank must not exceed the first's padded rank).
    ``sha256`` refuses a file whose hash differs (regeneration from a PNG). On an fp8 or quantised
    transformer this raises: there LoRAs are fused before quantising (``Session.lora_add`` reloads).

    The file is read once, straight to the transformer's device when its weights are all on one GPU (diffusers
    then converts and copies there), and its keys are converted once. A file is hashed once per process (cached
    by path, size and modification time); a file not seen before is hashed in a background thread, and the
    returned info's ``sha256`` waits for it when first read (an image reads it after its steps). Seconds per
    stage: :func:`last_load_timings`.
    """
    _require_peft()
    stages = _Stages()
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"a LoRA scale is a number, got {scale!r}")
    why = _quantised(pipe.transformer)
    if why:
        raise LoraError(
            f"cannot add a LoRA to this transformer: {why}; LoRAs are fused into the bf16 weights before "
            "quantising, so load the model with them (Session.lora_add and %qwen lora add do this)"
        )
    reg = _registry(pipe)
    name = name or (adapter_name(source, reg) if not hotswap else None)
    if hotswap and (name is None or name not in reg):
        raise LoraError(f"hotswap replaces a loaded LoRA: name one of {', '.join(reg) or '(none loaded)'}")
    if not hotswap and name in reg:
        raise LoraError(
            f"a LoRA called {name!r} is loaded already: set its scale, remove it, or pick another name"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise LoraError(f"a LoRA name is letters, digits and _ (not starting with a digit), got {name!r}")
    sd, path, digest, fmt, rank, layers = _prepare(
        source, pipe.transformer, weight_name, stages, need_sha256=bool(sha256)
    )
    if sha256 and sha256 != digest:
        raise LoraError(
            f"{os.fspath(source)} has changed: its sha256 is {digest[:12]}…, the image was made with {sha256[:12]}…"
        )
    device = next(iter(sd.values())).device if sd else None
    plan = _plan(pipe)
    with stages("copy"):
        if plan is not None and getattr(plan, "compile", False) and not reg and not hotswap:
            # Before the first LoRA of a compiled plan: pad every LoRA to one rank and keep scales as tensors, so
            # a later hotswap changes values only and the compiled graph stays valid.
            pipe.enable_lora_hotswap(target_rank=max(HOTSWAP_RANK, rank), check_compiled="ignore")
        try:
            # PEFT warns on every second adapter; several LoRAs are the point here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(sd, adapter_name=name, hotswap=hotswap)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LoraError(f"{os.fspath(source)}: {_first_line(exc)}") from None
        del sd
    info = LoraInfo(name, os.fspath(source), str(path), digest, float(scale), fmt, rank, layers)
    reg[name] = info
    _record_bases(pipe.transformer, name)
    with stages("scales"):
        _restore_streaming(pipe)
        _apply_scales(pipe)
    if device is not None and device.type == "cuda":
        import torch

        with stages("sync"):
            torch.cuda.synchronize(device)
    getattr(pipe, "qwennb", {})["lora_timings"] = stages.done()
    return info


def _get(pipe: Any, name: str) -> LoraInfo:
    reg = _registry(pipe)
    if name not in reg:
        raise LoraError(f"no LoRA called {name!r}; loaded: {', '.join(reg) or 'none'}")
    return reg[name]


def set_scale(pipe: Any, name: str, scale: float) -> LoraInfo:
    """Change one LoRA's scale (0 turns it off and leaves the pixels as without it).

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> set_scale(build_tiny_pipeline(), "style", 0.5)
        Traceback (most recent call last):
        qwennb.lora.LoraError: no LoRA called 'style'; loaded: none
    """
    info = _get(pipe, name)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"a LoRA scale is a number, got {scale!r}")
    if info.fused:
        raise LoraError(f"{name} is fused into the weights (fp8 plan): reload the model to change its scale")
    info.scale = float(scale)
    _apply_scales(pipe)
    return info


def disable(pipe: Any) -> None:
    """Turn every LoRA off (kept loaded; :func:`enable` turns them back on)."""
    if any(i.fused for i in list_loras(pipe)):
        raise LoraError("the LoRAs are fused into the weights (fp8 plan): reload the model without them")
    getattr(pipe, "qwennb", {})["loras_disabled"] = True
    if list_loras(pipe):
        pipe.disable_lora()
    _invalidate_fast_path(pipe.transformer)


def enable(pipe: Any) -> None:
    """Turn the LoRAs back on after :func:`disable`."""
    getattr(pipe, "qwennb", {}).pop("loras_disabled", None)
    if list_loras(pipe):
        pipe.enable_lora()
        _apply_scales(pipe)


def remove(pipe: Any, name: str | None = None) -> None:
    """Remove one LoRA (or all with ``name=None``); the transformer computes exactly what it did before."""
    reg = _registry(pipe)
    names = list(reg) if name is None else [_get(pipe, name).name]
    if any(reg[n].fused for n in names):
        raise LoraError("fused into the weights (fp8 plan): reload the model without it")
    if not names:
        return
    if len(names) == len(reg):
        pipe.unload_lora_weights()
    else:
        pipe.delete_adapters(names)
    for n in names:
        reg.pop(n)
    if not reg:
        getattr(pipe, "qwennb", {}).pop("loras_disabled", None)
    _restore_streaming(pipe)
    _apply_scales(pipe)


def fuse_before_quantising(pipe: Any, specs: list[tuple[str, float]]) -> list[LoraInfo]:
    """Load LoRAs into a bf16 transformer and fuse them into its weights at their scales, then drop the LoRA
    layers: what an fp8 or quantised plan needs before it quantises (``pipeline.build(plan, loras=...)``)."""
    _require_peft()
    infos = [add(pipe, source, scale) for source, scale in specs]
    if infos:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[i.name for i in infos])
        pipe.unload_lora_weights()
    reg = _registry(pipe)
    for i in infos:
        reg[i.name] = replace(i, fused=True)
    return list(reg.values())


def read_for_fusing(
    specs: list[tuple[str, float]], transformer: Any
) -> list[tuple[LoraInfo, dict[str, tuple[Any, Any]]]]:
    """Read, convert and check LoRAs (``(source, scale)`` pairs) against ``transformer`` (its weights may still
    be on the meta device) for :func:`qwennb.loading.fuse_lora_layers_`: each LoRA's info (fused) and its
    ``{layer: (A, B)}`` with the alpha folded in, as diffusers' converters give them. What a transformer loaded
    block by block into fp8 needs: each block's LoRA layers are fused in before the block is quantised
    (``qwennb.loading.load_transformer(..., read_loras=...)``).
    """
    _require_peft()
    out: list[tuple[LoraInfo, dict[str, tuple[Any, Any]]]] = []
    names: dict[str, Any] = {}
    for source, scale in specs:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoraError(f"a LoRA scale is a number, got {scale!r}")
        sd, path, digest, fmt, rank, layers = _prepare(source, transformer, None, _Stages(), False)
        pairs: dict[str, dict[str, Any]] = {}
        for k, v in sd.items():
            m = _LORA_KEY.match(k)
            pairs.setdefault(m.group(1), {})[m.group(2)] = v  # check_keys passed: every key matches, in pairs
        name = adapter_name(source, names)
        names[name] = True
        info = LoraInfo(
            name, os.fspath(source), str(path), digest, float(scale), fmt, rank, layers, fused=True
        )
        out.append((info, {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}))
    return out


def ensure(pipe: Any, records: list[dict[str, Any]]) -> list[str]:
    """Make the pipeline's LoRAs exactly ``records`` (from a PNG or ``result.loras``): load what is missing
    (checking each file's sha256), set scales, remove the others. Returns notices of what changed."""
    reg = _registry(pipe)
    wanted = {}
    for r in records:
        if not isinstance(r, dict) or "source" not in r:
            raise LoraError(f"a LoRA record needs at least a source, got {r!r}")
        wanted[r.get("name") or adapter_name(r["source"], wanted)] = r
    notices = []
    for name, r in wanted.items():
        have = reg.get(name)
        if have is not None and r.get("sha256") and have.sha256 != r["sha256"]:
            remove(pipe, name)
            have = None
        if have is None:
            add(pipe, r["source"], float(r.get("scale", 1.0)), name, sha256=r.get("sha256"))
            notices.append(f"loaded LoRA {name} from {r['source']}")
        elif have.scale != float(r.get("scale", 1.0)):
            set_scale(pipe, name, float(r.get("scale", 1.0)))
    extra = [n for n in reg if n not in wanted]
    if extra:
        if len(extra) == len(reg):
            remove(pipe)
        else:
            for n in extra:
                remove(pipe, n)
        notices.append(f"removed LoRA {', '.join(extra)} (not in the parameters)")
    if getattr(pipe, "qwennb", {}).get("loras_disabled") and wanted:
        enable(pipe)
    return notices


# --------------------------------------------------------------------------- LoRA files made in code


LAYOUTS = ("diffusers", "kohya", "comfyui", "lightning", "peft-default")
# The Linear layers of a Qwen-Image block that LoRAs (Lightning's among them) target.
BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
)
# The same for a Qwen-Image-2.1 block (single stream, SwiGLU MLP; its modulation is shared outside the blocks).
BLOCK_TARGETS_21 = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "img_mlp.proj",
    "img_mlp.gate_layer",
    "img_mlp.out",
)


def random_lora_state_dict(
    transformer: Any,
    rank: int = 64,
    alpha: float | None = 8.0,
    layout: str = "lightning",
    seed: int = 0,
    std: float = 0.02,
    targets: tuple[str, ...] | None = None,
    blocks: list[int] | None = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """A random LoRA for ``transformer`` in one of :data:`LAYOUTS` (the keys each tool writes), rank ``rank``,
    with an ``alpha`` per layer where the layout has one, on :data:`BLOCK_TARGETS` of every block
    (:data:`BLOCK_TARGETS_21` for Qwen-Image-2.1). Lightning's releases are rank 64 with alpha 8. Used by the tests (every format) and the few-step benchmark (a full-size LoRA of Lightning's shape).

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> sd = random_lora_state_dict(build_tiny_pipeline().transformer, rank=2, layout="kohya", blocks=[0])
        >>> sorted(sd)[:3]
        ['lora_unet_transformer_blocks_0_attn_add_k_proj.alpha', 'lora_unet_transformer_blocks_0_attn_add_k_proj.lora_down.weight', 'lora_unet_transformer_blocks_0_attn_add_k_proj.lora_up.weight']
    """
    import torch

    if layout not in LAYOUTS:
        raise LoraError(f"unknown LoRA layout {layout!r}; one of {', '.join(LAYOUTS)}")
    g = torch.Generator().manual_seed(seed)
    if targets is None:
        single = type(transformer).__name__ == "QwenImage21Transformer2DModel"
        targets = BLOCK_TARGETS_21 if single else BLOCK_TARGETS
    n = len(transformer.transformer_blocks)
    modules = dict(transformer.named_modules())
    out: dict[str, Any] = {}
    dtype = dtype or torch.float32
    for b in blocks if blocks is not None else range(n):
        for t in targets:
            name = f"transformer_blocks.{b}.{t}"
            fin, fout = _target(modules[name]) or (0, 0)
            down = (torch.randn(rank, fin, generator=g) * std).to(dtype)
            up = (torch.randn(fout, rank, generator=g) * std).to(dtype)
            if layout == "kohya":
                key = "lora_unet_" + name.replace(".", "_")
                out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
            elif layout == "lightning":
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            elif layout == "comfyui":
                key = f"diffusion_model.{name}"
                out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = down, up
            elif layout == "peft-default":
                out[f"{name}.lora_A.default.weight"], out[f"{name}.lora_B.default.weight"] = down, up
            else:
                out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = down, up
            if alpha is not None and layout in ("kohya", "lightning", "comfyui"):
                key = (
                    name
                    if layout == "lightning"
                    else (
                        "lora_unet_" + name.replace(".", "_")
                        if layout == "kohya"
                        else f"diffusion_model.{name}"
                    )
                )
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def save_random_lora(transformer: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write :func:`random_lora_state_dict` to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    kwargs.setdefault("rank", 4)
    kwargs.setdefault("std", 0.2)
    save_file(random_lora_state_dict(transformer, **kwargs), str(path))


# --------------------------------------------------------------------------- few-step presets


def lightning_source(model: str, preset: str) -> str:
    """The hub source (``owner/repo/FILE``) of the Lightning LoRA a preset uses on a model.

    Example:
        >>> lightning_source("qwen-image-2512", "lightning-4")
        'lightx2v/Qwen-Image-2512-Lightning/Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors'
    """
    from .presets import lightning_lora

    repo, filename = lightning_lora(model, preset)
    return f"{repo}/{filename}"


def is_lightning(info: LoraInfo) -> bool:
    """True for a LoRA loaded from a Lightning release (few steps at CFG 1 only)."""
    return "lightning" in Path(info.path).name.lower() or "lightning" in info.source.lower()


def ensure_preset_lora(pipe: Any, preset: Any, model: str, stand_in: bool = False) -> list[str]:
    """Load the preset's LoRA for ``model`` unless it is on the pipeline already; returns notices.

    A stand-in (tiny, synthetic, the toy models) has no published Lightning LoRA: only the steps, CFG and
    scheduler apply, and a notice says so.
    """
    if not preset.lora:
        return []
    if stand_in:
        return [
            f"{model} is a stand-in with no {preset.lora} LoRA: only its steps, CFG {preset.cfg:g} and scheduler apply"
        ]
    source = lightning_source(model, preset.name)
    name = adapter_name(source, ())
    have = _registry(pipe).get(name)
    if have is not None:
        if have.scale != 1.0 and not have.fused:
            set_scale(pipe, name, 1.0)
        return []
    from .pipeline import offline

    if offline():
        from huggingface_hub import hf_hub_download

        repo, filename = _hub_parts(source) or (source, None)
        try:
            hf_hub_download(repo, filename or "", local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache, whatever the reason
            raise LoraError(
                f"the {preset.lora} LoRA for {model} ({source}) is not downloaded and the hub is offline; run "
                f"`qwennb download --lora {preset.lora} --for-model {model}` where the hub is reachable"
            ) from None
    add(pipe, source, 1.0, name)
    return [f"loaded the {preset.lora} LoRA for {model} ({source})"]


class few_step_scheduler:
    """While active, the pipeline (and the tuned path's modulation table) use a scheduler with ``overrides``
    applied to the pipeline's own config; the original comes back afterwards.

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> from qwennb.presets import LIGHTNING_SCHEDULER
        >>> pipe = build_tiny_pipeline()
        >>> with few_step_scheduler(pipe, LIGHTNING_SCHEDULER):
        ...     round(pipe.scheduler.config.max_shift, 4), pipe.scheduler.config.shift_terminal
        (1.0986, None)
        >>> pipe.scheduler.config.shift_terminal
        0.02
    """

    def __init__(self, pipe: Any, overrides: dict[str, Any] | None) -> None:
        self.pipe, self.overrides = pipe, overrides
        self.saved: Any = None

    def __enter__(self) -> Any:
        if not self.overrides:
            return self.pipe.scheduler
        from .speed import STATE_ATTR

        old = self.pipe.scheduler
        new = type(old).from_config({**dict(old.config), **self.overrides})
        state = getattr(self.pipe.transformer, STATE_ATTR, None)
        self.saved = (old, state, getattr(state, "scheduler", None))
        self.pipe.scheduler = new
        if state is not None and state.scheduler is not None:
            state.scheduler = new
        return new

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            return
        old, state, state_sched = self.saved
        self.pipe.scheduler = old
        if state is not None:
            state.scheduler = state_sched
        self.saved = None


def check_for_model(source: str | os.PathLike[str], model: str) -> None:
    """Check a LoRA against a registry model's transformer built on the meta device (no weights, no memory):
    what the CLI and a reload do before loading anything.

    Example:
        >>> check_for_model("x.pt", "tiny")
        Traceback (most recent call last):
        qwennb.lora.LoraError: x.pt refused: it is a pickle, and loading a pickle can run code; use a .safetensors file
    """
    from .models import build_on_meta, get_model

    path = resolve_file(source)
    spec = get_model(model)
    transformer = build_on_meta(spec.config_dir, "transformer")
    check_keys(transformer, to_diffusers(read_state_dict(path), os.fspath(source)), os.fspath(source))


def parse_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's and the magics' ``--lora``) as (source, scale).

    Example:
        >>> parse_spec("style.safetensors:0.8"), parse_spec("owner/repo")
        (('style.safetensors', 0.8), ('owner/repo', 1.0))
    """
    source, sep, tail = text.rpartition(":")
    if sep and source:
        try:
            return source, float(tail)
        except ValueError:
            # "ink.safetensors:strong": a scale that is not a number (a Windows drive's colon is not one)
            if source.endswith(".safetensors") or (os.path.isfile(source) and not os.path.exists(text)):
                raise LoraError(f"a LoRA scale is a number, got {tail!r} (in {text!r})") from None
    return text, 1.0
