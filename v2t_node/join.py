"""Zero-config join: a node started with only a cluster secret takes the cluster's Redis and S3 endpoints from a
peer it finds over mDNS, through an authenticated request (never from TXT records)."""

import logging

import aiohttp
import msgspec

from peers.join import find_peers
from peers.signing import make_token

from .api import PEER_TOKEN_HEADER
from .config import Config
from .errors import JoinFailed

log = logging.getLogger(__name__)

#: How long a joining node listens for peers before giving up.
JOIN_TIMEOUT_S = 30.0


class JoinInfo(msgspec.Struct, frozen=True):
    """What a peer's ``GET /v1/cluster/join`` answers."""

    cluster: str
    node: str
    redis_url: str
    redis_prefix: str
    storage: dict[str, str]


async def join(config: Config, timeout: float = JOIN_TIMEOUT_S) -> Config:
    """``config`` with the cluster's endpoints filled in, taken from the first peer that accepts us."""
    secret = config.cluster_secret
    refused: list[str] = []
    log.info("no Redis or S3 configured: looking for cluster %r over mDNS (up to %.0fs)", config.peers.cluster,
             timeout)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async for peer in find_peers(config.peers, secret, timeout):
            headers = {PEER_TOKEN_HEADER: make_token(secret, config.node_id)}
            try:
                async with session.get(f"{peer.api_url}/v1/cluster/join", headers=headers) as r:
                    body = await r.read()
                    if r.status != 200:
                        refused.append(f"{peer.node_id}: HTTP {r.status} {body[:200]!r}")
                        continue
                info = msgspec.json.decode(body, type=JoinInfo)
            except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as e:
                refused.append(f"{peer.node_id}: {e}")
                continue
            log.info("joining cluster %s through %s: redis %s, storage %s", info.cluster, info.node,
                     _redact(info.redis_url), info.storage.get("url") or "(local)")
            storage = msgspec.structs.replace(config.storage, url=info.storage.get("url", ""),
                                              endpoint=info.storage.get("endpoint", ""),
                                              region=info.storage.get("region", ""))
            redis = msgspec.structs.replace(config.redis, url=info.redis_url, prefix=info.redis_prefix)
            return msgspec.structs.replace(config, redis=redis, storage=storage)
    detail = "; ".join(refused) or "no signed advertisement of this cluster was heard"
    raise JoinFailed(f"could not join cluster {config.peers.cluster!r} within {timeout:.0f}s: {detail}. Check the "
                     "secret file and that multicast reaches this host, or set redis.url and storage.url")


def _redact(url: str) -> str:
    """A Redis URL without its password, for the log."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
