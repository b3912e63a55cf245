"""MetricsListener: the Prometheus endpoint (`metrics.listen`) on its own address."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy.utils import asyncio_utils

from ..config import RouterConfig
from ..metrics import MetricsServer
from ..state import RouterState

log = logging.getLogger("synapse_router")


class MetricsListener:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.listen: str | None = None  # what the configuration asks for
        self._server: MetricsServer | None = None

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        def switch() -> None:
            self.listen = config.metrics_listen
            if self._server is not None and self._server.listen != self.listen:
                self._move(self._server)
            else:
                self._serve()

        return switch

    def running(self) -> None:
        self._serve()

    async def done(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    def _move(self, old: MetricsServer) -> None:
        """Serve on the new address, and only once it listens stop the old one: a new address
        that cannot be bound leaves the endpoint where it was (binding is asynchronous, so it
        cannot be part of preparing a configuration)."""
        listen = self.listen
        new = MetricsServer(self.state.metrics.render, listen) if listen is not None else None

        async def move() -> None:
            if new is not None:
                try:
                    await new.start()
                except OSError as e:
                    log.error(
                        f"synapse-router: cannot serve metrics on {listen}: {e.strerror or e}; "
                        f"they stay on http://{old.listen}/metrics"
                    )
                    return
                log.info(f"synapse-router: metrics on http://{listen}/metrics")
            self._server = new
            await old.stop()

        asyncio_utils.create_task(move(), name="metrics listener move", keep_ref=True)

    def _serve(self) -> None:
        listen = self.listen
        if listen is None or self._server is not None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not running yet: running() starts it
            return
        server = self._server = MetricsServer(self.state.metrics.render, listen)

        async def start() -> None:
            try:
                await server.start()
            except OSError as e:
                log.error(f"synapse-router: cannot serve metrics on {listen}: {e.strerror or e}")
                return
            log.info(f"synapse-router: metrics on http://{listen}/metrics")

        asyncio_utils.create_task(start(), name="metrics listener", keep_ref=True)
