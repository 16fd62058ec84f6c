"""Many images: a prompt file in, a folder of provenance PNGs and a manifest out, resumable.

The prompt file is JSONL (one object a line: ``prompt`` and optional ``negative``, ``seed``, ``steps``,
``cfg``, ``size``/``width``/``height`` or ``aspect``, ``preset``, ``n``, ``lora``, ``id``), CSV with a header
naming the same columns, or plain text (one prompt a line; blank lines and ``#`` comments skipped). Every
line is checked before any model loads; a bad line is reported as ``file:line: what is wrong`` and, unless
``strict``, skipped and listed.

Each image is one *item* with a deterministic id (a hash of its parameters and model, or the ``id`` given)
and a deterministic seed (the line's seed plus the image's index, else drawn from the id), so a rerun on
the same folder skips what is done and redoes only what is missing or failed. One run at a time writes to a
folder (a lock file); images are written to a temporary name and hard-linked into place, so a file is never
written twice and never seen half written. ``manifest.jsonl`` (and ``manifest.parquet`` when pyarrow is
importable) records each item's id, parameters, seed, path, timings, worker, attempts and status.

Engines: ``inline`` (a pipeline already loaded in this process), ``local`` (one worker process per free GPU,
or 1..N CPU workers, through ``concurrent.futures``) and ``ray`` (one long-lived actor per GPU on a Ray
cluster). Each worker runs one item with one more queued behind it, so it never waits for the coordinator
between items; items go to whichever worker has room; a worker lost mid-item costs that item one attempt (the
item queued behind it goes back as it was). Workers hand back pixels and provenance: the coordinator encodes
and writes the PNGs in threads (:class:`ImageWriter`), off the workers' path, and records an item as done once
its file is whole on disk.

Example:
    >>> from qwennb.batch import read_prompts
    >>> ps = read_prompts(["a red fox", {"prompt": "a blue bird", "n": 2, "seed": 5}], model="tiny")
    >>> [(i.prompt, i.seed) for i in ps.items][1:]
    [('a blue bird', 5), ('a blue bird', 6)]
    >>> read_prompts(["a fox", {"prompt": ""}], model="tiny").problems[0].text()
    'item 2: the prompt is empty'
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import io
import json
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import PlanError, QwennbError

KEYS = (
    "prompt",
    "negative",
    "seed",
    "steps",
    "cfg",
    "size",
    "width",
    "height",
    "aspect",
    "preset",
    "n",
    "lora",
    "id",
)
ALIASES = {"negative_prompt": "negative", "true_cfg_scale": "cfg", "num_images": "n"}
MAX_N = 10_000
MANIFEST = "manifest.jsonl"
PARQUET = "manifest.parquet"
LOCK = ".qwennb-batch.lock"
IMAGES = "images"
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class BatchError(QwennbError):
    """A batch cannot start: a bad prompt file (with ``strict``), an unwritable folder, a busy folder."""


# --------------------------------------------------------------------------- reading and validating


@dataclass
class BatchItem:
    """One image to make: fully resolved parameters, its id, seed, file and where it came from."""

    id: str
    prompt: str
    negative: str | None
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    preset: str | None
    lora: str | None
    source: str  # "file:line" (or "item N" for a list)
    key: str  # hash of the parameters and model: a finished file is reused only for the same key
    model: str

    @property
    def path(self) -> str:
        """The image's path relative to the output folder."""
        return f"{IMAGES}/{self.id}.png"

    def request(self) -> dict[str, Any]:
        """What a worker needs to make it (plain data, picklable)."""
        return {
            "id": self.id,
            "key": self.key,
            "prompt": self.prompt,
            "negative_prompt": self.negative,
            "seed": self.seed,
            "steps": self.steps,
            "cfg": self.cfg,
            "width": self.width,
            "height": self.height,
            "preset": self.preset,
            "lora": self.lora,
        }

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path
        return d


