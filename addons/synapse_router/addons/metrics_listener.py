"""MetricsListener: the Prometheus endpoint (`metrics.listen`) on its own address."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import RouterConfig
from ..launcher.listener import SwitchedListener
from ..observability.metrics_server import MetricsServer
from .state import RouterState

log = logging.getLogger("synapse_router")


class MetricsListener:
    """Serves the metrics where the configuration says, moved by one task (listener.py): a new
    address is served before the old one stops, and one that cannot be bound leaves it."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.listen: str | None = None  # what the configuration asks for
        self._listener = SwitchedListener(
            lambda listen: MetricsServer(self.state.metrics.render, listen, ready=self.state.not_ready),
            lambda message: log.error(f"synapse-router: {message}"),
            lambda message: log.info(f"synapse-router: {message}"),
        )
        self._running = False

    @property
    def served(self) -> str | None:
        """The address that listens now."""
        return self._listener.listen

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        def switch() -> None:
            self.listen = config.metrics_listen
            if self._running:  # before running() there is no loop: running() starts it
                self._listener.want(self.listen)

        return switch

    def running(self) -> None:
        self._running = True
        self._listener.want(self.listen)

    async def done(self) -> None:
        self._running = False
        await self._listener.close()
