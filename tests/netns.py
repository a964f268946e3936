"""Test hosts in network namespaces: a bridge in a hub namespace and member namespaces wired to it by veth pairs.

Every interface and address lives inside namespaces the test creates; the root namespace is never touched.
Namespace names carry a prefix and the creating process's pid, so leftovers of a killed run are found and removed
without touching a concurrent run's namespaces.
"""

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=15)


def kill_namespace_processes(namespace: str) -> None:
    """Every process still inside one of our namespaces is one we started: SIGKILL, one pid at a time."""
    for pid in ip("netns", "pids", namespace, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class Network:
    """A bridge in ``<prefix><pid>-hub`` and ``members`` namespaces ``<prefix><pid>-m<i>`` on 10.213.S.0/24."""

    def __init__(self, prefix: str, subnet: int, members: int) -> None:
        tag = f"{prefix}{os.getpid()}"
        self.prefix = prefix
        self.hub = f"{tag}-hub"
        self.members = [f"{tag}-m{i}" for i in range(1, members + 1)]
        self.addresses = [f"10.213.{subnet}.{i}" for i in range(1, members + 1)]
        self.hub_address = f"10.213.{subnet}.254"

    def create(self) -> None:
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        # Snooping off: every multicast frame is flooded, as on a dumb switch.
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.hub, "link", "set", "br0", "up")
        ip("-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0")
        for i, (namespace, address) in enumerate(zip(self.members, self.addresses, strict=True), start=1):
            ip("netns", "add", namespace)
            # Both ends are created inside our namespaces: the root namespace never sees a new interface.
            ip("-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", namespace, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def destroy(self) -> None:
        for namespace in [*self.members, self.hub]:
            kill_namespace_processes(namespace)
            # Deleting a namespace deletes its veth ends (and so their peers) and the bridge.
            ip("netns", "del", namespace, check=False)

    def leftovers(self) -> list[str]:
        ours = self.hub[: -len("hub")]
        return [n for n in ip("netns", "list", check=False).stdout.split() if n.startswith(ours)]


def remove_stale(prefix: str) -> None:
    """Namespaces of ``prefix`` left by a run that was killed before its teardown (its pid is gone)."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{re.escape(prefix)}(\d+)-(hub|m\d+)", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            kill_namespace_processes(name)
            ip("netns", "del", name, check=False)
