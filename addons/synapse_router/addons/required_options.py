"""RequiredOptions: the mitmproxy options a router cannot work without, set and said so."""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx

log = logging.getLogger("synapse_router")

MIN_TCP_TIMEOUT = 360  # seconds: above Synapse's longest long-poll (5 min) plus margin

# mitmproxy options a router cannot work without, and why.
REQUIRED_OPTIONS: dict[str, tuple[Any, str]] = {
    "connection_strategy": (
        "lazy",
        "an eager connection to the main process would fail every request when main is down",
    ),
    "block_global": (False, "clients on public addresses must be served"),
    "keep_host_header": (True, "Synapse must see the client's Host"),
    "anticache": (False, "it strips If-None-Match, which QR-login rendezvous needs"),
    "anticomp": (False, "the router never changes content encoding"),
    "http2": (False, "several long-polls multiplexed on one HTTP/2 connection would starve"),
}


class RequiredOptions:
    def configure(self, updated: set[str]) -> None:
        changes: dict[str, Any] = {}
        for name, (value, why) in REQUIRED_OPTIONS.items():
            if name in updated and name in ctx.options and getattr(ctx.options, name) != value:
                changes[name] = value
                log.info(f"synapse-router: setting {name}={value}: {why}")
        if "tcp_timeout" in updated and "tcp_timeout" in ctx.options and ctx.options.tcp_timeout < MIN_TCP_TIMEOUT:
            changes["tcp_timeout"] = MIN_TCP_TIMEOUT
            log.info(f"synapse-router: raising tcp_timeout to {MIN_TCP_TIMEOUT}s so 5-minute long-polls are never cut")
        if changes:
            ctx.options.update(**changes)  # type: ignore[no-untyped-call]
