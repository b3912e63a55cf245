"""One owner per exchange: what the router holds for one request from its decision to its end.

An `Exchange` is opened when a request gets its routing decision and holds everything the router
keeps for it: its in-flight count on a worker (what least_conn balances on and
`synapse_router_worker_in_flight` shows), its place in the registry of its client connection's
open exchanges, its sending path (the router's own client, retry.py, or mitmproxy's), its registration while
mitmproxy connects upstream for it (connect failover), its registration with the router's own
upstream client while the router sends it, the workers
it already tried, and how it failed (`FailureKind`, never an error message's text).

`close(failure)` ends it exactly once, whichever of `response`, `error` or `client_disconnected`
comes first: it does every release, each even if an earlier one raised, and then raises the
first exception. After that it counts nothing more: a failover decided after the end (a probe
that returns once the client has gone) moves no count.

The `Ledger` is the registry: per worker URL the exchanges counted on it, per client connection
its open exchanges, per client connection the exchange waiting for an upstream connection.
Pure: the flow is any object; the addons (addons/exchange.py) open and close exchanges.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from .retry import Sending


class FailureKind(StrEnum):
    """How an exchange failed, as the access log (`failure=`) and the failover policy read it."""

    CONNECT_ERROR = "connect_error"  # refused, unreachable: the worker is not listening
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within the connect timeout
    NO_RESPONSE = "no_response"  # connected, but the whole response never arrived (the worker died)
    READ_TIMEOUT = "read_timeout"  # connected, sent; the worker sent nothing for the read timeout
    CLIENT_GONE = "client_gone"  # the client left (or stopped reading) before its answer ended
    CLIENT_ERROR = "client_error"  # the client broke the request's framing or stalled its body
    KILLED = "killed"  # the flow was killed (by the router, or an operator in mitmweb)


class Exchange[F]:
    """One request's bookkeeping (see the module docstring). Made by `Ledger.open`."""

    __slots__ = ("ledger", "flow", "client", "key", "worker", "failure", "closed", "sending", "in_upstream", "tried")

    def __init__(self, ledger: Ledger[F], flow: F, client: str, key: str) -> None:
        self.ledger = ledger
        self.flow = flow
        self.client = client  # the client connection's id
        self.key = key  # the flow's id: unique among the client's exchanges, and the upstream owner
        self.worker: str | None = None  # the worker URL it is counted on
        self.failure: FailureKind | None = None
        self.closed = False
        self.sending: Sending | None = None  # how the router sends it (retry.py); None: mitmproxy does
        self.in_upstream = False  # the router's upstream client has an exchange of it in flight
        self.tried: set[str] | None = None  # workers that failed it, made at its first failover

    def count_on(self, worker: str | None) -> bool:
        """Count the exchange on `worker` (None: on none), releasing its previous count. After
        `close`, counts nothing and returns False."""
        if self.closed:
            return False
        in_flight = self.ledger.in_flight
        if self.worker is not None:
            _uncount(in_flight, self.worker)
        self.worker = worker
        if worker is not None:
            in_flight[worker] = in_flight.get(worker, 0) + 1
        return True

    def failed_on(self, worker: str) -> set[str]:
        """Note that `worker` failed this exchange; the workers it must not go back to."""
        if self.tried is None:
            self.tried = set()
        self.tried.add(worker)
        return self.tried

    def await_connection(self) -> None:
        """mitmproxy is to connect upstream for it: connect failover takes it (`Ledger.connecting`)."""
        if not self.closed:
            self.ledger.connecting[self.client] = self

    def note(self, failure: FailureKind) -> None:
        """How it failed, known before it ends (the router's own upstream client said so)."""
        if not self.closed:
            self.failure = failure

    def close(self, failure: FailureKind | None = None) -> bool:
        """End the exchange: every release, each attempted even if one before it raised (the
        first exception is raised after the last). True the first time, False after. `failure`
        is how it ended, unless a failure was noted before (`note`: the part that saw it knows
        better than the hook that ends it, e.g. a flow killed because its client had left)."""
        if self.closed:
            return False
        self.closed = True
        if self.failure is None:
            self.failure = failure
        error: Exception | None = None
        for release in _RELEASES:  # unbound: no bound method made per exchange
            try:
                release(self)
            except Exception as e:  # noqa: BLE001 - the rest is released all the same, then it is raised
                error = error or e
        if error is not None:
            raise error
        return True

    def _release_count(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            _uncount(self.ledger.in_flight, worker)

    def _release_registry(self) -> None:
        registry = self.ledger.open
        exchanges = registry.get(self.client)
        if exchanges is not None and exchanges.get(self.key) is self:
            del exchanges[self.key]
            if not exchanges:
                del registry[self.client]

    def _release_connecting(self) -> None:
        connecting = self.ledger.connecting
        if connecting.get(self.client) is self:
            del connecting[self.client]

    def _release_upstream(self) -> None:
        if self.in_upstream:
            self.in_upstream = False
            abandon = self.ledger.abandon
            if abandon is not None:
                abandon(self.key)


_RELEASES = (
    Exchange._release_count,
    Exchange._release_registry,
    Exchange._release_connecting,
    Exchange._release_upstream,
)


def _uncount(in_flight: dict[str, int], worker: str) -> None:
    count = in_flight.get(worker, 0) - 1
    in_flight[worker] = count if count > 0 else 0


class Ledger[F]:
    """Every open exchange, and the counts they hold."""

    __slots__ = ("in_flight", "open", "connecting", "abandon")

    def __init__(self, abandon: Callable[[str], object] | None = None) -> None:
        self.in_flight: dict[str, int] = {}  # worker URL -> exchanges counted on it
        self.open: dict[str, dict[str, Exchange[F]]] = {}  # client connection id -> flow id -> exchange
        self.connecting: dict[str, Exchange[F]] = {}  # client connection id -> exchange awaiting its connection
        # closes the router's own upstream exchange of an owner (UpstreamClient.abandon)
        self.abandon = abandon

    def open_exchange(self, flow: F, client: str, key: str) -> Exchange[F]:
        """The flow's open exchange, opened now if it has none."""
        exchanges = self.open.get(client)
        if exchanges is None:
            exchanges = self.open[client] = {}
        exchange = exchanges.get(key)
        if exchange is None:
            exchange = exchanges[key] = Exchange(self, flow, client, key)
        return exchange

    def find(self, client: str, key: str) -> Exchange[F] | None:
        """The flow's exchange while it is open, else None."""
        exchanges = self.open.get(client)
        return exchanges.get(key) if exchanges is not None else None

    def take_connecting(self, client: str) -> Exchange[F] | None:
        return self.connecting.pop(client, None)

    def of_client(self, client: str) -> list[Exchange[F]]:
        """The client's open exchanges (to close when it has gone)."""
        exchanges = self.open.get(client)
        return list(exchanges.values()) if exchanges else []

    def open_count(self) -> int:
        return sum(len(exchanges) for exchanges in self.open.values())
