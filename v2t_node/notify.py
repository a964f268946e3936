"""systemd's notification protocol (``READY=1``, ``STOPPING=1``): one datagram to ``$NOTIFY_SOCKET``."""

import os
import socket


def _send(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return  # not under systemd (or not Type=notify)
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError:
            pass


def ready(status: str = "") -> None:
    _send("READY=1\n" + (f"STATUS={status}\n" if status else ""))


def stopping() -> None:
    _send("STOPPING=1\n")
