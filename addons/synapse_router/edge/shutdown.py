"""Graceful stop: the `shutdown` key of the configuration.

    shutdown: {grace: 35}

On SIGTERM (or a first SIGINT) the router stops accepting connections at once, closes its idle
keep-alive connections, lets every request in flight finish (long-polls included, whether
mitmproxy forwards them or the router sends them itself) and answers each with
`Connection: close`, then exits 0. `grace` (seconds, default 35: longer than the 30 s
long-polls clients usually send) bounds the wait; requests still in flight then are closed
and counted in the log. A second SIGTERM/SIGINT stops at once.

This module is the pure half (ShutdownConfig, parse_shutdown, the log lines); the mitmproxy
addon is addons/graceful_stop.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_GRACE = 35.0


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    grace: float = DEFAULT_GRACE  # seconds in-flight requests get after SIGTERM


class ShutdownConfigError(ValueError):
    """A bad `shutdown` value; `key` is the sub-key ("" for the mapping itself)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"shutdown.{key}: {reason}" if key else f"shutdown: {reason}")


_KEYS = ("grace",)


def parse_shutdown(raw: object) -> ShutdownConfig:
    """The `shutdown` mapping (None: the defaults); raise ShutdownConfigError naming the key."""
    if raw is None:
        return ShutdownConfig()
    if not isinstance(raw, dict):
        raise ShutdownConfigError("", f"expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            raise ShutdownConfigError(str(key), f"unknown key; expected one of {', '.join(_KEYS)}")
    grace = raw.get("grace", DEFAULT_GRACE)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not math.isfinite(grace) or grace < 0:
        raise ShutdownConfigError("grace", f"must be a number >= 0 (seconds), got {grace!r}")
    return ShutdownConfig(grace=float(grace))


def stopping_line(grace: float, idle: int, requests: int, connections: int, paced: int = 0) -> str:
    told = f", {paced} paced request(s) ended (told to retry, or gone)" if paced else ""
    return (
        f"synapse-router: stopping: no new connections, {idle} idle connection(s) closed{told}; waiting up to "
        f"{grace:g}s for {requests} request(s) in flight on {connections} connection(s)"
    )


def drained_line(elapsed: float) -> str:
    return f"synapse-router: stopped gracefully: every request in flight answered ({elapsed:.1f}s)"


def grace_over_line(grace: float, requests: int, connections: int) -> str:
    return (
        f"synapse-router: grace of {grace:g}s over: closing {requests} request(s) still in flight "
        f"on {connections} connection(s)"
    )


def immediate_line(requests: int, connections: int) -> str:
    return (
        f"synapse-router: second stop signal: stopping now, closing {requests} request(s) still in flight "
        f"on {connections} connection(s)"
    )
