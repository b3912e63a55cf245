"""Prometheus metrics for the router (the server that exposes them: metrics_server.py).

Every metric lives in the `CollectorRegistry` a `RouterMetrics` owns (nothing is registered in
prometheus_client's global default registry), so tests and configuration reloads get fresh,
independent instances.

Label values come from bounded sets only: route and pool names and worker URLs (all from the
configuration), a normalised HTTP method, a status class, and small fixed vocabularies. User ids,
tokens, paths and client addresses are never label values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..edge.limits import CLOSE_REASONS
from ..identity.resolver import Source

log = logging.getLogger(__name__)

MAIN = "main"  # the pool and worker label of the main process (same value as routes.MAIN)

# Methods kept as a label value; any other method is counted as OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "OTHER"
NO_RESPONSE = "error"  # the status class of a request that got no response
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", NO_RESPONSE)

WHOAMI_OUTCOMES = ("user", "rejected", "error")
PACED_DELAYED = "delayed"  # a request that waited for its address's turn (limits.request_rate_per_address)
PACED_REFUSED = "refused"  # answered 429: its turn was beyond limits.request_delay_max
PACED_OUTCOMES = (PACED_DELAYED, PACED_REFUSED)
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
            "Client connections closed by a limit: header_timeout, keepalive_timeout, header_too_large (431), "
            "body_timeout (408), address_connections and address_rate (per-address bounds, reset at accept).",
            ["reason"],
            registry=r,
        )
        self.resource_errors_total = Counter(
            "synapse_router_accept_resource_errors",
            "Failed accepts for want of file descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
            registry=r,
        )
        self.paced_total = Counter(
            "synapse_router_paced_requests",
            "Requests over their client address's rate (limits.request_rate_per_address): delayed to their "
            "turn, or refused 429 when it was beyond limits.request_delay_max.",
            ["outcome"],
            registry=r,
        )
        self.paced_seconds_total = Counter(
            "synapse_router_paced_delay_seconds",
            "Seconds delayed requests waited for their turn, together (counted as each wait ends).",
            registry=r,
        )
        self._in_flight = _InFlight()
        r.register(self._in_flight)
        # The fixed vocabularies start at zero, so rate() and ratios work from the first scrape.
        for reason in CLOSE_REASONS:
            self.limit_closes_total.labels(reason)
        for outcome in WHOAMI_OUTCOMES:
            self.whoami_calls_total.labels(outcome)
        for outcome in PACED_OUTCOMES:
            self.paced_total.labels(outcome)
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

    def observe_paced(self, outcome: str) -> None:
        self.paced_total.labels(outcome if outcome in PACED_OUTCOMES else OTHER).inc()

    def observe_paced_wait(self, seconds: float) -> None:
        """A delayed request's wait is over (its turn came, or its client left): how long it was."""
        self.paced_seconds_total.inc(max(0.0, seconds))

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
