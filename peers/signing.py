"""HMAC-SHA256 under the cluster secret: signed TXT records, and short-lived tokens for requests between peers.

Both are keyed by the same secret, so each MAC starts with its own domain label: a TXT signature can never be
presented as a token, nor the reverse. Verification always goes through ``hmac.compare_digest``.

What a TXT signature proves: the fields were written by a holder of the secret. It does not prove who sent the
packet (a signed record can be replayed verbatim from another address), which is why anything that acts on a peer
(the join request, fetching endpoints) authenticates with a token, whose timestamp bounds replay to ``max_skew``.
"""

import hashlib
import hmac
import time
from collections.abc import Mapping

#: The TXT key holding the signature; every other key is signed.
SIG_KEY = "sig"
#: Default tolerance, in seconds, between the clocks of two peers (and so the replay window of a token).
TOKEN_MAX_SKEW = 60.0

_TXT_DOMAIN = b"v2t-txt-v1\n"
_TOKEN_DOMAIN = b"v2t-token-v1\n"


def canonical(fields: Mapping[str, str]) -> bytes:
    """The signed form of ``fields``: ``key=value`` lines sorted by key, ``sig`` left out.

    Keys may not contain ``=`` or newlines and values may not contain newlines, so that two different sets of
    fields can never encode to the same bytes (``{"a": "1\\nb=2"}`` against ``{"a": "1", "b": "2"}``).
    """
    lines = []
    for key in sorted(fields):
        if key == SIG_KEY:
            continue
        value = fields[key]
        if not key or "=" in key or "\n" in key or "\n" in value:
            raise ValueError(f"field {key!r} cannot be signed: keys must be non-empty without '=' or newlines, "
                             "values without newlines")
        lines.append(f"{key}={value}")
    return "\n".join(lines).encode()


def sign(fields: Mapping[str, str], secret: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical form of ``fields`` (all but ``sig``) under ``secret``."""
    if not secret:
        raise ValueError("cannot sign with an empty secret")
    return hmac.new(secret, _TXT_DOMAIN + canonical(fields), hashlib.sha256).hexdigest()


def verify(fields: Mapping[str, str | None], secret: bytes) -> bool:
    """Whether ``fields[sig]`` is the signature of the other fields under ``secret``.

    False, never an exception, for anything malformed: a missing signature, a key without a value, a field that
    cannot be signed, an empty secret.
    """
    signature = fields.get(SIG_KEY)
    if not secret or not signature:
        return False
    if any(value is None for value in fields.values()):
        return False
    plain = {key: value for key, value in fields.items() if value is not None}
    try:
        expected = sign(plain, secret)
    except ValueError:
        return False
    # Bytes, because compare_digest refuses non-ASCII str (a hostile record may carry any text).
    return hmac.compare_digest(expected.encode(), signature.encode())


def make_token(secret: bytes, node_id: str, now: float | None = None) -> str:
    """A token proving that ``node_id`` holds the cluster secret at time ``now``: ``<node_id>:<unix s>:<mac>``.

    Meant for a header of one request between peers; it can be replayed within ``max_skew`` of ``now``, so it
    authenticates, it does not encrypt or bind to a request body.
    """
    if not secret:
        raise ValueError("cannot make a token with an empty secret")
    if not node_id or "\n" in node_id:
        raise ValueError(f"node id {node_id!r} cannot be put in a token")
    stamp = str(int(time.time() if now is None else now))
    return f"{node_id}:{stamp}:{_token_mac(secret, node_id, stamp)}"


def check_token(secret: bytes, token: str, max_skew: float = TOKEN_MAX_SKEW, now: float | None = None) -> str | None:
    """The node id a token was made for, or None when it is malformed, forged, or further than ``max_skew``
    seconds from ``now`` (in either direction: a clock ahead of ours is as suspicious as an old token)."""
    if not secret:
        return None
    # The node id comes first and may itself contain ':', so split from the right.
    parts = token.rsplit(":", 2)
    if len(parts) != 3:
        return None
    node_id, stamp, mac = parts
    if not node_id or "\n" in node_id or not (stamp.isascii() and stamp.isdigit()):
        return None
    if not hmac.compare_digest(_token_mac(secret, node_id, stamp).encode(), mac.encode()):
        return None
    if abs((time.time() if now is None else now) - int(stamp)) > max_skew:
        return None
    return node_id


def _token_mac(secret: bytes, node_id: str, stamp: str) -> str:
    return hmac.new(secret, _TOKEN_DOMAIN + f"{node_id}\n{stamp}".encode(), hashlib.sha256).hexdigest()
