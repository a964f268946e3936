"""Section "cache" of the benchmark: a hit in the node's LRU file cache against a fetch of the same object from S3.

What it measures, in one run:

1. moto's standalone S3 server on a free loopback port (the tests' stand-in for MinIO), one bucket, and one file
   of random bytes (50 MiB by default) uploaded once through the node's ``S3Store`` with its default part size.
2. **Miss**: a lease on a cold ``FileCache`` whose fetch is ``S3Store.fetch``, as the worker's runner leases
   audio: one S3 GET streamed to a temp file that is renamed into the cache. A fresh cache directory each time.
3. **Hit**: a lease on a warm cache *plus reading the whole file* (1 MiB reads), so that both sides deliver
   every byte to the reader. The lease alone (a look-up and a utime) is timed too, and printed beside it.
4. Misses and hits alternate, N of each; ratio = miss time / hit time, of the means and of the best runs.

moto is a Python server on the same cores, so its fetch times are not MinIO's: the ratio is what a hit saves
against this endpoint. Hits read from the page cache, as on a node whose cache is hot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiobotocore.session import AioSession
from botocore.config import Config

from cache.errors import StoreError
from cache.lru import Fetch, FileCache
from cache.s3 import S3Store
from tests.bench_node import moto_server, run_dir
from v2t_node.config import StorageSettings

MiB = 1 << 20
#: The object's size unless told otherwise.
DEFAULT_SIZE = 50 * MiB
#: Where the object lives on the S3 server.
BUCKET = "v2t-bench"
PREFIX = "bench"
KEY = "audio/object.bin"
#: The reader's buffer on a hit (the same size as the store's download chunks).
READ_CHUNK = 1 * MiB
#: Credentials and region of moto's server (it accepts any; the AWS chain needs some).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class CacheResult:
    """Seconds per repetition of each path, and the ratios (``--json`` writes it as it is)."""

    size: int
    upload: float
    """The one ``put_file`` of the object."""
    misses: list[float]
    """Leases on a cold cache: an S3 GET streamed to disk."""
    hits: list[float]
    """Leases on a warm cache, each with a read of the whole file."""
    leases: list[float]
    """Leases on a warm cache, alone."""
    ratio_mean: float = field(init=False)
    """Mean miss / mean hit."""
    ratio_best: float = field(init=False)
    """Fastest miss / fastest hit: the least disturbed comparison."""

    def __post_init__(self) -> None:
        self.ratio_mean = statistics.fmean(self.misses) / statistics.fmean(self.hits)
        self.ratio_best = min(self.misses) / min(self.hits)


def run(workdir: Path, repeats: int, size: int = DEFAULT_SIZE) -> CacheResult:
    """Starts moto's server, measures, stops it; every file is removed afterwards."""
    if repeats < 1 or size < 1:
        raise ValueError("the cache section needs at least one repetition and one byte")
    with moto_server(workdir) as endpoint, _aws_credentials(), run_dir(workdir, "cache") as directory:
        try:
            return asyncio.run(_measure(endpoint, directory, size, repeats))
        except StoreError as e:
            raise RuntimeError(f"cache section: {e}") from e


