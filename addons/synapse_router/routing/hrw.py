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


class Rendezvous:
    """An immutable set of nodes that ranks keys by rendezvous score."""

    __slots__ = ("nodes", "_uniform")

    def __init__(self, nodes: Sequence[Node]) -> None:
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self._uniform = len({n.weight for n in nodes}) <= 1

    def _score(self, node: Node, h: int) -> float:
        u = _mix(h ^ node.seed)
        if self._uniform:
            return float(u)
        return -node.weight / math.log((u + 0.5) / _TWO64)

    def pick(self, key: str, excluded: Container[str] = ()) -> Node | None:
        """The highest-scoring node for key whose name is not excluded, or None."""
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
