"""CPU time, memory and children of processes, from /proc (Linux), for the benchmark scripts.

from scripts.procstat import cpu_seconds, process_tree  # after putting the repo root on sys.path
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of the processes `pids`, summed, in seconds (one that has exited
    counts 0)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLK_TCK


def children(pid: int) -> list[int]:
    """The direct children of `pid` (started by any of its threads)."""
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    pids = [pid]
    for child in children(pid):
        pids += process_tree(child)
    return pids


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """A memory figure of /proc/PID/status in KiB: resident now (VmRSS) or at peak (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0
