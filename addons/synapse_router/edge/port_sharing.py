"""Whether another socket listens on the address one of ours listens on: a router that replaces
this one (`--replace`) and shares the address with SO_REUSEPORT. Read from the kernel's socket
tables (Linux: /proc/net/tcp and /proc/net/tcp6 of this network namespace), where a socket is
named by its inode, the `st_ino` of its descriptor."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
LISTEN = "0A"  # the state column of a listening socket


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def listening(table: str) -> dict[str, set[int]]:
    """Local address (as the table writes it, `0100007F:2AF9`) -> inodes of the sockets that
    listen on it, from the text of one socket table."""
    found: dict[str, set[int]] = {}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] == LISTEN and fields[9].isdigit():
            found.setdefault(fields[1], set()).add(int(fields[9]))
    return found


def shared_with_another(sockets: Iterable[HasFileno], tables: Iterable[Path] = TABLES) -> bool:
    """True if a socket that is not one of `sockets` listens on the address of one of them.
    False where the tables cannot be read (not Linux): nothing is known to share it."""
    ours = set()
    for sock in sockets:
        try:
            ours.add(os.fstat(sock.fileno()).st_ino)
        except (OSError, ValueError):  # closed meanwhile
            continue
    if not ours:
        return False
    for table in tables:
        try:
            text = table.read_text()
        except OSError:
            continue
        for inodes in listening(text).values():
            if inodes & ours and inodes - ours:
                return True
    return False
