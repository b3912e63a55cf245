"""Which workers may take requests: health (up/down) and operator drain, keyed by worker URL."""

from __future__ import annotations


class WorkerStates:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.drained: set[str] = set()
        self.unusable: frozenset[str] = frozenset()  # down or drained: what routing skips

    def _changed(self) -> None:
        self.unusable = frozenset(self.down | self.drained)
