"""The parent of `synapse-router --processes N` (Linux): starts the N children, forwards
signals to them, restarts the ones that die, and serves their merged metrics.

Each child (childprocess.py) is this launcher with a hidden `--launcher-child` flag and a
complete router on the same port. The parent forwards SIGINT, SIGTERM and SIGHUP (configuration
reload) to them; on SIGINT/SIGTERM each child drains (graceful stop, addons/graceful_stop.py)
and the parent exits when they all have (with the first non-zero status, else 0). The children
run in a process group of their own, so a terminal's Ctrl-C reaches the parent alone and each
child gets one SIGINT (a second one stops at once). Process 1 is started alone first, so a bad
configuration is reported once; the others start when it serves, and if one of them cannot
start, all are stopped. Later, a child that dies (a crash, the OOM killer, a SIGKILL) is
restarted in its slot at once, logged, and counted in `synapse_router_process_restarts_total`
(the parent's merged metrics); one that dies again within STABLE_AFTER seconds of its start is
restarted after a back-off doubling from 1 s to MAX_BACKOFF. With `--replace PID` the parent
sends SIGTERM to PID once all N serve (a rolling restart). Routing needs no coordination:
rendezvous hashing over the same configuration sends a user (or room) to the same worker from
every process. Each process has its own identity cache (`whoami.redis` shares one), health
checks and balance state (`round_robin`/`least_conn` are per process).

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from types import FrameType

from . import sdnotify
from .childprocess import ChildSlot
from .commandline import PROG, configured_metrics_listen, metrics_listen
from .processmetrics import MergedMetricsServer

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STABLE_AFTER = 30.0  # seconds: a child that ran this long before dying is restarted at once
MAX_BACKOFF = 30.0  # seconds: the longest wait before restarting a child that keeps dying
POLL_INTERVAL = 0.1  # seconds between looks for an exited child while a restart is pending


def restart_delay(failures: int) -> float:
    """Seconds before restarting a child that died `failures` times in a row, each within
    STABLE_AFTER of its start: at once the first time, then 1, 2, 4, ... MAX_BACKOFF."""
    return 0.0 if failures <= 1 else min(MAX_BACKOFF, 2.0 ** (failures - 2))


def exit_description(code: int) -> str:
    """`Popen.returncode` as an operator reads it: "status 3", "signal SIGKILL"."""
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


@dataclass
class Child:
    slot: ChildSlot
    proc: subprocess.Popen[bytes]
    ready_read: int
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """The `--processes N` parent: starts the children, forwards signals, reaps and restarts
    them, and serves their merged metrics."""

    def __init__(self, argv: Sequence[str], count: int, quiet: bool, replace: int | None = None) -> None:
        self.argv = list(argv)
        self.count = count
        self.quiet = quiet
        self.replace = replace
        self.children: dict[int, Child] = {}  # pid -> child, while running
        self.stopping = False
        self.status = 0
        self.metrics: MergedMetricsServer | None = None
        self.failures: dict[int, int] = {}  # slot index -> deaths in a row, each soon after its start
        self.restarts: dict[int, int] = dict.fromkeys(range(count), 0)  # slot index -> restarts
        self.pending: dict[int, float] = {}  # slot index -> when (monotonic) to restart it

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        """The signal handler: it may run nested (two quick SIGHUPs), so it only asks; the
        configuration is read where it is acted on, once per ask, the last file winning."""
        if signum != signal.SIGHUP:
            self.stopping = True
        elif self.metrics is not None:
            self.metrics.reload(partial(configured_metrics_listen, self.argv))
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _start(self, index: int) -> Child:
        ready_read, ready_write = os.pipe()
        slot = ChildSlot(index, self.count, os.getpid(), ready_write)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synapse_router.launcher.main", *self.argv, slot.flag()],
                pass_fds=(ready_write,),
                process_group=0,  # Ctrl-C in a terminal: the parent forwards one SIGINT
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

    def _reap(self, block: bool) -> None:
        """Wait for any child to exit (without reaping it behind Popen's back; `block` False:
        only look), then reap it, and plan its restart unless the parent is stopping."""
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
        except ChildProcessError:
            self.children.clear()
            return
        if info is None or info.si_pid not in self.children:
            return
        child = self.children.pop(info.si_pid)
        code = child.proc.wait()
        if self.stopping:
            status = 128 - code if code < 0 else code
            if status and not self.status:
                self.status = status
            return
        index = child.slot.index
        lived = time.monotonic() - child.started
        self.failures[index] = 1 if lived >= STABLE_AFTER else self.failures.get(index, 0) + 1
        delay = restart_delay(self.failures[index])
        self.pending[index] = time.monotonic() + delay
        when = "at once" if delay == 0 else f"in {delay:g}s (it died {self.failures[index]} times in a row)"
        self.warn(
            f"{child.slot.label} (pid {child.proc.pid}) exited ({exit_description(code)}) after {lived:.1f}s; "
            f"restarting it {when}"
        )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, due in sorted(self.pending.items()):
            if due > now or self.stopping:
                continue
            del self.pending[index]
            child = self._start(index)
            self.restarts[index] += 1
            if self._wait_ready(child):
                self.warn(
                    f"{child.slot.label} restarted (pid {child.proc.pid}) and serving; "
                    f"restarts of this process: {self.restarts[index]}"
                )

    def run(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)
        try:
            # The first process alone: a bad configuration is reported once, not N times.
            if not self._wait_ready(self._start(0)):
                self.stopping = True  # it could not start (it said why): no restart
            elif not self.stopping:
                self.metrics = MergedMetricsServer(
                    self.count, self.warn, lambda: dict(self.restarts), stopping=lambda: self.stopping
                )
                self.metrics.serve(metrics_listen(self.argv))
                rest = [self._start(i) for i in range(1, self.count)]
                started = [self._wait_ready(child) for child in rest]  # every pipe read and closed
                if self.stopping:
                    pass
                elif all(started):
                    pids = ", ".join(str(pid) for pid in self.children)
                    self.say(f"{self.count} processes serving (pids {pids})")
                    sdnotify.ready()  # systemd Type=notify
                    if self.replace is not None:
                        self._replace(self.replace)
                else:  # all or nothing at start-up; later, a child that dies is restarted
                    self.say("a process failed to start: stopping the others")
                    self._forward(signal.SIGTERM, None)
            while self.children or (self.pending and not self.stopping):
                if self.pending and not self.stopping:
                    self._restart_due()
                    self._reap(block=False)
                    time.sleep(POLL_INTERVAL)
                else:
                    self._reap(block=True)
            return self.status
        finally:
            for pid in list(self.children):  # only on an unexpected error in the parent itself
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for child in list(self.children.values()):
                child.proc.wait()
            if self.metrics is not None:
                self.metrics.stop()

    def _replace(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as e:
            self.warn(f"--replace {pid}: {e.strerror or e}")
            return
        self.say(f"SIGTERM sent to pid {pid}, which drains (--replace)")
