"""The object-store interface and its local-filesystem implementation (the embedded default).

Keys are relative, slash-separated paths (``audio/<job>``, ``transcripts/<job>.json``). Writes are atomic: an
object appears whole under its key or not at all, so a crash never leaves a half file that is served later.
"""

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Protocol

from .errors import InvalidKey, ObjectNotFound, StoreError

#: Bytes gathered before one write to disk (writes run in a thread, off the event loop).
WRITE_BATCH = 1 << 20


class ObjectStore(Protocol):
    """What the node needs from object storage."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> int: ...
    async def put_file(self, key: str, path: Path) -> int: ...
    async def put_bytes(self, key: str, data: bytes) -> None: ...
    async def get_bytes(self, key: str) -> bytes: ...
    async def fetch(self, key: str, dest: Path) -> Path: ...
    def local_path(self, key: str) -> Path | None: ...
    async def delete(self, key: str) -> None: ...
    async def exists(self, key: str) -> bool: ...


async def file_chunks(path: Path, size: int = WRITE_BATCH) -> AsyncIterator[bytes]:
    """A local file as chunks of ``size`` bytes, read in a thread (off the event loop)."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk
    finally:
        f.close()


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as a stream of one chunk, for ``put_stream``."""
    yield data


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class LocalStore:
    """Objects as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / ".tmp"
        self.puts = 0
        self.gets = 0

    async def start(self) -> None:
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the object store in {self.root}: {e}") from e
        # Leftovers of writes interrupted by a crash: never visible under a key, safe to remove.
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)

    async def close(self) -> None:
        """Nothing to release."""

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        p = self._path(key)
        return p if p.is_file() else None

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        dest = self._path(key)
        tmp = self._tmp / uuid.uuid4().hex
        size = 0
        f = await asyncio.to_thread(open, tmp, "wb")
        try:
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                size += len(chunk)
                if len(batch) >= WRITE_BATCH:
                    await asyncio.to_thread(f.write, bytes(batch))
                    batch.clear()
            if batch:
                await asyncio.to_thread(f.write, bytes(batch))
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(self._commit, tmp, dest)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        self.puts += 1
        return size

    @staticmethod
    def _commit(tmp: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)

    async def put_file(self, key: str, path: Path) -> int:
        return await self.put_stream(key, file_chunks(path))

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self.put_stream(key, one_chunk(data))

    async def get_bytes(self, key: str) -> bytes:
        try:
            data = await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r}") from None
        self.gets += 1
        return data

    async def fetch(self, key: str, dest: Path) -> Path:
        src = self.local_path(key)
        if src is None:
            raise ObjectNotFound(f"no object {key!r}")
        await asyncio.to_thread(shutil.copyfile, src, dest)
        self.gets += 1
        return dest

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, puts={self.puts}, gets={self.gets})"
