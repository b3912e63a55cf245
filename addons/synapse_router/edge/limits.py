"""Resource limits on client connections, as nginx's: the `limits` key of the configuration.

    limits: {header_timeout: 60, keepalive_timeout: 75, max_header_bytes: 65536, max_connections: 10000,
             response_buffer: 262144, buffer_budget: 67108864}

- `header_timeout`: a new connection whose first request's headers are not complete within
  this many seconds of connecting is closed (nginx's `client_header_timeout`: a total for the
  head, so a client trickling a byte at a time gains nothing).
- `keepalive_timeout`: a connection with no request in flight is closed this many seconds after
  its last response; the next request's headers must be complete by then (mitmproxy shows an
  addon no request before its headers are complete, so a keep-alive connection's next request
  is bounded by this timer alone; real clients send a head in one packet). A request in flight
  (a long-poll waiting minutes for its response, an upload) is never cut by either timer.
- `body_timeout`: a request whose body is being read and gets no byte for this many seconds
  is answered 408 (Matrix error) and its connection closed (nginx's `client_body_timeout`:
  the time between two reads, not a total; an upload that keeps sending is never cut).
- `max_header_bytes`: a request whose head (request line and header fields) is larger is
  answered 431 with a Matrix error `M_TOO_LARGE` and its connection closed; it reaches no
  worker (the limits addon is first in the router's chain, so no routing or whoami work is
  spent on it). A
  head that never ends is answered the same and closed once more than this much of it has
  been received (mitmproxy 12.3 itself has no limit: it buffers a head until its blank line).
- `max_connections`: client connections one router process holds at most; beyond, a new
  client is closed at once, counted in `synapse_router_client_connections_refused_total`, and
  reported in at most one log line per 10 s. Not set: 10000, or what fits in the open-files
  limit L if less (`derived_max_connections`: (L - 256) // 2, at least L // 4), said once at
  info level.
- `max_connections_per_address`: client connections one TCP peer address may hold open at
  once in one process; `connection_rate_per_address` / `connection_burst_per_address`: new
  connections per second one address may open (a token bucket of that many per second, that
  deep). Beyond either, a new connection is closed at accept (reset, no answer: it costs the
  router an accept and a close, not a mitmproxy connection), counted in
  `synapse_router_client_connections_closed_total{reason="address_connections"|"address_rate"}`
  and reported in at most one log line per 10 s. The address is the TCP peer's: connection
  bounds apply before any header is read, so X-Forwarded-For plays no part, and a peer in
  `trusted_proxies` is exempt (it carries many clients; bound those where it sees them, e.g.
  nginx's `limit_conn`).
- `request_rate_per_address` / `request_burst_per_address` / `request_delay_max`: requests one
  client address may start per second beyond a burst of that many; a later one waits for its
  turn (no work is done on it meanwhile), and one whose turn is more than `request_delay_max`
  seconds away is answered 429 `M_LIMIT_EXCEEDED` (as nginx's `limit_req ... burst=`). The
  address is the one the router attributes the request to (X-Forwarded-For from a trusted
  proxy); a trusted proxy's own is not paced. `request_rate_per_address: 0` turns pacing off
  (edge/request_pacing.py).
- `response_buffer`: bytes of a worker's answer body the router holds for one request it sends
  itself (so that a safe request can still be resent while nothing of its answer reached the
  client); a longer answer is streamed to the client from there on (upstream_client.py, relay.py).
- `buffer_budget`: bytes all those held answer bodies of one process may take together; beyond,
  a new answer is streamed as soon as its head is read (no buffer, so no resend after its head).

Start-up raises the soft open-files limit (RLIMIT_NOFILE) to the hard one and warns once if
a `max_connections` the configuration sets does not fit in it (each client connection may hold
an upstream one too); the default never warns, it is derived from that limit.
When descriptors run out anyway, asyncio's accept errors (one traceback per failed accept,
tens of thousands a second) are collapsed into one log line per 10 s with a count.

This module is the pure half (LimitsConfig, parse_limits, Throttle, fd_budget_warning,
header_block_size); the mitmproxy addon that enforces it is addons/connection_limits.py.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import chain

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0  # seconds: at most one line per interval for refused connections / fd errors
MAX_REQUEST_DELAY = 3600.0  # seconds a paced request may wait at most (request_delay_max's bound)
MIN_SECONDS = 0.001  # the shortest wait request_delay_max may set
MIN_REQUEST_RATE = 0.01  # requests per second: one per 100 s (below, a schedule's waits overflow)
DEFAULT_MAX_CONNECTIONS = 10000  # per process, when the open-files limit allows it
FD_MARGIN = 256  # descriptors beyond 2 per client connection: workers, health checks, metrics, logs
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Why a connection was closed (a metric label: a fixed vocabulary).
HEADER_TIMEOUT = "header_timeout"
KEEPALIVE_TIMEOUT = "keepalive_timeout"
HEADER_TOO_LARGE = "header_too_large"
BODY_TIMEOUT = "body_timeout"
ADDRESS_CONNECTIONS = "address_connections"  # limits.max_connections_per_address reached
ADDRESS_RATE = "address_rate"  # limits.connection_rate_per_address exceeded
CLOSE_REASONS = (HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, HEADER_TOO_LARGE, BODY_TIMEOUT, ADDRESS_CONNECTIONS, ADDRESS_RATE)

TOO_LARGE_ERRCODE = "M_TOO_LARGE"


# --- configuration (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    header_timeout: float = 60.0  # seconds from connecting to the first request's complete head
    keepalive_timeout: float = 75.0  # seconds a connection may idle between requests
    max_header_bytes: int = 65536  # request line + header fields
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # client connections per process
    # Connections the kernel queues before the router accepts them (the kernel caps it at
    # net.core.somaxconn); asyncio's default, 100, overflows in a reconnect storm.
    listen_backlog: int = 4096
    response_buffer: int = 256 * 1024  # answer body bytes held per router-sent request
    buffer_budget: int = 64 * 1024 * 1024  # answer body bytes held by all of them together
    body_timeout: float = 60.0  # seconds a request body may go without a byte while it is read
    # The configuration sets max_connections (else it is derived from the open-files limit:
    # fit_to_nofile). Not compared: a configuration is the same whether it spells the default.
    max_connections_set: bool = field(default=False, compare=False)
    # Per TCP peer address (trusted proxies exempt), per process: open connections at once, and
    # new connections per second (a token bucket this deep). A NATed office of ~1,000 people
    # with a browser's usual 2 connections each, all reconnecting at once, stays within them.
    max_connections_per_address: int = 2000
    connection_rate_per_address: float = 200.0
    connection_burst_per_address: int = 2000
    # Per client address (as attributed: X-Forwarded-For from a trusted proxy), per process:
    # requests started per second beyond a burst; later ones wait their turn, up to
    # request_delay_max seconds (edge/request_pacing.py). 0: no pacing.
    request_rate_per_address: float = 200.0
    request_burst_per_address: int = 400
    request_delay_max: float = 10.0


class LimitsConfigError(ValueError):
    """A bad `limits` value; `key` is the sub-key ("" for the mapping itself)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"limits.{key}: {reason}" if key else f"limits: {reason}")


