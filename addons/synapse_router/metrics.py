"""Prometheus metrics for the router, and a small asyncio HTTP server that exposes them.

Every metric lives in the `CollectorRegistry` a `RouterMetrics` owns (nothing is registered in
prometheus_client's global default registry), so tests and configuration reloads get fresh,
independent instances.

Label values come from bounded sets only: route and pool names and worker URLs (all from the
configuration), a normalised HTTP method, a status class, and small fixed vocabularies. User ids,
tokens, paths and client addresses are never label values.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .identity import Source
from .limits import CLOSE_REASONS
from .upstream import parse_listen as parse_listen  # re-exported: the launcher's import
from .wellformed import TOKEN

log = logging.getLogger(__name__)

MAIN = "main"  # the pool and worker label of the main process (same value as routes.MAIN)

# Methods kept as a label value; any other method is counted as OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "OTHER"
NO_RESPONSE = "error"  # the status class of a request that got no response
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", NO_RESPONSE)

WHOAMI_OUTCOMES = ("user", "rejected", "error")
IDENTITY_SOURCES = tuple(source.value for source in Source)
OTHER = "other"  # an outcome or source outside the vocabularies above (a bug, but bounded)

# From 1 ms API calls to 30 s long-polls (/sync, /events) and slow media uploads.
UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# whoami is a cheap call on the main process; its timeout is a few seconds.
WHOAMI_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def normalise_method(method: str) -> str:
    """The method label: one of METHODS, else OTHER. HTTP methods are case-sensitive."""
    return method if method in METHODS else OTHER_METHOD


def status_class(status: int | None) -> str:
    """The status label: "1xx".."5xx", or "error" for no response (or an impossible status)."""
    if status is None or not 100 <= status <= 599:
        return NO_RESPONSE
    return f"{status // 100}xx"


def _seconds(value: float) -> float:
    return value if value > 0 else 0.0  # a clock step backwards must not observe a negative time


class _InFlight(Collector):
    """Requests in flight per worker, read from the router's own count at each scrape (a
    worker that left the configuration leaves with it: no stale series)."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] = dict

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for worker, count in sorted(self.source().items()):
            family.add_metric([worker], float(count))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "synapse_router_worker_in_flight",
            "Requests in flight to each worker of the configuration, as the router counts them (least_conn's count).",
            labels=["worker"],
        )


