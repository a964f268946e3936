"""Peer discovery over mDNS (zeroconf), cluster membership, and the cluster secret's signatures.

- ``discovery``: advertises ``<node_id>._v2t._tcp.local.`` with a signed TXT record and keeps the table of the
  cluster's peers (join, update, leave on goodbye, expiry after ``peer_ttl`` of silence).
- ``membership``: ``PeerInfo``, and the same membership mirrored in Redis (a key per node, with a TTL), for
  networks where multicast does not pass.
- ``signing``: HMAC-SHA256 of TXT fields, and short-lived tokens for authenticated requests between peers.
- ``settings``: the ``[peers]`` section.

This package knows nothing of the node, the scheduler or the transcoder: it is given plain values (a
``PeerInfo`` or a callable returning one, the secret as bytes, a Redis client and a key prefix).
"""

from .discovery import Discovery, PeerEvent, read_txt, txt_fields
from .errors import DiscoveryUnavailable, DuplicateNode, MissingSecret, PeerError
from .membership import PeerInfo, RedisMembership
from .settings import SERVICE_TYPE, PeerSettings
from .signing import check_token, make_token, sign, verify

__all__ = [
    "SERVICE_TYPE",
    "Discovery",
    "DiscoveryUnavailable",
    "DuplicateNode",
    "MissingSecret",
    "PeerError",
    "PeerEvent",
    "PeerInfo",
    "PeerSettings",
    "RedisMembership",
    "check_token",
    "make_token",
    "read_txt",
    "sign",
    "txt_fields",
    "verify",
]
