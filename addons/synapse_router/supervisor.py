"""The parent of `synapse-router --processes N` (Linux): starts the N children, forwards
signals to them, reaps them, and serves their merged metrics.

Each child (childprocess.py) is this launcher with a hidden `--launcher-child` flag and a
complete router on the same port. The parent forwards SIGINT, SIGTERM and SIGHUP (configuration
reload) to them, restarts none, and exits when they have all exited (with the first non-zero
status, else 0). Process 1 is started alone first, so a bad configuration is reported once; the
others start when it serves, and if one of them cannot start, all are stopped (later, the
survivors of a crash keep serving). Routing needs no coordination: rendezvous hashing over the
same configuration sends a user (or room) to the same worker from every process. Each process
has its own identity cache (`whoami.redis` shares one), health checks and balance state
(`round_robin`/`least_conn` are per process).

Metrics (`metrics.listen`, port P): process i (1-based) serves its own on P + i, and the parent
serves on P all of them merged, each sample labelled `process="i"` (processmetrics.py), so one
scrape target covers N processes; pick P outside the ephemeral port range (9105 is) with the
next N ports free. The parent finds P in the `--set router_config=` file (again on SIGHUP).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from .childprocess import ChildSlot
from .commandline import PROG, metrics_listen
from .processmetrics import MergedMetricsServer

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Child:
    slot: ChildSlot
    proc: subprocess.Popen[bytes]
    ready_read: int


class Supervisor:
    """The `--processes N` parent: starts the children, forwards signals, reaps them, and
    serves their merged metrics."""

    def __init__(self, argv: Sequence[str], count: int, quiet: bool) -> None:
        self.argv = list(argv)
        self.count = count
        self.quiet = quiet
        self.children: dict[int, Child] = {}  # pid -> child, while running
        self.stopping = False
        self.status = 0
        self.metrics: MergedMetricsServer | None = None

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        elif self.metrics is not None:
            self.metrics.serve(metrics_listen(self.argv))
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _start(self, index: int) -> Child:
        ready_read, ready_write = os.pipe()
        slot = ChildSlot(index, self.count, os.getpid(), ready_write)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synapse_router.launcher", *self.argv, slot.flag()], pass_fds=(ready_write,)
            )
        finally:
            os.close(ready_write)
        child = Child(slot, proc, ready_read)
        self.children[proc.pid] = child
        return child

    @staticmethod
    def _wait_ready(child: Child) -> bool:
        """True once the child serves; False if it exited first (its write end closed)."""
        try:
            return os.read(child.ready_read, 1) == b"1"
        finally:
            os.close(child.ready_read)

    def _reap(self) -> None:
        """Wait for any child to exit (without reaping it behind Popen's back), then reap it."""
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            self.children.clear()
            return
        if info is None or info.si_pid not in self.children:
            return
        child = self.children.pop(info.si_pid)
        code = child.proc.wait()
        code = 128 - code if code < 0 else code
        if code and not self.status:
            self.status = code
        if not self.stopping and self.children:
            self.say(f"{child.slot.label} (pid {child.proc.pid}) exited with {code}; {len(self.children)} left")

    def run(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)
        try:
            # The first process alone: a bad configuration is reported once, not N times.
            if self._wait_ready(self._start(0)) and not self.stopping:
                self.metrics = MergedMetricsServer(self.count, self.warn)
                self.metrics.serve(metrics_listen(self.argv))
                rest = [self._start(i) for i in range(1, self.count)]
                started = [self._wait_ready(child) for child in rest]  # every pipe read and closed
                if self.stopping:
                    pass
                elif all(started):
                    pids = ", ".join(str(pid) for pid in self.children)
                    self.say(f"{self.count} processes serving (pids {pids})")
                else:  # all or nothing at start-up; later, the survivors keep serving
                    self.say("a process failed to start: stopping the others")
                    self._forward(signal.SIGTERM, None)
            while self.children:
                self._reap()
            return self.status
        finally:
            for pid in list(self.children):  # only on an unexpected error in the parent itself
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for child in list(self.children.values()):
                child.proc.wait()
            if self.metrics is not None:
                self.metrics.stop()
