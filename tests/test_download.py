"""``qwennb download`` against a small hub served on 127.0.0.1, with the real huggingface_hub client.

The server implements just what ``HfApi.model_info(files_metadata=True)`` and ``snapshot_download`` call:
``GET /api/models/{repo}/revision/{rev}``, ``GET /api/models/{repo}/tree/{rev}``, and ``HEAD``/``GET``
``/{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``Accept-Ranges``, Range
requests answered with 206). It can cut a file mid-transfer and then answer 503, to test resuming.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants

from qwennb.cli import main
from qwennb.download import download, free_disk_bytes, human_bytes, verify_snapshot
from qwennb.errors import LoadError
from qwennb.models import find_local_models
from qwennb.pipeline import resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"
SHARDS = [
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
]
LFS_SUFFIXES = (".safetensors", ".bin")
CHUNK = constants.DOWNLOAD_CHUNK_SIZE  # 10 MiB
VL_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"


def make_repo(seed: int = 0) -> dict[str, bytes]:
    """A tiny Qwen-Image-shaped diffusers repository: path -> bytes."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {
        "model_index.json": json.dumps(
            {
                "_class_name": "QwenImagePipeline",
                "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLQwenImage"],
            },
            indent=2,
        ).encode(),
        "README.md": b"# tiny test repo\n",
        "scheduler/scheduler_config.json": b'{"_class_name": "FlowMatchEulerDiscreteScheduler"}',
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 1024}',
        "tokenizer/vocab.json": b'{"a": 0, "b": 1}',
        "tokenizer/merges.txt": b"#version: 0.2\na b\n",
        "text_encoder/config.json": b'{"architectures": ["Qwen2_5_VLForConditionalGeneration"]}',
        "text_encoder/model.safetensors": rnd.randbytes(40_000),
        "transformer/config.json": b'{"_class_name": "QwenImageTransformer2DModel"}',
        "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps(
            {"metadata": {}, "weight_map": {"a.weight": SHARDS[0][12:], "b.weight": SHARDS[1][12:]}}
        ).encode(),
        # Over 2 x 10 MiB: huggingface_hub writes a download in 10 MiB chunks, so a cut keeps whole chunks.
        SHARDS[0]: rnd.randbytes(22_000_000),
        SHARDS[1]: rnd.randbytes(21_000_000),
        "transformer/diffusion_pytorch_model.bin": rnd.randbytes(50_000),  # must never be fetched
        "vae/config.json": b'{"_class_name": "AutoencoderKLQwenImage"}',
        "vae/diffusion_pytorch_model.safetensors": rnd.randbytes(30_000),
    }
    return files


def make_vl_repo(seed: int = 1) -> dict[str, bytes]:
    """A tiny transformers-layout vision-language repository (shards at the root)."""
    rnd = random.Random(seed)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    return {
        "config.json": b'{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "vision_config": {}}',
        "generation_config.json": b"{}",
        "model.safetensors.index.json": json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}).encode(),
        shards[0]: rnd.randbytes(20_000),
        shards[1]: rnd.randbytes(10_000),
        "pytorch_model.bin": rnd.randbytes(30_000),  # must never be fetched
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "merges.txt": b"a b\n",
        "README.md": b"# vl\n",
    }


def _etag(path: str, data: bytes) -> str:
    if path.endswith(LFS_SUFFIXES):  # LFS files: the hub's etag is the sha256 of the content
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