class RouterMetrics:
    """The router's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_total = Counter(
            "synapse_router_requests",
            "Requests proxied, by route, serving pool and worker, method and status class.",
            ["route", "pool", "worker", "method", "status_class"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "synapse_router_upstream_seconds",
            "Seconds from sending a request upstream to its response (headers, or end when buffered).",
            ["pool", "worker"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.whoami_calls_total = Counter(
            "synapse_router_whoami_calls",
            "Calls to Synapse's /account/whoami, by outcome: user, rejected (401), error.",
            ["outcome"],
            registry=r,
        )
        self.whoami_seconds = Histogram(
            "synapse_router_whoami_seconds",
            "Duration of calls to Synapse's /account/whoami.",
            buckets=WHOAMI_BUCKETS,
            registry=r,
        )
        self.identity_lookups_total = Counter(
            "synapse_router_identity_lookups",
            "Token -> user lookups, by how the answer was found: cache, shared, whoami, coalesced, negative, "
            "unresolved.",
            ["source"],
            registry=r,
        )
        self.identity_cache_entries = Gauge(
            "synapse_router_identity_cache_entries",
            "Tokens in the token -> user cache.",
            registry=r,
        )
        self.shared_cache_up = Gauge(
            "synapse_router_shared_cache_up",
            "1 when the shared (Redis) identity cache answers, 0 when the router runs on its "
            "in-process cache alone; NaN when no shared cache is configured.",
            registry=r,
        )
        self.worker_up = Gauge(
            "synapse_router_worker_up",
            "1 when the health checker considers a worker up, else 0.",
            ["pool", "worker"],
            registry=r,
        )
        self.worker_drained = Gauge(
            "synapse_router_worker_drained",
            "1 when a worker is drained (takes no new requests), else 0.",
            ["pool", "worker"],
            registry=r,
        )
        self.failovers_total = Counter(
            "synapse_router_failovers",
            "Requests sent to another worker of a pool after their first choice failed, by reason.",
            ["pool", "reason"],
            registry=r,
        )
        self.retries_total = Counter(
            "synapse_router_retries",
            "Requests retried upstream, by pool.",
            ["pool"],
            registry=r,
        )
        self.fallbacks_total = Counter(
            "synapse_router_fallbacks",
            "Pools of a route's chain passed over because they had no usable worker.",
            ["route", "from_pool"],
            registry=r,
        )
        # Connection limits (limits.py): one process's client connections, fixed label values.
        self.client_connections = Gauge(
            "synapse_router_client_connections",
            "Client connections this process holds open.",
            registry=r,
        )
        self.refused_connections_total = Counter(
            "synapse_router_client_connections_refused",
            "Client connections closed at once because limits.max_connections were open.",
            registry=r,
        )
        self.limit_closes_total = Counter(
            "synapse_router_client_connections_closed",
            "Client connections closed by a limit: header_timeout, keepalive_timeout, header_too_large (431).",
            ["reason"],
            registry=r,
        )
        self.resource_errors_total = Counter(
            "synapse_router_accept_resource_errors",
            "Failed accepts for want of file descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
            registry=r,
        )
        self._in_flight = _InFlight()
        r.register(self._in_flight)
        # The fixed vocabularies start at zero, so rate() and ratios work from the first scrape.
        for reason in CLOSE_REASONS:
            self.limit_closes_total.labels(reason)
        for outcome in WHOAMI_OUTCOMES:
            self.whoami_calls_total.labels(outcome)
        for source in IDENTITY_SOURCES:
            self.identity_lookups_total.labels(source)

    def observe_request(
        self,
        route: str,
        pool: str,
        worker: str,
        method: str,
        status: int | None,
        upstream_seconds: float | None,
    ) -> None:
        self.requests_total.labels(route, pool, worker, normalise_method(method), status_class(status)).inc()
        if upstream_seconds is not None and math.isfinite(upstream_seconds):
            self.upstream_seconds.labels(pool, worker).observe(_seconds(upstream_seconds))

    def observe_whoami(self, outcome: str, seconds: float) -> None:
        self.whoami_calls_total.labels(outcome if outcome in WHOAMI_OUTCOMES else OTHER).inc()
        if math.isfinite(seconds):
            self.whoami_seconds.observe(_seconds(seconds))

    def observe_identity(self, source: str) -> None:
        """Count one lookup; "" (a request without a token, so no lookup) counts nothing."""
        if source:
            self.identity_lookups_total.labels(source if source in IDENTITY_SOURCES else OTHER).inc()

    def bind_cache_size(self, fn: Callable[[], int]) -> None:
        """Report `fn()` as the identity cache size at each scrape (replaces an earlier binding).
        A failing `fn` reports NaN instead of failing the scrape."""

        def size() -> float:
            try:
                return float(fn())
            except Exception:
                log.debug("identity cache size callback failed", exc_info=True)
                return math.nan

        self.identity_cache_entries.set_function(size)

    def bind_shared_cache(self, fn: Callable[[], bool | None]) -> None:
        """Report fn() at each scrape: True (up), False (down), None (not configured)."""

        def up() -> float:
            state = fn()
            return math.nan if state is None else float(state)

        self.shared_cache_up.set_function(up)

    def set_worker_state(self, pool: str, worker: str, up: bool, drained: bool) -> None:
        self.worker_up.labels(pool, worker).set(1 if up else 0)
        self.worker_drained.labels(pool, worker).set(1 if drained else 0)

    def remove_worker(self, pool: str, worker: str) -> None:
        """Drop every series of a worker in a pool (it left the configuration): its state,
        latency and request counts, so dashboards stop showing a worker that is gone."""
        for metric in (self.worker_up, self.worker_drained, self.upstream_seconds):
            try:
                metric.remove(pool, worker)
            except KeyError:
                pass
        # requests_total has more labels; prometheus_client lists a metric's label values only
        # through its `_metrics` mapping (stable since 0.4).
        for labels in [k for k in list(self.requests_total._metrics) if k[1:3] == (pool, worker)]:
            self.requests_total.remove(*labels)

    def bind_in_flight(self, fn: Callable[[], Mapping[str, int]]) -> None:
        """Report `fn()` (worker URL -> requests in flight to it) at each scrape, as
        `synapse_router_worker_in_flight{worker}` (HAProxy's `scur`): the count least_conn
        balances on, so a count that drifts is seen."""
        self._in_flight.source = fn

    def bind_client_connections(self, fn: Callable[[], int]) -> None:
        """Report `fn()` as the open client connections at each scrape."""
        self.client_connections.set_function(lambda: float(fn()))

    def observe_refused_connection(self) -> None:
        self.refused_connections_total.inc()

    def observe_limit_close(self, reason: str) -> None:
        self.limit_closes_total.labels(reason if reason in CLOSE_REASONS else OTHER).inc()

    def observe_resource_error(self) -> None:
        self.resource_errors_total.inc()

    def observe_failover(self, pool: str, reason: str) -> None:
        """`reason` must come from a small fixed set (e.g. "connect", "timeout", "5xx"), never an error text."""
        self.failovers_total.labels(pool, reason).inc()

    def observe_retry(self, pool: str) -> None:
        self.retries_total.labels(pool).inc()

    def observe_fallback(self, route: str, from_pool: str) -> None:
        self.fallbacks_total.labels(route, from_pool).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)


# --- the exposition server -------------------------------------------------------------------

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/health"  # liveness for an orchestrator (container HEALTHCHECK, liveness probes)
READY_PATH = "/ready"  # readiness: 503 from the moment a stop begins, and while main is unreachable
_PLAIN = "text/plain; charset=utf-8"
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# Why the router should get no new traffic (None: it should): what `/ready` asks.
Readiness = Callable[[], str | None | Awaitable[str | None]]


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class MetricsServer:
    """Serves `GET /metrics` on its own address, one request per connection: what `render`
    returns (RouterMetrics.render, or a coroutine function, e.g. the aggregate of processes).

    Minimal HTTP/1.1: `GET` or `HEAD /metrics` (a query string is ignored) answers 200 with the
    exposition, and `/health` 200 `OK` without rendering anything, as Synapse's `/health` does
    (for an orchestrator's probes: this server runs on the router's event loop, or with
    `--processes` on the parent's, and starts once the proxy listens, so an answer means the
    router is up), and `/ready` 200 `OK` or 503 with the reason `ready()` gives (a stop has
    begun, main is unreachable: a load balancer should send elsewhere); another method 405;
    any other path 404; an unparseable request 400
    (414 or 431 when too long). Every response closes its connection. A client has
    `read_timeout` seconds to send its request head and as long again to take the response;
    at most `max_connections` are open at once (more are closed at once). Rendering runs on
    the event loop (about 10 ms per thousand series, once per scrape).

    On Linux the port is bound with SO_REUSEPORT, as the proxy's: in a rolling restart the new
    router serves its metrics and `/health` beside the old one while that one drains, instead of
    failing to bind and staying without them once the old one has gone.
    """

    def __init__(
        self,
        render: Callable[[], bytes | Awaitable[bytes]],
        listen: str,
        *,
        read_timeout: float = 10.0,
        max_connections: int = 64,
        max_header_lines: int = 100,
        ready: Readiness | None = None,
    ) -> None:
        self.listen = listen
        self.ready = ready
        self.host, self._configured_port = parse_listen(listen)
        self.render = render
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_header_lines = max_header_lines
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (the first socket's, if the host name resolved to several addresses)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self._configured_port, limit=16 * 1024, reuse_port=REUSE_PORT
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()  # the handler sees EOF and finishes
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            writer.close()
            return
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    method, path = await self._read_head(reader)
            except _BadRequest as e:
                status, body, head_only, extra = e.status, b"", False, b""
            except (TimeoutError, EOFError):
                return  # a silent or vanished client gets no answer
            else:
                status, body, head_only, extra = await self._respond(method, path)
            ctype = CONTENT_TYPE if status == 200 and path == METRICS_PATH else _PLAIN
            async with asyncio.timeout(self.read_timeout):  # a client that does not read is let go
                await self._send(writer, status, body, head_only=head_only, ctype=ctype, extra=extra)
        except OSError:  # includes ConnectionError and TimeoutError
            pass
        except Exception:
            log.warning("metrics server: unexpected error serving a request", exc_info=True)
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _respond(self, method: str, path: str) -> tuple[int, bytes, bool, bytes]:
        """(status, body, head only, extra header lines) for a well-formed request."""
        if path not in (METRICS_PATH, HEALTH_PATH, READY_PATH):
            return 404, b"not found\n", method == "HEAD", b""
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", False, b"Allow: GET, HEAD\r\n"
        if path == HEALTH_PATH:
            return 200, b"OK\n", method == "HEAD", b""
        if path == READY_PATH:
            reason = await self._not_ready()
            if reason is not None:
                return 503, f"not ready: {reason}\n".encode(), method == "HEAD", b""
            return 200, b"OK\n", method == "HEAD", b""
        try:
            rendered = self.render()
            body = await rendered if inspect.isawaitable(rendered) else rendered
        except Exception:
            log.warning("metrics server: rendering the metrics failed", exc_info=True)
            return 500, b"internal server error\n", method == "HEAD", b""
        return 200, body, method == "HEAD", b""

    async def _not_ready(self) -> str | None:
        if self.ready is None:
            return None
        try:
            answer = self.ready()
            return await answer if inspect.isawaitable(answer) else answer
        except Exception:
            log.warning("metrics server: the readiness check failed", exc_info=True)
            return "readiness unknown"

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """Read the request line and headers; return (method, path without query)."""
        line = await self._readline(reader, too_long=414)
        if not line:
            raise EOFError
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400)
        method, target = parts[0], parts[1]
        if not target.startswith("/"):
            raise _BadRequest(400)
        for _ in range(self.max_header_lines):
            header = await self._readline(reader, too_long=431)
            if not header:
                raise EOFError
            if header in (b"\r\n", b"\n"):
                return method, target.split("?", 1)[0]
        raise _BadRequest(431)

    @staticmethod
    async def _readline(reader: asyncio.StreamReader, too_long: int) -> bytes:
        try:
            line = await reader.readline()
        except ValueError:  # longer than the stream's limit
            raise _BadRequest(too_long) from None
        if line and not line.endswith(b"\n"):
            raise EOFError  # the connection ended mid-line
        return line

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        head_only: bool,
        ctype: str,
        extra: bytes,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode("ascii")
        writer.write(head + extra + b"\r\n" + (b"" if head_only else body))
        await writer.drain()