_KEYS = (
    "header_timeout",
    "keepalive_timeout",
    "body_timeout",
    "max_header_bytes",
    "max_connections",
    "listen_backlog",
    "response_buffer",
    "buffer_budget",
    "max_connections_per_address",
    "connection_rate_per_address",
    "connection_burst_per_address",
    "request_rate_per_address",
    "request_burst_per_address",
    "request_delay_max",
)


def parse_limits(raw: object) -> LimitsConfig:
    """The `limits` mapping (None: the defaults); raise LimitsConfigError naming the key."""
    if raw is None:
        return LimitsConfig()
    if not isinstance(raw, dict):
        raise LimitsConfigError("", f"expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            raise LimitsConfigError(str(key), f"unknown key; expected one of {', '.join(sorted(_KEYS))}")
    d = LimitsConfig()

    def seconds(key: str, default: float, unit: str = "seconds", maximum: float = math.inf) -> float:
        value = raw.get(key, default)
        bounded = maximum < math.inf  # one message for every value out of its range
        wanted = f"between {MIN_SECONDS:g} and {maximum:g}" if bounded else "> 0"
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            hint = _text_number_hint(value)
            raise LimitsConfigError(key, f"must be a number {wanted} ({unit}), got {value!r}" + hint)
        if value > maximum or (bounded and value < MIN_SECONDS):
            raise LimitsConfigError(key, f"must be a number {wanted} ({unit}), got {value!r}")
        return float(value)

    def count(key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LimitsConfigError(key, f"must be an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise LimitsConfigError(key, f"must be an integer <= {maximum}, got {value!r}")
        return value

    def rate_or_off(key: str, default: float) -> float:
        value = raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or (value != 0 and value < MIN_REQUEST_RATE)
        ):
            raise LimitsConfigError(
                key,
                f"must be 0 (not paced) or a number >= {MIN_REQUEST_RATE:g} (requests per second), got {value!r}"
                + _text_number_hint(value),
            )
        return float(value)

    return LimitsConfig(
        header_timeout=seconds("header_timeout", d.header_timeout),
        keepalive_timeout=seconds("keepalive_timeout", d.keepalive_timeout),
        body_timeout=seconds("body_timeout", d.body_timeout),
        # Below 1 KiB even an ordinary request with a token and a user agent would be refused.
        max_header_bytes=count("max_header_bytes", d.max_header_bytes, 1024),
        max_connections=count("max_connections", d.max_connections, 1),
        listen_backlog=count("listen_backlog", d.listen_backlog, 1),
        # 0: every answer with a body is streamed from its head on (no resend after the head).
        response_buffer=count("response_buffer", d.response_buffer, 0),
        buffer_budget=count("buffer_budget", d.buffer_budget, 0),
        max_connections_set="max_connections" in raw,
        max_connections_per_address=count("max_connections_per_address", d.max_connections_per_address, 1),
        connection_rate_per_address=seconds(
            "connection_rate_per_address", d.connection_rate_per_address, "connections per second"
        ),
        connection_burst_per_address=count("connection_burst_per_address", d.connection_burst_per_address, 1),
        request_rate_per_address=rate_or_off("request_rate_per_address", d.request_rate_per_address),
        request_burst_per_address=count("request_burst_per_address", d.request_burst_per_address, 1, 1_000_000),
        request_delay_max=seconds("request_delay_max", d.request_delay_max, maximum=MAX_REQUEST_DELAY),
    )


def _text_number_hint(value: object) -> str:
    """For a number YAML read as text (YAML 1.1 floats need a dot: `1e3` is a string)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (text, not a number: write it unquoted, as 1000 or 1.0e+3)"
    return ""


def header_block_size(method: str, target: str, version: str, fields: Sequence[tuple[bytes, bytes]]) -> int:
    """The size of a request head as sent: `METHOD target VERSION\\r\\n`, `name: value\\r\\n`
    per field and the blank line (the optional whitespace a client may add is not counted)."""
    fixed = len(method) + len(target) + len(version) + 6 + 4 * len(fields)
    return fixed + sum(map(len, chain.from_iterable(fields)))


# What Synapse sends on every response (synapse/http/server.py, set_cors_headers), so that a
# web client can read the errors the router answers itself (a 401's soft_logout, a 503's
# Retry-After) as it reads Synapse's own.
CORS_HEADERS: tuple[tuple[str, str], ...] = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date"),
    ("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server"),
)


def too_large_body(limit: int) -> bytes:
    """The Matrix error body of a 431 answer."""
    error = f"Request header fields too large (limit {limit} bytes)"
    return json.dumps({"errcode": TOO_LARGE_ERRCODE, "error": error}).encode()


def derived_max_connections(nofile: int) -> int:
    """The default `max_connections` under an open-files limit: 10000, or fewer so that two
    descriptors per connection plus FD_MARGIN fit ((nofile - 256) // 2), never below a quarter of
    the limit (so a small limit still serves: the router's own descriptors rarely reach 256)."""
    return max(1, min(DEFAULT_MAX_CONNECTIONS, max((nofile - FD_MARGIN) // 2, nofile // 4)))


def fit_to_nofile(config: LimitsConfig, nofile: int | None) -> tuple[LimitsConfig, str | None]:
    """The configuration in force under the open-files limit `nofile` (None: unknown or
    unlimited), and the info line to log when the default was lowered to fit (None else). A
    `max_connections` the configuration sets is kept as it is (fd_budget_warning tells if it
    does not fit)."""
    if config.max_connections_set or nofile is None:
        return config, None
    derived = derived_max_connections(nofile)
    if derived == config.max_connections:
        return config, None
    note = (
        f"limits.max_connections not set: {derived} client connections per process, what fits in the "
        f"open-files limit {nofile} (2 descriptors per connection + {FD_MARGIN}; {DEFAULT_MAX_CONNECTIONS} "
        f"needs {2 * DEFAULT_MAX_CONNECTIONS + FD_MARGIN}); raise the limit (ulimit -n, LimitNOFILE=) or set "
        "limits.max_connections for more"
    )
    return replace(config, max_connections=derived), note


def fd_budget_warning(max_connections: int, nofile: int | None) -> str | None:
    """A warning when `max_connections` client connections, each with an upstream connection,
    plus a margin for the router's own connections do not fit in the open-files limit."""
    if nofile is None:
        return None
    needed = 2 * max_connections + FD_MARGIN
    if needed <= nofile:
        return None
    fits = (nofile - FD_MARGIN) // 2
    lower = f" or set limits.max_connections to at most {fits}" if fits >= 1 else ""
    return (
        f"limits.max_connections={max_connections} needs about {needed} file descriptors "
        f"(2 per connection + {FD_MARGIN}) but the open-files limit is {nofile}: raise it "
        f"(ulimit -n, LimitNOFILE=){lower}"
    )


class Throttle:
    """Counts events and says when to report them: the first at once, then at most one report
    per `interval` seconds, with the number of events since the last report."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.pending = 0
        self.quiet_until = -math.inf

    def hit(self, now: float) -> int:
        """Count one event; return how many to report now (0: stay quiet)."""
        self.pending += 1
        return self.take(now)

    def take(self, now: float) -> int:
        """The events to report now, if the quiet period is over (0 otherwise)."""
        if now < self.quiet_until or not self.pending:
            return 0
        reported, self.pending = self.pending, 0
        self.quiet_until = now + self.interval
        return reported
