"""Fixtures that spawn real servers (valkey) and real nodes, with fast clocks, and clean them up."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from v2t_node.config import load
from v2t_node.embedded import find_server

REPO = Path(__file__).resolve().parent.parent

#: Short intervals so failure scenarios play out in seconds, not minutes.
FAST_JOBS = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 2.0,
    "reclaim_interval": 0.5,
    "retry_initial": 0.2,
    "retry_max": 1.0,
    "shutdown_grace": 5.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class ValkeyServer:
    """A real valkey-server on a free loopback port, in its own directory."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "ValkeyServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [find_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no",
             "--logfile", str(self.directory / "valkey.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    server = ValkeyServer(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey: ValkeyServer) -> str:
    """The session's valkey, emptied for this test."""
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    return valkey.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def node_config(data_dir: Path, models_dir: Path, redis_url: str | None = None, **sections: dict[str, Any]) -> Any:
    """A node config for tests: API on a free port, one pool process, fast clocks."""
    layers: dict[str, dict[str, Any]] = {
        "node": {"data_dir": str(data_dir), "id": data_dir.name},
        "api": {"port": 0},
        "models": {"dir": str(models_dir)},
        "pool": {"processes": 1, "threads": 2},
        "jobs": dict(FAST_JOBS),
    }
    if redis_url:
        layers["redis"] = {"url": redis_url}
    for section, values in sections.items():
        layers[section] = {**layers.get(section, {}), **values}
    return load(env={}, overrides=layers)


@pytest.fixture
async def make_node(tmp_path: Path, models_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts in-process nodes (``await make_node(name, redis_url=..., jobs={...})``); all closed afterwards."""
    from v2t_node.app import Node

    nodes: list[Node] = []

    async def make(name: str = "node-a", redis_url: str | None = None, start: bool = True,
                   **sections: dict[str, Any]) -> Node:
        node = Node(node_config(tmp_path / name, models_dir, redis_url, **sections))
        nodes.append(node)
        if start:
            await node.start()
        return node

    yield make
    for node in reversed(nodes):
        await node.close()


class NodeProcess:
    """``v2t-node start`` as a real process (for kill -9 and signal tests)."""

    def __init__(self, data_dir: Path, models_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.args = [sys.executable, "-m", "v2t_node", "--data-dir", str(data_dir), "--models-dir", str(models_dir),
                     "start", "--port", str(self.port), "--node-id", data_dir.name, *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> "NodeProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.1)
        raise TimeoutError(f"node not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: the whole process group would include the embedded server; only the node is killed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def node_process(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., NodeProcess]]:
    procs: list[NodeProcess] = []

    def make(name: str, *args: str, env: dict[str, str] | None = None) -> NodeProcess:
        p = NodeProcess(tmp_path / name, models_dir, *args, env=env)
        procs.append(p)
        return p.start()

    yield make
    for p in procs:
        p.stop(signal.SIGKILL if p.process and p.process.poll() is None else signal.SIGTERM)


async def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Polls an (async or sync) predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def fast_env(**extra: str) -> dict[str, str]:
    """The FAST_JOBS clocks as V2T_* variables, for node processes."""
    env = {f"V2T_JOBS_{k.upper()}": str(v) for k, v in FAST_JOBS.items()}
    env.update(V2T_POOL_PROCESSES="1", V2T_POOL_THREADS="2", **extra)
    return env


