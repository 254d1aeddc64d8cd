"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import contextlib
import socket

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks the port (bind to port 0, read it back). Another process may grab it before
    the caller binds it, so servers that can bind port 0 themselves should prefer that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free ports on 127.0.0.1.

    All sockets are held open until every port is chosen, so the ports are pairwise distinct
    (calling :func:`free_port` repeatedly may return the same port twice).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOCALHOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def is_listening(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
