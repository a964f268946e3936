"""The node: every component, wired in one place, started in dependency order and closed in reverse."""

import asyncio
import logging
import time
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from cache.lru import FileCache
from cache.s3 import S3Store, parse_storage_url
from cache.store import LocalStore, ObjectStore
from peers.discovery import Discovery
from peers.membership import PeerInfo, RedisMembership
from scheduler.intake import Intake
from scheduler.keys import Keys
from scheduler.queue import JobQueue
from scheduler.runner import Runner
from scheduler.worker import Worker
from transcoder.pool import TranscriberPool
from transcoder.registry import ModelRegistry

from . import __version__, notify
from .api import make_app
from .config import Config
from .embedded import EmbeddedRedis
from .errors import StartupError
from .metrics import Metrics

log = logging.getLogger(__name__)


def _make_store(config: Config) -> tuple[ObjectStore, FileCache | None]:
    """S3 with a local file cache in front when ``storage.url`` is set, else files under the data directory."""
    s = config.storage
    if not s.url:
        return LocalStore(config.storage_dir), None
    bucket, prefix = parse_storage_url(s.url)
    store = S3Store(bucket, prefix, endpoint_url=s.endpoint or None, region=s.region or None,
                    part_size=s.part_size, parallel_parts=s.parallel_parts)
    return store, FileCache(config.cache_dir, config.cache.max_bytes)


def _public_url(host: str, port: int, advertised: tuple[str, ...]) -> str:
    """How others reach us: the bound address, or for a wildcard bind the first non-loopback IPv4 address."""
    if host not in ("0.0.0.0", "::"):
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    for address in advertised or _ipv4_addresses():
        return f"http://{address}:{port}"
    return f"http://127.0.0.1:{port}"


def _ipv4_addresses() -> list[str]:
    import ifaddr

    return [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]


