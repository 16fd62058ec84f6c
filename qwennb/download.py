"""``qwennb download``: fetch a model snapshot from the Hugging Face hub, checked before and after.

Before anything is fetched the hub is asked for the file list and sizes of the snapshot
(``HfApi.model_info(files_metadata=True)``), only the files a pipeline loads are kept (``model_index.json``,
each component's configs, safetensors shards and index, tokenizer files, scheduler config; never
``*.bin``/``*.pt``/``*.ckpt``), and the bytes still to fetch are checked against the free disk space
(capped by ``QWENNB_DISK_LIMIT_GB`` when set). Weight files over plain HTTP are fetched into a partial file
that a later call resumes with a Range request; the rest goes through ``snapshot_download``, which also
writes the cache layout (refs, snapshot links) that diffusers and ``qwennb detect`` read. Afterwards the
snapshot is verified: every component, every shard that an index names, every size the hub reported.

Hub and network failures (offline mode, unreachable hub, gated repository, HTTP errors) end in one
:class:`DownloadError` line that says what to do.

Example:
    >>> from qwennb.download import verify_snapshot
    >>> verify_snapshot("/nonexistent")
    ['/nonexistent does not exist']

    $ qwennb download --model qwen-image --dir /data/models --dry-run
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import QwennbError
from .models import REGISTRY, ModelSpec, get_model, missing_files

DISK_LIMIT_ENV = "QWENNB_DISK_LIMIT_GB"
HUB_TIMEOUT_S = 10.0
# What a pipeline loads from a component folder (or a transformers repo's root).
COMPONENT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
# Never fetched: pickled or other-framework weights that use_safetensors=True loading never reads.
NEVER_PATTERNS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.msgpack",
    "*.h5",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
)
EDIT_WARNING = "Qwen-Image-Edit is for editing images; for text-to-image use qwen-image"
OFFLINE_HINT = (
    "the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1): run the download where the hub is "
    "reachable with HF_HUB_OFFLINE unset, or copy a snapshot over and point `qwennb detect --dir` at it"
)


class DownloadError(QwennbError):
    """A download that cannot start or did not finish; the message says why and what to do."""


@dataclass
class RemoteFile:
    """One file of the snapshot, with the size the hub reported."""

    path: str
    size: int
    sha256: str | None = None  # the LFS hash: the blob's name in the cache

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size}


@dataclass
class DownloadResult:
    """What was (or, in a dry run, would be) fetched, and whether the snapshot on disk is complete."""

    model: str
    repo_id: str
    revision: str
    dir: str
    files: list[RemoteFile]
    total_bytes: int
    present_bytes: int
    free_bytes: int
    downloaded: bool = False
    complete: bool = False
    problems: list[str] = field(default_factory=list)
    in_cache: bool = True

    @property
    def needed_bytes(self) -> int:
        return max(self.total_bytes - self.present_bytes, 0)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "dir": self.dir,
            "files": [f.to_dict() for f in self.files],
            "total_bytes": self.total_bytes,
            "present_bytes": self.present_bytes,
            "needed_bytes": self.needed_bytes,
            "free_bytes": self.free_bytes,
            "fits": self.fits,
            "downloaded": self.downloaded,
            "complete": self.complete,
            "problems": self.problems,
        }


# --------------------------------------------------------------------------- checks


def verify_snapshot(path: str | os.PathLike[str], expected_sizes: dict[str, int] | None = None) -> list[str]:
    """Problems of a snapshot on disk; an empty list means complete.

    Checks that every component ``model_index.json`` names is there with its config and weights, that
    every shard a ``*.safetensors.index.json`` names is there (component folders and the root), and, when
    ``expected_sizes`` (``{relative path: bytes}``, as the hub reported them) is given, that each file
    exists with exactly that size.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text(json.dumps({"vision_config": {}}))
        >>> verify_snapshot(d, {"model.safetensors": 100})
        ['missing model.safetensors']
    """
    root = Path(path)
    if not root.is_dir():
        return [f"{root} does not exist"]
    missing = list(missing_files(root))
    for idx in sorted(root.glob("*.safetensors.index.json")):  # transformers layout: shards at the root
        try:
            shards = set(json.loads(idx.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError):
            missing.append(f"{idx.name} (unreadable)")
            continue
        missing += [s for s in sorted(shards) if not (root / s).is_file() and s not in missing]
    problems = [f"missing {m}" for m in missing]
    for rel, size in sorted((expected_sizes or {}).items()):
        p = root / rel
        if not p.is_file():
            if rel not in missing:
                problems.append(f"missing {rel}")
        elif (actual := p.stat().st_size) != size:
            problems.append(f"{rel}: {actual:,} bytes on disk, the hub says {size:,}")
    return problems


def free_disk_bytes(target: str | os.PathLike[str]) -> tuple[int, str, float | None]:
    """``(free bytes, folder measured, QWENNB_DISK_LIMIT_GB or None)`` for a target folder.

    The folder measured is ``target`` or its nearest existing parent. ``QWENNB_DISK_LIMIT_GB`` (GiB),
    when set, caps the free space.

    Example:
        >>> free, where, limit = free_disk_bytes("/nonexistent/models")
        >>> where
        '/'
    """
    p = Path(target).expanduser().absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    free = shutil.disk_usage(p).free
    limit: float | None = None
    raw = os.environ.get(DISK_LIMIT_ENV, "").strip()
    if raw:
        try:
            limit = float(raw)
        except ValueError:
            raise DownloadError(f"{DISK_LIMIT_ENV}={raw!r} is not a number of GiB") from None
        free = min(free, int(limit * 1024**3))
    return free, str(p), limit


def human_bytes(n: float) -> str:
    """Bytes in binary units.

    Example:
        >>> human_bytes(57_700_000_000)
        '53.74 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def downloadable(name: str) -> ModelSpec:
    """The registry entry for ``name`` if it has weights on the hub; a clear error otherwise.

    Example:
        >>> downloadable("qwen-image").hub_id
        'Qwen/Qwen-Image'
    """
    spec = get_model(name)
    if spec.hub_id is None:
        with_weights = ", ".join(s.name for s in REGISTRY.values() if s.hub_id)
        raise DownloadError(
            f"{spec.name} is a stand-in built in code from shipped configs: it has no hub repository and "
            f"nothing to download (models with weights: {with_weights})"
        )
    return spec


