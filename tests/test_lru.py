"""FileCache: LRU order, byte bound, single flight, atomic fills, pins, restart, oversize objects."""

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cache.errors import StoreError
from cache.lru import OBJECTS_DIR, TMP_DIR, FileCache


class Origin:
    """A fake object store's fetch: writes ``objects[key]`` and counts calls; can be gated or made to fail."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    def fetch(self, key: str) -> Callable[[Path], Awaitable[None]]:
        async def run(tmp: Path) -> None:
            self.calls.append(key)
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            tmp.write_bytes(self.objects[key])

        return run


@pytest.fixture
async def make_cache(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[FileCache]]]:
    caches: list[FileCache] = []

    async def make(max_bytes: int, root: Path = tmp_path / "cache") -> FileCache:
        cache = FileCache(root, max_bytes)
        caches.append(cache)
        await cache.start()
        return cache

    yield make
    for cache in caches:
        await cache.close()


async def read(cache: FileCache, origin: Origin, key: str) -> bytes:
    async with cache.lease(key, origin.fetch(key)) as path:
        return path.read_bytes()


async def until(condition: Callable[[], bool]) -> None:
    """Lets the loop run until ``condition`` holds (tasks reached their await), without timing guesses."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def cached_keys(cache: FileCache, keys: list[str]) -> list[str]:
    return [k for k in keys if (cache.root / OBJECTS_DIR / FileCache.file_name(k)).exists()]


