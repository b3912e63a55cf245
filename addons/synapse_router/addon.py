"""SynapseRouter: the router as mitmproxy sees it, a composition of small addons, one job each.

mitmproxy calls a parent addon's hooks and then its `addons`, in list order, so this list is
the order in which each hook runs (a part that raises is logged and the later ones still run:
addons/isolation.py) (for a request: limits, then routing, then the router's own
upstream path or connect failover, then, once answered, logout eviction, the end of the
exchange and observation). The addons share one RouterState (state.py), in which every request
in flight is an exchange with one owner (routing/exchange.py), and per-flow data through
flowdata.py.

    LogRedaction      load, running, done: no token in the event log (mitmproxy's, libraries')
    ConnectionLimits  client_connected/disconnected, requestheaders, response, error: timeouts, caps
    Configuration     load, configure, running: router_config, SIGHUP; router.reload
    RequiredOptions   configure: the mitmproxy options a router needs
    WhoamiIdentity    response: logout eviction; router.flush
    HealthChecks      running, done, server_connect_error; router.drain/undrain/workers
    Routing           requestheaders, responseheaders; router.explain
    RouterSent        request, running, done: long-polls the router sends (and retries) itself
    ConnectFailover   server_connect: probe before mitmproxy connects
    StreamedErrors    error/responseheaders: a Matrix 502/503, not mitmproxy's page or a bad head, on its path
    ExchangeOwner     response, error, client_disconnected: ends each exchange once (releases,
                      then Observation's metrics and access log, then redaction)
    Observation       responseheaders (debug headers); `observe`, called by ExchangeOwner
    MetricsListener   running, done: the Prometheus endpoint
    ListenBacklog     running, done: the listening sockets' accept queue (limits.listen_backlog)
    GracefulStop      running (SIGTERM/SIGINT), responseheaders, response, done: drain, then stop
"""

from __future__ import annotations

from typing import Any

from .addons.configuration import Applier, Configuration
from .addons.connect_failover import ConnectFailover
from .addons.connection_limits import ConnectionLimits
from .addons.credentials import LogRedaction
from .addons.exchange import ExchangeOwner
from .addons.flowdata import METADATA_KEY
from .addons.graceful_stop import GracefulStop
from .addons.health import HealthChecks
from .addons.isolation import isolate_hooks
from .addons.listen_backlog import ListenBacklog
from .addons.metrics_listener import MetricsListener
from .addons.observation import Observation
from .addons.plain_tls import PlainTls
from .addons.required_options import MIN_TCP_TIMEOUT, REQUIRED_OPTIONS, RequiredOptions
from .addons.router_sent import RouterSent
from .addons.routing import Routing
from .addons.state import RouterState
from .addons.streamed_errors import StreamedErrors
from .addons.whoami import WhoamiIdentity
from .identity.resolver import IdentityResolver
from .observability.loopfilters import LoopExceptionFilters
from .observability.metrics import RouterMetrics
from .routing.availability import WorkerStates
from .routing.engine import Engine
from .routing.upstream import Upstream

__all__ = ["METADATA_KEY", "MIN_TCP_TIMEOUT", "REQUIRED_OPTIONS", "SynapseRouter"]


class SynapseRouter:
    """The composition root: builds the shared state and the addons; holds no hooks itself."""

    def __init__(self) -> None:
        self.state = state = RouterState()
        state.metrics.bind_in_flight(lambda: {url: state.in_flight.get(url, 0) for url in state.workers.workers})
        self.limits = ConnectionLimits(state.metrics, loop_filters=LoopExceptionFilters())
        self.identity_addon = WhoamiIdentity(state)
        self.health = HealthChecks(state)
        self.routing = Routing(state)
        self.router_sent = RouterSent(state, self.routing, self.health)
        self.observation = Observation(state)
        self.metrics_listener = MetricsListener(state)
        self.listen_backlog = ListenBacklog(
            self.limits.headroom, self.limits.refuse_at_accept, self.limits.set_screening
        )
        self.graceful_stop = GracefulStop(self.limits, state, self.metrics_listener.stopping)
        # Prepared in this order, then switched to in this order. Observation opens the access
        # log file, the one part that can fail on a valid file: last, so nothing is left open.
        appliers: list[Applier] = [
            self.routing,
            self.identity_addon,
            self.limits,
            self.health,
            self.router_sent,
            self.metrics_listener,
            self.listen_backlog,
            self.graceful_stop,
            self.observation,
        ]
        self.configuration = Configuration(state, appliers)
        self.addons: list[Any] = [
            LogRedaction(),
            self.limits,
            PlainTls(),
            self.configuration,
            RequiredOptions(),
            self.identity_addon,
            self.health,
            self.routing,
            self.router_sent,
            ConnectFailover(state, self.routing, self.health),
            StreamedErrors(state),
            ExchangeOwner(state, self.observation),
            self.observation,
            self.metrics_listener,
            self.listen_backlog,
            self.graceful_stop,
        ]
        isolate_hooks(self.addons)  # one part failing on an event does not skip the later ones

    # What tests, the launcher and interactive users look at.
    @property
    def engine(self) -> Engine | None:
        return self.state.engine

    @property
    def identity(self) -> IdentityResolver | None:
        return self.state.identity

    @property
    def metrics(self) -> RouterMetrics:
        return self.state.metrics

    @property
    def workers(self) -> WorkerStates:
        return self.state.workers

    @property
    def main(self) -> Upstream | None:
        return self.state.main

    @property
    def config_path(self) -> str | None:
        return self.state.config_path
