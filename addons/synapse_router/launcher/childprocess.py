"""One of the N processes of `synapse-router --processes N`: what a child does that a lone
router does not (the parent is supervisor.py).

A child is this launcher started with a hidden `--launcher-child=INDEX/COUNT/PARENT_PID/FD`
flag (ChildSlot). It asks the kernel to SIGTERM it if the parent dies (PR_SET_PDEATHSIG), so a
SIGKILLed parent leaves no orphan, and writes one byte to the pipe FD once it serves.

Sharing the port. mitmproxy's `AsyncioServerInstance.listen` calls
`asyncio.start_server(handler, host, port)` without `reuse_port`. A child runs on an event loop
of its own class (SharedPorts, over asyncio's or uvloop's loop) whose `create_server` adds
`reuse_port=True` for the proxy's listen ports, so each child binds its own SO_REUSEPORT socket
and no mitmproxy class is changed (a `ServerInstance` subclass registers itself for its mode and
mitmproxy refuses a second `reverse` class; replacing `ReverseInstance.listen` would patch mitmproxy process-wide).
Against the alternative, one socket bound by the parent and inherited by every child (one
shared accept queue): with SO_REUSEPORT the kernel spreads new connections evenly by a hash of
the 4-tuple and wakes one process per connection, with no thundering herd; but it does not look
at load (a busy child still gets its share, where a shared queue lets the idle one accept
first), connections still waiting in a child's own queue when that child exits are reset, and
any other process of the same user that sets SO_REUSEPORT on the port would silently share it.
A keep-alive connection stays on one process either way. With `metrics.listen` on port P,
process i (1-based) serves its own metrics on P + i (the parent serves them merged on P).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions, options
from mitmproxy.proxy.mode_specs import ProxyMode

from ..addon import SynapseRouter
from ..routing.upstream import parse_listen
from .commandline import PROG

log = logging.getLogger(__name__)

CHILD_FLAG = "--launcher-child"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ChildSlot:
    """Who a child process is: `index` of `count` (0-based), its parent, the pipe it writes one
    byte to once it serves, and the listening socket of its slot's private channel to the
    parent, on which it serves its metrics endpoint too (channels.py; -1: none)."""

    index: int
    count: int
    parent_pid: int
    ready_fd: int
    channel_fd: int = -1

    def flag(self) -> str:
        return f"{CHILD_FLAG}={self.index}/{self.count}/{self.parent_pid}/{self.ready_fd}/{self.channel_fd}"

    @classmethod
    def parse(cls, text: str) -> ChildSlot:
        try:
            index, count, parent_pid, ready_fd, channel_fd = (int(part) for part in text.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected INDEX/COUNT/PARENT_PID/FD/FD, got {text!r}") from None
        return cls(index, count, parent_pid, ready_fd, channel_fd)

    @property
    def label(self) -> str:
        return f"process {self.index + 1}/{self.count}"


class SharedPorts:
    """What the event loop of every `synapse-router` process adds to its base loop (asyncio's
    selector loop, SharedPortLoop, or uvloop's, eventloop.py). Listening sockets on
    `shared_ports` get SO_REUSEPORT, so N children can serve one port, and a new router can take
    over the port of one that drains (`--replace`, a rolling restart); in a `--processes` child
    the router's metrics listener moves to port + `metrics_offset` (process i serves its own
    metrics on P + i)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_ports: frozenset[int] = frozenset()
        self.lone = False  # a lone router (not a --processes child): say if the port is already served
        self.metrics_offset = 0
        self.metrics_port: Callable[[], int | None] = lambda: None

    def share(self, opts: options.Options, slot: ChildSlot | None, router: SynapseRouter) -> None:
        """Share the listen ports of `opts`; a child (`slot`) serves `router`'s metrics on its own
        port. OptionsError if a child has no fixed listen port."""
        if slot is None:
            with contextlib.suppress(exceptions.OptionsError):  # an ephemeral port: nothing to share
                self.shared_ports = listen_ports(opts)
            self.lone = True
            return
        self.shared_ports = listen_ports(opts)
        self.metrics_offset = slot.index + 1
        self.metrics_port = lambda: metrics_port(router)

    async def create_server(
        self, protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any
    ) -> asyncio.Server:
        if port and port in self.shared_ports:
            kwargs["reuse_port"] = True
            if self.lone and port_in_use(host, port):
                log.warning(
                    f"{PROG}: port {port} is already served by another process: this router shares it "
                    "(SO_REUSEPORT) until that one stops (--replace PID stops it once this one serves)"
                )
        elif port and self.metrics_offset and port == self.metrics_port():
            port += self.metrics_offset  # said by the metrics listener, with the bound address (listener.py)
        return await super().create_server(protocol_factory, host, port, **kwargs)  # type: ignore[misc, no-any-return]


class SharedPortLoop(SharedPorts, asyncio.SelectorEventLoop):
    """asyncio's own event loop with SharedPorts: the default."""


def listen_ports(opts: options.Options) -> frozenset[int]:
    """The proxy's listen ports; OptionsError for a mode without a fixed one."""
    ports = set()
    for spec in opts.mode:
        port = ProxyMode.parse(spec).listen_port(opts.listen_port)
        if not port:
            raise exceptions.OptionsError(  # type: ignore[no-untyped-call]
                f"--processes needs a fixed listen port, not {port} (mode {spec}; e.g. reverse:URL@8080)"
            )
        ports.add(port)
    return frozenset(ports)


def port_in_use(host: Any, port: int) -> bool:
    """Whether a socket already listens on (host, port): a bind without SO_REUSEPORT fails then
    (SO_REUSEADDR, as asyncio's own, so that connections in TIME_WAIT do not count)."""
    hosts = [host] if isinstance(host, str) and host else ["0.0.0.0"]
    for address in hosts:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def metrics_port(router: SynapseRouter) -> int | None:
    listen = router.engine.config.metrics_listen if router.engine is not None else None
    return parse_listen(listen)[1] if listen else None


def ready_signal(slot: ChildSlot) -> Callable[[], None]:
    """What tells the parent "serving" (StartupCheck's `on_started`)."""

    def ready() -> None:
        log.info(f"{PROG}: {slot.label} (pid {os.getpid()}) serving")
        with contextlib.suppress(OSError):
            os.write(slot.ready_fd, b"1")
            os.close(slot.ready_fd)

    return ready


def replace(pid: int) -> Callable[[], None]:
    """What a router started with `--replace PID` does once it serves: SIGTERM the router it
    replaces, which then drains while this one takes every new connection on the port."""

    def stop_replaced() -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as e:
            log.warning(f"{PROG}: serving; --replace {pid}: {e.strerror or e}")
            return
        log.info(f"{PROG}: serving; SIGTERM sent to pid {pid}, which drains (--replace)")

    return stop_replaced


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(f"{PROG}: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)