class Node:
    """One v2t node: API, queue, worker, pool, store, and (unconfigured) its embedded Redis."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.node_id
        self.metrics = Metrics()
        self.embedded: EmbeddedRedis | None = None
        self.redis: aioredis.Redis | None = None
        #: The object store, and local copies of remote audio (only for a store without local paths).
        self.store, self.file_cache = _make_store(config)
        self.models = ModelRegistry(config.models_dir, base_url=config.models.base_url)
        self.pool: TranscriberPool | None = None
        self._queue: JobQueue | None = None
        self._intake: Intake | None = None
        self.worker: Worker | None = None
        self.discovery: Discovery | None = None
        self.membership: RedisMembership | None = None
        self._advertiser: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""
        self.public_url = ""
        self.started_at: float | None = None

    async def start(self) -> None:
        """Starts everything, in dependency order; on failure, closes what was started and re-raises."""
        t0 = time.monotonic()
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        self.started_at = time.time()
        log.info("node %s ready in %.2fs: api %s, redis %s, store %s, pool %d x %d threads",
                 self.node_id, time.monotonic() - t0, self.url, self.redis_url, self.store,
                 self.pool.size if self.pool else 0, self.pool.threads if self.pool else 0)
        notify.ready(f"serving on {self.url}")

    async def _start(self) -> None:
        # 0. Only a cluster secret: take the cluster's Redis and S3 endpoints from a peer first.
        if self.config.needs_join:
            from .join import join

            self.config = await join(self.config)
            self.store, self.file_cache = _make_store(self.config)
        c = self.config
        # 1. State directory.
        c.data_dir.mkdir(parents=True, exist_ok=True)
        # 2. Redis: the configured server, or our own embedded one.
        if c.redis.url:
            self.redis_url = c.redis.url
        else:
            self.embedded = EmbeddedRedis(c.data_dir / "redis", c.redis.server, c.redis.port)
            await self.embedded.start()
            self.redis_url = self.embedded.url
        # socket_timeout must exceed the worker's blocking read; health checks keep pooled connections fresh.
        self.redis = aioredis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5,
                                       health_check_interval=15, retry_on_timeout=True)
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise StartupError(f"redis at {self.redis_url} is unreachable: {e}") from e
        keys = Keys(c.redis.prefix)
        # 3. Object store, and the local cache in front of a remote one.
        await self.store.start()
        if self.file_cache is not None:
            await self.file_cache.start()
        # 4. The default model (converted from the bundled CTranslate2 copy on first use) and the pool.
        self.pool = TranscriberPool(c.pool, self.models.path, preload=c.models.default)
        await self.pool.start()
        # 5. The work stream: submission side and consuming side.
        self._queue = JobQueue(self.redis, keys, c.jobs)
        await self._queue.start()
        self._intake = Intake(self._queue, self.store, c.api.max_upload_bytes)
        runner = Runner(self.store, self.pool, self.file_cache)
        self.worker = Worker(self.redis, keys, c.jobs, self.node_id, self.pool.size, runner, self.metrics.observe)
        await self.worker.start()
        # 6. The API, last: nothing is accepted before the node can run it.
        self._runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.api.host, c.api.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot listen on {c.api.host}:{c.api.port}: {e.strerror}") from e
        host, port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self.public_url = c.api.public_url.rstrip("/") or _public_url(host, port, c.peers.advertise_addresses)
        # 7. Membership: mirrored in Redis (works without multicast), and over mDNS when a secret signs it.
        self.membership = RedisMembership(self.redis, keys.node(""), self.node_id, c.peers.peer_ttl, self.peer_info)
        await self.membership.start()
        secret = c.cluster_secret
        if c.peers.enabled and secret:
            self.discovery = Discovery(c.peers, self.peer_info, secret)
            await self.discovery.start()
        elif c.peers.enabled:
            log.info("no cluster secret (peers.secret_file): mDNS discovery off, membership via Redis only")
        self._advertiser = asyncio.create_task(self._advertise_load(), name="advertise-load")

    def peer_info(self) -> PeerInfo:
        """This node as its peers see it (read at every advertisement and membership heartbeat)."""
        w = self.worker
        return PeerInfo(
            node_id=self.node_id, cluster=self.config.peers.cluster, version=__version__, api_url=self.public_url,
            slots_total=w.slots if w else 0, slots_free=w.free if w else 0, jobs_running=w.busy if w else 0,
        )

    async def _advertise_load(self) -> None:
        """Republishes our free slots and running jobs when they change, so peers see our load."""
        last = (-1, -1)
        interval = max(0.5, self.config.peers.update_interval)
        while True:
            await asyncio.sleep(interval)
            w = self.worker
            now = (w.free, w.busy) if w else last
            if now == last:
                continue
            last = now
            try:
                if self.discovery is not None:
                    await self.discovery.update()
                if self.membership is not None:
                    await self.membership.update()
            except (RedisError, OSError) as e:  # the membership heartbeat logs outages itself
                log.debug("load advertisement failed: %s", e)

    async def peers(self) -> list[dict[str, Any]]:
        """Every node this one knows of, from mDNS and from the Redis mirror, itself included."""
        merged: dict[str, dict[str, Any]] = {}

        def add(p: PeerInfo, via: str) -> None:
            row = merged.setdefault(p.node_id, {**msgspec.structs.asdict(p), "via": [], "self": False})
            if via == "mdns" or not row["address"]:
                row.update({k: v for k, v in msgspec.structs.asdict(p).items() if v not in ("", 0.0)})
            row["via"].append(via)

        if self.discovery is not None:
            for p in self.discovery.peers():
                add(p, "mdns")
        if self.membership is not None:
            for p in await self.membership.peers(include_self=True):
                add(p, "redis")
        me = merged.setdefault(self.node_id, {**msgspec.structs.asdict(self.peer_info()), "via": []})
        me.update(msgspec.structs.asdict(self.peer_info()), self=True, last_seen=time.time())
        return sorted(merged.values(), key=lambda r: (not r["self"], r["node_id"]))

    @property
    def queue(self) -> JobQueue:
        """Jobs as the API sees them (available once started)."""
        if self._queue is None:
            raise RuntimeError("node not started")
        return self._queue

    @property
    def intake(self) -> Intake:
        """Submission of new audio (available once started)."""
        if self._intake is None:
            raise RuntimeError("node not started")
        return self._intake

    def check_model(self, name: str) -> None:
        """Raises ModelNotFound unless ``name`` is installed here (or is the default, converted on first use)."""
        if name != self.config.models.default:
            self.models.path(name)

    def http(self) -> aiohttp.ClientSession:
        """A shared client session for outgoing requests (``https://`` sources)."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
        return self._http

    async def health(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        status = "ok"
        try:
            assert self.redis is not None
            await asyncio.wait_for(self.redis.ping(), 2)
            checks["redis"] = "ok"
            checks["queue"] = await self.queue.stats()
        except (TimeoutError, RedisError, OSError, AssertionError) as e:
            checks["redis"] = f"unreachable: {e}"
            status = "degraded"
        if self.pool is not None:
            alive = len(self.pool.pids)
            checks["pool"] = {"processes": alive, "size": self.pool.size, "threads": self.pool.threads,
                              "busy": self.pool.busy, "crashes": self.pool.crashes, "pids": self.pool.pids}
            if alive == 0:
                status = "degraded"
        return {"status": status, "node": self.node_id, "version": __version__, "url": self.url,
                "uptime": round(time.time() - (self.started_at or time.time()), 1), **checks}

    async def close(self) -> None:
        """Shuts down in numbered steps; safe to call twice and after a failed start."""
        notify.stopping()
        # 1. Leave the cluster: goodbye over mDNS, our membership key deleted, so peers stop counting on us.
        if self._advertiser is not None:
            self._advertiser.cancel()
            await asyncio.gather(self._advertiser, return_exceptions=True)
            self._advertiser = None
        if self.discovery is not None:
            await self.discovery.close()
            self.discovery = None
        if self.membership is not None:
            await self.membership.close()
            self.membership = None
        # 2. Stop accepting requests: in-flight ones get a short grace to finish.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # 3. Stop taking work; running jobs finish within jobs.shutdown_grace, the rest go back to the queue.
        if self.worker is not None:
            await self.worker.close()
            self.worker = None
        # 4. Stop the pool processes.
        if self.pool is not None:
            await self.pool.close()
        # 5. Close connections: outgoing HTTP, Redis, the store.
        if self._http is not None:
            await self._http.close()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        await self.store.close()
        if self.file_cache is not None:
            await self.file_cache.close()
        # 6. Stop the embedded server last: everything above may still have written to it.
        if self.embedded is not None:
            await self.embedded.close()
            self.embedded = None
        log.info("node %s stopped", self.node_id)

    def __repr__(self) -> str:
        return f"Node({self.node_id!r}, url={self.url!r}, worker={self.worker!r}, pool={self.pool!r})"



