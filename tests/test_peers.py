"""Peers: signatures and tokens, TXT records, discovery over real mDNS between network namespaces, and the
membership mirror in a real valkey.

The mDNS tests never send a packet from the test's own namespace: a dedicated "hub" namespace holds a bridge, each
member namespace has one veth into it (10.213.X.k/24, a multicast route, lo up), and each agent
(``tests/peer_agent.py``) runs inside a member namespace. Everything is removed afterwards, even on failure.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from zeroconf import DNSText, RecordUpdate, current_time_millis

from peers import (
    Discovery,
    MissingSecret,
    PeerEvent,
    PeerInfo,
    PeerSettings,
    RedisMembership,
    check_token,
    make_token,
    read_txt,
    sign,
    txt_fields,
    verify,
)
from peers.discovery import _Peer
from peers.signing import canonical

from .netns import Network, remove_stale
from .server_fixtures import wait_for

REPO = Path(__file__).resolve().parent.parent
SECRET = b"correct horse battery staple"
INFO = PeerInfo(node_id="n1", cluster="c1", version="0.1.0", api_url="http://10.0.0.1:8750", slots_total=4,
                slots_free=3, jobs_running=1)


# -- signing --------------------------------------------------------------------------------------------------


def test_sign_round_trip() -> None:
    fields = {"id": "n1", "cluster": "c1", "slots": "3/4"}
    signed = {**fields, "sig": sign(fields, SECRET)}
    assert verify(signed, SECRET)
    # Key order and a stale "sig" in the input change nothing: only the canonical form is signed.
    assert sign(dict(reversed(list(signed.items()))), SECRET) == signed["sig"]


def test_tampered_field_is_rejected() -> None:
    signed = txt_fields(INFO, SECRET)
    for key in signed:
        if key != "sig":
            assert not verify({**signed, key: signed[key] + "0"}, SECRET), key
    assert not verify({**signed, "extra": "1"}, SECRET)  # an added field is tampering too
    assert not verify({k: v for k, v in signed.items() if k != "jobs"}, SECRET)  # and a removed one


def test_wrong_secret_missing_or_odd_signature_is_rejected() -> None:
    signed = txt_fields(INFO, SECRET)
    assert not verify(signed, b"another secret")
    assert not verify(signed, b"")
    assert not verify({k: v for k, v in signed.items() if k != "sig"}, SECRET)
    assert not verify({**signed, "sig": "ünïcode"}, SECRET)  # never an exception on hostile input
    assert not verify({**signed, "flag": None}, SECRET)  # a key without '=' in the TXT record


def test_canonical_form_is_unambiguous() -> None:
    with pytest.raises(ValueError):
        canonical({"a": "1\nb=2"})
    with pytest.raises(ValueError):
        canonical({"a=b": "1"})
    with pytest.raises(ValueError):
        sign({"a": "1"}, b"")
    assert canonical({"b": "2", "a": "1", "sig": "x"}) == b"a=1\nb=2"


def test_token_round_trip_and_skew() -> None:
    now = 1_700_000_000.0
    token = make_token(SECRET, "node:with:colons", now)
    assert check_token(SECRET, token, now=now) == "node:with:colons"
    assert check_token(SECRET, token, max_skew=60, now=now + 59) == "node:with:colons"
    assert check_token(SECRET, token, max_skew=60, now=now + 61) is None  # expired
    assert check_token(SECRET, token, max_skew=60, now=now - 61) is None  # from a clock too far ahead
    assert check_token(SECRET, make_token(SECRET, "n1")) == "n1"  # default: the current time


def test_token_forgery_is_rejected() -> None:
    now = 1_700_000_000.0
    node_id, stamp, mac = make_token(SECRET, "n1", now).rsplit(":", 2)
    assert check_token(b"another secret", f"{node_id}:{stamp}:{mac}", now=now) is None
    assert check_token(SECRET, f"n2:{stamp}:{mac}", now=now) is None  # another node id
    assert check_token(SECRET, f"{node_id}:{int(stamp) + 1}:{mac}", now=now) is None  # another time
    for junk in ("", "n1", "n1:123", f"n1:12x:{mac}", f":{stamp}:{mac}", f"n1:{stamp}:ü", f"n1:²:{mac}"):
        assert check_token(SECRET, junk, now=now) is None, junk
    # A TXT signature is no token: the domains differ.
    assert check_token(SECRET, f"n1:{stamp}:" + sign({"n1": stamp}, SECRET), now=now) is None


# -- TXT records and settings ---------------------------------------------------------------------------------


def test_txt_round_trip_without_credentials() -> None:
    fields = txt_fields(INFO, SECRET)
    assert set(fields) == {"txtvers", "id", "cluster", "ver", "api", "slots", "jobs", "sig"}
    assert all(SECRET.decode() not in value for value in fields.values())
    assert all(len(f"{k}={v}".encode()) <= 255 for k, v in fields.items())  # one TXT string each
    assert read_txt(fields, SECRET, "c1") == (INFO, None)


def test_txt_rejections_by_reason() -> None:
    fields = txt_fields(INFO, SECRET)
    assert read_txt(fields, SECRET, "c2") == (None, "wrong_cluster")
    assert read_txt({k: v for k, v in fields.items() if k != "sig"}, SECRET, "c1") == (None, "missing_signature")
    assert read_txt(fields, b"other", "c1") == (None, "bad_signature")
    assert read_txt({"cluster": "c1"}, SECRET, "c1") == (None, "malformed")
    # Correctly signed but unreadable: still not a peer.
    for key, value in (("slots", "3of4"), ("jobs", "-1"), ("txtvers", "2")):
        odd = {**{k: v for k, v in fields.items() if k != "sig"}, key: value}
        odd["sig"] = sign(odd, SECRET)
        assert read_txt(odd, SECRET, "c1") == (None, "malformed"), key


def test_settings_constraints() -> None:
    assert PeerSettings().service_type == "_v2t._tcp.local."
    for bad in ({"cluster": ""}, {"cluster": "a b"}, {"peer_ttl": 0}, {"service_type": "_v2t._tcp.local"},
                {"interfaces": ["eth0"]}, {"unknown": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, PeerSettings)
    assert msgspec.convert({"interfaces": ["10.0.0.1"]}, PeerSettings).interfaces == ("10.0.0.1",)


async def test_discovery_needs_a_secret_and_can_be_disabled() -> None:
    """Both are decided before any socket is opened (this runs in the test's own namespace)."""
    off = Discovery(PeerSettings(enabled=False), INFO, SECRET)
    await off.start()
    assert off.peers() == []
    await off.update()
    await off.close()
    await off.close()
    no_secret = Discovery(PeerSettings(), INFO, b"")
    with pytest.raises(MissingSecret):
        await no_secret.start()
    await no_secret.close()  # safe after a failed start
    assert "closed" in repr(no_secret)


def test_only_a_ttl_zero_record_is_a_goodbye() -> None:
    """zeroconf hands the records it drops from its cache (a TXT superseded by an update, up to 10 s later) to
    record listeners as expired updates: that must not read as a goodbye. No socket is opened here."""
    discovery = Discovery(PeerSettings(cluster="c1"), INFO, SECRET)
    events: list[PeerEvent] = []
    discovery.add_listener(events.append)
    name = "n2._v2t._tcp.local."
    text = b"\x04id=n2"
    discovery._table[name] = _Peer(name, msgspec.structs.replace(INFO, node_id="n2"), text)
    now = current_time_millis()
    superseded = DNSText(name, 16, 1, 1, b"\x04id=n0", created=now - 5000)
    discovery._on_records(now, [RecordUpdate(superseded, superseded)])
    assert events == [] and [p.node_id for p in discovery.peers()] == ["n2"]

    goodbye = DNSText(name, 16, 1, 0, text, created=now)
    discovery._on_records(now, [RecordUpdate(goodbye, None)])
    assert [(e.kind, e.reason, e.peer.node_id) for e in events] == [("leave", "goodbye", "n2")]
    assert discovery.peers() == []


# -- real mDNS in network namespaces --------------------------------------------------------------------------

#: Namespaces of this test run are named ``<PREFIX><pid>-...``; leftovers of a killed run are removed by pid.
NS_PREFIX = "v2tpeers"
MEMBERS = 4
#: Peer TTL of the agents: short, so expiry plays out in seconds.
TTL = 2.0
#: Time for an agent to start (interpreter, imports, mDNS probing) and for peers to find each other.
START_TIMEOUT = 20.0
FIND_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    remove_stale(NS_PREFIX)
    net = Network(NS_PREFIX, 20 + os.getpid() % 200, members=MEMBERS)
    try:
        try:
            net.create()
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            pytest.skip(f"cannot create network namespaces here: {detail.strip()}")
        yield net
    finally:
        net.destroy()
    leftovers = net.leftovers()
    assert not leftovers, f"namespaces left behind: {leftovers}"


class Agent:
    """One ``tests/peer_agent.py`` process in a member namespace, and the JSON lines it printed."""

    def __init__(self, node_id: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.node_id = node_id
        self.process = process
        self.log = log
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._eof = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.events.append(json.loads(line))
            self._changed.set()
        self._eof = True
        self._changed.set()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = FIND_TIMEOUT,
                       since: int = 0) -> dict[str, Any]:
        """The first event (from index ``since``) matching ``predicate``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        start = since
        while True:
            for event in self.events[start:]:
                if predicate(event):
                    return event
            start = len(self.events)
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0:
                why = "exited" if self._eof else f"no such event within {timeout}s"
                raise AssertionError(f"agent {self.node_id} {why}; events: {self.events}\nlog:\n{self.log_tail()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    @property
    def ready(self) -> dict[str, Any]:
        return next(e for e in self.events if e["event"] == "ready")

    def joined(self, node_id: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["event"] == "join" and e["peer"]["node_id"] == node_id

    def left(self, node_id: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["event"] == "leave" and e["peer"]["node_id"] == node_id

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()

    async def stats(self) -> dict[str, Any]:
        since = len(self.events)
        await self.send("stats")
        return await self.wait_for(lambda e: e["event"] == "stats", since=since)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        await asyncio.gather(self._reader, return_exceptions=True)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        return ""


AgentFactory = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def agents(network: Network, tmp_path: Path) -> AsyncIterator[AgentFactory]:
    """``await agents(member, node_id, secret=..., cluster=...)`` starts an agent and waits until it is ready."""
    started: list[Agent] = []

    async def start(member: int, node_id: str, secret: bytes = SECRET, cluster: str = "c1", ttl: float = TTL,
                    interface: bool = False, wait_ready: bool = True) -> Agent:
        secret_file = tmp_path / f"{node_id}.secret"
        secret_file.write_bytes(secret)
        log = tmp_path / f"{node_id}-{len(started)}.log"
        address = network.addresses[member]
        with open(log, "wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", network.members[member],
                sys.executable, "-m", "tests.peer_agent", "--node-id", node_id, "--cluster", cluster,
                "--secret-file", str(secret_file), "--peer-ttl", str(ttl),
                "--api-url", f"http://{address}:8750", *(["--interface", address] if interface else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        agent = Agent(node_id, process, log)
        started.append(agent)
        if not wait_ready:
            return agent
        ready = await agent.wait_for(lambda e: e["event"] == "ready", timeout=START_TIMEOUT)
        # `ip netns exec` execs the command: the pid we signal is the agent itself.
        assert ready["pid"] == process.pid
        return agent

    try:
        yield start
    finally:
        for agent in started:
            await agent.stop()


def peer_ids(events: list[dict[str, Any]]) -> set[str]:
    """Who an agent's events say is a member now."""
    members: set[str] = set()
    for e in events:
        if e["event"] == "join":
            members.add(e["peer"]["node_id"])
        elif e["event"] == "leave":
            members.discard(e["peer"]["node_id"])
    return members


async def test_three_nodes_discover_each_other(agents: AgentFactory, network: Network) -> None:
    """1. Start three agents in three namespaces.
    2. Each sees the two others join within a few seconds, with the address it can reach them at; none lists
       itself.
    3. One publishes a new slot count: the others see an update (TXT refresh), not a new join.
    """
    # Started together (they probe and browse at the same time); n1 names its interface, the others use all.
    nodes = await asyncio.gather(*(agents(i, f"n{i + 1}", interface=i == 0) for i in range(3)))
    for node in nodes:
        for i, other in enumerate(nodes):
            if other is not node:
                joined = await node.wait_for(node.joined(other.node_id))
                assert joined["peer"]["address"] == network.addresses[i]
                assert joined["peer"]["api_url"] == f"http://{network.addresses[i]}:8750"
                assert joined["peer"]["cluster"] == "c1"
                # From the moment both were up (a peer may well be found during our own start, before "ready").
                latency = joined["t"] - max(node.ready["t"], other.ready["t"])
                print(f"{node.node_id} saw {other.node_id} {latency:.3f}s after both were ready")
                assert latency < FIND_TIMEOUT
    for node in nodes:
        assert (await node.stats())["peers"] == sorted(n.node_id for n in nodes if n is not node)

    since = [len(node.events) for node in nodes]
    for command in ("slots 1", "slots 1", "slots 0"):  # one unchanged, all within update_interval
        await nodes[0].send(command)
    for node, mark in zip(nodes[1:], since[1:], strict=True):
        await node.wait_for(lambda e: e["event"] == "update" and e["peer"]["slots_free"] == 0, since=mark)
        updates = [e["peer"] for e in node.events[mark:] if e["event"] == "update"]
        assert {p["node_id"] for p in updates} == {"n1"} and len(updates) <= 2  # coalesced
    for node in nodes:
        assert [e for e in node.events if e["event"] in ("leave",)] == []
        assert sum(1 for e in node.events if e["event"] == "join") == 2


async def test_duplicate_node_id_is_refused(agents: AgentFactory) -> None:
    """1. n1 runs. 2. A second n1 in another namespace probes the name, finds it taken, and refuses to start.
    3. The first one is unaffected."""
    first = await agents(0, "n1")
    second = await agents(1, "n1", wait_ready=False)
    error = await second.wait_for(lambda e: e["event"] == "error", timeout=START_TIMEOUT)
    assert error["code"] == "duplicate_node"
    assert await asyncio.wait_for(second.process.wait(), 10) == 2
    assert (await first.stats())["peers"] == []
    assert [e for e in first.events if e["event"] == "leave"] == []


async def test_rogue_with_wrong_secret_is_ignored(agents: AgentFactory) -> None:
    """1. Two agents share the secret; a third ("rogue") signs with another one.
    2. The two see each other; neither lists the rogue; both count a bad signature.
    """
    *good, rogue = await asyncio.gather(agents(0, "n1"), agents(1, "n2"), agents(2, "rogue", secret=b"guessed"))
    await good[0].wait_for(good[0].joined("n2"))
    await good[1].wait_for(good[1].joined("n1"))
    for node in good:
        stats = await wait_for(partial(_rejected, node, "bad_signature"), timeout=FIND_TIMEOUT, interval=0.2)
        assert stats["peers"] == [other.node_id for other in good if other is not node]
        assert "rogue" not in peer_ids(node.events)
    # The rogue, for its part, trusts nobody.
    assert (await rogue.stats())["peers"] == []


async def test_other_cluster_is_ignored(agents: AgentFactory) -> None:
    """1. Two agents of cluster c1 and one of cluster c2, all with the same secret.
    2. The c1 agents see each other only, and count the c2 agent as ``wrong_cluster`` (not a bad signature).
    """
    *good, stranger = await asyncio.gather(agents(0, "n1"), agents(1, "n2"), agents(3, "s1", cluster="c2"))
    await good[0].wait_for(good[0].joined("n2"))
    for node in good:
        stats = await wait_for(partial(_rejected, node, "wrong_cluster"), timeout=FIND_TIMEOUT, interval=0.2)
        assert "bad_signature" not in stats["rejected"]
        assert "s1" not in stats["peers"]
    assert (await stranger.stats())["peers"] == []


async def test_graceful_stop_is_a_prompt_leave(agents: AgentFactory) -> None:
    """1. Two agents see each other.
    2. SIGTERM to one: it closes discovery (goodbye packets) and exits 0.
    3. The other reports it left, reason ``goodbye``, well before the peer TTL.
    """
    n1, n2 = await asyncio.gather(agents(0, "n1"), agents(1, "n2"))
    await n1.wait_for(n1.joined("n2"))
    stopped = time.monotonic()
    n2.signal(signal.SIGTERM)
    leave = await n1.wait_for(n1.left("n2"), timeout=TTL)
    assert leave["reason"] == "goodbye"
    print(f"goodbye noticed {leave['t'] - stopped:.3f}s after SIGTERM")
    assert leave["t"] - stopped < TTL / 2
    assert await asyncio.wait_for(n2.process.wait(), 10) == 0
    assert n2.events[-1]["event"] == "closed"


async def test_killed_peer_expires_after_ttl_and_can_rejoin(agents: AgentFactory) -> None:
    """1. Two agents see each other and stay members for several TTLs (the refresh queries keep them alive).
    2. SIGKILL one: no goodbye. The other drops it as ``expired`` about one TTL later.
    3. Restart it in the same namespace: it joins again.
    """
    n1, n2 = await asyncio.gather(agents(0, "n1"), agents(1, "n2"))
    await n1.wait_for(n1.joined("n2"))
    await n2.wait_for(n2.joined("n1"))
    await asyncio.sleep(3 * TTL)
    assert [e for e in n1.events + n2.events if e["event"] == "leave"] == []

    killed = time.monotonic()
    n2.signal(signal.SIGKILL)
    leave = await n1.wait_for(n1.left("n2"), timeout=2 * TTL)
    assert leave["reason"] == "expired"
    elapsed = leave["t"] - killed
    print(f"expired {elapsed:.3f}s after SIGKILL (peer ttl {TTL}s)")
    # Last heard at most REFRESH_AFTER * TTL (plus a step) before the kill, dropped at most a step after TTL.
    assert TTL * 0.2 < elapsed < TTL * 1.5, elapsed

    since = len(n1.events)
    await agents(1, "n2")
    await n1.wait_for(n1.joined("n2"), since=since)


async def _rejected(agent: Agent, reason: str) -> dict[str, Any] | None:
    stats = await agent.stats()
    return stats if stats["rejected"].get(reason, 0) >= 1 else None


# -- the Redis mirror -----------------------------------------------------------------------------------------

PREFIX = "v2t:node:"


def member_info(node_id: str, slots_free: int = 2) -> PeerInfo:
    return PeerInfo(node_id=node_id, cluster="c1", version="0.1.0", api_url=f"http://{node_id}:8750",
                    slots_total=2, slots_free=slots_free)


@pytest.fixture
async def members(redis_client: aioredis.Redis) -> AsyncIterator[Callable[..., Awaitable[RedisMembership]]]:
    made: list[RedisMembership] = []

    async def make(node_id: str, ttl: float = 1.0) -> RedisMembership:
        membership = RedisMembership(redis_client, PREFIX, node_id, ttl, lambda: member_info(node_id))
        made.append(membership)
        await membership.start()
        return membership

    yield make
    for membership in made:
        await membership.close()


async def test_redis_members_see_each_other(members: Callable[..., Awaitable[RedisMembership]],
                                            redis_client: aioredis.Redis) -> None:
    """1. Two nodes write their records. 2. Each lists the other (and both with ``include_self``).
    3. An update is visible at once. 4. The heartbeat keeps both alive past their TTL."""
    a, b = await members("a", ttl=0.6), await members("b", ttl=0.6)
    assert [p.node_id for p in await a.peers()] == ["b"]
    assert [p.node_id for p in await b.peers()] == ["a"]
    assert [p.node_id for p in await a.peers(include_self=True)] == ["a", "b"]
    peer = (await a.peers())[0]
    assert peer.api_url == "http://b:8750" and peer.last_seen > time.time() - 5

    await b.update(member_info("b", slots_free=0))
    assert (await a.peers())[0].slots_free == 0

    await asyncio.sleep(3 * 0.6)
    assert [p.node_id for p in await a.peers()] == ["b"]
    assert 0 < await redis_client.pttl(b.key) <= 600
    assert "writes=" in repr(a)


async def test_redis_closed_member_leaves_at_once(members: Callable[..., Awaitable[RedisMembership]]) -> None:
    a, b = await members("a", ttl=30), await members("b", ttl=30)
    await b.close()
    await b.close()  # idempotent
    assert await a.peers() == []


async def test_redis_crashed_member_expires_after_ttl(members: Callable[..., Awaitable[RedisMembership]]) -> None:
    """1. Two nodes see each other. 2. One "crashes": its heartbeat stops, no close, so its key stays.
    3. The other still lists it right after, and no longer once its TTL has passed."""
    ttl = 0.8
    a, b = await members("a", ttl=ttl), await members("b", ttl=ttl)
    assert b._task is not None
    b._task.cancel()
    crashed = time.monotonic()
    assert [p.node_id for p in await a.peers()] == ["b"]
    await wait_for(lambda: _gone(a), timeout=3 * ttl)
    assert time.monotonic() - crashed <= ttl + 0.5


async def _gone(membership: RedisMembership) -> bool:
    return await membership.peers() == []


async def test_redis_membership_skips_junk_and_escapes_the_prefix(redis_client: aioredis.Redis) -> None:
    """A prefix with glob characters matches only itself, and undecodable records are skipped."""
    prefix = "v2t[x]:node:"
    a = RedisMembership(redis_client, prefix, "a", 5, member_info("a"))
    b = RedisMembership(redis_client, prefix, "b", 5, member_info("b"))
    await a.start()
    await b.start()
    try:
        await redis_client.set(prefix + "junk", b"{not json")
        await redis_client.set("v2tx:node:c", msgspec.json.encode(member_info("c")))
        assert [p.node_id for p in await a.peers()] == ["b"]
    finally:
        await a.close()
        await b.close()


async def test_redis_membership_start_fails_without_redis() -> None:
    """The node must learn at start that its Redis is unreachable; close stays safe."""
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    membership = RedisMembership(client, PREFIX, "a", 1, member_info("a"))
    try:
        with pytest.raises(aioredis.ConnectionError):
            await membership.start()
        await membership.close()
    finally:
        await client.aclose()
