"""Worker pools and how one worker of a pool is chosen for a request."""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from .hrw import Node, Rendezvous
from .routes import Balance
from .upstream import Upstream

Unusable = Container[str]  # URLs of workers that may not take requests now (down or drained)


class Pool:
    """The workers of one pool. Selection state (round-robin weights) lives here, owned by
    the addon instance that built the pool."""

    def __init__(self, name: str, workers: Sequence[Upstream]) -> None:
        self.name = name
        self.workers: tuple[Upstream, ...] = tuple(workers)
        self.by_url: dict[str, Upstream] = {w.url: w for w in self.workers}
        self.ring = Rendezvous([Node(w.url, w.weight) for w in self.workers])
        self._rr_current: dict[str, float] = {w.url: 0.0 for w in self.workers}

    def choose(
        self,
        balance: Balance,
        key: str | None,
        unusable: Unusable,
        in_flight: Mapping[str, int],
    ) -> Upstream | None:
        """A usable worker for a request, or None when the pool has none."""
        if balance is Balance.LEAST_CONN:
            return self._least_conn(unusable, in_flight)
        if balance is Balance.ROUND_ROBIN or key is None:
            return self._smooth_round_robin(unusable)
        node = self.ring.pick(key, unusable)
        return None if node is None else self.by_url[node.name]

    def ranking(self, key: str) -> list[Upstream]:
        """The pool's workers in the order a key tries them (rendezvous order)."""
        return [self.by_url[n.name] for n in self.ring.rank(key)]

    def _smooth_round_robin(self, unusable: Unusable) -> Upstream | None:
        # nginx's smooth weighted round robin: evenly interleaved, weights honoured.
        best: Upstream | None = None
        total = 0.0
        current = self._rr_current
        for w in self.workers:
            if w.url in unusable:
                continue
            current[w.url] += w.weight
            total += w.weight
            if best is None or current[w.url] > current[best.url]:
                best = w
        if best is not None:
            current[best.url] -= total
        return best

    def _least_conn(self, unusable: Unusable, in_flight: Mapping[str, int]) -> Upstream | None:
        best: Upstream | None = None
        best_load = 0.0
        for w in self.workers:
            if w.url in unusable:
                continue
            load = in_flight.get(w.url, 0) / w.weight
            if best is None or load < best_load:
                best, best_load = w, load
        return best


def build_pools(pools: Mapping[str, Sequence[Upstream]]) -> dict[str, Pool]:
    return {name: Pool(name, workers) for name, workers in pools.items()}
