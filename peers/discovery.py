"""mDNS advertisement and browsing of ``_v2t._tcp.local.``: the signed membership table of one cluster.

A node advertises one service instance, ``<node_id>._v2t._tcp.local.``, whose TXT record carries its id, cluster,
version, API URL, pool slots and running jobs, signed with HMAC-SHA256 under the cluster secret (``sig``). It
browses the same type and keeps a table of the peers whose record is well-formed, of its cluster, and correctly
signed; the others are counted in ``rejected`` by reason and otherwise ignored.

How a peer is known to be alive
-------------------------------
mDNS forgets a record in two ways: a goodbye (the record again with TTL 0, which zeroconf sends when a service
is unregistered) and cache expiry. Goodbyes are handled as they arrive: a clean stop is a leave within
milliseconds. Cache expiry cannot be left to zeroconf: it raises every received PTR TTL to at least 1125 s
(``_DNS_PTR_MIN_TTL``, a guard against query storms) and its browser reports a removal only when the PTR goes, so
a node killed with SIGKILL would stay in the table for about 19 minutes.

So Discovery keeps its own clock per peer, "last heard", reset whenever a fresh TXT record of that peer arrives:
an announcement, an update, or an answer to anyone's query (multicast answers reach every node). A maintenance
task runs every ``peer_ttl / MAINTENANCE_STEPS`` seconds: a peer silent for ``REFRESH_AFTER * peer_ttl`` is asked
for its TXT record with one multicast query (the cache maintenance of RFC 6762 §5.2, so one answer refreshes every
node at once), again at each step while it stays silent, and a peer silent for ``peer_ttl`` is dropped as
``expired``. Our own records are published with a TTL of ``peer_ttl`` (rounded up) so that other mDNS caches
agree on how long they stay valid. A dropped peer that speaks again (it restarted) simply joins again.
"""

import asyncio
import hashlib
import ipaddress
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Literal
from urllib.parse import urlsplit

