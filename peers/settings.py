"""The peers' configuration (the ``[peers]`` section), with its constraints in the types."""

from typing import Annotated

import msgspec

#: The DNS-SD service type every node advertises and browses.
SERVICE_TYPE = "_v2t._tcp.local."

Seconds = Annotated[float, msgspec.Meta(gt=0)]
#: One DNS label: it travels in a TXT record and names the cluster in logs.
ClusterName = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
#: RFC 6763 §7: ``_name._tcp.local.``, a service name of at most 15 characters.
ServiceType = Annotated[str, msgspec.Meta(pattern=r"^_[A-Za-z0-9-]{1,15}\._(tcp|udp)\.local\.$")]
IPv4 = Annotated[str, msgspec.Meta(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]


class PeerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a node finds its peers and how quickly it forgets them."""

    #: Whether to advertise and browse over mDNS at all (the Redis mirror works without it).
    enabled: bool = True
    #: Nodes only see peers of the same cluster; several clusters can share a network (and even a secret).
    cluster: ClusterName = "default"
    #: The cluster secret that signs advertisements and peer tokens. The peers package never reads these two
    #: keys itself: the node resolves them (``secret_file`` wins, like ``api.token_file``) and passes bytes.
    secret: str = ""
    secret_file: str = ""
    #: IPv4 addresses of the interfaces to use for mDNS. Empty: every interface.
    interfaces: tuple[IPv4, ...] = ()
    #: Addresses put in our A records. Empty: those of ``interfaces``, else every non-loopback IPv4 address.
    advertise_addresses: tuple[IPv4, ...] = ()
    #: A peer not heard from for this long is dropped (a crash, a cable pulled); also the TTL of our records,
    #: and of a node's key in the Redis mirror. A clean stop is noticed at once (goodbye packets).
    peer_ttl: Seconds = 30.0
    #: At most one TXT update (slots, jobs) per this many seconds; changes in between are coalesced.
    update_interval: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    service_type: ServiceType = SERVICE_TYPE
