"""The connections waiting in a listening socket's accept queue, taken before it is closed.

Closing a listener resets every connection still in its queue: the client sees its connection
refused or reset although a router (the same process draining, or a new one sharing the port with
SO_REUSEPORT) would have answered it. Whoever closes a listener first accepts what waits.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def accept_waiting(fileno: int) -> list[socket.socket]:
    """Accept, without blocking, every connection waiting in the queue of listening socket
    `fileno` (left open: the caller closes it right after, nothing running in between)."""
    accepted = []
    with socket.socket(fileno=os.dup(fileno)) as listening:
        listening.setblocking(False)
        while True:
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # out of descriptors: the rest are reset with the listener
                log.warning(f"synapse-router: accepting the connections queued at stop: {e.strerror or e}")
                break
            accepted.append(conn)
    return accepted
