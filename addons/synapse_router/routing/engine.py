"""The routing decision, free of mitmproxy: route a request, walk its pool chain, pick a worker."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from ..config import RouterConfig
from .pools import Pool, Unusable, build_pools
from .routes import MAIN, Balance, Match, Route
from .upstream import Upstream

ROUTER = "router"  # pool and worker of a response the router made itself
# The end of a stream writer's pool chain when its writer pool is configured: main cannot write.
WRITER_DOWN = "503 from the router"


@dataclass(slots=True)
class Decision:
    route: str  # the route's name, or "main" when no route claimed the request
    pool: str  # the pool that served it, or "main"
    upstream: Upstream | None  # None: the main process (the reverse-mode target)
    key_kind: str  # what the balance key was: user, token, room, ip, none
    fallbacks: list[str] = field(default_factory=list)  # pools passed over, with why
    identity: str = ""  # how the user was known: cache, whoami, negative, unresolved
    failover: str = ""  # "<worker> -> <worker>: <why>" when the first choice failed
    strip_accept_encoding: bool = False
    stream_bodies: bool = False
    refused: str = ""  # the errcode, when the router answered itself instead of passing it on
    # A stream writer's write whose configured writer pool has no usable worker: answered 503
    # by the router (main, not being the writer, would fail it).
    writer_down: bool = False
    # To choose again after a failure: the route and key (in memory only, never shown).
    matched: Route | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    @property
    def worker(self) -> str:
        if self.refused or self.writer_down:
            return ROUTER
        return self.upstream.url if self.upstream else MAIN

    def summary(self) -> str:
        """One line for a flow comment: no token, no user id."""
        if self.refused:
            return f"{self.route} -> refused by the router: {self.refused}"
        if self.writer_down:
            return f"{self.route} -> no usable writer ({', '.join(self.fallbacks)}): 503 from the router"
        text = f"{self.route} -> {self.pool} {self.worker} [key={self.key_kind}"
        if self.identity:
            text += f" identity={self.identity}"
        text += "]"
        if self.fallbacks:
            text += " fallback: " + ", ".join(self.fallbacks)
        if self.failover:
            text += f" FAILOVER {self.failover}"
        return text

    def as_dict(self) -> dict[str, object]:
        return {
            "route": self.route,
            "pool": self.pool,
            "worker": self.worker,
            "key_kind": self.key_kind,
            "identity": self.identity,
            "fallbacks": list(self.fallbacks),
            "failover": self.failover,
            "refused": self.refused,
            "writer_down": self.writer_down,
        }


class Engine:
    """An immutable view of one configuration: its route table and pools."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.table = config.table
        self.pools: dict[str, Pool] = build_pools(config.pools)

    def match(self, method: str, path_and_query: str) -> Match:
        return self.table.match(method, path_and_query)

    def chain(self, route: Route | None) -> list[str]:
        """The configured pools a route may use, in order, ending with main (or, for a stream
        writer's route whose writer pool is configured, with the router's 503)."""
        if route is None:
            return [MAIN]
        last = WRITER_DOWN if self.writes_only_to_writer(route) else MAIN
        return [p for p in route.pools if p in self.pools] + [last]

    def select(
        self,
        route: Route | None,
        key: str | None,
        key_kind: str,
        unusable: Unusable,
        in_flight: Mapping[str, int],
    ) -> Decision:
        if route is None:
            return Decision("main", MAIN, None, "none")
        decision = Decision(
            route.name,
            MAIN,
            None,
            key_kind,
            strip_accept_encoding=route.strip_accept_encoding,
            stream_bodies=route.stream_bodies,
            matched=route,
            key=key,
        )
        for name in route.pools:
            pool = self.pools.get(name)
            if pool is None:
                continue  # not deployed: routes list every pool that could serve them
            upstream = pool.choose(route.balance, key, unusable, in_flight)
            if upstream is not None:
                decision.pool, decision.upstream = name, upstream
                return decision
            decision.fallbacks.append(f"{name}:no usable worker")
        if self.writes_only_to_writer(route):
            decision.writer_down, decision.pool = True, ROUTER
        return decision

    def writes_only_to_writer(self, route: Route) -> bool:
        """A stream writer's route whose writer pool is configured: main, not being the writer,
        is no fallback (the router answers 503 when no writer is usable)."""
        return route.writer and any(name in self.pools for name in route.pools)

    def failover(self, failed: Decision, unusable: Set[str], in_flight: Mapping[str, int], reason: str) -> Decision:
        """Choose again for a request whose worker failed: the same route and key, without it.
        With rendezvous balancing this is the key's next-highest-scoring worker."""
        assert failed.upstream is not None
        again = self.select(failed.matched, failed.key, failed.key_kind, unusable | {failed.upstream.url}, in_flight)
        again.identity = failed.identity
        hop = f"{failed.upstream.url} -> {again.worker}: {reason}"
        again.failover = f"{failed.failover}; {hop}" if failed.failover else hop  # every hop, in order
        return again

    def explain(
        self, method: str, path_and_query: str, key: str | None, key_kind: str, unusable: Set[str]
    ) -> list[str]:
        """Why a request would go where it goes: route, pool chain, rendezvous ranking."""
        match = self.match(method, path_and_query)
        route = match.route
        if route is None:
            return [f"{method} {match.path}: no route claims it -> main"]
        lines = [
            f"{method} {match.path}: route {route.name} ({'custom' if not route.builtin else 'built-in'}), "
            f"balance {route.balance.value}, key {key_kind}"
        ]
        chain = [p if p in self.pools else f"({p}: not configured)" for p in route.pools]
        last = WRITER_DOWN if self.writes_only_to_writer(route) else MAIN
        lines.append("pool chain: " + " -> ".join([*chain, last]))
        decision = self.select(route, key, key_kind, unusable, {})
        for name in route.pools:
            pool = self.pools.get(name)
            if pool is None:
                continue
            hashed = key is not None and route.balance in (Balance.USER, Balance.ROOM, Balance.IP)
            ordered = pool.ranking(key) if hashed and key is not None else list(pool.workers)
            label = "rendezvous ranking" if hashed else f"workers ({route.balance.value})"
            lines.append(f"{name} {label}:")
            for i, worker in enumerate(ordered, 1):
                state = "unusable (down or drained)" if worker.url in unusable else "usable"
                mark = (
                    "  <- chosen"
                    if decision.upstream is not None and worker.url == decision.upstream.url and decision.pool == name
                    else ""
                )
                lines.append(f"  {i}. {worker.url} weight {worker.weight:g} {state}{mark}")
            if decision.pool == name:
                break
        lines.append(f"decision: {decision.summary()}")
        return lines