class FakeHub:
    """A threaded HTTP server with the hub's URL layout, serving ``repos`` ({repo_id: {path: bytes}})."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.log: list[dict] = []  # one entry per request: method, path, range, sent (body bytes)
        self.cut: set[str] = set()  # files whose next GET is cut halfway; the hub then answers 503
        self.down = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        return [r for r in self.log if (method is None or r["method"] == method) and contains in r["path"]]

    # -- request handling

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict, head: bool) -> int:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
        return 0 if head else len(body)

    def _json(self, h: BaseHTTPRequestHandler, obj: object, head: bool) -> int:
        return self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, head: bool) -> int:
        headers = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}
        return self._send(h, status, json.dumps({"error": code}).encode(), headers, head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        entry = {"method": h.command, "path": path, "range": h.headers.get("Range"), "sent": 0}
        self.log.append(entry)
        if self.down:
            entry["sent"] = self._error(h, 503, "ServiceUnavailable", head)
            return
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            files = self.repos.get(repo_id)
            if files is None:
                entry["sent"] = self._error(h, 404, "RepoNotFound", head)
            elif rev not in ("main", SHA):
                entry["sent"] = self._error(h, 404, "RevisionNotFound", head)
            elif kind == "revision":
                entry["sent"] = self._json(h, self._info(repo_id, files), head)
            else:
                entry["sent"] = self._json(h, self._tree(files), head)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, rel = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            files = self.repos.get(repo_id)
            if files is None:
                entry["sent"] = self._error(h, 404, "RepoNotFound", head)
            elif rev not in ("main", SHA):
                entry["sent"] = self._error(h, 404, "RevisionNotFound", head)
            elif rel not in files:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA}
                entry["sent"] = self._send(h, 404, b"{}", headers, head)
            else:
                entry["sent"] = self._file(h, rel, files[rel], head)
            return
        entry["sent"] = self._error(h, 404, "NotFound", head)

    def _info(self, repo_id: str, files: dict[str, bytes]) -> dict:
        siblings = []
        for p, data in sorted(files.items()):
            s = {"rfilename": p, "size": len(data), "blobId": _etag(p + ".git", data)}
            if p.endswith(LFS_SUFFIXES):
                s["lfs"] = {"sha256": _etag(p, data), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {
            "_id": "x",
            "id": repo_id,
            "modelId": repo_id,
            "sha": SHA,
            "private": False,
            "siblings": siblings,
        }

    def _tree(self, files: dict[str, bytes]) -> list[dict]:
        out = []
        for p, data in sorted(files.items()):
            e = {"type": "file", "oid": _etag(p + ".git", data), "size": len(data), "path": p}
            if p.endswith(LFS_SUFFIXES):
                e["lfs"] = {"oid": _etag(p, data), "size": len(data), "pointerSize": 134}
            out.append(e)
        return out

    def _file(self, h: BaseHTTPRequestHandler, rel: str, data: bytes, head: bool) -> int:
        headers = {"X-Repo-Commit": SHA, "ETag": f'"{_etag(rel, data)}"', "Accept-Ranges": "bytes"}
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[len("bytes=") :].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head or rel not in self.cut:
            return self._send(h, status, body, headers, head)
        # Cut the transfer: promise the whole body, send half, drop the connection; the hub is then down.
        self.cut.discard(rel)
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        half = len(body) // 2
        h.wfile.write(body[:half])
        h.wfile.flush()
        self.down = True
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
        return half


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake hub, with huggingface_hub pointed at it (online) and its cache in tmp_path."""
    files = make_repo()
    repos = {
        "Qwen/Qwen-Image": files,
        "Qwen/Qwen-Image-2512": dict(files),
        "Qwen/Qwen-Image-Edit": dict(files),
        VL_REPO: make_vl_repo(),
    }
    server = FakeHub(repos).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("QWENNB_DISK_LIMIT_GB", raising=False)
    monkeypatch.delenv("QWENNB_MODEL", raising=False)
    server.files = files
    server.cache = cache
    yield server
    server.stop()


def _weights(files: dict[str, bytes]) -> dict[str, int]:
    return {p: len(d) for p, d in files.items() if not p.endswith(".bin") and p != "README.md"}