@dataclass
class Problem:
    """A line that cannot be used, and why."""

    source: str
    message: str

    def text(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class PromptSet:
    """The items read from a prompt file (or list), and the lines that were refused."""

    items: list[BatchItem]
    problems: list[Problem]
    source: str
    lines: int

    def report(self, limit: int = 20) -> str:
        """The problems, one ``file:line: message`` a line (the first ``limit``)."""
        out = [p.text() for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(out)


class _Bad(Exception):
    pass


def _raw_records(source: Any) -> tuple[Iterator[tuple[str, Any]], str]:
    """(where, raw) pairs: raw is a dict, a str, or an exception message for an unreadable line."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise BatchError(f"no such prompt file: {source}")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchError(f"cannot read {source}: {exc}") from None
        name = str(source)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl(name, text), name
        if suffix in (".csv", ".tsv"):
            return _csv(name, text, "\t" if suffix == ".tsv" else ","), name
        return _text(name, text), name
    if isinstance(source, Iterable):
        return ((f"item {i}", r) for i, r in enumerate(source, 1)), "prompts"
    raise BatchError(f"prompts must be a file path or a list of prompts, got {type(source).__name__}")


def _text(name: str, text: str) -> Iterator[tuple[str, Any]]:
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield f"{name}:{no}", s


def _jsonl(name: str, text: str) -> Iterator[tuple[str, Any]]:
    loads = json.loads
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("//"):
            continue
        try:
            obj = loads(s)
        except json.JSONDecodeError as exc:
            yield f"{name}:{no}", _Bad(f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if isinstance(obj, str):
            obj = {"prompt": obj}
        yield f"{name}:{no}", obj if isinstance(obj, dict) else _Bad("a line must be a JSON object")


def _csv(name: str, text: str, delimiter: str) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as exc:
        yield f"{name}:1", _Bad(f"unreadable CSV header ({exc})")
        return
    if "prompt" not in header:
        yield f"{name}:1", _Bad(f"the CSV header has no 'prompt' column (it has: {', '.join(header)})")
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"{name}:{reader.line_num}", _Bad(f"unreadable CSV row ({exc})")
            continue
        if not any(c.strip() for c in row):
            continue
        where = f"{name}:{reader.line_num}"
        if len(row) != len(header):
            yield where, _Bad(f"{len(row)} columns where the header has {len(header)}")
            continue
        yield where, {k: v for k, v in zip(header, row, strict=True) if v.strip() != ""}


def _as_int(key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise _Bad(f"{key} must be a whole number, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise _Bad(f"{key} must be a whole number, got {v!r}")


def _as_float(key: str, v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise _Bad(f"{key} must be a number, got {v!r}")


def _as_str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{key} must be text, got {v!r}")
    return v


def _digest(*parts: Any) -> str:
    # repr of str/int/float/None is stable across runs and Python versions, and cheaper than JSON.
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _seed_for(item_id: str) -> int:
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16)


@dataclass
class Defaults:
    """Values for what a line does not say (the command line's ``--steps``, ``--cfg``, ``--size``...)."""

    steps: int | None = None
    cfg: float | None = None
    width: int | None = None
    height: int | None = None
    aspect: str | None = None
    preset: str | None = None
    negative: str | None = None


def _lora_supported() -> bool:
    from .generation import generate

    return "lora" in inspect.signature(generate).parameters


def read_prompts(
    source: str | os.PathLike[str] | Iterable[str | dict[str, Any]],
    *,
    model: str = "tiny",
    plan: Any = None,
    defaults: Defaults | None = None,
) -> PromptSet:
    """Read and check prompts; nothing loads. Bad lines become :class:`Problem` s (``file:line: why``).

    Precedence for each value: the line, the line's preset, ``defaults``, ``defaults.preset``, the plan.
    ``plan`` (a :class:`qwennb.plan.Plan`) gives the default steps/CFG/size and the memory budget that
    sizes must fit; without it a plan for this machine is made.

    Example:
        >>> ps = read_prompts(["a red fox"], model="tiny", defaults=Defaults(steps=3, width=64, height=64))
        >>> it = ps.items[0]
        >>> (it.steps, it.width, it.height, it.path == f"images/{it.id}.png")
        (3, 64, 64, True)
    """
    from .generation import MAX_SEED, largest_size_that_fits, parse_size, resolve_options
    from .options import MAX_CFG, check_cfg
    from .presets import get_preset

    if plan is None:
        from .hardware import detect
        from .plan import make_plan

        plan = make_plan(detect(), model)
    d = defaults or Defaults()
    fake = SimpleNamespace(qwennb={"plan": plan})
    if d.preset:
        get_preset(d.preset)
    records, name = _raw_records(source)
    items: list[BatchItem] = []
    problems: list[Problem] = []
    seen_ids: dict[str, str] = {}
    seen_keys: dict[str, int] = {}
    fits: dict[tuple[int, int], Any] = {}
    lora_ok: bool | None = None
    lines = 0
    for where, raw in records:
        lines += 1
        try:
            if isinstance(raw, _Bad):
                raise raw
            if isinstance(raw, str):
                raw = {"prompt": raw}
            if not isinstance(raw, dict):
                raise _Bad(f"an item must be a prompt or a dict, got {type(raw).__name__}")
            rec = {ALIASES.get(k, k): v for k, v in raw.items()}
            unknown = sorted(k for k in rec if k not in KEYS)
            if unknown:
                raise _Bad(f"unknown field {unknown[0]!r}; known: {', '.join(KEYS)}")
            prompt = rec.get("prompt")
            if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
                raise _Bad("the prompt is empty")
            prompt = _as_str("prompt", prompt)
            negative = _as_str("negative", rec["negative"]) if "negative" in rec else d.negative
            preset = _as_str("preset", rec["preset"]) if "preset" in rec else None
            p = get_preset(preset) if preset else None
            dp = get_preset(d.preset) if d.preset and not p else None
            steps = _as_int("steps", rec["steps"]) if "steps" in rec else None
            cfg = _as_float("cfg", rec["cfg"]) if "cfg" in rec else None
            if steps is None and p is None:
                steps = d.steps if d.steps is not None else (dp.steps if dp else None)
            if cfg is None and p is None:
                cfg = d.cfg if d.cfg is not None else (dp.cfg if dp else None)
            width = _as_int("width", rec["width"]) if "width" in rec else None
            height = _as_int("height", rec["height"]) if "height" in rec else None
            if "size" in rec:
                if width is not None or height is not None:
                    raise _Bad("give size or width/height, not both")
                width, height = parse_size(_as_str("size", rec["size"]))
            if (width is None) != (height is None):
                raise _Bad("give both width and height (or size: WxH)")
            aspect = _as_str("aspect", rec["aspect"]) if "aspect" in rec else None
            if width is None and aspect is None and (p is None or not p.official_sizes):
                width, height, aspect = d.width, d.height, d.aspect
            notices: list[str] = []
            steps, cfg, width, height = resolve_options(
                fake,
                steps,
                cfg,
                width,
                height,
                aspect,
                preset or (d.preset if not p else None),
                None,
                notices,
            )
            if steps < 2 or steps > 1000:
                raise _Bad(f"steps must be from 2 to 1000, got {steps}")
            try:
                check_cfg(cfg)  # the one place the CFG range lives
            except QwennbError:
                raise _Bad(
                    f"cfg must be at least 1 (1 turns guidance off) and at most {MAX_CFG:g}, got {cfg:g}"
                ) from None
            if (width, height) not in fits:
                fits[(width, height)] = largest_size_that_fits(plan, width, height, 1)
            fit = fits[(width, height)]
            if fit != (width, height):
                hint = f"; the largest of this shape that fits is {fit[0]}x{fit[1]}" if fit else ""
                raise _Bad(
                    f"{width}x{height} does not fit the plan's {plan.budget_gb:.1f} GiB budget on "
                    f"{plan.gpu_name or plan.device}{hint}"
                )
            seed = _as_int("seed", rec["seed"]) if "seed" in rec else None
            n = _as_int("n", rec["n"]) if "n" in rec else 1
            if not 1 <= n <= MAX_N:
                raise _Bad(f"n must be from 1 to {MAX_N}, got {n}")
            if seed is not None and not 0 <= seed <= MAX_SEED - n:
                raise _Bad(f"seed must be from 0 to 2**63-1, got {seed}")
            lora = _as_str("lora", rec["lora"]) if "lora" in rec else None
            if lora is not None:
                if lora_ok is None:
                    lora_ok = _lora_supported()
                if not lora_ok:
                    raise _Bad("lora is not supported by this version of qwennb")
            given = rec.get("id")
            if given is not None:
                given = str(given)
                if not given or len(given) > 100 or not set(given) <= _ID_CHARS or given.startswith("."):
                    raise _Bad(f"id must be 1-100 letters, digits, '.', '_' or '-', got {given!r}")
            key = _digest(model, prompt, negative, steps, cfg, width, height, preset, lora, seed, given)
            if given is None:
                occurrence = seen_keys.get(key, 0)
                seen_keys[key] = occurrence + 1
                base = key[:12] + (f"-{occurrence + 1}" if occurrence else "")
            else:
                base = given
            ids = [base] if n == 1 else [f"{base}-{k}" for k in range(n)]
            for new_id in ids:
                if new_id in seen_ids:
                    raise _Bad(f"id {new_id!r} is already used at {seen_ids[new_id]}")
            for k, new_id in enumerate(ids):
                seen_ids[new_id] = where
                items.append(
                    BatchItem(
                        id=new_id,
                        prompt=prompt,
                        negative=negative,
                        seed=seed + k if seed is not None else _seed_for(f"{model}/{new_id}"),
                        steps=steps,
                        cfg=cfg,
                        width=width,
                        height=height,
                        preset=preset or (d.preset if not p else None),
                        lora=lora,
                        source=where,
                        key=_digest(key, k),
                        model=model,
                    )
                )
        except _Bad as exc:
            problems.append(Problem(where, str(exc)))
        except QwennbError as exc:
            problems.append(Problem(where, str(exc)))
    return PromptSet(items, problems, name, lines)


# --------------------------------------------------------------------------- the output folder


def check_writable(out: str | os.PathLike[str]) -> Path:
    """Create the output folder (and ``images/``) and prove a file can be written there."""
    folder = Path(out).expanduser()
    try:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        probe = folder / f".qwennb-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BatchError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    return folder


class FolderLock:
    """One batch run at a time per folder: an OS lock on ``.qwennb-batch.lock`` (released if the run dies)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._f: Any = None

    def __enter__(self) -> FolderLock:
        f = open(self.path, "a+")  # noqa: SIM115 - held for the run
        try:
            import fcntl

            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "another process"
                f.close()
                raise BatchError(
                    f"another qwennb batch ({owner}) is writing to {self.path.parent}; wait for it or use "
                    "another --out"
                ) from None
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError:
                f.close()
                raise BatchError(f"another qwennb batch is writing to {self.path.parent}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            self._f.close()  # closing releases the lock
            self._f = None


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, and never over an existing file.

    The bytes go to a temporary name, are flushed to disk, then hard-linked to ``path`` (an atomic step that
    fails if ``path`` exists: ``FileExistsError``).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # pragma: no cover - a file system without hard links
            if path.exists():
                raise FileExistsError(str(path)) from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def png_batch_key(path: Path) -> str | None:
    """The item key stored in a batch PNG's provenance (None when absent or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw = im.info.get("qwennb")
        return json.loads(raw).get("batch_key") if raw else None
    except (OSError, ValueError):
        return None


class Manifest:
    """``manifest.jsonl``: one JSON object a line, appended as items start and finish; the last line for an
    id is its state. Compacted to one line per item (through a temporary file) at the start and end of a run.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / MANIFEST
        self._f: Any = None
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        """The latest record per id (a line cut short by a crash is ignored)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    out[rec["id"]] = rec
        return out

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        self.close()
        tmp = self.path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def write_parquet(self, rows: list[dict[str, Any]]) -> Path | None:
        """``manifest.parquet`` beside the JSONL, when pyarrow is importable (else None)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return None
        cols = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in rows])
        path = self.folder / PARQUET
        tmp = path.with_name(f".{PARQUET}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path


# --------------------------------------------------------------------------- writing the images (coordinator)


def _png(image: Any, meta: dict[str, Any], item_id: str, key: str) -> bytes:
    """A provenance PNG: the image and its parameters (``qwennb`` text chunk) with the batch id and key."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    info = PngInfo()
    info.add_text("qwennb", json.dumps({**meta, "batch_id": item_id, "batch_key": key}, ensure_ascii=False))
    info.add_text("Software", f"qwennb {__version__}")
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _write_item(folder: Path, it: BatchItem, value: dict[str, Any]) -> dict[str, Any]:
    """Encode and write one finished item's PNG (never over another file); what the manifest records of it."""
    t0 = time.perf_counter()
    data = _png(value["image"], value["meta"], it.id, it.key)
    rel = it.path
    target = folder / rel
    try:
        write_new_file(target, data)
    except FileExistsError:
        if png_batch_key(target) != it.key:  # a different image under this id (its parameters changed)
            rel = f"{IMAGES}/{it.id}-{it.key[:8]}.png"
            with contextlib.suppress(FileExistsError):
                write_new_file(folder / rel, data)
    return {
        "path": rel,
        "write_s": round(time.perf_counter() - t0, 4),
        "written": round(time.time(), 4),
        "written_by": f"{socket.gethostname()}:{os.getpid()}",
    }


class ImageWriter:
    """The coordinator's PNG writer: workers hand back pixels and provenance, and threads here encode and write
    the files while the workers go on with their next items. ``threads=0`` writes at once in the caller (the
    inline engine, where the caller is the generating thread anyway).

    An item is recorded as done only once its file is whole on disk (:func:`write_new_file`); ``limit`` finished
    images may wait for a writer before the coordinator stops handing out new items (bounded memory).
    """

    def __init__(self, folder: Path, threads: int, limit: int = 8) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.folder = folder
        self.limit = max(1, limit)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="qwennb-png") if threads else None
        self.pending: dict[Any, tuple[BatchItem, dict[str, Any]]] = {}
        self.write: Callable[[Path, BatchItem, dict[str, Any]], dict[str, Any]] = _write_item

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def submit(self, it: BatchItem, value: dict[str, Any]) -> None:
        from concurrent.futures import Future

        if self.pool is None:
            fut: Future[dict[str, Any]] = Future()
            try:
                fut.set_result(self.write(self.folder, it, value))
            except Exception as exc:
                fut.set_exception(exc)
        else:
            fut = self.pool.submit(self.write, self.folder, it, value)
        self.pending[fut] = (it, value)

    def finished(self, timeout: float = 0.0) -> list[tuple[BatchItem, dict[str, Any], dict[str, Any]]]:
        """The writes that ended (waiting up to ``timeout`` for one): (item, worker's value, write record).
        A failed write raises here, in the coordinator."""
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait

        if not self.pending:
            return []
        done, _ = fwait(list(self.pending), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            it, value = self.pending.pop(fut)
            out.append((it, value, fut.result()))
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


# --------------------------------------------------------------------------- workers (all engines)


class Worker:
    """What every engine runs: a pipeline loaded once, then one item at a time (plain data in and out).

    An item's result is its pixels (a uint8 array) and provenance, not a file: the coordinator writes the PNG
    (:class:`ImageWriter`), so the worker starts its next item at once. The worker keeps its recent prompt
    encodings (the negative prompt is usually the same for every item).
    """

    def __init__(
        self,
        model: str | None = None,
        overrides: dict[str, Any] | None = None,
        pipe: Any = None,
        device: str = "",
        warmup: dict[str, Any] | None = None,
    ) -> None:
        self.stop_signal: Any = None
        self.texts: dict[Any, Any] = {}  # encodings of recent prompts (generate's _text_cache)
        if pipe is None:
            from .hardware import detect
            from .pipeline import build, resolve_model
            from .plan import make_plan

            name, path, _ = resolve_model(model)
            pipe = build(make_plan(detect(), name, overrides), path)
        self.pipe = pipe
        self.name = f"{socket.gethostname()}:{os.getpid()}" + (f":{device}" if device else "")
        if warmup:  # one throwaway image: compiled graphs and caches are ready before the first item
            self.run(warmup)

    def info(self) -> dict[str, Any]:
        return {"worker": self.name, "pid": os.getpid(), "host": socket.gethostname()}

    def run(self, request: dict[str, Any], stop: Any = None) -> dict[str, Any]:
        """Make one item; returns ``{"id", "image", "meta", "timings", "worker"}`` or ``{"id", "error", ...}``."""
        import numpy as np

        from .generation import StopSignal, _metadata, generate

        self.stop_signal = stop if stop is not None else StopSignal()
        kwargs = {
            k: request[k] for k in ("negative_prompt", "seed", "steps", "cfg", "width", "height", "preset")
        }
        if request.get("lora"):
            kwargs["lora"] = request["lora"]
        t0 = time.time()
        marks: dict[str, float] = {}

        def on_step(info: Any) -> None:  # the wall-clock end of the last step, for the gap between items
            marks["loop_ended"] = time.time()

        try:
            result = generate(
                self.pipe,
                request["prompt"],
                stop=self.stop_signal,
                on_step=on_step,
                _text_cache=self.texts,
                **kwargs,
            )
        except QwennbError as exc:
            return {"id": request["id"], "error": str(exc), "permanent": True, "worker": self.name}
        if result.interrupted or not result.images:
            return {"id": request["id"], "interrupted": True, "worker": self.name}
        image = np.asarray(result.images[0])
        denoise = sum(result.step_times_s)
        loop_ended = marks.get("loop_ended", t0)
        return {
            "id": request["id"],
            "image": image,
            "meta": _metadata(result, 0),
            "worker": self.name,
            "started": t0,
            "timings": {
                "began": round(t0, 4),
                # The denoising loop by the worker's wall clock: the pipeline call's start (its set-up counts in
                # the first step, as in denoise_s) to the last step's end.
                "loop_began": round(loop_ended - denoise, 4),
                "loop_ended": round(loop_ended, 4),
                "ended": round(time.time(), 4),
                "text_encoding_s": round(result.text_encoding_s, 4),
                "denoise_s": round(denoise, 4),
                "decode_s": round(result.decode_s, 4),
                "generate_s": round(result.total_s, 4),
                "median_step_s": round(result.median_step_s or 0.0, 4),
                "worker_s": round(time.time() - t0, 4),
            },
        }

    def stop(self) -> None:
        if self.stop_signal is not None:
            self.stop_signal.set()


# ---- local engine: one process per GPU (or CPU worker), concurrent.futures

_LOCAL: dict[str, Any] = {}


def _local_init(
    model: str | None, overrides: Any, slot: int | None, stop_event: Any, threads: int, warmup: Any = None
) -> None:
    """ProcessPoolExecutor initializer: pin this process to its GPU, then load the pipeline once."""
    import signal

    if slot is not None:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    # The driver handles Ctrl-C (it stops the workers at their next step through stop_event).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    if threads:
        torch.set_num_threads(threads)
    _LOCAL["worker"] = Worker(
        model, overrides, device=f"cuda{slot}" if slot is not None else "cpu", warmup=warmup
    )
    _LOCAL["stop_event"] = stop_event


def _local_run(request: dict[str, Any]) -> dict[str, Any]:
    from .generation import StopSignal

    worker: Worker = _LOCAL["worker"]
    stop_event = _LOCAL["stop_event"]
    stop = StopSignal()
    if stop_event.is_set():
        return {"id": request["id"], "interrupted": True, "worker": worker.name}
    done = threading.Event()

    def watch() -> None:  # the driver's stop reaches the generation at its next step
        while not done.wait(0.05):
            if stop_event.is_set():
                stop.set()
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        return worker.run(request, stop)
    finally:
        done.set()


@dataclass
class _Outcome:
    handle: Any
    kind: (
        str  # "ok" | "error" | "lost" (the worker died running it) | "requeue" (queued there, never started)
    )
    value: dict[str, Any] = field(default_factory=dict)
    message: str = ""


class InlineEngine:
    """The pipeline already loaded in this process (a notebook session): one item at a time, run in ``wait``
    (so that the item is recorded as started before it runs)."""

    name = "inline"

    def __init__(self, pipe: Any, stop: Any) -> None:
        self.worker = Worker(pipe=pipe, device="inline")
        self.stop_signal = stop
        self._next: tuple[Any, dict[str, Any]] | None = None
        self.workers = [self.worker.name]

    def free(self) -> int:
        return 0 if self._next else 1

    def idle(self) -> int:
        return self.free()

    def size(self) -> int:
        return 1

    def submit(self, request: dict[str, Any]) -> Any:
        handle = object()
        self._next = (handle, request)
        return handle

    def running(self, handle: Any) -> bool:
        return self._next is not None and self._next[0] is handle

    def worker_of(self, handle: Any) -> str | None:
        return self.worker.name

    def wait(self, handles: list[Any], timeout: float) -> list[_Outcome]:
        if self._next is None:
            return []
        handle, request = self._next
        try:
            value = self.worker.run(request, self.stop_signal)
        except KeyboardInterrupt:  # outside generate's own handling: the item is unfinished, the batch stops
            self.stop_signal.set()
            value = {"id": request["id"], "interrupted": True, "worker": self.worker.name}
        finally:
            self._next = None
        return [_Outcome(handle, "ok", value)]

    def stop(self) -> None:
        self.stop_signal.set()

    def close(self, abandon: bool = False) -> None:
        pass


AHEAD = 1  # items queued on each worker behind the one it runs, so that it never waits for the coordinator


class _Slot:
    """One worker of an engine and the items handed to it, in the order it runs them (the first is running)."""

    def __init__(self, key: Any) -> None:
        self.key = key  # the GPU index (local) or the actor (Ray)
        self.fifo: deque[Any] = deque()
        self.name: str | None = None
        self.pool: Any = None
        self.made = 0  # items finished since this worker (re)started
        self.turn = 0  # Ray: the next item's place in the actor's order
        self.breaks = 0  # consecutive deaths without an item finished
        self.dead = False


def _pick(slots: list[_Slot]) -> _Slot | None:
    """The worker to take the next item: an idle one first, then one with room for an item queued ahead."""
    live = [s for s in slots if not s.dead and len(s.fifo) <= AHEAD]
    return min(live, key=lambda s: len(s.fifo)) if live else None


class _SlotEngine:
    """What the local and the Ray engine share: their workers' slots (``slots``) and which slot each handed-out
    item went to (``owner``)."""

    slots: list[_Slot]
    owner: dict[Any, _Slot]

    def free(self) -> int:
        return sum(AHEAD + 1 - len(s.fifo) for s in self.slots if not s.dead)

    def idle(self) -> int:
        return sum(1 for s in self.slots if not s.dead and not s.fifo)

    def size(self) -> int:
        return sum(1 for s in self.slots if not s.dead)

    def running(self, handle: Any) -> bool:
        s = self.owner.get(handle)
        return s is not None and bool(s.fifo) and s.fifo[0] is handle

    def worker_of(self, handle: Any) -> str | None:
        s = self.owner.get(handle)
        return s.name if s is not None else None


class LocalEngine(_SlotEngine):
    """One worker process per GPU (or ``workers`` CPU processes), each loading the pipeline once.

    Each worker is its own one-process ``concurrent.futures.ProcessPoolExecutor`` (spawned): the initializer
    pins it to its GPU through ``CUDA_VISIBLE_DEVICES`` before torch starts. A worker runs one item and has one
    queued behind it (``AHEAD``), so it goes from one item to the next without waiting for the coordinator;
    items go to whichever worker has room (an idle one first). A worker that dies costs the item it was running
    one attempt; the item queued behind it goes back to the queue as it was, the other workers go on, and that
    worker is restarted (dropped if it dies twice without finishing an item).
    """

    name = "local"

    def __init__(
        self,
        model: str | None,
        overrides: Any,
        gpus: list[int] | None,
        workers: int,
        threads: int = 0,
        warmup: dict[str, Any] | None = None,
    ) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.model, self.overrides, self.threads = model, overrides, threads
        self.warmup = warmup
        self.stop_event = self.ctx.Event()
        self.slots = [_Slot(g) for g in gpus] if gpus else [_Slot(None) for _ in range(workers)]
        self.owner: dict[Any, _Slot] = {}
        for s in self.slots:
            self._start(s)
        self.workers: list[str] = []  # filled with the real names (host:pid:device) as workers report

    def _start(self, s: _Slot) -> None:
        from concurrent.futures import ProcessPoolExecutor

        s.pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=self.ctx,
            initializer=_local_init,
            initargs=(self.model, self.overrides, s.key, self.stop_event, self.threads, self.warmup),
        )
        s.made = 0

    def submit(self, request: dict[str, Any]) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        s = _pick(self.slots)
        assert s is not None, "submit() without a free worker"
        try:
            fut = s.pool.submit(_local_run, request)
        except BrokenProcessPool:  # its process died while it had nothing to do: start it again
            _shutdown(s.pool, wait=False)
            self._start(s)
            fut = s.pool.submit(_local_run, request)
        s.fifo.append(fut)
        self.owner[fut] = s
        return fut

    def wait(self, handles: list[Any], timeout: float) -> list[_Outcome]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait
        from concurrent.futures.process import BrokenProcessPool

        if handles:
            fwait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        else:
            time.sleep(timeout)
        out: list[_Outcome] = []
        for s in self.slots:
            # In the order the worker runs them: only its first item can be finished or lost.
            while s.fifo and s.fifo[0].done():
                fut = s.fifo.popleft()
                del self.owner[fut]
                try:
                    value = fut.result()
                except BrokenProcessPool as exc:
                    out.extend(self._died(s, fut, exc))
                    break
                except Exception as exc:  # an error inside generate: retried a bounded number of times
                    out.append(_Outcome(fut, "error", message=f"{type(exc).__name__}: {exc}"))
                    continue
                out.append(_Outcome(fut, "ok", value))
                s.made += 1
                s.breaks = 0
                name = value.get("worker")
                if name:
                    s.name = name
                    if name not in self.workers:
                        self.workers.append(name)
        return out

    def _died(self, s: _Slot, fut: Any, exc: Exception) -> list[_Outcome]:
        """The worker's process died running ``fut``: that item is lost, those queued behind it go back."""
        out = [_Outcome(f, "requeue") for f in s.fifo]  # first: they go back to the queue's front, behind it
        out.append(_Outcome(fut, "lost", message=f"worker {s.name or 'process'} died ({exc})"))
        for f in s.fifo:
            del self.owner[f]
        s.fifo.clear()
        _shutdown(s.pool, wait=False)
        s.breaks += 1  # reset by each item it finishes
        if s.breaks >= 2:
            s.dead = True
            if all(x.dead for x in self.slots):
                raise BatchError(
                    "the worker processes die before finishing any item (loading the model fails, or the "
                    "machine runs out of memory); try one item with `qwennb generate` to see why"
                )
        else:
            self._start(s)
        return out

    def stop(self) -> None:
        self.stop_event.set()

    def close(self, abandon: bool = False) -> None:
        for s in self.slots:
            if s.pool is None:
                continue
            if abandon:
                for p in list((getattr(s.pool, "_processes", None) or {}).values()):
                    with contextlib.suppress(Exception):
                        p.kill()
            _shutdown(s.pool, wait=not abandon)
            s.pool = None


def _shutdown(pool: Any, wait: bool) -> None:
    """``pool.shutdown`` that also works on a pool whose manager thread never started: a Ctrl-C that lands while
    the workers start leaves the executor with a thread object it cannot join (``RuntimeError: cannot join thread
    before it is started``); its processes are killed instead."""
    try:
        pool.shutdown(wait=wait, cancel_futures=True)
    except RuntimeError:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()


class RayEngine(_SlotEngine):
    """One long-lived Ray actor per GPU of the cluster (or ``workers`` CPU actors), each loading the
    pipeline once; each actor runs one item and has one queued behind it (``AHEAD``), and items go to whichever
    actor has room (``ray.wait``). A lost actor's running item is retried on another actor (the one queued
    behind it goes back to the queue as it was); Ray restarts the actor (``max_restarts``), which rejoins once it
    answers again.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None,
        model: str | None,
        overrides: Any,
        workers: int | None,
        max_restarts: int = 1,
        warmup: dict[str, Any] | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise BatchError("the Ray engine needs ray: pip install 'qwennb[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                if address in (None, "local"):
                    ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except ConnectionError as exc:
                raise BatchError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
            except Exception as exc:  # Ray raises a bare Exception when its node does not start in time
                raise BatchError(f"could not start Ray here: {exc}") from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            n, opts = min(workers or gpus, gpus), {"num_gpus": 1}
        else:
            n, opts = workers or 1, {"num_cpus": 1}
        # Threads: the running item, the one queued behind it (waiting for the first), and stop().
        cls = ray.remote(max_restarts=max_restarts, max_task_retries=0, max_concurrency=AHEAD + 2, **opts)(
            _RayWorker
        )
        self.actors = [cls.remote(model, overrides, warmup) for _ in range(n)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            text = str(exc).strip()
            raise BatchError(
                f"the Ray workers could not load {model}: {text.splitlines()[-1] if text else type(exc).__name__}"
            ) from None
        self.slots = [_Slot(a) for a in self.actors]
        for s, i in zip(self.slots, infos, strict=True):
            s.name = i["worker"]
        self.workers = [i["worker"] for i in infos]
        self.pids = [i["pid"] for i in infos]
        self.owner: dict[Any, _Slot] = {}  # ref -> its actor's slot
        self.probes: dict[Any, _Slot] = {}  # ref of an info() call -> a lost actor's slot, until it answers
        self.lost: list[str | None] = []

    def submit(self, request: dict[str, Any]) -> Any:
        s = _pick(self.slots)
        assert s is not None, "submit() without a free worker"
        ref = s.key.run.remote(request, None, s.turn)
        s.turn += 1
        s.fifo.append(ref)
        self.owner[ref] = s
        return ref

    def wait(self, handles: list[Any], timeout: float) -> list[_Outcome]:
        ray = self.ray
        refs = [h for h in handles if h in self.owner] + list(self.probes)
        if not refs:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        out: list[_Outcome] = []
        for ref in ready:
            if ref in self.probes:
                self._probed(ref)
                continue
            s = self.owner.get(ref)
            if s is None:  # dropped with its lost actor (it went back to the queue)
                continue
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                # Lost mid-item: the running item is retried elsewhere, the queued ones go back as they were; the
                # actor rejoins once it answers again (Ray restarts it, max_restarts) or is dropped if it is dead.
                text = str(exc).strip()
                first = text.splitlines()[0] if text else type(exc).__name__
                running = s.fifo[0]
                out += [_Outcome(f, "requeue") for f in list(s.fifo)[1:]]
                out.append(_Outcome(running, "lost", message=f"worker {s.name} lost: {first}"))
                for f in s.fifo:
                    del self.owner[f]
                s.fifo.clear()
                s.dead = True  # until it answers
                self.probes[s.key.info.remote()] = s
                continue
            except ray.exceptions.RayError as exc:
                text = str(exc).strip()
                last = text.splitlines()[-1] if text else type(exc).__name__
                out.append(_Outcome(ref, "error", message=last))
            else:
                out.append(_Outcome(ref, "ok", value))
            s.fifo.remove(ref)
            del self.owner[ref]
        if all(s.dead for s in self.slots) and not self.probes:
            raise BatchError("every Ray worker was lost")
        return out

    def _probed(self, ref: Any) -> None:
        ray = self.ray
        s = self.probes.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
            time.sleep(0.2)
            self.probes[s.key.info.remote()] = s
            return
        except ray.exceptions.RayActorError:  # dead for good
            self.lost.append(s.name)
            return
        s.name = info["worker"]
        s.turn = info["turn"]  # a restarted actor counts from 0 again
        if info["worker"] not in self.workers:
            self.workers.append(info["worker"])
        s.dead = False

    def stop(self) -> None:
        for s in self.slots:
            if s.fifo:
                s.key.stop.remote()

    def close(self, abandon: bool = False) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors = []


class _RayWorker(Worker):
    """A :class:`Worker` as a Ray actor. Threaded, so that ``stop`` is heard while ``run`` runs and the next item
    waits in the actor. A threaded actor may start its calls in any order, so each ``run`` carries its ``turn``
    (0, 1, 2... from the driver, per actor) and waits for the earlier ones: the driver knows which item is running.
    Items run one at a time; ``stop`` also ends those queued."""

    def __init__(self, model: str | None, overrides: Any, warmup: dict[str, Any] | None = None) -> None:
        import ray

        self._one = threading.Lock()
        self._turns = threading.Condition()
        self._next_turn = 0
        self._stopped = False
        gpu_ids = ray.get_gpu_ids()
        super().__init__(model, overrides, device=f"gpu{gpu_ids[0]}" if gpu_ids else "cpu", warmup=warmup)

    def info(self) -> dict[str, Any]:
        with self._turns:
            return {**super().info(), "turn": self._next_turn}

    def run(self, request: dict[str, Any], stop: Any = None, turn: int | None = None) -> dict[str, Any]:
        if turn is not None:
            with self._turns:
                self._turns.wait_for(lambda: self._next_turn >= turn)
        try:
            with self._one:
                if self._stopped:
                    return {"id": request["id"], "interrupted": True, "worker": self.name}
                return super().run(request, stop)
        finally:
            if turn is not None:
                with self._turns:
                    self._next_turn = max(self._next_turn, turn + 1)
                    self._turns.notify_all()

    def stop(self) -> None:
        self._stopped = True
        super().stop()


# --------------------------------------------------------------------------- the run


@dataclass
class BatchEvent:
    """A plain progress event: what the terminal bar and the notebook widget show."""

    kind: str  # "start", "item_start", "item_done", "item_failed", "item_retry", "stopping", "end"
    total: int
    done: int
    skipped: int
    failed: int
    in_flight: int
    elapsed_s: float
    item_id: str | None = None
    path: str | None = None  # absolute path of a finished image
    worker: str | None = None
    message: str | None = None
    problems: list[str] = field(default_factory=list)  # on "start": the refused lines, file:line: why

    @property
    def images_per_min(self) -> float:
        return 60.0 * self.done / self.elapsed_s if self.elapsed_s > 0 and self.done else 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.skipped - self.failed

    @property
    def eta_s(self) -> float | None:
        rate = self.images_per_min
        return 60.0 * self.remaining / rate if rate else None


@dataclass
class BatchResult:
    """What a batch run did. ``done`` counts images made by this run, ``skipped`` those already present."""

    total: int
    done: int
    skipped: int
    failed: int
    pending: int
    invalid: int
    started: int  # items handed to a worker by this run (done + failed + stopped in flight)
    manifest: str
    out: str
    engine: str
    workers: list[str]
    elapsed_s: float
    interrupted: bool
    problems: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    parquet: str | None = None
    contact_sheet_html: str | None = None
    contact_sheet_png: str | None = None
    paths: list[str] = field(default_factory=list)  # finished images, in prompt order (this run and earlier)
    model: str = ""

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("paths")
        d["images_per_s"] = round(self.images_per_s, 4)
        return d

    def summary(self) -> str:
        """A few lines for people."""
        state = "stopped" if self.interrupted else "finished"
        lines = [
            f"qwennb batch {state}: {self.total} items: {self.done} made, {self.skipped} already done, "
            f"{self.failed} failed, {self.pending} not run"
            + (f"; {self.invalid} bad lines skipped" if self.invalid else ""),
            f"{self.engine} engine, {len(self.workers)} worker(s), {self.model}: {self.elapsed_s:.1f} s, "
            f"{60 * self.images_per_s:.1f} images/min",
            f"manifest: {self.manifest}",
        ]
        if self.contact_sheet_html:
            lines.append(f"contact sheet: {self.contact_sheet_html}")
        for f in self.failures[:5]:
            lines.append(f"failed {f['id']} ({f['source']}): {f['error']}")
        if self.pending:
            lines.append("run the same command again to make the rest (finished items are skipped)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<BatchResult {self.done} made, {self.skipped} skipped, {self.failed} failed of {self.total}>"


def free_gpus(hardware: Any, need_gb: float | None) -> list[int]:
    """Indices of the GPUs with at least ``need_gb`` GiB free (all GPUs when need_gb is None).

    Example:
        >>> from qwennb.plan import describe_machine
        >>> free_gpus(describe_machine(gpu_memory_gb=80), 40.0)
        [0]
    """
    return [g.index for g in hardware.gpus if need_gb is None or g.free_memory_gb >= need_gb]


def contact_sheet(
    rows: list[dict[str, Any]], folder: Path, limit_png: int = 100, thumb: int = 160
) -> tuple[Path, Path | None]:
    """Write ``contact_sheet.html`` (every finished image with its parameters) and ``contact_sheet.png`` (a
    grid of the first ``limit_png``). Returns their paths (the PNG is None when no image is finished)."""
    import html

    from PIL import Image

    done = [r for r in rows if r.get("status") == "done"]
    cards = []
    for r in done:
        cap = (
            f"{html.escape(r['prompt'][:200])}<br><small>{html.escape(r['id'])} · seed {r['seed']} · "
            f"{r['steps']} steps · CFG {r['cfg']:g} · {r['width']}×{r['height']}"
            + (f" · {html.escape(r['worker'])}" if r.get("worker") else "")
            + "</small>"
        )
        cards.append(
            f'<figure style="display:inline-block;width:{thumb}px;margin:4px;vertical-align:top;'
            f'font:11px sans-serif"><a href="{html.escape(r["path"])}"><img loading="lazy" '
            f'src="{html.escape(r["path"])}" style="width:{thumb}px"></a><figcaption>{cap}</figcaption></figure>'
        )
    failed = [r for r in rows if r.get("status") == "failed"]
    fails = "".join(
        f"<li>{html.escape(r['id'])} ({html.escape(r.get('source', ''))}): {html.escape(str(r.get('error')))}</li>"
        for r in failed
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>qwennb batch</title>"
        f"<h3 style='font-family:sans-serif'>qwennb batch: {len(done)} of {len(rows)} images</h3>"
        + "".join(cards)
        + (f"<h4>failed</h4><ul>{fails}</ul>" if fails else "")
    )
    html_path = folder / "contact_sheet.html"
    tmp = folder / ".contact_sheet.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, html_path)
    if not done:
        return html_path, None
    shown = done[:limit_png]
    cols = min(10, math.ceil(math.sqrt(len(shown))))
    rows_n = math.ceil(len(shown) / cols)
    sheet = Image.new("RGB", (cols * thumb, rows_n * thumb), "white")
    for i, r in enumerate(shown):
        try:
            with Image.open(folder / r["path"]) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                sheet.paste(im, ((i % cols) * thumb, (i // cols) * thumb))
        except OSError:
            continue
    png_path = folder / "contact_sheet.png"
    tmp = folder / ".contact_sheet.png.tmp"
    sheet.save(tmp, format="PNG")
    os.replace(tmp, png_path)
    return html_path, png_path


def check_batch(
    prompts: str | os.PathLike[str] | Iterable[str | dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    size: str | tuple[int, int] | None = None,
    aspect: str | None = None,
    preset: str | None = None,
    negative: str | None = None,
    strict: bool = False,
    pipe: Any = None,
    overrides: dict[str, Any] | None = None,
) -> PromptSet:
    """What :func:`run_batch` checks before anything loads, alone: the folder is writable, the prompts read (bad
    lines listed as problems; with ``strict`` the first raises :class:`BatchError`) and every size fits the plan
    of ``model`` (or of ``pipe``) on this machine. Raises :class:`BatchError` when no prompt is usable.

    Example:
        >>> import tempfile
        >>> ps = check_batch(["a red fox", {"prompt": ""}], tempfile.mkdtemp(), model="tiny", size="64x64")
        >>> (len(ps.items), len(ps.problems))
        (1, 1)
    """
    return _prepare(
        prompts,
        out,
        model=model,
        pipe=pipe,
        ray=None,
        overrides=overrides,
        strict=strict,
        steps=steps,
        cfg=cfg,
        size=size,
        aspect=aspect,
        preset=preset,
        negative=negative,
    )[-1]


def _prepare(
    prompts: Any,
    out: Any,
    *,
    model: str | None,
    pipe: Any,
    ray: str | None,
    overrides: dict[str, Any] | None,
    strict: bool,
    steps: int | None,
    cfg: float | None,
    size: str | tuple[int, int] | None,
    aspect: str | None,
    preset: str | None,
    negative: str | None,
) -> tuple[Path, str, str | None, Any, Any, PromptSet]:
    """The checks of :func:`check_batch` (and the start of :func:`run_batch`): the folder, the model's name and
    path, its plan, the machine and the prompts."""
    from .generation import parse_size
    from .hardware import detect
    from .plan import make_plan

    folder = check_writable(out)
    if isinstance(size, str):
        width, height = parse_size(size)
    elif size is not None:
        width, height = size
    else:
        width = height = None
    if pipe is not None:
        plan = getattr(pipe, "qwennb", {}).get("plan")
        name = getattr(pipe, "qwennb", {}).get("model", model or "unknown")
        path = None
    else:
        from .pipeline import resolve_model

        name, path, _ = resolve_model(model)
        plan = None
    hardware = detect()
    if plan is None:
        try:
            plan = make_plan(hardware, name, overrides)
        except PlanError:
            if not ray or hardware.gpus:
                raise
            # A driver without a GPU sends work to a GPU cluster: check the prompts against an 80 GB card
            # (each actor makes its own plan for the card it has).
            from .plan import describe_machine

            plan = make_plan(describe_machine(gpu_memory_gb=80.0, host_ram_gb=256.0), name, overrides)
    pset = read_prompts(
        prompts,
        model=name,
        plan=plan,
        defaults=Defaults(steps, cfg, width, height, aspect, preset, negative),
    )
    if strict and pset.problems:
        more = len(pset.problems) - 1
        raise BatchError(
            pset.problems[0].text()
            + (f" (and {more} more bad line{'s' if more > 1 else ''})" if more else "")
            + "; --strict refuses the file"
        )
    if not pset.items:
        first = f"; {pset.problems[0].text()}" if pset.problems else ""
        raise BatchError(f"no usable prompt in {pset.source}{first}")
    return folder, name, path, plan, hardware, pset


def _check_gpus(gpus: int | list[int], plan: Any, hardware: Any) -> None:
    """Refuse GPUs asked for that this machine cannot give, before anything loads (they were dropped silently)."""
    if isinstance(gpus, bool) or not isinstance(gpus, (int, list)):
        raise BatchError(f"gpus must be a count or a list of GPU indices, got {gpus!r}")
    if isinstance(gpus, int) and gpus < 1:
        raise BatchError(f"gpus must be at least 1, got {gpus}")
    if plan.device != "cuda":
        raise BatchError(
            f"GPUs were asked for ({gpus}), but {plan.model} runs on the {plan.device} here (no CUDA GPU): leave "
            "them out, or ask for CPU worker processes (workers, --workers)"
        )
    if isinstance(gpus, list):
        there = [g.index for g in hardware.gpus]
        missing = [g for g in gpus if g not in there]
        if missing:
            raise BatchError(
                f"no GPU {', '.join(map(str, missing))} on this machine; its GPUs are {', '.join(map(str, there))}"
            )


def run_batch(
    prompts: str | os.PathLike[str] | Iterable[str | dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    size: str | tuple[int, int] | None = None,
    aspect: str | None = None,
    preset: str | None = None,
    negative: str | None = None,
    strict: bool = False,
    ray: str | None = None,
    workers: int | None = None,
    gpus: int | list[int] | None = None,
    pipe: Any = None,
    overrides: dict[str, Any] | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
    stop: Any = None,
    max_attempts: int = 3,
    sheet: bool = True,
    warmup: bool = False,
) -> BatchResult:
    """Make every image of a prompt file (or list) into ``out``, skipping what is already there.

    Engines: ``pipe=`` runs in this process on a loaded pipeline; ``ray="auto"`` (the running cluster),
    ``"local"`` (start one here) or an address runs on Ray actors; otherwise one worker process per GPU
    with enough free memory (``gpus``: at most this many, or these indices; refused where there is no CUDA GPU or
    no such index), or ``workers`` CPU processes
    (default 1); ``warmup`` has each worker make one throwaway image first (compiled graphs ready, for
    timing). Prompt problems are found before
    anything loads: with ``strict`` they raise :class:`BatchError`, otherwise the lines are skipped and
    listed in ``problems``. ``stop`` (a :class:`qwennb.generation.StopSignal`) or Ctrl-C stops at the
    items' next step; unfinished items stay pending for the next run. ``on_event`` gets a
    :class:`BatchEvent` as items start and finish.

    Example:
        >>> import tempfile
        >>> from qwennb.pipeline import build
        >>> from qwennb.plan import make_plan, describe_machine
        >>> pipe = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
        >>> out = tempfile.mkdtemp()
        >>> r = run_batch(["a red fox", "a blue bird"], out, pipe=pipe, steps=2, size="64x64")
        >>> (r.total, r.done, r.skipped, r.failed)
        (2, 2, 0, 0)
        >>> run_batch(["a red fox", "a blue bird"], out, pipe=pipe, steps=2, size="64x64").skipped
        2
    """
    from .generation import StopSignal

    t_start = time.perf_counter()
    folder, name, path, plan, hardware, pset = _prepare(
        prompts,
        out,
        model=model,
        pipe=pipe,
        ray=ray,
        overrides=overrides,
        strict=strict,
        steps=steps,
        cfg=cfg,
        size=size,
        aspect=aspect,
        preset=preset,
        negative=negative,
    )
    if gpus is not None and pipe is None and not ray:
        _check_gpus(gpus, plan, hardware)
    stop = stop if stop is not None else StopSignal()
    with FolderLock(folder):
        for tmp in (folder / IMAGES).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # left by a run that died mid-write (under the lock: not ours)
        manifest = Manifest(folder)
        records = manifest.load()
        state: dict[str, dict[str, Any]] = {}
        todo: list[BatchItem] = []
        skipped = 0
        for it in pset.items:
            rec = records.get(it.id)
            if (
                rec
                and rec.get("status") == "done"
                and rec.get("key") == it.key
                and (folder / rec["path"]).exists()
            ):
                state[it.id] = rec
                skipped += 1
            elif (folder / it.path).exists() and png_batch_key(folder / it.path) == it.key:
                # written by a run that stopped before recording it
                state[it.id] = {
                    **it.row(),
                    "status": "done",
                    "worker": None,
                    "note": "recovered from the file",
                }
                skipped += 1
            else:
                state[it.id] = {**it.row(), "status": "pending", "attempts": 0}
                todo.append(it)
        order = [it.id for it in pset.items]
        others = [r for k, r in records.items() if k not in state]

        def rows() -> list[dict[str, Any]]:
            return [state[i] for i in order] + others

        manifest.rewrite(rows())
        counts = {"done": 0, "failed": 0, "started": 0}
        inflight: dict[Any, BatchItem] = {}

        def emit(kind: str, **kw: Any) -> None:
            if on_event is not None:
                on_event(
                    BatchEvent(
                        kind,
                        len(pset.items),
                        counts["done"],
                        skipped,
                        counts["failed"],
                        len(inflight) + (len(writer.pending) if writer is not None else 0),
                        time.perf_counter() - t_start,
                        **kw,
                    )
                )

        engine: Any = None
        writer: ImageWriter | None = None
        interrupted = False
        try:
            emit(
                "start",
                message=f"{len(todo)} to make, {skipped} already done",
                problems=[p.text() for p in pset.problems],
            )
            if todo:
                warm = {**todo[0].request(), "id": "warm-up", "prompt": "warm-up"} if warmup else None
                if pipe is not None:
                    engine = InlineEngine(pipe, stop)
                elif ray:
                    n_ray = workers if workers else (gpus if isinstance(gpus, int) else None)
                    engine = RayEngine(ray, name if path is None else path, overrides, n_ray, warmup=warm)
                else:
                    usable = free_gpus(hardware, plan.estimated_peak_gpu_gb) if plan.device == "cuda" else []
                    if isinstance(gpus, int):
                        usable = usable[:gpus]
                    elif gpus is not None:
                        usable = [g for g in usable if g in gpus]
                    if plan.device == "cuda" and not usable:
                        raise BatchError(
                            f"no GPU has the {plan.estimated_peak_gpu_gb:.1f} GiB free that {name} needs "
                            "(free some, or pass pipe= to use the loaded model)"
                        )
                    n = workers or 1
                    threads = max(1, (os.cpu_count() or 1) // n) if not usable else 0
                    engine = LocalEngine(
                        name if path is None else path, overrides, usable or None, n, threads, warm
                    )
                # The PNGs are encoded and written here, in threads, while the workers go on (inline: at once,
                # this thread is the one generating anyway).
                n_workers = len(getattr(engine, "slots", ())) or 1
                threads = 0 if isinstance(engine, InlineEngine) else min(8, n_workers + 1)
                writer = ImageWriter(folder, threads, limit=4 * n_workers + 4)
                interrupted = _drive(
                    engine, todo, state, manifest, inflight, counts, emit, stop, max_attempts, folder, writer
                )
        except KeyboardInterrupt:  # Ctrl-C while the workers start (they load the model): nothing is lost
            interrupted = True
        finally:
            if engine is not None:
                engine.close(abandon=bool(inflight))
            if writer is not None:  # images already made are written and recorded, even when stopping
                _drain(writer, state, manifest, counts, emit, folder)
            for tmp in (folder / IMAGES).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)  # a write that never finished: nothing refers to it
            for rec in state.values():  # in flight when abandoned (a second Ctrl-C), or queued for a retry
                if rec["status"] not in ("done", "failed"):
                    rec["status"] = "pending"
            final = rows()
            manifest.rewrite(final)
            parquet = manifest.write_parquet(final)
        html_path = png_path = None
        if sheet:
            try:
                html_path, png_path = contact_sheet([state[i] for i in order], folder)
            except KeyboardInterrupt:  # Ctrl-C while the sheet is drawn: no sheet, the summary still comes
                interrupted = True
    failures = [
        {"id": i, "source": state[i]["source"], "error": state[i].get("error")}
        for i in order
        if state[i]["status"] == "failed"
    ]
    result = BatchResult(
        total=len(pset.items),
        done=counts["done"],
        skipped=skipped,
        failed=len(failures),
        pending=sum(1 for i in order if state[i]["status"] == "pending"),
        invalid=len(pset.problems),
        started=counts["started"],
        manifest=str(manifest.path),
        out=str(folder),
        engine=engine.name if engine is not None else "none",
        workers=list(engine.workers) if engine is not None else [],
        elapsed_s=time.perf_counter() - t_start,
        interrupted=interrupted,
        problems=[p.text() for p in pset.problems],
        failures=failures,
        parquet=str(parquet) if parquet else None,
        contact_sheet_html=str(html_path) if html_path else None,
        contact_sheet_png=str(png_path) if png_path else None,
        paths=[str(folder / state[i]["path"]) for i in order if state[i]["status"] == "done"],
        model=name,
    )
    emit("end", message=result.summary())
    return result


def _drive(
    engine: Any,
    todo: list[BatchItem],
    state: dict[str, dict[str, Any]],
    manifest: Manifest,
    inflight: dict[Any, BatchItem],
    counts: dict[str, int],
    emit: Callable[..., None],
    stop: Any,
    max_attempts: int,
    folder: Path,
    writer: ImageWriter,
) -> bool:
    """Keep every worker busy with one item queued ahead, hand finished images to the writer, record each
    outcome as it comes; True when stopped early.

    An item counts as started (an attempt, a "running" line, ``item_start``) when it reaches the front of its
    worker's queue, i.e. when the worker runs it; and as done once its file is written. Once fewer items are left
    than workers, none is queued ahead any more: each goes to the first worker that is free, so that the batch
    does not end with one worker making two items while another idles.
    """
    queue = deque(todo)
    started: set[Any] = set()
    stopping = False
    interrupts = 0

    def mark_started() -> None:
        if stop:  # items that reach a worker after a stop come back at once, unstarted
            return
        for handle, it in inflight.items():
            if handle in started or not engine.running(handle):
                continue
            started.add(handle)
            rec = state[it.id]
            if rec["status"] == "pending":
                counts["started"] += 1
            rec.update(status="running", attempts=rec.get("attempts", 0) + 1, started=time.time())
            manifest.append(rec)
            emit("item_start", item_id=it.id, worker=engine.worker_of(handle))

    while True:
        try:  # the loop's test is inside: a Ctrl-C that lands on it stops the batch the same way
            if not (queue or inflight or writer.pending):
                break
            if stop and not stopping:
                stopping = True
                engine.stop()
                emit(
                    "stopping", message=f"stopping: {len(inflight)} item(s) in flight end at their next step"
                )
            while queue and not stopping and not writer.full and engine.free() > 0:
                if not engine.idle() and len(queue) < engine.size():
                    break  # the last few items go to whichever worker frees up first (no tail behind one worker)
                it = queue.popleft()
                inflight[engine.submit(it.request())] = it
            mark_started()
            if stopping and not inflight and not writer.pending:
                break
            # While images are being written, look at the writer often (the workers do not wait for it).
            for o in engine.wait(list(inflight), timeout=0.02 if writer.pending else 0.5):
                it = inflight.pop(o.handle)
                was_started = o.handle in started
                started.discard(o.handle)
                _record(o, it, was_started, state, manifest, counts, emit, queue, max_attempts, stop, writer)
            for it, value, wrote in writer.finished():
                _written(it, value, wrote, state, manifest, counts, emit, folder)
            mark_started()
        except KeyboardInterrupt:
            interrupts += 1
            stop.set()
            if interrupts > 1:  # a second Ctrl-C: abandon the items in flight
                return True
    return stopping


def _record(
    o: _Outcome,
    it: BatchItem,
    was_started: bool,
    state: dict[str, dict[str, Any]],
    manifest: Manifest,
    counts: dict[str, int],
    emit: Callable[..., None],
    queue: deque[BatchItem],
    max_attempts: int,
    stop: Any,
    writer: ImageWriter,
) -> None:
    if o.kind == "requeue" or (o.kind == "lost" and not was_started):
        queue.appendleft(it)  # it was queued on a worker that was lost and never ran: back as it was
        return
    rec = state[it.id]
    v = o.value
    rec["worker"] = v.get("worker", rec.get("worker"))
    if o.kind == "ok" and "image" in v:
        writer.submit(it, v)  # done once the file is written (_written)
        return
    if o.kind == "ok" and v.get("interrupted"):
        if was_started:
            rec.update(status="pending", attempts=max(0, rec.get("attempts", 1) - 1))
            manifest.append(rec)
        if not stop:
            stop.set()  # a worker was stopped (Ctrl-C in the generation): the whole batch stops
        return
    message = v.get("error") or o.message
    permanent = bool(v.get("permanent"))
    if not permanent and rec.get("attempts", 0) < max_attempts and not stop:
        rec.update(status="retry", error=message)
        manifest.append(rec)
        queue.appendleft(it)
        emit("item_retry", item_id=it.id, worker=rec["worker"], message=message)
        return
    rec.update(status="failed", error=message, finished=time.time())
    counts["failed"] += 1
    manifest.append(rec)
    emit("item_failed", item_id=it.id, worker=rec["worker"], message=message)


def _drain(
    writer: ImageWriter,
    state: dict[str, dict[str, Any]],
    manifest: Manifest,
    counts: dict[str, int],
    emit: Callable[..., None],
    folder: Path,
) -> None:
    """At the end of a run: wait for the writes under way and record those that ended well (a failed write, or a
    Ctrl-C while waiting, leaves its item pending; a file written after that is recovered by the next run)."""
    with contextlib.suppress(KeyboardInterrupt):
        writer.close()
        while writer.pending:
            for fut in list(writer.pending):
                it, value = writer.pending.pop(fut)
                try:
                    wrote = fut.result()
                except Exception:
                    continue
                _written(it, value, wrote, state, manifest, counts, emit, folder)


def _written(
    it: BatchItem,
    value: dict[str, Any],
    wrote: dict[str, Any],
    state: dict[str, dict[str, Any]],
    manifest: Manifest,
    counts: dict[str, int],
    emit: Callable[..., None],
    folder: Path,
) -> None:
    """An item's PNG is whole on disk: now it is done (the manifest line, ``item_done``)."""
    rec = state[it.id]
    rec.update(status="done", finished=time.time(), error=None, **value["timings"], **wrote)
    counts["done"] += 1
    manifest.append(rec)
    emit("item_done", item_id=it.id, path=str(folder / rec["path"]), worker=rec["worker"])


def batch(
    prompts: str | os.PathLike[str] | Iterable[str | dict[str, Any]],
    out: str | os.PathLike[str],
    **options: Any,
) -> BatchResult:
    """``qwennb.batch(prompts, out=...)``: :func:`run_batch` under the package's name (same options)."""
    return run_batch(prompts, out, **options)


class _CallableModule(type(os)):  # type: ignore[misc]
    """``import qwennb.batch`` binds this module to ``qwennb.batch``; calling it runs :func:`run_batch`."""

    def __call__(
        self,
        prompts: str | os.PathLike[str] | Iterable[str | dict[str, Any]],
        out: str | os.PathLike[str],
        **options: Any,
    ) -> BatchResult:
        return run_batch(prompts, out, **options)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
