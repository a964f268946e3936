"""A Discovery in a process of its own, for the network-namespace tests of ``tests/test_peers.py``.

Run inside a namespace (``ip netns exec NS python -m tests.peer_agent --node-id n1 --secret-file F ...``). It
prints one JSON object per line on stdout:

- ``{"event": "ready", "pid": ..., "t": ...}`` once the service is registered,
- ``{"event": "join" | "update" | "leave", "reason": ..., "peer": {...}, "t": ...}`` on each membership change,
- ``{"event": "stats", "peers": [...], "rejected": {...}, "t": ...}`` in answer to ``stats`` on stdin,
- ``{"event": "closed", "t": ...}`` after SIGTERM (or ``close`` on stdin) closed discovery cleanly,
- ``{"event": "error", "code": ..., "message": ...}`` if discovery refused to start (exit status 2).

``slots N`` on stdin publishes N free slots. ``t`` is ``time.monotonic()``, one clock for every namespace.
Logs go to stderr.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from peers import Discovery, PeerError, PeerEvent, PeerInfo, PeerSettings


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def main(args: argparse.Namespace) -> int:
    settings = PeerSettings(cluster=args.cluster, peer_ttl=args.peer_ttl, update_interval=args.update_interval)
    info = PeerInfo(node_id=args.node_id, cluster=args.cluster, version="test", api_url=args.api_url,
                    slots_total=args.slots, slots_free=args.slots)
    discovery = Discovery(settings, info, Path(args.secret_file).read_bytes().strip(),
                          interfaces=[args.interface] if args.interface else None)

    def on_change(event: PeerEvent) -> None:
        emit(event.kind, reason=event.reason, peer=msgspec.to_builtins(event.peer))

    discovery.add_listener(on_change)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while raw := await reader.readline():
            line = raw.decode().split() or [""]
            if line[0] == "stats":
                emit("stats", peers=[p.node_id for p in discovery.peers()], rejected=dict(discovery.rejected))
            elif line[0] == "slots":
                await discovery.update(msgspec.structs.replace(info, slots_free=int(line[1])))
            elif line[0] == "close":
                break
        stop.set()  # stdin closed (the test went away) or "close"

    try:
        await discovery.start()
    except PeerError as e:
        emit("error", code=e.code, message=str(e))
        await discovery.close()
        return 2
    emit("ready", pid=os.getpid())
    reading = asyncio.create_task(commands())
    try:
        await stop.wait()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await discovery.close()
    emit("closed")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peer_agent")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--peer-ttl", type=float, default=3.0)
    parser.add_argument("--update-interval", type=float, default=0.2)
    parser.add_argument("--api-url", default="http://127.0.0.1:8750")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--interface", default="", help="IPv4 address to use for mDNS (default: all)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    sys.exit(asyncio.run(main(parse())))