def test_full_download_into_dir_is_found_complete(hub, tmp_path, capsys):
    out_dir = tmp_path / "models"
    assert main(["download", "--model", "qwen-image", "--dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    snap = out_dir / "qwen-image"
    assert f"Qwen/Qwen-Image (qwen-image): complete, {len(_weights(hub.files))} files" in out
    assert f"qwennb detect --dir {out_dir}" in out
    assert not (snap / "transformer" / "diffusion_pytorch_model.bin").exists()
    assert not (snap / "README.md").exists()
    assert not any("/diffusion_pytorch_model.bin" in r["path"] for r in hub.requests("GET"))
    for rel, data in hub.files.items():
        if rel.endswith(".bin") or rel == "README.md":
            continue
        assert (snap / rel).read_bytes() == data, rel
    assert verify_snapshot(snap, _weights(hub.files)) == []

    (model,) = find_local_models(out_dir)
    assert model.complete and model.architecture == "MMDiT" and model.name == "qwen-image"
    assert main(["detect", "--dir", str(out_dir)]) == 0
    assert f"model: qwen-image [MMDiT] at {snap}: complete" in capsys.readouterr().out

    # Run again: nothing is fetched twice.
    before = sum(r["sent"] for r in hub.requests("GET", "/resolve/"))
    assert main(["download", "--model", "qwen-image", "--dir", str(out_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["complete"] and res["downloaded"] and res["problems"] == [] and res["needed_bytes"] == 0
    assert sum(r["sent"] for r in hub.requests("GET", "/resolve/")) == before + len(
        hub.files["model_index.json"]
    )


def test_download_into_the_cache_json(hub, capsys):
    assert main(["download", "--optimal", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {
        "model",
        "repo_id",
        "dir",
        "files",
        "total_bytes",
        "downloaded",
        "complete",
        "problems",
    }
    # --optimal is the newest Apache-2.0 text-to-image release.
    assert res["model"] == "qwen-image-2512" and res["repo_id"] == "Qwen/Qwen-Image-2512"
    assert res["downloaded"] and res["complete"] and res["problems"] == []
    assert {f["path"]: f["size"] for f in res["files"]} == _weights(hub.files)
    assert res["total_bytes"] == sum(_weights(hub.files).values())
    assert res["dir"] == str(hub.cache / "models--Qwen--Qwen-Image-2512" / "snapshots" / SHA)
    assert (hub.cache / "models--Qwen--Qwen-Image-2512" / "refs" / "main").read_text() == SHA
    (model,) = find_local_models(cache_dir=hub.cache)
    assert model.complete and model.architecture == "MMDiT" and model.name == "qwen-image-2512"
    assert resolve_model()[0:2] == ("qwen-image-2512", res["dir"])  # generate's default now loads it
    # With Qwen-Image also in the cache, the newer release stays the default.
    assert main(["download", "--model", "qwen-image", "--json"]) == 0
    capsys.readouterr()
    assert resolve_model()[0:2] == ("qwen-image-2512", res["dir"])


def test_optimal_with_a_vl_model(hub, tmp_path, capsys):
    out_dir = tmp_path / "models"
    assert main(["download", "--optimal", "--with-vl", "qwen2.5-vl-7b", "--dir", str(out_dir), "--json"]) == 0
    qi, vl = json.loads(capsys.readouterr().out)["models"]
    assert qi["model"] == "qwen-image-2512" and qi["complete"]
    assert vl["model"] == "qwen2.5-vl-7b" and vl["repo_id"] == VL_REPO and vl["complete"]
    assert vl["dir"] == str(out_dir / "qwen2.5-vl-7b")
    vl_files = make_vl_repo()
    expected = {p: len(d) for p, d in vl_files.items() if p not in ("pytorch_model.bin", "README.md")}
    assert {f["path"]: f["size"] for f in vl["files"]} == expected
    assert not (out_dir / "qwen2.5-vl-7b" / "pytorch_model.bin").exists()
    (out_dir / "qwen2.5-vl-7b" / "model-00002-of-00002.safetensors").unlink()
    assert verify_snapshot(vl["dir"]) == ["missing model-00002-of-00002.safetensors"]


def test_dry_run_lists_files_and_fetches_nothing(hub, tmp_path, capsys):
    out_dir = tmp_path / "models"
    assert main(["download", "--model", "qwen-image", "--dir", str(out_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for rel, size in _weights(hub.files).items():
        assert f"{size:,}  {rel}" in out
    assert ".bin" not in out and "README" not in out
    total = human_bytes(sum(_weights(hub.files).values()))
    assert f"total {total} in {len(_weights(hub.files))} files: 0 B already here, {total} to fetch;" in out
    assert ": fits" in out and "dry run: nothing was fetched" in out
    assert not out_dir.exists()
    # Only model_index.json is read (in memory: it names the components to fetch).
    assert [r["path"] for r in hub.requests("GET", "/resolve/")] == [
        f"/Qwen/Qwen-Image/resolve/{SHA}/model_index.json"
    ]

    assert main(["download", "--optimal", "--dry-run", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert not res["downloaded"] and not res["complete"] and res["fits"]
    assert res["needed_bytes"] == res["total_bytes"] == sum(_weights(hub.files).values())
    assert not hub.cache.exists()
    # Into the cache, in words: the free space is measured where the cache is (its nearest existing folder).
    assert main(["download", "--optimal", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"free at {free_disk_bytes(hub.cache)[1]}: fits" in out and "dry run: nothing was fetched" in out
    assert not hub.cache.exists()


def test_interrupted_download_resumes_on_the_next_call(hub, capsys):
    hub.cut.add(SHARDS[0])
    assert main(["download", "--model", "qwen-image"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("qwennb: fetching"), err
    # The server cut the file after 11,000,000 bytes; huggingface_hub writes whole 10 MiB chunks.
    assert err[1].startswith(f"qwennb: error: the download of {SHARDS[0]} stopped at 10.00 MiB of 20.98 MiB")
    assert "kept for resuming" in err[1] and "HTTP 503" in err[1] and "run the same command again" in err[1]

    hub.down = False
    hub.log.clear()
    assert main(["download", "--model", "qwen-image"]) == 0
    assert "complete" in capsys.readouterr().out
    shard = hub.requests("GET", SHARDS[0])
    assert [r["range"] for r in shard] == [f"bytes={CHUNK}-"]
    assert sum(r["sent"] for r in shard) == 22_000_000 - CHUNK  # the first 10 MiB were not sent again
    (model,) = find_local_models(cache_dir=hub.cache)
    assert model.complete
    assert (Path(model.path) / SHARDS[0]).read_bytes() == hub.files[SHARDS[0]]
    assert not list((hub.cache / "models--Qwen--Qwen-Image" / "blobs").glob("*.incomplete"))


def test_connection_cut_once_is_resumed_within_the_call(hub, tmp_path, capsys, monkeypatch):
    hub.cut.add(SHARDS[1])
    real = FakeHub._file

    def file_then_up(self, h, rel, data, head):  # the hub comes back at once after the cut
        sent = real(self, h, rel, data, head)
        self.down = False
        return sent

    monkeypatch.setattr(FakeHub, "_file", file_then_up)
    assert main(["download", "--model", "qwen-image", "--dir", str(tmp_path / "m")]) == 0
    shard = hub.requests("GET", SHARDS[1])
    assert [r["range"] for r in shard] == [None, f"bytes={CHUNK}-"]
    assert sum(r["sent"] for r in shard) == 10_500_000 + 21_000_000 - CHUNK
    assert verify_snapshot(tmp_path / "m" / "qwen-image", _weights(hub.files)) == []


def test_disk_limit_refuses_with_the_numbers(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWENNB_DISK_LIMIT_GB", "0.0001")  # 104,857 bytes
    out_dir = tmp_path / "models"
    assert main(["download", "--model", "qwen-image", "--dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    total = sum(_weights(hub.files).values())
    assert f"{human_bytes(total)} ({total:,} bytes) to fetch" in err
    assert "104.86 KiB (107,374 bytes) free" in err and "QWENNB_DISK_LIMIT_GB=0.0001" in err
    assert not out_dir.exists()
    assert hub.requests("GET", ".safetensors") == [] and hub.requests("HEAD") == []

    # The dry run says so too, and exits 0.
    assert main(["download", "--model", "qwen-image", "--dir", str(out_dir), "--dry-run"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_offline_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert main(["download", "--model", "qwen-image", "--dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "qwennb: error: the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1): run the download where "
        "the hub is reachable with HF_HUB_OFFLINE unset, or copy a snapshot over and point `qwennb detect "
        "--dir` at it"
    ]
    assert time.perf_counter() - t0 < 2 and not list(tmp_path.iterdir())

    # huggingface_hub read HF_HUB_OFFLINE=1 at import, the variable is gone since: still offline for it.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "--optimal", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qwennb: error: the Hugging Face hub is switched off here") and len(err) == 2


def test_unreachable_hub_is_one_line_quickly(hub, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    t0 = time.perf_counter()
    assert main(["download", "--model", "qwen-image", "--dir", str(tmp_path / "m")]) == 2
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"qwennb: error: cannot reach the Hugging Face hub at {dead}")
    assert elapsed < 5, elapsed


def test_incomplete_snapshot_is_reported_everywhere(hub, tmp_path, capsys):
    out_dir = tmp_path / "models"
    results = download("qwen-image", out_dir)
    snap = Path(results[0].dir)
    assert results[0].complete
    (snap / SHARDS[1]).unlink()
    sizes = _weights(hub.files)
    assert verify_snapshot(snap, sizes) == [f"missing {SHARDS[1]}"]
    assert verify_snapshot(snap) == [f"missing {SHARDS[1]}"]

    assert main(["detect", "--dir", str(out_dir)]) == 0
    assert f"model: qwen-image [MMDiT] at {snap}: INCOMPLETE (missing {SHARDS[1]})" in capsys.readouterr().out
    with pytest.raises(LoadError, match="qwennb download"):
        resolve_model(str(snap))
    with pytest.raises(LoadError, match="run `qwennb download --model qwen-image` to complete it"):
        resolve_model("qwen-image", folder=str(out_dir))

    # A truncated file is found by its size.
    with open(snap / SHARDS[0], "r+b") as fh:
        fh.truncate(1000)
    assert f"{SHARDS[0]}: 1,000 bytes on disk, the hub says 22,000,000" in verify_snapshot(snap, sizes)

    # The next download completes it.
    assert main(["download", "--model", "qwen-image", "--dir", str(out_dir)]) == 0
    assert verify_snapshot(snap, sizes) == []


def test_edit_model_warns(hub, tmp_path, capsys):
    assert main(["download", "--model", "qwen-image-edit", "--dir", str(tmp_path), "--dry-run"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qwennb: warning: Qwen-Image-Edit is for editing images; for text-to-image use qwen-image"]


@pytest.mark.parametrize("name", ["tiny", "qwen-image-synthetic"])
def test_stand_ins_have_nothing_to_download(name, capsys):
    assert main(["download", "--model", name]) == 2
    err = capsys.readouterr().err
    assert (
        f"{name} is a stand-in" in err and "no hub repository" in err and len(err.strip().splitlines()) == 1
    )


def test_needs_a_model_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["download"])
    assert exc.value.code == 2
    assert "--optimal" in capsys.readouterr().err


def test_missing_repository_is_one_line(hub, tmp_path, capsys):
    assert main(["download", "--model", "qwen2-vl-7b", "--dir", str(tmp_path)]) == 2  # not on this hub
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"qwennb: error: Qwen/Qwen2-VL-7B-Instruct was not found at {hub.url} (or it is private and "
        "no token is set: `hf auth login`)"
    ]


def test_download_lora_fetches_the_lightning_lora_into_the_cache(hub, capsys, monkeypatch):
    from qwennb.lora import file_sha256, resolve_file

    data = make_repo(seed=3)["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    hub.repos["lightx2v/Qwen-Image-Lightning"] = {"Qwen-Image-Lightning-8steps-V2.0.safetensors": data}
    hub.repos["lightx2v/Qwen-Image-2512-Lightning"] = {
        "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors": data
    }
    assert main(["download", "--lora", "lightning-8", "--for-model", "qwen-image", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V2.0.safetensors"
    assert open(res["path"], "rb").read() == data and res["sha256"] == hashlib.sha256(data).hexdigest()
    # No --for-model and no local model: for Qwen-Image; 2512 has only a 4-step LoRA.
    assert main(["download", "--lora", "lightning-8", "--for-model", "qwen-image-2512"]) == 2
    assert (
        "no 8-step Lightning LoRA is published for qwen-image-2512; use lightning-4"
        in capsys.readouterr().err
    )
    assert main(["download", "--lora", "lightning-4", "--for-model", "2512"]) == 0
    assert (
        "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors (for qwen-image-2512)"
        in capsys.readouterr().out
    )
    assert main(["download", "--lora", "someone/x/style.ckpt"]) == 2
    assert "it is a pickle" in capsys.readouterr().err
    # Offline afterwards, the cached file is found without the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    found = resolve_file(res["source"])
    assert file_sha256(found) == res["sha256"]
    assert main(["download", "--lora", "lightning-4"]) == 2
    assert "switched off" in capsys.readouterr().err


def test_a_lora_named_by_its_repository_is_listed_picked_and_fetched(hub):
    """owner/repo: its one .safetensors file; several: refused with their names unless one is named (as a path
    inside the repository or as weight_name), and then that one."""
    from qwennb.lora import LoraError, resolve_file

    a, b = make_repo(seed=4), make_repo(seed=5)
    one = a["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    two = b["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    assert one != two
    hub.repos["someone/one-lora"] = {"README.md": b"# a LoRA", "style.safetensors": one}
    hub.repos["someone/two-loras"] = {"a.safetensors": one, "b.safetensors": two, "notes.txt": b"x"}
    assert resolve_file("someone/one-lora").read_bytes() == one
    with pytest.raises(
        LoraError, match=r"someone/two-loras has 2 \.safetensors files \(a\.safetensors, b\.safetensors\)"
    ):
        resolve_file("someone/two-loras")
    assert resolve_file("someone/two-loras", weight_name="b.safetensors").read_bytes() == two
    assert resolve_file("someone/two-loras/a.safetensors").read_bytes() == one
    assert resolve_file("someone/two-loras/a.safetensors", weight_name="b.safetensors").read_bytes() == two


def test_a_lightning_preset_offline_uses_the_downloaded_lora(hub, capsys, monkeypatch):
    """Downloaded once (`qwennb download --lora`), the Lightning LoRA loads offline from the cache for its preset."""
    from safetensors.torch import save

    from qwennb import lora
    from qwennb.presets import get_preset
    from qwennb.stand_ins import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    sd = lora.random_lora_state_dict(pipe.transformer, rank=4, layout="lightning", blocks=[0])
    data = save(sd)
    hub.repos["lightx2v/Qwen-Image-Lightning"] = {"Qwen-Image-Lightning-8steps-V2.0.safetensors": data}
    assert main(["download", "--lora", "lightning-8", "--for-model", "qwen-image"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    notices = lora.ensure_preset_lora(pipe, get_preset("lightning-8"), "qwen-image")
    assert notices == [
        "loaded the lightning-8 LoRA for qwen-image "
        "(lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V2.0.safetensors)"
    ]
    (info,) = lora.list_loras(pipe)
    assert info.sha256 == hashlib.sha256(data).hexdigest() and lora.is_lightning(info)
