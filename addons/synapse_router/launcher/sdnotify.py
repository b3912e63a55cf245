"""systemd's readiness protocol (sd_notify), for `Type=notify` units: `READY=1` once the
router serves, so `systemctl start` returns only then (a rolling restart switches units on it).

A datagram to the AF_UNIX socket named in $NOTIFY_SOCKET (a leading "@": the abstract
namespace); nothing without it. Only the process systemd started sends it (a `--processes`
parent once all N serve, or a lone router): its children inherit the variable and stay silent.
"""

from __future__ import annotations

import contextlib
import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; True if sent, False without a notify socket
    or if it cannot be reached."""
    path = (os.environ if environ is None else environ).get(NOTIFY_SOCKET, "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
        return True
    return False


def ready() -> None:
    """Tell systemd the router serves (a no-op outside a `Type=notify` unit)."""
    notify("READY=1")
