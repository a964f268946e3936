"""A least-recently-used cache of objects as files on local disk, in front of an object store.

Layout under ``root``::

    objects/<sha256 of the key>[.ext]   whole objects; mtime is the last access (survives restarts)
    tmp/<random>.part                   fetches in progress, and leased objects too large to keep

A key's file name is the SHA-256 of the key (plus a short sanitised extension, which helps decoders that
guess formats by name), so no key can name a path outside ``root``. A fetch fills a file under ``tmp/`` that is
renamed into ``objects/`` only once complete: a crash leaves at worst a temp file, which ``start`` removes.

Concurrent leases of one missing key share one fetch (single flight). Leased files are pinned: eviction skips
them, so the cache may stay above its bound until they are released.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError

log = logging.getLogger(__name__)

#: Sub-directory of whole cached objects.
OBJECTS_DIR = "objects"
#: Sub-directory of files being fetched (and of leased objects too large to keep).
TMP_DIR = "tmp"
#: Suffix of temp files; anything under ``tmp/`` is removed at start anyway.
TMP_SUFFIX = ".part"
#: A key's extension is kept on its file name only if it looks like one (``.wav``, ``.opus``, ``.m4a``).
_EXT_RE = re.compile(r"\.[A-Za-z0-9]{1,10}")
#: What a cache file's name looks like; other files under ``objects/`` are not ours and left alone.
_NAME_RE = re.compile(r"[0-9a-f]{64}(\.[A-Za-z0-9]{1,10})?")

Fetch = Callable[[Path], Awaitable[object]]


@dataclass
class _Entry:
    """One object on disk; ``pins`` counts the leases using it."""

    path: Path
    size: int
    pins: int = 0
    #: False for an object larger than the whole cache: served from its temp file, deleted when released.
    kept: bool = True


class _Flight:
    """One fetch in progress, shared by every lease that wants the key meanwhile."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Leases waiting on this fetch; the fetch pins the entry once for each before anyone can evict it.
        self.waiters = 0
        self.task: asyncio.Task[None] | None = None


