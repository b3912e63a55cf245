"""Weighted rendezvous (highest-random-weight) hashing.

Every (key, node) pair gets a pseudo-random score; a key goes to the eligible node with the
highest score. Removing a node moves only that node's keys, and they spread over the
survivors in proportion to weight, because each key's runner-up is independent of the rest.
Weighted score: -w / ln(u), u uniform in (0, 1) (Schindelhauer & Schomaker). With equal
weights the ranking by u alone is the same, so the log is skipped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

_MASK64 = (1 << 64) - 1
_TWO64 = float(1 << 64)


def key_hash(key: str) -> int:
    """64-bit hash of a routing key, stable across processes and machines."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest())


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-distributed 64-bit permutation."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    weight: float = 1.0
    seed: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be a positive number, got {self.weight!r}")
        object.__setattr__(self, "seed", key_hash(self.name))


RANKINGS_KEPT = 8192  # keys whose node order a Rendezvous remembers (the oldest forgotten first)


class Rendezvous:
    """An immutable set of nodes that ranks keys by rendezvous score.

    `pick` remembers the node order of the last RANKINGS_KEPT keys (as bytes of node indices,
    about 100 bytes a key with 16 nodes): a key seen again (a user's next request) costs a dict
    lookup instead of a hash and a score per node. The order is the one `rank` gives."""

    __slots__ = ("nodes", "_uniform", "_orders")

    def __init__(self, nodes: Sequence[Node]) -> None:
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self._uniform = len({n.weight for n in nodes}) <= 1
        self._orders: dict[str, bytes] = {}

    def _score(self, node: Node, h: int) -> float:
        u = _mix(h ^ node.seed)
        if self._uniform:
            return float(u)
        return -node.weight / math.log((u + 0.5) / _TWO64)

    def pick(self, key: str, excluded: Container[str] = ()) -> Node | None:
        """The highest-scoring node for key whose name is not excluded, or None."""
        if len(self.nodes) > 256:
            return self._pick(key, excluded)
        order = self._orders.get(key)
        if order is None:
            order = self._order(key)
            if len(self._orders) >= RANKINGS_KEPT:
                del self._orders[next(iter(self._orders))]
            self._orders[key] = order
        nodes = self.nodes
        for i in order:
            node = nodes[i]
            if node.name not in excluded:
                return node
        return None

    def _order(self, key: str) -> bytes:
        """Node indices, highest score first (ties: the earlier node first, as `_pick`)."""
        h = key_hash(key)
        scores = [self._score(node, h) for node in self.nodes]
        return bytes(sorted(range(len(scores)), key=scores.__getitem__, reverse=True))

    def _pick(self, key: str, excluded: Container[str]) -> Node | None:
        """`pick` without remembering: one score per node."""
        h = key_hash(key)
        best: Node | None = None
        best_score = -1.0
        uniform = self._uniform
        for node in self.nodes:
            if node.name in excluded:
                continue
            # _score inlined: this loop is the hot path of every sticky request
            x = h ^ node.seed
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
            u = x ^ (x >> 31)
            s = float(u) if uniform else -node.weight / math.log((u + 0.5) / _TWO64)
            if s > best_score:
                best, best_score = node, s
        return best

    def rank(self, key: str) -> list[Node]:
        """All nodes, best first: the order in which a key fails over."""
        h = key_hash(key)
        return sorted(self.nodes, key=lambda n: self._score(n, h), reverse=True)