async def test_miss_then_hit(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    cache = await make_cache(1000)
    origin = Origin({"audio/a.wav": b"a" * 100})

    assert await read(cache, origin, "audio/a.wav") == b"a" * 100
    assert await read(cache, origin, "audio/a.wav") == b"a" * 100

    assert origin.calls == ["audio/a.wav"]
    assert (cache.hits, cache.misses, cache.fetches, cache.entries, cache.bytes) == (1, 1, 1, 1, 100)
    assert "hits=1" in repr(cache) and "misses=1" in repr(cache)


async def test_lru_not_fifo_and_bytes_bound(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    """1. a, b, c (100 bytes each) fill a 300-byte cache.
    2. a is read again: now the most recently used.
    3. d arrives: b (least recently used) is evicted, not a (oldest inserted)."""
    cache = await make_cache(300)
    keys = ["a", "b", "c", "d"]
    origin = Origin({k: k.encode() * 100 for k in keys})
    for k in "abc":
        await read(cache, origin, k)
    await read(cache, origin, "a")

    await read(cache, origin, "d")

    assert cached_keys(cache, keys) == ["a", "c", "d"]
    assert (cache.evictions, cache.entries, cache.bytes) == (1, 3, 300)
    await read(cache, origin, "b")  # fetched again: it was really gone
    assert origin.calls.count("b") == 2
    assert cache.bytes <= 300 and cache.evictions == 2


async def test_single_flight(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    """Ten concurrent leases of one missing key: one fetch, ten equal answers."""
    cache = await make_cache(10_000)
    origin = Origin({"audio/x": os.urandom(1000)})
    origin.gate = asyncio.Event()

    readers = [asyncio.create_task(read(cache, origin, "audio/x")) for _ in range(10)]
    await until(lambda: cache.misses == 10)
    origin.gate.set()
    results = await asyncio.gather(*readers)

    assert origin.calls == ["audio/x"]
    assert results == [origin.objects["audio/x"]] * 10
    assert (cache.fetches, cache.misses, cache.entries) == (1, 10, 1)


async def test_failed_fetch_reaches_every_waiter_and_caches_nothing(
    make_cache: Callable[..., Awaitable[FileCache]],
) -> None:
    cache = await make_cache(10_000)
    origin = Origin({"k": b"data"})
    origin.gate = asyncio.Event()
    origin.error = ConnectionError("object store down")

    readers = [asyncio.create_task(read(cache, origin, "k")) for _ in range(5)]
    await until(lambda: cache.misses == 5)
    origin.gate.set()
    results = await asyncio.gather(*readers, return_exceptions=True)

    assert all(isinstance(r, ConnectionError) for r in results)
    assert origin.calls == ["k"]
    assert (cache.entries, cache.bytes) == (0, 0)
    assert list((cache.root / TMP_DIR).iterdir()) == []
    origin.error = None
    assert await read(cache, origin, "k") == b"data"  # the next lease retries
    assert origin.calls == ["k", "k"]


async def test_half_written_fetch_leaves_nothing(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    """1. A fetch writes half the object to its temp file, then fails.
    2. Nothing is under the key (in the index or on disk), no temp file is left."""
    cache = await make_cache(10_000)

    async def half(tmp: Path) -> None:
        tmp.write_bytes(b"half of it")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        async with cache.lease("audio/half", half):
            pass

    assert cached_keys(cache, ["audio/half"]) == []
    assert list((cache.root / TMP_DIR).iterdir()) == []
    assert cache.entries == 0


async def test_fetch_that_writes_nothing(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    cache = await make_cache(10_000)

    async def nothing(tmp: Path) -> None:
        pass

    with pytest.raises(StoreError, match="wrote no file"):
        async with cache.lease("k", nothing):
            pass


async def test_leased_files_are_pinned(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    """1. a is leased and held.
    2. b and c arrive in a 200-byte cache: a is the least recently used but pinned, so b is evicted instead.
    3. a is released; when b comes back, a is evicted."""
    cache = await make_cache(200)
    origin = Origin({k: k.encode() * 100 for k in "abc"})

    async with cache.lease("a", origin.fetch("a")) as a_path:
        await read(cache, origin, "b")
        await read(cache, origin, "c")
        assert a_path.read_bytes() == b"a" * 100
        assert cached_keys(cache, ["a", "b", "c"]) == ["a", "c"]
        held = cache.bytes

    assert held == 200
    await read(cache, origin, "b")  # now a, released and least recently used, is the one to go
    assert cached_keys(cache, ["a", "b", "c"]) == ["b", "c"]
    assert cache.bytes == 200


async def test_pinned_beyond_the_bound_until_released(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    """Two held leases of 150 bytes each in a 200-byte cache: both stay while held, one goes once released."""
    cache = await make_cache(200)
    origin = Origin({k: k.encode() * 150 for k in "ab"})

    async with cache.lease("a", origin.fetch("a")):
        async with cache.lease("b", origin.fetch("b")) as b_path:
            assert cache.bytes == 300 and b_path.exists()

            assert cache.evictions == 0
        # b is released first, while a is still held: b is the only one that can go.
        assert cache.bytes == 150 and cache.evictions == 1

    assert cached_keys(cache, ["a", "b"]) == ["a"] and cache.bytes == 150


async def test_rebuilt_from_disk_after_restart(
    make_cache: Callable[..., Awaitable[FileCache]], tmp_path: Path
) -> None:
    """1. A cache holds a, b, c; a is read last (most recently used).
    2. A crash leaves a temp file of a fetch in progress.
    3. A new FileCache on the same root sees a, b, c with their sizes, removes the temp file, and keeps
       the LRU order: its first eviction takes b."""
    root = tmp_path / "cache"
    first = await make_cache(1000, root)
    origin = Origin({"a": b"a" * 100, "b": b"b" * 200, "c": b"c" * 300})
    for k in ["a", "b", "c"]:
        await read(first, origin, k)
    # mtimes have a resolution that a fast test can beat: age b and c explicitly, a is the freshest.
    for age, k in ((30, "b"), (20, "c")):
        p = root / OBJECTS_DIR / FileCache.file_name(k)
        os.utime(p, (p.stat().st_atime - age, p.stat().st_mtime - age))
    (root / TMP_DIR / "deadbeef.part").write_bytes(b"half a download")
    await first.close()

    second = await make_cache(600, root)

    assert (second.entries, second.bytes) == (3, 600)
    assert list((root / TMP_DIR).iterdir()) == []
    origin.objects["d"] = b"d" * 200
    await read(second, origin, "d")
    assert cached_keys(second, ["a", "b", "c", "d"]) == ["a", "c", "d"]
    assert origin.calls == ["a", "b", "c", "d"]  # a and c were served from disk, not fetched again
    await read(second, origin, "a")
    assert origin.calls == ["a", "b", "c", "d"]


async def test_restart_with_a_smaller_bound_evicts(
    make_cache: Callable[..., Awaitable[FileCache]], tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    first = await make_cache(1000, root)
    origin = Origin({"a": b"a" * 400, "b": b"b" * 400})
    for k in "ab":
        await read(first, origin, k)

    second = await make_cache(500, root)

    assert second.entries == 1 and second.bytes == 400


async def test_oversize_object_is_served_not_kept(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    cache = await make_cache(100)
    origin = Origin({"small": b"s" * 50, "huge": b"h" * 500})
    await read(cache, origin, "small")

    async with cache.lease("huge", origin.fetch("huge")) as path:
        assert path.read_bytes() == b"h" * 500
    assert not path.exists()

    assert cached_keys(cache, ["small", "huge"]) == ["small"]  # the huge one did not flush the cache
    assert (cache.entries, cache.bytes, cache.evictions) == (1, 50, 0)
    assert list((cache.root / TMP_DIR).iterdir()) == []


async def test_oversize_object_is_shared_by_concurrent_leases(
    make_cache: Callable[..., Awaitable[FileCache]],
) -> None:
    cache = await make_cache(100)
    origin = Origin({"huge": b"h" * 500})
    origin.gate = asyncio.Event()

    readers = [asyncio.create_task(read(cache, origin, "huge")) for _ in range(3)]
    await until(lambda: cache.misses == 3)
    origin.gate.set()

    assert await asyncio.gather(*readers) == [b"h" * 500] * 3
    assert origin.calls == ["huge"]
    assert list((cache.root / TMP_DIR).iterdir()) == []


async def test_cancelled_lease_does_not_cancel_the_shared_fetch(
    make_cache: Callable[..., Awaitable[FileCache]],
) -> None:
    cache = await make_cache(1000)
    origin = Origin({"k": b"k" * 10})
    origin.gate = asyncio.Event()
    first = asyncio.create_task(read(cache, origin, "k"))
    second = asyncio.create_task(read(cache, origin, "k"))
    await until(lambda: cache.misses == 2 and origin.calls == ["k"])

    first.cancel()
    origin.gate.set()

    assert await second == b"k" * 10
    with pytest.raises(asyncio.CancelledError):
        await first
    assert origin.calls == ["k"] and cache.entries == 1


async def test_vanished_file_is_fetched_again(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    cache = await make_cache(1000)
    origin = Origin({"k": b"k" * 10})
    await read(cache, origin, "k")
    (cache.root / OBJECTS_DIR / FileCache.file_name("k")).unlink()

    assert await read(cache, origin, "k") == b"k" * 10
    assert origin.calls == ["k", "k"] and cache.bytes == 10


async def test_keys_cannot_escape_root(make_cache: Callable[..., Awaitable[FileCache]]) -> None:
    cache = await make_cache(1000)
    origin = Origin({"../../etc/passwd": b"x", "audio/a.WAV": b"y"})

    async with cache.lease("../../etc/passwd", origin.fetch("../../etc/passwd")) as path:
        assert path.parent == cache.root / OBJECTS_DIR
    async with cache.lease("audio/a.WAV", origin.fetch("audio/a.WAV")) as path:
        assert path.parent == cache.root / OBJECTS_DIR and path.suffix == ".wav"


async def test_close_is_idempotent_and_fails_pending_fetches(
    make_cache: Callable[..., Awaitable[FileCache]],
) -> None:
    cache = await make_cache(1000)
    origin = Origin({"k": b"k"})
    origin.gate = asyncio.Event()  # never set: the fetch hangs until close
    reader = asyncio.create_task(read(cache, origin, "k"))
    await until(lambda: origin.calls == ["k"])

    await cache.close()
    await cache.close()

    with pytest.raises(StoreError, match="closed"):
        await reader
    with pytest.raises(StoreError, match="not started"):
        await read(cache, origin, "k")
    assert list((cache.root / TMP_DIR).iterdir()) == []
