"""What a round may leave behind: tasks, and sockets this process still holds to a server.

Sockets are read from /proc (Linux): the process's socket inodes, matched against the TCP table, so
only connections from *this process* to the given port count — the far end's sockets do not.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path


def client_tasks() -> set[asyncio.Task]:
    """Tasks on this loop, less the fake server's own request handlers (they are the far end)."""
    return {t for t in asyncio.all_tasks() if not t.get_coro().__qualname__.startswith("RequestHandler.")}


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


# TCP states that still hold a connection open (not TIME_WAIT/CLOSE: those are gone from the fd table).
_OPEN_STATES = {
    "01",
    "02",
    "03",
    "04",
    "05",
    "08",
    "09",
    "0B",
}  # ESTABLISHED, SYN_*, FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING


def client_connections(port: int) -> int:
    """Open TCP connections this process holds *to* 127.0.0.1:port (client side only)."""
    mine = _socket_inodes()
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            remote_port = int(cols[2].rsplit(":", 1)[1], 16)
            if remote_port == port and cols[3] in _OPEN_STATES and cols[9] in mine:
                count += 1
    return count


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