@contextmanager
def _aws_credentials() -> Iterator[None]:
    """moto's credentials for the standard AWS chain in this process, shared files and instance metadata kept out;
    the environment is restored afterwards (the nodes of other sections inherit it)."""
    values = {**CREDENTIALS, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
              "AWS_EC2_METADATA_DISABLED": "true"}
    removed = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    saved = {name: os.environ.get(name) for name in (*values, *removed)}
    os.environ.update(values)
    for name in removed:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _measure(endpoint: str, directory: Path, size: int, repeats: int) -> CacheResult:
    source = directory / "object.bin"
    await asyncio.to_thread(_write_random, source, size)
    await _create_bucket(endpoint)
    defaults = StorageSettings()  # the node's own part size and parallelism
    store = S3Store(BUCKET, PREFIX, endpoint_url=endpoint, part_size=defaults.part_size,
                    parallel_parts=defaults.parallel_parts)
    warm = FileCache(directory / "warm", 2 * size)
    try:
        await store.start()
        t0 = time.perf_counter()
        await store.put_file(KEY, source)
        upload = time.perf_counter() - t0
        source.unlink()

        def fetch(tmp: Path) -> Awaitable[Path]:
            return store.fetch(KEY, tmp)

        await warm.start()
        # Fills the warm cache; also the warm-up of the S3 connection, so no timed miss pays for opening it.
        async with warm.lease(KEY, fetch) as path:
            _check_size(path, size)
        misses: list[float] = []
        hits: list[float] = []
        leases: list[float] = []
        for i in range(repeats):
            misses.append(await _miss(fetch, directory / f"cold-{i}", size))
            hits.append(await _hit(warm, fetch, size, read=True))
            leases.append(await _hit(warm, fetch, size, read=False))
            print(f"  cache {i + 1}/{repeats}: miss {misses[-1] * 1000:8.1f} ms, hit {hits[-1] * 1000:6.1f} ms",
                  file=sys.stderr, flush=True)
        if warm.misses != 1 or warm.fetches != 1:
            raise RuntimeError(f"the warm cache fetched again ({warm!r}): the hits were not all hits")
    finally:
        await warm.close()
        await store.close()
    return CacheResult(size, upload, misses, hits, leases)


async def _miss(fetch: Fetch, root: Path, size: int) -> float:
    """One lease on an empty cache (its directory made and removed outside the timing)."""
    cache = FileCache(root, 2 * size)
    await cache.start()
    try:
        t0 = time.perf_counter()
        async with cache.lease(KEY, fetch) as path:
            elapsed = time.perf_counter() - t0
            _check_size(path, size)
        if cache.fetches != 1:
            raise RuntimeError(f"a lease on an empty cache did not fetch ({cache!r})")
        return elapsed
    finally:
        await cache.close()
        await asyncio.to_thread(shutil.rmtree, root, True)


async def _hit(cache: FileCache, fetch: Fetch, size: int, read: bool) -> float:
    """One lease on the warm cache, with or without reading the whole file."""
    t0 = time.perf_counter()
    async with cache.lease(KEY, fetch) as path:
        if read:
            got = _read_all(path)
    elapsed = time.perf_counter() - t0
    if read and got != size:
        raise RuntimeError(f"read {got} bytes of a {size}-byte cached file")
    return elapsed


def _read_all(path: Path) -> int:
    """Reads the file through (what a pool process does when it decodes it); returns the bytes read."""
    buf = bytearray(READ_CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _check_size(path: Path, size: int) -> None:
    if path.stat().st_size != size:
        raise RuntimeError(f"the cache served {path.stat().st_size} bytes, not {size}")


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            f.write(os.urandom(min(MiB, size - offset)))


async def _create_bucket(endpoint: str) -> None:
    config = Config(s3={"addressing_style": "path"})
    async with AioSession().create_client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                                          config=config) as client:
        await client.create_bucket(Bucket=BUCKET)


# -- the report ------------------------------------------------------------------------------------------------------

def print_result(result: CacheResult) -> None:
    """The paths' mean and best times, and the ratio."""
    mib = result.size / MiB
    n = len(result.misses)
    print(f"cache hit vs object-store fetch: one {mib:g} MiB object (random bytes), {n} misses and {n} hits, "
          "alternating")
    print("  S3 is moto's standalone server on 127.0.0.1, an in-process Python server on these same cores: its")
    print("  absolute fetch times are not MinIO's, compare the ratio. Hits read from the page cache (a hot cache).")
    print(f"{'path':<44} {'mean ms':>9} {'best ms':>9} {'MiB/s best':>10}")
    rows = [
        ("upload: S3Store.put_file (once)", [result.upload], True),
        ("miss: lease on a cold cache (S3 GET to disk)", result.misses, True),
        (f"hit: lease + read all {mib:g} MiB", result.hits, True),
        ("hit: lease alone", result.leases, False),
    ]
    for label, times, rate in rows:
        best = min(times)
        speed = f"{mib / best:10.0f}" if rate else f"{'-':>10}"
        print(f"{label:<44} {statistics.fmean(times) * 1000:9.2f} {best * 1000:9.2f} {speed}")
    print(f"cache hit vs object-store fetch: fetch / hit = {result.ratio_mean:.1f}x (means), "
          f"{result.ratio_best:.1f}x (best runs); the hit includes reading the whole file")