import ifaddr
import msgspec
from zeroconf import (
    DNSOutgoing,
    DNSQuestion,
    DNSText,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .errors import DiscoveryUnavailable, DuplicateNode, MissingSecret, PeerError
from .membership import InfoSource, PeerInfo, current
from .settings import PeerSettings
from .signing import SIG_KEY, sign, verify

log = logging.getLogger(__name__)

#: A peer silent for this fraction of ``peer_ttl`` is asked for its TXT record. RFC 6762 §5.2 asks at 80 %; we ask
#: earlier and then at every maintenance step, so two lost answers in a row still leave time for a third.
REFRESH_AFTER = 0.5
#: Maintenance runs this many times per ``peer_ttl``: an expiry is noticed at most ``peer_ttl / 4`` late.
MAINTENANCE_STEPS = 4
#: How long resolving a peer (SRV, TXT and A records) may take, in milliseconds (zeroconf's unit).
RESOLVE_TIMEOUT_MS = 3000
#: Distinct rejected advertisements remembered so each is counted and logged once; bounded against a flood.
REJECTED_MEMORY = 1024
#: Version of the TXT layout (RFC 6763 §6.7 ``txtvers``); records of another version are ``malformed``.
TXT_VERSION = "1"

# DNS wire constants (RFC 1035) for the refresh query; zeroconf keeps its own copies private.
_FLAGS_QUERY = 0x0000
_TYPE_TXT = 16
_CLASS_IN = 1

#: Reasons an advertisement is rejected (the keys of ``Discovery.rejected``).
RejectReason = Literal["malformed", "wrong_cluster", "missing_signature", "bad_signature", "name_mismatch"]


class PeerEvent(msgspec.Struct, frozen=True):
    """A change of the membership table, as given to listeners."""

    kind: Literal["join", "update", "leave"]
    peer: PeerInfo
    #: Why a peer left: ``goodbye`` (it said so), ``expired`` (silent for ``peer_ttl``), ``rejected`` (its new
    #: record failed the checks). Empty for joins and updates.
    reason: str = ""


def txt_fields(info: PeerInfo, secret: bytes) -> dict[str, str]:
    """The TXT record advertising ``info``, signed. No credentials: the secret only keys the MAC."""
    fields = {
        "txtvers": TXT_VERSION,
        "id": info.node_id,
        "cluster": info.cluster,
        "ver": info.version,
        "api": info.api_url,
        "slots": f"{info.slots_free}/{info.slots_total}",
        "jobs": str(info.jobs_running),
    }
    fields[SIG_KEY] = sign(fields, secret)
    return fields


def read_txt(
    fields: Mapping[str, str | None], secret: bytes, cluster: str
) -> tuple[PeerInfo | None, RejectReason | None]:
    """The peer a TXT record describes, or None and the reason it is not acceptable.

    The cluster is checked before the signature: a neighbouring cluster is not an attack, and its operators
    should see ``wrong_cluster``, not ``bad_signature``, when they share a network with us.
    """
    node_id, their_cluster = fields.get("id"), fields.get("cluster")
    if not node_id or not their_cluster:
        return None, "malformed"
    if their_cluster != cluster:
        return None, "wrong_cluster"
    if not fields.get(SIG_KEY):
        return None, "missing_signature"
    if not verify(fields, secret):
        return None, "bad_signature"
    try:
        if fields.get("txtvers") != TXT_VERSION:
            raise ValueError("txtvers")
        free, _, total = (fields.get("slots") or "").partition("/")
        info = PeerInfo(
            node_id=node_id,
            cluster=their_cluster,
            version=fields.get("ver") or "",
            api_url=fields.get("api") or "",
            slots_total=_count(total),
            slots_free=_count(free),
            jobs_running=_count(fields.get("jobs") or ""),
        )
    except ValueError:
        return None, "malformed"
    return info, None


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


class _Peer:
    """A row of the table: the accepted record, its raw TXT (to notice changes) and when we last heard it."""

    __slots__ = ("heard", "heard_wall", "info", "name", "text")

    def __init__(self, name: str, info: PeerInfo, text: bytes) -> None:
        self.name = name
        self.info = info
        self.text = text
        self.heard = time.monotonic()
        self.heard_wall = time.time()

    def touch(self) -> None:
        self.heard = time.monotonic()
        self.heard_wall = time.time()

    def snapshot(self) -> PeerInfo:
        return msgspec.structs.replace(self.info, last_seen=self.heard_wall)


class _RecordListener(RecordUpdateListener):
    """Hands every record zeroconf receives to Discovery, which looks at the TXT records of our type."""

    def __init__(self, discovery: "Discovery") -> None:
        self._discovery = discovery

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        self._discovery._on_records(now, records)

    def async_update_records_complete(self) -> None:
        """Nothing to do once a batch is in: each record was handled as it arrived."""


class Discovery:
    """Advertises this node over mDNS and keeps the table of its cluster's peers.

    ``self_info`` is this node's record, or a callable returning it (read at start and at every ``update()``
    without argument); its ``cluster`` is replaced by ``settings.cluster``. ``interfaces`` (IPv4 addresses)
    overrides ``settings.interfaces``. ``start()`` opens the sockets, browses, and registers the service (probing
    for a duplicate node id first); ``close()`` sends goodbye packets and closes everything. Listeners added with
    ``add_listener`` are called, in the event loop, with each ``PeerEvent``.
    """

    def __init__(
        self,
        settings: PeerSettings,
        self_info: InfoSource,
        secret: bytes,
        interfaces: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self._source = self_info
        self._secret = secret
        self._interfaces = tuple(interfaces) if interfaces is not None else settings.interfaces
        self._type = settings.service_type
        self._type_suffix = "." + settings.service_type.lower()
        #: Rejected advertisements by reason (each distinct record counted once).
        self.rejected: Counter[str] = Counter()
        self._table: dict[str, _Peer] = {}
        self._rejected_seen: dict[str, bytes] = {}
        self._listeners: list[Callable[[PeerEvent], None]] = []
        self._node_id = ""
        self._own_key = ""
        self._networks: list[ipaddress.IPv4Network] = []
        self._advertised: list[str] = []
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._record_listener: _RecordListener | None = None
        self._service: AsyncServiceInfo | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._resolve_again: set[str] = set()
        self._dirty = False
        self._last_publish = -math.inf
        self._started = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the mDNS sockets, starts browsing and registers this node. A no-op when ``enabled`` is false."""
        if self._started or self._closed:
            return
        self._started = True
        if not self.settings.enabled:
            log.info("peers: mDNS discovery disabled")
            return
        if not self._secret:
            raise MissingSecret("peers: no cluster secret; set peers.secret_file to a file holding the secret "
                                "that every node of the cluster shares")
        info = self._own_info()
        self._node_id = info.node_id
        if len(info.node_id.encode()) > 63 or not info.node_id:
            raise PeerError(f"node id {info.node_id!r} cannot name an mDNS service: 1 to 63 bytes")
        own_name = f"{info.node_id}.{self._type}"
        self._own_key = own_name.lower()
        self._networks = _local_networks(self._interfaces)
        # Loopback only as a last resort: it lets nodes on one machine find each other, nothing more.
        self._advertised = (list(self.settings.advertise_addresses or self._interfaces) or _local_addresses()
                            or ["127.0.0.1"])
        started = time.monotonic()
        try:
            self._aiozc = AsyncZeroconf(
                interfaces=list(self._interfaces) or InterfaceChoice.All, ip_version=IPVersion.V4Only
            )
        except OSError as e:
            raise DiscoveryUnavailable(f"peers: cannot open mDNS sockets ({e}); check peers.interfaces") from e
        zc = self._aiozc.zeroconf
        self._record_listener = _RecordListener(self)
        zc.async_add_listener(self._record_listener, None)
        self._browser = AsyncServiceBrowser(zc, self._type, handlers=[self._on_service_state_change])
        try:
            service = self._service_info(info)
            # Probing (about 1 s) fails if another responder answers for our name; the announcements that
            # follow run in zeroconf's own task, so start returns as soon as the name is ours.
            await self._aiozc.async_register_service(service, allow_name_change=False)
        except NonUniqueNameException as e:
            raise DuplicateNode(f"peers: another node on the network already advertises {info.node_id!r}; "
                                "give each node its own node.id") from e
        except (OSError, ZeroconfError) as e:
            raise DiscoveryUnavailable(f"peers: cannot advertise {own_name} ({type(e).__name__}: {e})") from e
        self._service = service
        self._last_publish = time.monotonic()
        self._maintenance = asyncio.create_task(self._maintain(), name="peers-maintenance")
        log.info("peers: advertising %s in cluster %r on %s (peer ttl %.1fs) in %.2fs", own_name,
                 self.settings.cluster, ", ".join(self._advertised), self.settings.peer_ttl,
                 time.monotonic() - started)

    async def close(self) -> None:
        """Sends goodbye packets, stops browsing and closes the sockets. Idempotent; safe after a failed start."""
        if self._closed:
            return
        self._closed = True
        # 1. Stop our own tasks first, so nothing sends or resolves while the sockets go away.
        tasks = [t for t in (self._maintenance, self._publisher, *self._resolving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._maintenance = self._publisher = None
        self._resolving.clear()
        # 2. Stop browsing: no more queries, no more events.
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._aiozc is not None:
            if self._record_listener is not None:
                self._aiozc.zeroconf.async_remove_listener(self._record_listener)
            # 3. Unregister (goodbye packets: peers drop us at once instead of after peer_ttl), close sockets.
            await self._aiozc.async_close()
            self._aiozc = None
        self._table.clear()

    # -- public API -----------------------------------------------------------------------------------------

    def peers(self) -> list[PeerInfo]:
        """The current members of the cluster (not this node), sorted by node id."""
        return sorted((peer.snapshot() for peer in self._table.values()), key=lambda p: p.node_id)

    async def update(self, info: PeerInfo | None = None) -> None:
        """Publishes this node's record again (slots or jobs changed), at most once per ``update_interval``.

        ``info`` replaces the record or callable given at construction; without it the callable is read again.
        Returns at once: the publication happens in the background, changes in between are coalesced.
        """
        if info is not None:
            self._source = info
        if self._service is None or self._closed:
            return
        self._dirty = True
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_when_allowed(), name="peers-publish")

    def add_listener(self, callback: Callable[[PeerEvent], None]) -> Callable[[], None]:
        """Calls ``callback`` on every join, update and leave; returns a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    # -- advertising ----------------------------------------------------------------------------------------

    def _own_info(self) -> PeerInfo:
        info = current(self._source)
        if self._node_id and info.node_id != self._node_id:
            raise ValueError(f"node id changed from {self._node_id!r} to {info.node_id!r}; restart discovery")
        return msgspec.structs.replace(info, cluster=self.settings.cluster, address="", last_seen=0.0)

    def _service_info(self, info: PeerInfo) -> AsyncServiceInfo:
        url = urlsplit(info.api_url)
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            port = 0
        # A record TTL of peer_ttl: other caches forget us on the same schedule as our peers do.
        ttl = max(1, math.ceil(self.settings.peer_ttl))
        return AsyncServiceInfo(
            self._type,
            f"{info.node_id}.{self._type}",
            port=port,
            properties=txt_fields(info, self._secret),
            server=_host_name(info.node_id),
            parsed_addresses=self._advertised,
            host_ttl=ttl,
            other_ttl=ttl,
        )

    async def _publish_when_allowed(self) -> None:
        while self._dirty:
            wait = self._last_publish + self.settings.update_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty = False
            await self._publish()

    async def _publish(self) -> None:
        if self._aiozc is None or self._service is None:
            return
        service = self._service_info(self._own_info())
        if service.text == self._service.text:
            return  # nothing a peer would see has changed
        self._service = service
        self._last_publish = time.monotonic()
        try:
            await self._aiozc.async_update_service(service)
        except Exception as e:  # zeroconf may refuse while shutting down; the next update retries
            log.warning("peers: could not publish an update (%s)", e)

    # -- browsing -------------------------------------------------------------------------------------------

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser events: a new or changed instance is resolved; a removed one (a PTR goodbye) leaves."""
        key = name.lower()
        if key == self._own_key:
            return
        if state_change is ServiceStateChange.Removed:
            self._leave(key, "goodbye")
        else:
            self._resolve_soon(name)

    def _on_records(self, now: float, records: list[RecordUpdate]) -> None:
        """Every record received: TXT records of our type are the liveness signal, and show updates.

        Called before zeroconf commits the records to its cache, so resolution runs later, in a task.
        """
        for update in records:
            record = update.new
            if not isinstance(record, DNSText):
                continue
            key = record.key
            if not key.endswith(self._type_suffix) or key == self._own_key:
                continue
            if record.ttl == 0:  # a goodbye (RFC 6762 §10.1)
                self._leave(key, "goodbye")
                self._rejected_seen.pop(key, None)
                continue
            if record.is_expired(now):
                # zeroconf's cache cleanup hands back the records it drops (a TXT superseded by an update, the
                # records of a silent peer) as expired updates. They are not goodbyes: our own clock decides.
                continue
            peer = self._table.get(key)
            if peer is not None:
                peer.touch()
                if peer.text == record.text:
                    continue
            elif self._rejected_seen.get(key) == record.text:
                continue
            self._resolve_soon(record.name)

    def _resolve_soon(self, name: str) -> None:
        key = name.lower()
        if self._closed or self._aiozc is None:
            return
        if key in self._resolving:
            # Already resolving: make it look again, since the record may have changed after it read the cache.
            self._resolve_again.add(key)
            return
        self._resolving[key] = asyncio.create_task(self._resolve(name), name=f"peers-resolve-{name}")

    async def _resolve(self, name: str) -> None:
        key = name.lower()
        try:
            while True:
                self._resolve_again.discard(key)
                await self._resolve_once(name)
                if key not in self._resolve_again:
                    return
        except Exception:
            log.exception("peers: resolving %s failed", name)
        finally:
            self._resolving.pop(key, None)

    async def _resolve_once(self, name: str) -> None:
        assert self._aiozc is not None
        info = AsyncServiceInfo(self._type, name)
        if not await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("peers: %s did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        key = name.lower()
        peer_info, reason = read_txt(info.decoded_properties, self._secret, self.settings.cluster)
        if peer_info is not None and f"{peer_info.node_id}.{self._type}".lower() != key:
            # A valid record copied under another instance name: it would let one node appear twice.
            peer_info, reason = None, "name_mismatch"
        if peer_info is None:
            self._reject(key, name, info.text, reason or "malformed")
            return
        self._rejected_seen.pop(key, None)
        peer_info = msgspec.structs.replace(peer_info, address=self._pick_address(info.parsed_addresses()))
        peer = self._table.get(key)
        if peer is None:
            peer = self._table[key] = _Peer(name, peer_info, info.text)
            log.info("peers: %s joined (%s, %d/%d slots free)", peer_info.node_id, peer_info.api_url,
                     peer_info.slots_free, peer_info.slots_total)
            self._emit(PeerEvent("join", peer.snapshot()))
            return
        changed = peer.info != peer_info
        peer.info, peer.text = peer_info, info.text
        peer.touch()
        if changed:
            self._emit(PeerEvent("update", peer.snapshot()))

    def _reject(self, key: str, name: str, text: bytes, reason: str) -> None:
        if self._rejected_seen.get(key) != text:
            # Loud the first time a name is rejected, quiet when it keeps changing its record.
            level = logging.DEBUG if key in self._rejected_seen else logging.WARNING
            if len(self._rejected_seen) >= REJECTED_MEMORY:
                self._rejected_seen.clear()
            self._rejected_seen[key] = text
            self.rejected[reason] += 1
            log.log(level, "peers: ignoring the advertisement of %s: %s", name, reason)
        self._leave(key, "rejected")

    def _leave(self, key: str, reason: str) -> None:
        peer = self._table.pop(key, None)
        if peer is None:
            return
        log.info("peers: %s left (%s, last heard %.1fs ago)", peer.info.node_id, reason,
                 time.monotonic() - peer.heard)
        self._emit(PeerEvent("leave", peer.snapshot(), reason))

    def _emit(self, event: PeerEvent) -> None:
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:
                log.exception("peers: a membership listener failed on %s", event.kind)

    # -- liveness -------------------------------------------------------------------------------------------

    async def _maintain(self) -> None:
        step = self.settings.peer_ttl / MAINTENANCE_STEPS
        while True:
            await asyncio.sleep(step)
            self._expire_and_refresh(time.monotonic())

    def _expire_and_refresh(self, now: float) -> None:
        """Drops peers silent for ``peer_ttl``; asks the ones silent for ``REFRESH_AFTER * peer_ttl``."""
        ttl = self.settings.peer_ttl
        silent: list[str] = []
        for key, peer in list(self._table.items()):
            quiet = now - peer.heard
            if quiet > ttl:
                self._leave(key, "expired")
            elif quiet >= ttl * REFRESH_AFTER:
                silent.append(peer.name)
        if silent and self._aiozc is not None:
            # No known answers on purpose: we want the answer even though the record may still be cached.
            out = DNSOutgoing(_FLAGS_QUERY)
            for name in silent:
                out.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
            self._aiozc.zeroconf.async_send(out)

    def _pick_address(self, addresses: list[str]) -> str:
        """The advertised IPv4 address on a network we share (reachable without routing), else the first."""
        for text in addresses:
            address = ipaddress.ip_address(text)
            if any(address in net for net in self._networks):
                return text
        return addresses[0] if addresses else ""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._service else "new"
        return (f"Discovery(cluster={self.settings.cluster!r}, node={self._node_id!r}, {state}, "
                f"peers={len(self._table)}, rejected={dict(self.rejected)})")


def _host_name(node_id: str) -> str:
    """Our SRV target: derived from the node id, never the machine's own name (another responder owns that);
    the digest keeps ids that differ only in punctuation apart."""
    label = re.sub(r"[^A-Za-z0-9-]", "-", node_id)[:40].strip("-") or "node"
    return f"{label}-{hashlib.sha256(node_id.encode()).hexdigest()[:8]}.local."


def _ipv4s(interfaces: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(address, prefix length) of the non-loopback IPv4 addresses, limited to ``interfaces`` when given."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str) or ip.ip.startswith("127."):
                continue
            if interfaces and ip.ip not in interfaces:
                continue
            found.append((ip.ip, ip.network_prefix))
    return found


def _local_addresses() -> list[str]:
    return [address for address, _ in _ipv4s()]


def _local_networks(interfaces: Sequence[str]) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(f"{address}/{prefix}", strict=False) for address, prefix in _ipv4s(interfaces)]
