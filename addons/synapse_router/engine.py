"""The routing decision, free of mitmproxy: route a request, walk its pool chain, pick a worker."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from .config import RouterConfig, Upstream
from .pools import Pool, Unusable, build_pools
from .routes import MAIN, Match, Route, RouteTable


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
    # To choose again after a failure: the route and key (in memory only, never shown).
    matched: Route | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    @property
    def worker(self) -> str:
        return self.upstream.url if self.upstream else MAIN

    def summary(self) -> str:
        """One line for a flow comment: no token, no user id."""
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
        }


class Engine:
    """An immutable view of one configuration: its route table and pools."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.table = RouteTable(config.routes)
        self.pools: dict[str, Pool] = build_pools(config.pools)

    def match(self, method: str, path_and_query: str) -> Match:
        return self.table.match(method, path_and_query)

    def chain(self, route: Route | None) -> list[str]:
        """The configured pools a route may use, in order, ending with main."""
        if route is None:
            return [MAIN]
        return [p for p in route.pools if p in self.pools] + [MAIN]

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
        return decision

    def failover(self, failed: Decision, unusable: Set[str], in_flight: Mapping[str, int], reason: str) -> Decision:
        """Choose again for a request whose worker failed: the same route and key, without it.
        With rendezvous balancing this is the key's next-highest-scoring worker."""
        assert failed.upstream is not None
        again = self.select(failed.matched, failed.key, failed.key_kind, unusable | {failed.upstream.url}, in_flight)
        again.identity = failed.identity
        again.failover = f"{failed.upstream.url} -> {again.worker}: {reason}"
        return again
