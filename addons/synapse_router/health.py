"""Which workers may take requests: health (up/down) and operator drain, keyed by worker URL."""

from __future__ import annotations


class WorkerStates:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.drained: set[str] = set()

    def usable(self, url: str) -> bool:
        return url not in self.down and url not in self.drained
