"""Which requests the router sends itself, and which of those it may send twice.

The router sends a request itself (its own HTTP/1.1 client) when it can hold the request's
body: then a worker that refuses the connection is replaced by the next one, and every failure
is answered with a Matrix error instead of mitmproxy's HTML page. A request the worker may
already have acted on is resent only when a repeat is harmless:

- GET, HEAD and OPTIONS without a body, on any route but media (media bodies are streamed by
  mitmproxy, never held): safe methods.
- Simplified sliding sync long-polls (POST with `pos` and `timeout` > 0): a repeat with the same
  `pos` is answered the same.
- `PUT /rooms/{id}/send/{type}/{txnId}` and `PUT /rooms/{id}/redact/{event}/{txnId}`: Synapse
  deduplicates these in its database by (room, user, device, txnId), checked again when the
  event is persisted (one persister per room), so a repeat on another worker returns the first
  event. Not with `?user_id=` (an appservice acting as a user: no device, so only the first
  worker's in-memory cache deduplicates) nor with a delayed-event delay (MSC4140: delayed
  events are not deduplicated by txnId).

Never resent: every other POST, PUT and DELETE (`/sendToDevice/{type}/{txnId}` included:
Synapse deduplicates it only in the receiving process's memory), and every request whose body
is streamed (media, bodies over 1 MiB or of unknown length).
"""

from __future__ import annotations

import re
from enum import StrEnum

from .query import query_param

MAX_HELD_REQUEST = 1024 * 1024  # a request body the router holds (mitmproxy streams larger ones)
MAX_RESENT_BODY = 64 * 1024  # a request body the router keeps to resend
MAX_LONG_POLL = 3600.0  # seconds of a client's `timeout` the router waits beyond its read timeout
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SLIDING_SYNC_PATH = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
_TXN_PUT = re.compile(r"^/_matrix/client/(?:api/v1|r0|v3|unstable)/rooms/[^/]+/(?:send|redact)/[^/]+/[^/]+$")
_DELAY_PARAM = "org.matrix.msc4140.delay"


class Sending(StrEnum):
    RESEND = "resend"  # sent by the router; resent to the next worker after no response
    ONCE = "once"  # sent by the router; never resent once written (a refused connection moves on)


def sending(
    method: str, path: str, content_length: str | None, streamed: bool, body_framing_unknown: bool
) -> Sending | None:
    """How the router sends a request, or None for mitmproxy's own (streaming) path.
    `streamed`: the route streams bodies (media); `body_framing_unknown`: Transfer-Encoding or
    Upgrade present."""
    if streamed or body_framing_unknown:
        return None
    length = content_length if content_length is not None else "0"
    if not length.isdigit() or int(length) > MAX_HELD_REQUEST:
        return None
    size = int(length)
    if method in SAFE_METHODS:
        return Sending.RESEND if size == 0 else Sending.ONCE
    if size > MAX_RESENT_BODY:
        return Sending.ONCE
    bare, _, query = path.partition("?")
    if method == "POST" and bare == SLIDING_SYNC_PATH:
        timeout = query_param(query, "timeout")
        if query_param(query, "pos") and timeout is not None and timeout.isdigit() and int(timeout) > 0:
            return Sending.RESEND
    elif (
        method == "PUT"
        and _TXN_PUT.match(bare)
        and query_param(query, "user_id") is None
        and query_param(query, _DELAY_PARAM) is None
    ):
        return Sending.RESEND
    return Sending.ONCE


def head_timeout(path: str, read_timeout: float) -> float:
    """How long the router waits for a worker's answer head: its read timeout, plus the
    long-poll `timeout` (milliseconds) the client asked for (/sync, /events, sliding sync...),
    at most MAX_LONG_POLL, so a long-poll is never cut before its own time is up."""
    _, _, query = path.partition("?")
    timeout = query_param(query, "timeout") if query else None
    if timeout is None or not timeout.isdigit() or len(timeout) > 12:
        return read_timeout
    return read_timeout + min(int(timeout) / 1000, MAX_LONG_POLL)
