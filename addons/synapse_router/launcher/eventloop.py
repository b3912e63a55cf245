"""Which event loop a `synapse-router` process runs on: asyncio's own (the default) or uvloop's
(`--event-loop uvloop`, or the environment variable SYNAPSE_ROUTER_EVENT_LOOP=uvloop; the flag
wins). Either way the loop is SharedPorts' (childprocess.py), so `--processes` and `--replace`
share the port as before. uvloop is an optional dependency (`pip install 'synapse-router[uvloop]'`).

Only the lean launcher can choose: mitmdump makes its loop (`asyncio.run` in
mitmproxy.tools.main) before it loads any script, and an addon cannot change a running loop.

What differs on uvloop (docs/benchmarks.md has the figures): the router's accept handler that
takes up to `limits.listen_backlog` connections per wake-up (addons/listen_backlog.py) uses
asyncio's selector-loop internals and is not installed; libuv itself accepts until the queue is
empty on each wake-up (no `max_connections` bound per batch: connections over the limit are
closed at once by ConnectionLimits, as with asyncio). The raised listen backlog applies on both.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Mapping, Sequence

from .childprocess import SharedPortLoop, SharedPorts

EVENT_LOOPS = ("asyncio", "uvloop")
DEFAULT = "asyncio"
FLAG = "--event-loop"
ENVIRONMENT = "SYNAPSE_ROUTER_EVENT_LOOP"


def parse_event_loop(value: str, where: str) -> str:
    """`value` if it names an event loop, else ValueError naming `where` (the flag or variable)."""
    if value not in EVENT_LOOPS:
        raise ValueError(f"{where}: expected one of {', '.join(EVENT_LOOPS)}, got {value!r}")
    return value


def chosen_event_loop(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The event loop a command line and environment ask for: the last `--event-loop NAME` (or
    `--event-loop=NAME`), else SYNAPSE_ROUTER_EVENT_LOOP when set and not empty, else asyncio.
    ValueError for an unknown name or a flag without one."""
    chosen: str | None = None
    arguments = iter(argv)
    for arg in arguments:
        if arg == "--":
            break
        if arg == FLAG:
            value = next(arguments, None)
            if value is None:
                raise ValueError(f"{FLAG}: expected one of {', '.join(EVENT_LOOPS)}")
            chosen = parse_event_loop(value, FLAG)
        elif arg.startswith(FLAG + "="):
            chosen = parse_event_loop(arg.removeprefix(FLAG + "="), FLAG)
    if chosen is not None:
        return chosen
    value = environ.get(ENVIRONMENT, "")
    return parse_event_loop(value, ENVIRONMENT) if value else DEFAULT


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The class of the event loop `name` (SharedPorts on its base); ValueError when uvloop is
    asked for and not installed."""
    if name == "asyncio":
        return SharedPortLoop
    if name != "uvloop":
        raise ValueError(f"unknown event loop {name!r}")
    if not uvloop_available():
        raise ValueError("uvloop is not installed (pip install 'synapse-router[uvloop]', or pip install uvloop)")
    import uvloop

    class UvloopSharedPortLoop(SharedPorts, uvloop.Loop):  # type: ignore[misc]
        """uvloop's event loop with SharedPorts."""

    return UvloopSharedPortLoop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """What a running loop is, for the start-up log line: "uvloop" or "asyncio"."""
    return "uvloop" if any(c.__module__.startswith("uvloop") for c in type(loop).__mro__) else "asyncio"
