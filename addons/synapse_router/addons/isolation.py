"""One part of the router failing on one event does not take the others down with it.

mitmproxy calls a parent addon's hooks and its children's inside one `safecall`: an exception
in one child skips every later child for that event (under mitmdump, a failing
`ConnectionLimits.response` meant no redaction, no access-log line and an in-flight count
never decremented), while the lean launcher's hook cache goes on to the next. Each per-flow and
per-connection hook of each part is wrapped so that both launchers do the same thing, the
better one: the failure is logged, and the later parts run.

The log line names the part, the hook, the exception's type and where it was raised, never its
message or the traceback's values: either may quote a client's bytes (a header, a token).
Lifecycle hooks (load, configure, running, done) are not wrapped: an OptionsError from
`configure` is how a bad option stops start-up.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mitmproxy import exceptions

log = logging.getLogger("synapse_router")

# mitmproxy's hooks that concern one flow or one connection (mitmproxy.hooks.all_hooks once the
# proxy layers are imported, minus the lifecycle ones and those of modes a router never runs).
FLOW_HOOKS = frozenset(
    {
        "client_connected",
        "client_disconnected",
        "server_connect",
        "server_connected",
        "server_connect_error",
        "server_disconnected",
        "next_layer",
        "requestheaders",
        "request",
        "responseheaders",
        "response",
        "error",
        "tls_clienthello",
        "tls_start_client",
        "tls_start_server",
        "tls_established_client",
        "tls_established_server",
        "tls_failed_client",
        "tls_failed_server",
        "tcp_start",
        "tcp_message",
        "tcp_end",
        "tcp_error",
        "websocket_start",
        "websocket_message",
        "websocket_end",
    }
)


def isolate_hooks(parts: Iterable[object]) -> None:
    """Wrap each flow and connection hook of each part (an instance attribute shadowing the
    method: mitmproxy and the lean launcher find hooks with getattr)."""
    for part in parts:
        for name in FLOW_HOOKS:
            method = getattr(part, name, None)
            if callable(method):
                setattr(part, name, _isolated(method, f"{type(part).__name__}.{name}"))


def _isolated(method: Callable[..., Any], owner: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def hook(*args: Any) -> Any:
        try:
            result = method(*args)
        except exceptions.AddonHalt:
            raise
        except Exception as e:
            report(owner, e)
            return None
        if result is not None and inspect.isawaitable(result):
            return _awaited(result, owner)
        return result

    return hook


async def _awaited(result: Awaitable[Any], owner: str) -> None:
    try:
        await result
    except exceptions.AddonHalt:
        raise
    except Exception as e:
        report(owner, e)


def report(owner: str, error: Exception) -> None:
    """Log a part's failure without the exception's message or values."""
    frames = traceback.extract_tb(error.__traceback__)[1:]  # the first is this module's wrapper
    where = " <- ".join(f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames[-4:]))
    log.error(f"synapse-router: {owner} failed with {type(error).__name__} at {where}; the other parts carried on")


def _short(filename: str) -> str:
    for marker in ("/synapse_router/", "/mitmproxy/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return filename.rsplit("/", 1)[-1]
