"""mitmproxy's Dumper (mitmdump's per-flow output): printed flows go through a transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy import http


def print_flows_through(master: Any, transform: Callable[[http.HTTPFlow], http.HTTPFlow]) -> bool:
    """Make mitmdump's Dumper (the addon named "dumper": mitmdump's and the lean launcher's) print
    `transform(flow)` instead of each HTTP flow, leaving the flow itself (what is relayed, what
    mitmweb and saved flows hold) as it is. Internal: every Dumper hook that prints an HTTP flow
    (`response`, `error`, `http_connect_error`) calls its `echo_flow(flow)` method, looked up on
    the instance. False when there is no Dumper (mitmweb) or it has no such method."""
    dumper = master.addons.get("dumper")
    if dumper is None:
        return False
    echo_flow = getattr(type(dumper), "echo_flow", None)
    if not callable(echo_flow):
        return False
    if getattr(dumper.echo_flow, "_synapse_router", False):
        return True  # already (a second `running`)

    def echo_shown(flow: Any) -> None:
        echo_flow(dumper, transform(flow) if isinstance(flow, http.HTTPFlow) else flow)

    echo_shown._synapse_router = True  # type: ignore[attr-defined]
    dumper.echo_flow = echo_shown
    return True
