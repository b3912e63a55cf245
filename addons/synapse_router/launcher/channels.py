"""The `--processes` parent's private line to each process's metrics endpoint.

The parent scrapes every process's `/metrics` and asks its `/ready` to serve them merged. Over
the processes' own TCP ports (P + i) it could reach another router's process: in a rolling
restart (`--replace`) the old and the new router's process i share P + i (SO_REUSEPORT), so the
new parent would merge the old process's counters or pass on its `/ready` "stopping"; and a
reload that moves `metrics.listen` moves P + i while the parent asks. So the parent makes, once
per slot, a listening Unix socket under an unguessable abstract name (Linux), which every
process started in that slot inherits and serves the same endpoint on; nobody else knows the
name, and it never moves. The socket outlives the processes of its slot: one asked while its
process is being restarted is asked again once the new one serves (or the scrape times out).
"""

from __future__ import annotations

import secrets
import socket

BACKLOG = 64  # the parent's scrapes and readiness checks in flight to one process


class ProcessChannels:
    """One listening Unix socket per slot (0-based), held by the parent for its whole life."""

    def __init__(self, count: int) -> None:
        token = secrets.token_hex(16)
        self.addresses: list[str] = []
        self._sockets: list[socket.socket] = []
        try:
            for index in range(count):
                address = f"\0synapse-router-{token}-{index + 1}"
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sockets.append(sock)
                sock.bind(address)
                sock.listen(BACKLOG)
                self.addresses.append(address)
        except OSError:
            self.close()
            raise

    def fileno(self, index: int) -> int:
        """The listening socket of slot `index`, for its process to inherit (`pass_fds`)."""
        return self._sockets[index].fileno()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []


def served_socket(fd: int) -> socket.socket:
    """The listening socket a process inherited for its slot (its endpoint serves it too)."""
    return socket.socket(fileno=fd)
