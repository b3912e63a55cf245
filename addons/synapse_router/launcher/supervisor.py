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
next N ports free.

One configuration source (applied.py): the parent reads the `--set router_config=` file at
start and on SIGHUP, and the children read only what it applied, so a restarted child runs
what its siblings run and a bad file is refused once, by the parent, keeping the last good one.

Signals: the handlers only note the signal; the parent's one loop acts on it (it waits in
`select` on the signal wakeup fd, SIGCHLD included, and the ready pipes of children starting),
so a handler never runs a reload inside another, and a reload never runs inside a wait.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from ..config import ConfigError
from . import sdnotify
from .applied import AppliedConfig
from .channels import ProcessChannels
from .childprocess import ChildSlot
from .commandline import PROG, router_config_path
from .processmetrics import MergedMetricsServer

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STABLE_AFTER = 30.0  # seconds: a child that ran this long before dying is restarted at once
MAX_BACKOFF = 30.0  # seconds: the longest wait before restarting a child that keeps dying


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
        # slot indexes whose process said it serves and has not exited (read by the metrics
        # thread: a slot whose process is starting or dead is reported at once, not asked)
        self.serving: set[int] = set()
        self.stopping = False
        self.status = 0
        self.metrics: MergedMetricsServer | None = None
        self.channels = ProcessChannels(count)  # one private line per slot to its process's metrics
        self.failures: dict[int, int] = {}  # slot index -> deaths in a row, each soon after its start
        self.restarts: dict[int, int] = dict.fromkeys(range(count), 0)  # slot index -> restarts
        self.pending: dict[int, float] = {}  # slot index -> when (monotonic) to restart it
        path = router_config_path(self.argv)
        self.applied = AppliedConfig(path) if path else None  # None: the children read their own
        self.signals: list[int] = []  # noted by the handler, acted on by the loop
        self.reload_asked = False
        self._wakeup = (-1, -1)

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        """The signal handler: it only notes the signal (the C handler has already written to
        the wakeup fd, which ends the loop's wait); the loop acts on it."""
        self.signals.append(signum)

    def _act_on_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload_asked = True  # acted on once no child is starting (_loop)
            elif signum != signal.SIGCHLD:
                if not self.stopping and self.metrics is not None and self.metrics.hand_over():
                    self.say("stopping: /health, /ready and /metrics left to the router sharing their address")
                self.stopping = True
                self._signal_children(signum)

    def _signal_children(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _wait(self, fds: Sequence[int], timeout: float | None) -> list[int]:
        """Wait until a signal arrives, one of `fds` is readable, or `timeout` passes; the
        readable ones of `fds`."""
        if self.signals:
            return []
        wakeup = self._wakeup[0]
        readable, _, _ = select.select([wakeup, *fds], [], [], timeout)
        if wakeup in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeup, 512):
                    pass
        return [fd for fd in readable if fd != wakeup]

    def _reload(self) -> None:
        """SIGHUP: apply the operator's file if it is valid (then the children reload it),
        else keep the last good configuration everywhere."""
        self.reload_asked = False
        if self.applied is None:
            self._signal_children(signal.SIGHUP)  # no file named: each child reads its own
            return
        try:
            config = self.applied.refresh()
        except ConfigError as e:
            self.warn(
                f"reload of {self.applied.path} failed, keeping the running configuration "
                f"(of the parent and its {self.count} processes): {e}"
            )
            return
        if self.metrics is not None:
            self.metrics.serve(config.metrics_listen)
        self._signal_children(signal.SIGHUP)

    def _start(self, index: int) -> Child:
        ready_read, ready_write = os.pipe()
        channel = self.channels.fileno(index)
        slot = ChildSlot(index, self.count, os.getpid(), ready_write, channel)
        applied = [self.applied.flag()] if self.applied is not None else []
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synapse_router.launcher.main", *self.argv, slot.flag(), *applied],
                pass_fds=(ready_write, channel),
                process_group=0,  # Ctrl-C in a terminal: the parent forwards one SIGINT
            )
        finally:
            os.close(ready_write)
        child = Child(slot, proc, ready_read)
        self.children[proc.pid] = child
        return child

    def _serving(self, index: int) -> bool:
        """Whether the process of slot `index` serves (asked from the metrics thread)."""
        return index in self.serving

    def _until_ready(self, children: Sequence[Child]) -> bool:
        """True once every one of `children` serves; False if one exited first (its write end
        closed). Signals are acted on meanwhile (a stop is forwarded at once)."""
        waiting = {child.ready_read: child for child in children}
        ready = True
        while waiting:
            self._act_on_signals()
            for fd in self._wait(list(waiting), None):
                child = waiting.pop(fd)
                try:
                    serves = os.read(fd, 1) == b"1"
                finally:
                    os.close(fd)
                if serves and child.proc.returncode is None:
                    self.serving.add(child.slot.index)
                ready = serves and ready
        return ready

    def _reap(self) -> None:
        """Reap every child that exited, and plan its restart unless the parent is stopping."""
        for pid, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.children[pid]
            self.serving.discard(child.slot.index)
            if self.stopping:
                status = 128 - code if code < 0 else code
                if status and not self.status:
                    self.status = status
                continue
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
            if self._until_ready([child]):
                self.warn(
                    f"{child.slot.label} restarted (pid {child.proc.pid}) and serving; "
                    f"restarts of this process: {self.restarts[index]}"
                )

    def _start_all(self) -> None:
        """Process 1 alone (a bad configuration is reported once, not N times), then the rest."""
        if not self._until_ready([self._start(0)]):
            self.stopping = True  # it could not start (it said why): no restart
            return
        if self.stopping:
            return
        if not self._until_ready([self._start(i) for i in range(1, self.count)]):
            if not self.stopping:  # all or nothing at start-up; later, a child that dies is restarted
                self.say("a process failed to start: stopping the others")
                self.stopping = True
                self._signal_children(signal.SIGTERM)
        elif not self.stopping:
            # The merged endpoint only once every process serves: its `/ready` would say 503
            # meanwhile, and in a rolling restart the old router (sharing the address) answers
            # until then. Bound before the old router is told to stop (--replace).
            self.metrics = MergedMetricsServer(
                self.channels.addresses,
                self.warn,
                lambda: dict(self.restarts),
                stopping=lambda: self.stopping,
                info=self.say,
                serving=self._serving,
            )
            self.metrics.serve(self.applied.config.metrics_listen if self.applied and self.applied.config else None)
            with contextlib.suppress(TimeoutError):  # not bound within 10 s: it says why, later
                self.metrics.served()
            pids = ", ".join(str(pid) for pid in self.children)
            self.say(f"{self.count} processes serving (pids {pids})")
            sdnotify.ready()  # systemd Type=notify
            if self.replace is not None:
                self._replace(self.replace)

    def _loop(self) -> None:
        """Until every child has exited (and none is to be restarted): act on the signals,
        reap, restart, then wait for the next signal (SIGCHLD included) or restart due."""
        while True:
            self._act_on_signals()
            if self.reload_asked and not self.stopping:
                self._reload()
            self._reap()
            if not self.stopping:
                self._restart_due()
            if not (self.children or (self.pending and not self.stopping)):
                return
            timeout = None
            if self.pending and not self.stopping:
                timeout = max(0.0, min(self.pending.values()) - time.monotonic())
            self._wait([], timeout)

    def run(self) -> int:
        wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (wakeup_read, wakeup_write)
        previous_wakeup = signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, self._note) for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD)}
        try:
            if self.applied is not None:
                try:
                    self.applied.refresh()
                except ConfigError as e:
                    self.warn(f"router_config {self.applied.path}: {e}")
                    return 1
            self._start_all()
            self._loop()
            return self.status
        finally:
            self._signal_children(signal.SIGTERM)  # only on an unexpected error in the parent itself
            for child in list(self.children.values()):
                child.proc.wait()
            if self.metrics is not None:
                self.metrics.stop()
            if self.applied is not None:
                self.applied.close()
            self.channels.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wakeup_read)
            os.close(wakeup_write)

    def _replace(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as e:
            self.warn(f"--replace {pid}: {e.strerror or e}")
            return
        self.say(f"SIGTERM sent to pid {pid}, which drains (--replace)")
