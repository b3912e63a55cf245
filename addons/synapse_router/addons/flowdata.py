"""The router's per-flow data in `flow.metadata`, read and written only through these accessors.

Keys are unchanged from the first releases, so saved flows and mitmweb read the same: the
decision under "synapse_router" (a Decision while the flow is live, its `as_dict()` after), and
plain values under "synapse_router.<name>".
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from ..routing.engine import Decision

if TYPE_CHECKING:
    from mitmproxy import http

METADATA_KEY = "synapse_router"
_TOKEN = f"{METADATA_KEY}.token"  # the routed token's short hash: 8 hex digits, never a token
_CLIENT_IP = f"{METADATA_KEY}.client_ip"
_LOGOUT = f"{METADATA_KEY}.logout"  # (everywhere, token key) of a logout request
_REDACTED = f"{METADATA_KEY}.redacted"  # the request's credentials are labels now
_UPLOAD_CUT = f"{METADATA_KEY}.upload_cut"  # answered while the client was still sending its body
_RELAYED = f"{METADATA_KEY}.relayed"  # a router-sent answer streamed through the relay
_STREAMED_BYTES = f"{METADATA_KEY}.streamed_bytes"  # body bytes of a relayed answer sent on
_PACED = f"{METADATA_KEY}.paced"  # seconds the request waited for its address's turn (pacing)
_WAITING = f"{METADATA_KEY}.waiting"  # the routing hook waits (its turn, whoami): when it stopped
_CLIENT_ERROR = f"{METADATA_KEY}.client_error"  # clienterrors: what the client did wrong, if the router answered it


def decision(flow: http.HTTPFlow) -> Decision | None:
    found = flow.metadata.get(METADATA_KEY)
    return found if isinstance(found, Decision) else None


def set_decision(flow: http.HTTPFlow, value: Decision) -> None:
    flow.metadata[METADATA_KEY] = value


def settle_decision(flow: http.HTTPFlow, value: Decision) -> None:
    """The flow is over: keep its decision as plain data, which saved flows serialise."""
    flow.metadata[METADATA_KEY] = value.as_dict()


def token_label(flow: http.HTTPFlow) -> str | None:
    label = flow.metadata.get(_TOKEN)
    return label if isinstance(label, str) else None


def set_token_label(flow: http.HTTPFlow, label: str) -> None:
    flow.metadata[_TOKEN] = label


def client_ip(flow: http.HTTPFlow) -> str:
    return str(flow.metadata.get(_CLIENT_IP, ""))


def set_client_ip(flow: http.HTTPFlow, address: str) -> None:
    flow.metadata[_CLIENT_IP] = address


def set_logout(flow: http.HTTPFlow, everywhere: bool, key: bytes) -> None:
    flow.metadata[_LOGOUT] = (everywhere, key)


def pop_logout(flow: http.HTTPFlow) -> tuple[bool, bytes] | None:
    found = flow.metadata.pop(_LOGOUT, None)
    return found if isinstance(found, tuple) else None


def redacted(flow: http.HTTPFlow) -> bool:
    return flow.metadata.get(_REDACTED) is True


def set_redacted(flow: http.HTTPFlow, value: bool) -> None:
    if value:
        flow.metadata[_REDACTED] = True
    else:
        flow.metadata.pop(_REDACTED, None)


def upload_cut(flow: http.HTTPFlow) -> bool:
    return flow.metadata.get(_UPLOAD_CUT) is True


def set_upload_cut(flow: http.HTTPFlow) -> None:
    flow.metadata[_UPLOAD_CUT] = True


def relayed(flow: http.HTTPFlow) -> bool:
    return flow.metadata.get(_RELAYED) is True


def set_relayed(flow: http.HTTPFlow) -> None:
    flow.metadata[_RELAYED] = True


def streamed_bytes(flow: http.HTTPFlow) -> int | None:
    found = flow.metadata.get(_STREAMED_BYTES)
    return found if isinstance(found, int) else None


def add_streamed_bytes(flow: http.HTTPFlow, size: int) -> None:
    flow.metadata[_STREAMED_BYTES] = flow.metadata.get(_STREAMED_BYTES, 0) + size


def paced(flow: http.HTTPFlow) -> float | None:
    found = flow.metadata.get(_PACED)
    return found if isinstance(found, float) else None


def set_paced(flow: http.HTTPFlow, delay: float) -> None:
    flow.metadata[_PACED] = delay


def wait_ended(flow: http.HTTPFlow) -> float | None:
    """When the routing hook last stopped waiting on the request (time.monotonic()); inf while
    it waits; None if it never waited."""
    found = flow.metadata.get(_WAITING)
    return found if isinstance(found, float) else None


def set_waiting(flow: http.HTTPFlow, value: bool) -> None:
    flow.metadata[_WAITING] = math.inf if value else time.monotonic()


def client_error(flow: http.HTTPFlow) -> str | None:
    found = flow.metadata.get(_CLIENT_ERROR)
    return found if isinstance(found, str) else None


def set_client_error(flow: http.HTTPFlow, reason: str) -> None:
    flow.metadata[_CLIENT_ERROR] = reason
