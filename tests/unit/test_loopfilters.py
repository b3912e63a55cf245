"""LoopExceptionFilters (loopfilters.py): one handler for every part's filters, whatever order
they come and go in; the loop's own handler back when the last goes."""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons
from synapse_router.addons.connection_limits import ConnectionLimits
from synapse_router.addons.graceful_stop import GracefulStop
from synapse_router.addons.state import RouterState
from synapse_router.observability.loopfilters import LoopExceptionFilters
from synapse_router.observability.metrics import RouterMetrics


async def test_filters_removed_in_any_order_restore_the_loops_handler() -> None:
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    def original(_loop: Any, context: dict[str, Any]) -> None:
        seen.append(context["message"])

    loop.set_exception_handler(original)
    try:
        filters = LoopExceptionFilters()
        first = lambda context: context["message"] == "first"  # noqa: E731
        second = lambda context: context["message"] == "second"  # noqa: E731
        filters.add(first)
        filters.add(second)
        for message in ("first", "second", "other"):
            loop.call_exception_handler({"message": message})
        assert seen == ["other"]
        filters.remove(first)  # the first added goes first: the other stays in force
        loop.call_exception_handler({"message": "first"})
        loop.call_exception_handler({"message": "second"})
        assert seen == ["other", "first"]
        filters.remove(second)
        assert loop.get_exception_handler() is original
        assert not filters.installed
    finally:
        loop.set_exception_handler(None)


async def test_connection_limits_and_graceful_stop_leave_no_handler_at_shutdown() -> None:
    """ConnectionLimits installs its filter when running, GracefulStop its own when a stop
    begins; mitmproxy calls `done` in chain order (limits first). Chained by hand, the limits'
    handler stayed installed after both were done."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(None)
    state = RouterState()
    limits = ConnectionLimits(RouterMetrics(), loop_filters=LoopExceptionFilters())
    stop = GracefulStop(limits, state)
    with taddons.context(limits, Proxyserver()):
        limits.running()
        stop._ignore_closed_listener_retries()  # what the drain does first
        assert loop.get_exception_handler() is not None
        limits.done()
        stop.done()
        assert loop.get_exception_handler() is None