def allow_patterns(spec: ModelSpec, model_index: dict[str, Any] | None) -> list[str]:
    """The ``snapshot_download`` allow-patterns for a model: per component for a diffusers pipeline.

    Example:
        >>> from qwennb.models import get_model
        >>> allow_patterns(get_model("qwen-image"), {"_class_name": "QwenImagePipeline",
        ...     "vae": ["diffusers", "AutoencoderKLQwenImage"]})[:3]
        ['model_index.json', 'vae/*.json', 'vae/*.safetensors']
    """
    if model_index is None:  # a transformers repository: everything at its root
        return list(COMPONENT_PATTERNS)
    patterns = ["model_index.json"]
    for comp, value in model_index.items():
        if comp.startswith("_") or not isinstance(value, list) or not value or value[0] is None:
            continue
        patterns += [f"{comp}/{p}" for p in COMPONENT_PATTERNS]
    return patterns


# --------------------------------------------------------------------------- hub errors in one line


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        errors += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def explain_hub_error(exc: BaseException, repo_id: str, endpoint: str) -> str | None:
    """One line for a hub or network exception, saying what to do; None for anything else.

    Example:
        >>> from huggingface_hub.errors import OfflineModeIsEnabled
        >>> explain_hub_error(OfflineModeIsEnabled("x"), "Qwen/Qwen-Image", "https://huggingface.co")[:40]
        'the Hugging Face hub is switched off her'
    """
    from huggingface_hub import errors as hf_errors

    again = "run the same command again to resume (finished files are kept)"
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:  # walk the cause chain: hf wraps the real reason
        seen.add(id(cur))
        if isinstance(cur, hf_errors.OfflineModeIsEnabled):
            return OFFLINE_HINT
        if isinstance(cur, hf_errors.GatedRepoError):
            return (
                f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id} and log in "
                "(`hf auth login` or the HF_TOKEN variable)"
            )
        if isinstance(cur, hf_errors.RepositoryNotFoundError):
            return f"{repo_id} was not found at {endpoint} (or it is private and no token is set: `hf auth login`)"
        if isinstance(cur, hf_errors.RevisionNotFoundError):
            return f"{repo_id} has no such revision at {endpoint}"
        if isinstance(cur, hf_errors.HfHubHTTPError):
            status = getattr(getattr(cur, "response", None), "status_code", "?")
            return f"the hub at {endpoint} answered HTTP {status} for {repo_id}; {again}"
        if isinstance(cur, hf_errors.FileMetadataError):
            return (
                f"{endpoint} does not answer like a Hugging Face hub ({_first_line(cur)}); check HF_ENDPOINT"
            )
        if isinstance(cur, _network_errors()):
            return (
                f"cannot reach the Hugging Face hub at {endpoint} ({_first_line(cur)}); check the network, "
                f"proxy or HF_ENDPOINT, then {again}"
            )
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return f"the disk filled up while fetching {repo_id}: free some space, then {again}"
        if isinstance(cur, OSError) and "Consistency check failed" in str(cur):
            return f"a file of {repo_id} arrived with the wrong size (connection cut?); {again}"
        cur = cur.__cause__ or cur.__context__
    if isinstance(exc, hf_errors.LocalEntryNotFoundError | hf_errors.DryRunError):
        return f"cannot reach the Hugging Face hub at {endpoint}: check the network, then {again}"
    return None


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    try:
        yield
    except QwennbError:
        raise
    except Exception as exc:
        line = explain_hub_error(exc, repo_id, endpoint)
        if line is None:
            raise
        raise DownloadError(line) from None


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs each retry as a warning; one error line at the end says it all."""
    logger = logging.getLogger("huggingface_hub")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def hub_offline() -> bool:
    """True when huggingface_hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, now or at import).

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    from huggingface_hub import constants

    env = any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub address: ``HF_ENDPOINT`` as set now (huggingface_hub reads it only at import), else its default.

    Example:
        >>> hub_endpoint().startswith("http")
        True
    """
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _progress_class() -> Any:
    """huggingface_hub's own tqdm, or a silent one under QWENNB_NO_PROGRESS=1."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    if os.environ.get("QWENNB_NO_PROGRESS") != "1":
        return hf_tqdm

    class _Silent(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def _notice(text: str) -> None:
    print(f"qwennb: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- the download


@dataclass
class _Job:
    spec: ModelSpec
    requested: str  # the revision asked for (a branch, tag or commit)
    revision: str  # the commit the hub resolved it to
    files: list[RemoteFile]
    patterns: list[str]
    local_dir: Path | None  # None: the Hugging Face cache
    cache_dir: Path
    snapshot: Path  # where the files end up

    @property
    def storage(self) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.cache_dir / repo_folder_name(repo_id=self.spec.hub_id or "", repo_type="model")

    def partial_path(self, etag: str) -> Path:
        if self.local_dir is None:  # where huggingface_hub < 1.0 kept them; `hf cache` lists them
            return self.storage / "blobs" / f"{etag}.incomplete"
        return self.local_dir / ".cache" / "qwennb" / f"{etag}.incomplete"

    def lock_path(self, etag: str) -> Path:
        if self.local_dir is None:  # the lock huggingface_hub takes to download the same blob
            return self.cache_dir / ".locks" / self.storage.name / f"{etag}.lock"
        return self.local_dir / ".cache" / "qwennb" / f"{etag}.lock"

    def final_path(self, f: RemoteFile, etag: str) -> Path:
        if self.local_dir is None:  # the blob: snapshot_download links it into the snapshot
            return self.storage / "blobs" / etag
        return self.local_dir / f.path

    def present_bytes(self, f: RemoteFile) -> int:
        p = self.snapshot / f.path
        if p.is_file() and p.stat().st_size == f.size:
            return f.size
        if f.sha256:
            if self.local_dir is None and (self.storage / "blobs" / f.sha256).is_file():
                return f.size
            partial = self.partial_path(f.sha256)
            if partial.is_file():
                return min(partial.stat().st_size, f.size)
        return 0


def _plan_job(
    spec: ModelSpec,
    folder: str | os.PathLike[str] | None,
    revision: str,
    token: str | bool | None,
    endpoint: str,
) -> _Job:
    from huggingface_hub import HfApi, constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects, get_session, hf_raise_for_status

    repo = spec.hub_id or ""
    info = HfApi(endpoint=endpoint, token=token).model_info(
        repo, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S
    )
    sha = info.sha or revision
    remote: dict[str, RemoteFile] = {}
    for s in info.siblings or []:
        size = s.lfs.size if s.lfs is not None else s.size
        remote[s.rfilename] = RemoteFile(
            s.rfilename, int(size or 0), s.lfs.sha256 if s.lfs is not None else None
        )
    index: dict[str, Any] | None = None
    if spec.architecture != "VL":
        if "model_index.json" not in remote:
            raise DownloadError(f"{repo} has no model_index.json: it is not a diffusers pipeline")
        url = hf_hub_url(repo, "model_index.json", revision=sha, endpoint=endpoint)
        r = get_session().get(url, headers=build_hf_headers(token=token), timeout=HUB_TIMEOUT_S)
        hf_raise_for_status(r)
        index = r.json()
    patterns = allow_patterns(spec, index)
    files = [
        remote[p]
        for p in filter_repo_objects(
            sorted(remote), allow_patterns=patterns, ignore_patterns=list(NEVER_PATTERNS)
        )
    ]
    cache_dir = Path(constants.HF_HUB_CACHE).expanduser().absolute()
    if folder is None:
        local_dir = None
        from huggingface_hub.file_download import repo_folder_name

        snapshot = cache_dir / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / sha
    else:
        local_dir = snapshot = Path(folder).expanduser().absolute() / spec.name
    return _Job(spec, revision, sha, files, patterns, local_dir, cache_dir, snapshot)


def _fetch_resumable(job: _Job, token: str | bool | None, endpoint: str, progress: Any) -> None:
    """Fetch the weight files over plain HTTP into partial files that the next call resumes (Range).

    huggingface_hub (2.x) resumes a dropped connection within one call but deletes its partial file when the
    call fails; this keeps ours. Files that huggingface_hub would fetch through Xet are left to it.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    xet = importlib.util.find_spec("hf_xet") is not None and not constants.HF_HUB_DISABLE_XET
    for f in job.files:
        if not f.path.endswith(".safetensors") or job.present_bytes(f) == f.size:
            continue
        url = hf_hub_url(job.spec.hub_id or "", f.path, revision=job.revision, endpoint=endpoint)
        with _hub_errors(job.spec.hub_id or "", endpoint):
            meta = get_hf_file_metadata(url, token=token, timeout=HUB_TIMEOUT_S)
        if (meta.xet_file_data is not None and xet) or not meta.etag:
            continue
        final = job.final_path(f, meta.etag)
        if final.is_file() and final.stat().st_size == (meta.size or f.size):
            continue
        partial, lock = job.partial_path(meta.etag), job.lock_path(meta.etag)
        partial.parent.mkdir(parents=True, exist_ok=True)
        lock.parent.mkdir(parents=True, exist_ok=True)
        headers = build_hf_headers(token=token)
        if urlsplit(meta.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a CDN: no token (as huggingface_hub does)
        with WeakFileLock(lock):
            if partial.is_file() and partial.stat().st_size > (meta.size or f.size):
                partial.unlink()  # longer than the file: not ours to resume
            with partial.open("ab") as fh:
                try:
                    with _hub_errors(job.spec.hub_id or "", endpoint):
                        http_get(
                            meta.location,
                            fh,
                            resume_size=fh.tell(),
                            headers=headers,
                            expected_size=meta.size or f.size,
                            displayed_filename=f.path,
                            tqdm_class=progress,
                        )
                except DownloadError as exc:
                    fh.flush()
                    raise DownloadError(
                        f"the download of {f.path} stopped at {human_bytes(partial.stat().st_size)} of "
                        f"{human_bytes(f.size)}, kept for resuming: {exc}"
                    ) from None
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)


def _result(job: _Job, free: int) -> DownloadResult:
    return DownloadResult(
        model=job.spec.name,
        repo_id=job.spec.hub_id or "",
        revision=job.revision,
        dir=str(job.snapshot),
        files=job.files,
        total_bytes=sum(f.size for f in job.files),
        present_bytes=sum(job.present_bytes(f) for f in job.files),
        free_bytes=free,
        in_cache=job.local_dir is None,
    )


def download(
    names: str | Sequence[str],
    folder: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
    revision: str = "main",
    token: str | bool | None = None,
) -> list[DownloadResult]:
    """Fetch registry models' snapshots (into ``folder/<name>``, or the Hugging Face cache) and verify them.

    ``token=None`` uses huggingface_hub's usual token (``HF_TOKEN`` or ``hf auth login``). Nothing is fetched
    when the files do not fit the free disk space, or with ``dry_run=True``: then the results only list
    the files, sizes and free space. Raises :class:`DownloadError` with one line on any hub problem.

    Example:
        >>> [r.dir for r in download("qwen-image", "/data/models", dry_run=True)]  # doctest: +SKIP
        ['/data/models/qwen-image']
    """
    specs = [downloadable(n) for n in ([names] if isinstance(names, str) else names)]
    for spec in specs:
        if spec.name == "qwen-image-edit":
            _notice(f"warning: {EDIT_WARNING}")
        if spec.licence:
            _notice(f"licence: {spec.licence}")
    if hub_offline():
        raise DownloadError(OFFLINE_HINT)
    endpoint = hub_endpoint()
    with _quiet_hub_logs():
        jobs = []
        for spec in specs:
            with _hub_errors(spec.hub_id or "", endpoint):
                jobs.append(_plan_job(spec, folder, revision, token, endpoint))
        free, where, limit = free_disk_bytes(jobs[0].local_dir or jobs[0].cache_dir)
        results = [_result(j, free) for j in jobs]
        if dry_run:
            for job, res in zip(jobs, results, strict=True):
                res.problems = verify_snapshot(job.snapshot, {f.path: f.size for f in job.files})
                res.complete = not res.problems
            return results
        needed = sum(r.needed_bytes for r in results)
        if needed > free:
            total = sum(r.total_bytes for r in results)
            capped = f" (capped by {DISK_LIMIT_ENV}={limit:g})" if limit is not None else ""
            raise DownloadError(
                f"not enough disk space: {human_bytes(needed)} ({needed:,} bytes) to fetch of "
                f"{human_bytes(total)} in all, but {human_bytes(free)} ({free:,} bytes) free at {where}{capped}; "
                "free some space or choose another --dir"
            )
        progress = _progress_class()
        for job, res in zip(jobs, results, strict=True):
            _fetch(job, res, token, endpoint, progress)
    return results


def _fetch(job: _Job, res: DownloadResult, token: str | bool | None, endpoint: str, progress: Any) -> None:
    from huggingface_hub import snapshot_download

    repo = job.spec.hub_id or ""
    if res.needed_bytes:
        _notice(f"fetching {human_bytes(res.needed_bytes)} of {repo} into {job.snapshot}")
    _fetch_resumable(job, token, endpoint, progress)
    with _hub_errors(repo, endpoint):
        path = snapshot_download(
            repo,
            # a folder takes the resolved commit; the cache takes the branch, so that refs/<branch> is written
            revision=job.revision if job.local_dir is not None else job.requested,
            cache_dir=str(job.cache_dir),
            local_dir=str(job.local_dir) if job.local_dir is not None else None,
            allow_patterns=job.patterns,
            ignore_patterns=list(NEVER_PATTERNS),
            endpoint=endpoint,
            token=token,
            etag_timeout=HUB_TIMEOUT_S,
            tqdm_class=progress,
        )
    res.dir = str(path)
    res.downloaded = True
    res.problems = verify_snapshot(path, {f.path: f.size for f in job.files})
    res.complete = not res.problems


def fetch_lora(name: str, model: str | None = None, token: str | bool | None = None) -> tuple[str, str]:
    """Fetch a LoRA into the Hugging Face cache: a few-step preset's (``lightning-8``, ``lightning-4``) for
    ``model``, or any ``owner/repo/FILE.safetensors``. Returns (hub source, local path).

    Example:
        >>> fetch_lora("lightning-8", "qwen-image")  # doctest: +SKIP
        ('lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V2.0.safetensors', '/root/.cache/...')
    """
    from huggingface_hub import hf_hub_download

    from .lora import PICKLE_REASON, _hub_parts, lightning_source
    from .presets import PRESETS

    if name in PRESETS and PRESETS[name].lora:
        source = lightning_source(get_model(model or "qwen-image").name, name)
    else:
        source = name
    if source.lower().endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
        raise DownloadError(f"{source} refused: {PICKLE_REASON}")
    parts = _hub_parts(source)
    if parts is None or parts[1] is None or not parts[1].endswith(".safetensors"):
        raise DownloadError(
            f"--lora takes lightning-8, lightning-4 or owner/repo/FILE.safetensors, got {name!r}"
        )
    if hub_offline():
        raise DownloadError(OFFLINE_HINT)
    repo, filename = parts
    endpoint = hub_endpoint()
    with _quiet_hub_logs(), _hub_errors(repo, endpoint):
        path = hf_hub_download(repo, filename, token=token, endpoint=endpoint, etag_timeout=HUB_TIMEOUT_S)
    return source, str(path)


# The default of `--optimal`: the newest Apache-2.0 text-to-image release.
OPTIMAL_MODEL = "qwen-image-2512"


def _cache_root() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