class FileCache:
    """Objects as local files, at most ``max_bytes`` of them (least recently used evicted first)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._objects = self.root / OBJECTS_DIR
        self._tmp = self.root / TMP_DIR
        # Kept objects, least recently used first.
        self._index: OrderedDict[str, _Entry] = OrderedDict()
        # Leased objects larger than max_bytes, by name: shared by concurrent leases, never indexed.
        self._transient: dict[str, _Entry] = {}
        self._flights: dict[str, _Flight] = {}
        self._started = False
        self._closed = False
        # Counters (see __repr__). ``hits``: leases served from disk at once; ``misses``: leases that waited for
        # a fetch (ten concurrent leases of one missing key are ten misses and one fetch); ``bytes`` and
        # ``entries`` count kept objects only, not oversize ones being served.
        self.hits = 0
        self.misses = 0
        self.fetches = 0
        self.evictions = 0
        self.bytes = 0

    @property
    def entries(self) -> int:
        return len(self._index)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Creates the directories, removes a crash's temp files and rebuilds the index from disk."""
        try:
            found = await asyncio.to_thread(self._scan)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as the file cache: {e}") from e
        self._index.clear()
        self.bytes = 0
        for _, name, size in sorted(found):
            self._index[name] = _Entry(self._objects / name, size)
            self.bytes += size
        self._started = True
        self._closed = False
        # The bound may have shrunk since the last run.
        self._evict()
        log.info("file cache %s: %d objects, %d bytes (max %d)", self.root, self.entries, self.bytes,
                 self.max_bytes)

    def _scan(self) -> list[tuple[float, str, int]]:
        """(mtime, name, size) of every cached object; runs in a thread."""
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Fetches interrupted by a crash: never renamed into objects/, so never served; safe to remove.
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                leftover.unlink()
        found = []
        with os.scandir(self._objects) as it:
            for item in it:
                if _NAME_RE.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                    st = item.stat(follow_symlinks=False)
                    found.append((st.st_mtime, item.name, st.st_size))
        return found

    async def close(self) -> None:
        """Cancels fetches in progress (their waiters get a StoreError); idempotent. Cached files stay."""
        self._closed = True
        flights = list(self._flights.values())
        for flight in flights:
            if flight.task is not None:
                flight.task.cancel()
        await asyncio.gather(*(f.task for f in flights if f.task is not None), return_exceptions=True)

    # -- leases --------------------------------------------------------------------------------------------

    @staticmethod
    def file_name(key: str) -> str:
        """The file name of ``key``: its SHA-256, plus its extension when it has a plain one."""
        if not key:
            raise ValueError("empty cache key")
        name = hashlib.sha256(key.encode()).hexdigest()
        ext = os.path.splitext(key.rsplit("/", 1)[-1])[1]
        return name + ext.lower() if _EXT_RE.fullmatch(ext) else name

    @contextlib.asynccontextmanager
    async def lease(self, key: str, fetch: Fetch) -> AsyncIterator[Path]:
        """A local file with the object ``key``, valid (and kept from eviction) inside the ``async with``.

        On a miss, ``fetch(tmp_path)`` must write the whole object to ``tmp_path``; concurrent leases of the
        same key share one fetch, and its error reaches all of them (nothing is cached then).
        """
        if not self._started or self._closed:
            raise StoreError(f"the file cache in {self.root} is not started (or already closed)")
        name = self.file_name(key)
        entry = await self._acquire(name, key, fetch)
        try:
            yield entry.path
        finally:
            self._release(name, entry)

    async def _acquire(self, name: str, key: str, fetch: Fetch) -> _Entry:
        entry = self._index.get(name) or self._transient.get(name)
        if entry is not None and entry.kept:
            try:
                # The mtime records the access, so the LRU order survives a restart (a metadata-only syscall).
                os.utime(entry.path)
            except FileNotFoundError:
                # Removed behind our back (an operator cleaning the disk): forget it and fetch it again.
                log.warning("cached file %s of %r vanished; fetching it again", entry.path, key)
                del self._index[name]
                self.bytes -= entry.size
                entry = None
            else:
                self._index.move_to_end(name)
        if entry is not None:
            self.hits += 1
            entry.pins += 1
            return entry
        self.misses += 1
        flight = self._flights.get(name)
        if flight is None:
            flight = self._flights[name] = _Flight()
            # The fetch is the cache's task, not the caller's: a cancelled lease must not cancel a download
            # that other leases are waiting for.
            flight.task = asyncio.create_task(self._fill(name, key, fetch, flight), name=f"cache-fetch {key}")
        flight.waiters += 1
        try:
            await asyncio.shield(flight.done)
        except asyncio.CancelledError:
            if flight.done.done() and not flight.done.cancelled() and flight.done.exception() is None:
                # The fetch finished (and pinned for us) in the same step as our cancellation: unpin.
                entry = self._index.get(name) or self._transient[name]
                self._release(name, entry)
            else:
                flight.waiters -= 1
            raise
        entry = self._index.get(name) or self._transient[name]
        return entry

    async def _fill(self, name: str, key: str, fetch: Fetch, flight: _Flight) -> None:
        """Runs one fetch into a temp file and moves it into place; resolves ``flight`` either way."""
        tmp = self._tmp / f"{uuid.uuid4().hex}{TMP_SUFFIX}"
        self.fetches += 1
        try:
            await fetch(tmp)
            size = await asyncio.to_thread(_sync_size, tmp)
            kept = size <= self.max_bytes
            path = self._objects / name
            if kept:
                await asyncio.to_thread(os.replace, tmp, path)
        except BaseException as e:
            del self._flights[name]
            tmp.unlink(missing_ok=True)
            if isinstance(e, asyncio.CancelledError):
                flight.done.set_exception(StoreError(f"the file cache was closed while fetching {key!r}"))
                raise
            if isinstance(e, FileNotFoundError) and e.filename == str(tmp):
                e = StoreError(f"fetching {key!r} into the file cache wrote no file")
            flight.done.set_exception(e)
            # Retrieved here so an error nobody waits for any more is not reported as never retrieved.
            flight.done.exception()
            return
        # From here to set_result nothing awaits: the waiters are pinned before anyone can evict the entry.
        del self._flights[name]
        entry = _Entry(path if kept else tmp, size, pins=flight.waiters, kept=kept)
        if kept:
            self._index[name] = entry
            self.bytes += size
            self._evict()
        else:
            log.info("%r (%d bytes) is larger than the file cache (%d bytes): served, not kept", key, size,
                     self.max_bytes)
            self._transient[name] = entry
        flight.done.set_result(None)

    def _release(self, name: str, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins > 0:
            return
        if not entry.kept:
            if self._transient.get(name) is entry:
                del self._transient[name]
            entry.path.unlink(missing_ok=True)
        elif self.bytes > self.max_bytes:
            # Pinned entries may have held the cache above its bound; now one of them is free.
            self._evict()

    def _evict(self) -> None:
        """Removes least recently used, unpinned objects until the cache is within its bound."""
        if self.bytes <= self.max_bytes:
            return
        for name, entry in list(self._index.items()):
            if self.bytes <= self.max_bytes:
                break
            if entry.pins:
                continue
            del self._index[name]
            self.bytes -= entry.size
            self.evictions += 1
            # unlink only drops a directory entry (blocks are freed by the kernel later): fine on the loop.
            entry.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return (
            f"FileCache({str(self.root)!r}, hits={self.hits}, misses={self.misses}, evictions={self.evictions}, "
            f"bytes={self.bytes}, entries={self.entries}, max_bytes={self.max_bytes})"
        )


def _sync_size(path: Path) -> int:
    """Flushes a fetched file to disk and returns its size; runs in a thread.

    The flush comes before the rename into place, so even a power loss cannot leave a renamed but empty file
    that the next start would index and serve.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
