"""Finding a cluster without joining it yet: browse-only mDNS for a node that has only the cluster secret.

The node uses the first verified peers it hears of to ask for the cluster's endpoints (over the API, with a token
signed by the secret); only then does it start, advertise itself and take work.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import msgspec
from zeroconf import InterfaceChoice, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .discovery import read_txt
from .membership import PeerInfo
from .settings import PeerSettings

log = logging.getLogger(__name__)

#: How long one instance may take to answer a resolve request.
RESOLVE_TIMEOUT_MS = 3000


async def find_peers(settings: PeerSettings, secret: bytes, timeout: float,
                     interfaces: Sequence[str] | None = None) -> AsyncIterator[PeerInfo]:
    """Yields verified peers of ``settings.cluster`` as they are heard of, until ``timeout`` seconds pass.

    Advertisements that fail the signature or cluster checks are skipped (and logged once), exactly as the
    membership table would.
    """
    chosen = tuple(interfaces if interfaces is not None else settings.interfaces)
    aiozc = AsyncZeroconf(interfaces=list(chosen) if chosen else InterfaceChoice.All)
    found: asyncio.Queue[PeerInfo] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    seen: set[str] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(settings.service_type, name)
        if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        peer, reason = read_txt(info.decoded_properties, secret, settings.cluster)
        if peer is None:
            log.warning("join: ignoring %s: %s", name, reason)
            return
        addresses = info.parsed_addresses()
        found.put_nowait(msgspec.structs.replace(peer, address=addresses[0]) if addresses else peer)

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed and name not in seen:
            seen.add(name)
            task = asyncio.get_running_loop().create_task(resolve(name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(aiozc.zeroconf, [settings.service_type], handlers=[on_change])
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                yield await asyncio.wait_for(found.get(), left)
            except TimeoutError:
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await browser.async_cancel()
        await aiozc.async_close()
