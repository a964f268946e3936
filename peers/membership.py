"""Who is in the cluster: the ``PeerInfo`` record, and its mirror in Redis for networks without multicast.

Every node writes its own record to ``<key_prefix><node_id>`` with an expiry of ``ttl`` and rewrites it every
``ttl / HEARTBEATS_PER_TTL``; a node that dies without a word disappears when its key expires, one that closes
cleanly deletes its key at once. Reading the members is a SCAN of ``<key_prefix>*``: cheap for clusters of
tens of nodes, and it needs no index that could drift from the keys.
"""

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

#: Writes per ``ttl``: two may be lost (a slow Redis, a failover) before the key expires.
HEARTBEATS_PER_TTL = 3
#: Keys fetched per SCAN/MGET round trip.
SCAN_BATCH = 256


class PeerInfo(msgspec.Struct, frozen=True):
    """One node as its peers see it: identity, endpoint and load.

    ``address`` and ``last_seen`` are filled in by the observer (the IPv4 address it can reach the node at, and
    the wall-clock time it last heard of it); a node's description of itself leaves them empty.
    """

    node_id: str
    cluster: str
    version: str
    api_url: str
    slots_total: int = 0
    slots_free: int = 0
    jobs_running: int = 0
    address: str = ""
    last_seen: float = 0.0


#: A node's own record, or a callable returning the current one (read at every heartbeat).
InfoSource = PeerInfo | Callable[[], PeerInfo]


def current(source: InfoSource) -> PeerInfo:
    """The record ``source`` stands for now."""
    return source if isinstance(source, PeerInfo) else source()


def _escape_glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisMembership:
    """This node's record in Redis, kept alive by a heartbeat, and the records of the others.

    ``start()`` writes the record (raising if Redis cannot be reached: the node should know at start) and then
    rewrites it every ``ttl / HEARTBEATS_PER_TTL`` seconds; ``update()`` writes it at once (slots changed);
    ``close()`` stops the heartbeat and deletes the key, so peers see a clean leave immediately.
    """

    def __init__(self, redis: aioredis.Redis, key_prefix: str, node_id: str, ttl: float, info: InfoSource) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl}")
        self.redis = redis
        self.key_prefix = key_prefix
        self.node_id = node_id
        self.ttl = ttl
        self.key = f"{key_prefix}{node_id}"
        self._source = info
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Heartbeats written, and heartbeats that failed (counters for ``__repr__`` and metrics).
        self.writes = 0
        self.failures = 0
        self._failing = False
        self._decoder = msgspec.json.Decoder(PeerInfo)

    async def start(self) -> None:
        """Writes this node's record and starts the heartbeat."""
        if self._task is not None or self._closed:
            return
        await self._write()
        self._task = asyncio.create_task(self._heartbeat(), name=f"membership-heartbeat-{self.node_id}")

    async def update(self, info: PeerInfo | None = None) -> None:
        """Writes the record now, once started (``info`` replaces the source given at construction)."""
        if info is not None:
            self._source = info
        if self._task is not None and not self._closed:
            await self._write()

    async def peers(self, include_self: bool = False) -> list[PeerInfo]:
        """Every node whose key has not expired, sorted by node id; records that do not decode are skipped."""
        keys: list[bytes | str] = [
            key async for key in self.redis.scan_iter(match=_escape_glob(self.key_prefix) + "*", count=SCAN_BATCH)
        ]
        found: list[PeerInfo] = []
        for start in range(0, len(keys), SCAN_BATCH):
            for value in await self.redis.mget(keys[start:start + SCAN_BATCH]):
                if value is None:  # expired between SCAN and MGET
                    continue
                try:
                    peer = self._decoder.decode(value)
                except msgspec.DecodeError:
                    log.debug("membership: undecodable record skipped: %r", value[:200])
                    continue
                if include_self or peer.node_id != self.node_id:
                    found.append(peer)
        return sorted(found, key=lambda p: p.node_id)

    async def close(self) -> None:
        """Stops the heartbeat and deletes this node's key (a clean leave). Idempotent; safe after a failed start."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("membership: heartbeat of %s had died", self.node_id)
        try:
            await self.redis.delete(self.key)
        except RedisError as e:
            # The key expires by itself within ttl; a closing node must not fail on it.
            log.warning("membership: could not delete %s on close (%s); it expires in %.0fs", self.key, e, self.ttl)

    async def _heartbeat(self) -> None:
        interval = self.ttl / HEARTBEATS_PER_TTL
        while True:
            await asyncio.sleep(interval)
            try:
                await self._write()
            except RedisError as e:
                self.failures += 1
                # Loud once, then quiet until it works again.
                if not self._failing:
                    log.warning("membership: heartbeat to Redis failed (%s); retrying every %.1fs", e, interval)
                    self._failing = True
                continue
            if self._failing:
                log.info("membership: heartbeat to Redis works again")
                self._failing = False

    async def _write(self) -> None:
        record = msgspec.structs.replace(current(self._source), last_seen=time.time())
        if record.node_id != self.node_id:
            raise ValueError(f"record of {record.node_id!r} given to the membership of {self.node_id!r}")
        # PX, not EX: test clusters use sub-second TTL fractions.
        await self.redis.set(self.key, msgspec.json.encode(record), px=max(1, int(self.ttl * 1000)))
        self.writes += 1

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._task else "new"
        return (f"RedisMembership({self.key!r}, ttl={self.ttl}, {state}, writes={self.writes}, "
                f"failures={self.failures})")
