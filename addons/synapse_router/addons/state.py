"""What the router's addons share: one plain object, built by SynapseRouter and handed to each.

Each field has one writer: the configuration's appliers set `engine`, `trusted`, `pacing`, `identity`,
`debug_headers` (Observation) and the workers they track; Configuration sets `config_path` and
`main`. Every request in flight
is an exchange in `exchanges` (routing/exchange.py): Routing opens it and counts it on its
worker, ExchangeOwner (exchange.py) closes it. A paced request waits in `turns` (Routing), which
GracefulStop ends.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..edge.client_address import TrustedProxies
from ..edge.request_pacing import RequestPacing, Turns
from ..edge.upstream_client import UpstreamClient
from ..observability.metrics import RouterMetrics
from ..routing.availability import WorkerStates
from ..routing.exchange import Ledger

if TYPE_CHECKING:
    from mitmproxy import http

    from ..identity.resolver import IdentityResolver
    from ..routing.engine import Engine
    from ..routing.upstream import Upstream


@dataclass(eq=False)
class RouterState:
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    engine: Engine | None = None  # None until a configuration is loaded
    config_path: str | None = None
    main: Upstream | None = None  # the reverse-mode target, when in reverse mode
    trusted: TrustedProxies = field(default_factory=TrustedProxies)
    pacing: RequestPacing = field(default_factory=RequestPacing)  # limits.request_*_per_address
    turns: Turns = field(default_factory=Turns)  # the paced requests waiting for their turn
    workers: WorkerStates = field(default_factory=WorkerStates)
    identity: IdentityResolver | None = None
    # every exchange (a request with a decision) not over yet, and the counts they hold
    exchanges: Ledger[http.HTTPFlow] = field(default_factory=Ledger)
    # a flow -> the cache key of the token it carries, while it is in flight (never in the flow,
    # which saved flows serialise): a worker's 401 M_UNKNOWN_TOKEN evicts that token's user
    token_keys: weakref.WeakKeyDictionary[http.HTTPFlow, bytes] = field(default_factory=weakref.WeakKeyDictionary)
    stopping: bool = False  # a graceful stop has begun: not ready for new traffic
    debug_headers: bool = False  # the configuration's `debug_headers` (Observation sets it)
    main_reachable: bool | None = None  # main's health checks: None until judged
    # (pool, worker URL) pairs of the configuration, whose series the metrics export
    published: frozenset[tuple[str, str]] = frozenset()
    upstream: UpstreamClient = field(default_factory=UpstreamClient)  # requests the router sends itself

    def __post_init__(self) -> None:
        self.exchanges.abandon = self.upstream.abandon  # a closed exchange's upstream exchange goes too

    @property
    def in_flight(self) -> dict[str, int]:
        """Worker URL -> exchanges counted on it (least_conn, `synapse_router_worker_in_flight`)."""
        return self.exchanges.in_flight

    def not_ready(self) -> str | None:
        """Why this router should get no new traffic (`/ready`), or None."""
        if self.stopping:
            return "stopping"
        if self.main_reachable is False:
            return "main unreachable"
        return None
