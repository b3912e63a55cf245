"""MetricsListener: the Prometheus endpoint (`metrics.listen`) on its own address."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from mitmproxy.utils import asyncio_utils

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
        # A --processes child's private channel to its parent (launcher/channels.py): the same
        # endpoint, served from start to done on a socket the parent made for this slot.
        self.channel: socket.socket | None = None
        self._channel_server: MetricsServer | None = None

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

    async def running(self) -> None:
        # Awaited before start-up is over: a `--replace` router stops the old one only once
        # its own endpoint listens (the old one then leaves the shared address to it).
        self._running = True
        if self.channel is not None and self._channel_server is None:
            self._channel_server = MetricsServer(
                self.state.metrics.render,
                "the --processes parent's channel",
                ready=self.state.not_ready,
                sock=self.channel,
            )
            await self._channel_server.start()
        self._listener.want(self.listen)
        await self._listener.settled()

    def stopping(self) -> None:
        """A graceful stop began. If another router listens on the metrics address too (the one
        replacing this one, `--replace`), it answers `/health`, `/ready` and `/metrics` from now
        on: this one stops listening (answering the probes already queued), so no probe meets
        this router's `/ready` 503 while the new one is ready. Otherwise they stay until done."""
        server = self._listener.server
        if isinstance(server, MetricsServer) and server.shares_its_port():
            log.info(
                f"synapse-router: stopping: /health, /ready and /metrics left to the router sharing {server.bound}"
            )
            asyncio_utils.create_task(self._listener.close(), name="metrics hand-over", keep_ref=True)

    async def done(self) -> None:
        self._running = False
        await self._listener.close()
        channel, self._channel_server = self._channel_server, None
        if channel is not None:
            await channel.stop()
