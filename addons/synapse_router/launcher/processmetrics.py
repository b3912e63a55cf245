"""One Prometheus endpoint for the N processes of `synapse-router --processes N`.

With `metrics.listen` on port P, process i (1-based) serves its own metrics on P + i and the
parent serves P: every process's exposition with each sample labelled `process="i"`, plus
`synapse_router_process_up{process}` (0 for a process that did not answer within
SCRAPE_TIMEOUT) and `synapse_router_process_restarts_total{process}` (how often the parent
restarted that process after it died). Counters are not summed here: `sum without (process) (...)` does that in
PromQL, and a process that exits takes its series with it instead of making a summed counter
go backwards. The parent serves the merge with MergedMetricsServer, on a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ..observability.metrics_server import METRICS_PATH, READY_PATH, MetricsServer
from ..routing.upstream import parse_listen
from .listener import SwitchedListener

PROCESS_LABEL = "process"
PROCESS_UP = "synapse_router_process_up"
PROCESS_RESTARTS = "synapse_router_process_restarts"
SCRAPE_TIMEOUT = 2.0  # seconds for each process to answer


def merge(expositions: Sequence[tuple[str, str | None]], restarts: Mapping[str, int] | None = None) -> bytes:
    """(process label, its exposition or None if it did not answer) -> one exposition;
    `restarts`: process label -> times the parent restarted it."""
    families: dict[str, Metric] = {}
    up = Metric(PROCESS_UP, "1 if this router process answered the parent's scrape, else 0.", "gauge")
    restarted = Metric(
        PROCESS_RESTARTS, "Times the --processes parent restarted this router process after it died.", "counter"
    )
    for process, count in sorted((restarts or {}).items()):
        restarted.samples.append(Sample(f"{PROCESS_RESTARTS}_total", {PROCESS_LABEL: process}, float(count)))
    for process, text in expositions:
        parsed = _parse(text)
        up.samples.append(Sample(PROCESS_UP, {PROCESS_LABEL: process}, 0.0 if parsed is None else 1.0))
        for family in parsed or ():
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, PROCESS_LABEL: process}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([up, *([restarted] if restarts is not None else []), *families.values()]))
    return generate_latest(registry)


def _parse(text: str | None) -> list[Metric] | None:
    if text is None:
        return None
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:  # not an exposition: a process that answers it is not one of ours
        return None


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


class ProcessMetrics:
    """Renders the merged metrics of the processes serving on `host`, ports base + 1 .. base + count."""

    def __init__(
        self, host: str, base_port: int, count: int, restarts: Callable[[], Mapping[int, int]] | None = None
    ) -> None:
        self.count = count
        self.urls: list[str] = []
        self.aim(host, base_port)
        self.restarts = restarts  # slot index (0-based) -> restarts
        self._client: httpx.AsyncClient | None = None

    def aim(self, host: str, base_port: int) -> None:
        """Scrape the processes serving on `host`, ports base + 1 .. base + count from now on."""
        self.urls = [f"http://{_dialable(host)}:{base_port + i}{METRICS_PATH}" for i in range(1, self.count + 1)]

    async def render(self) -> bytes:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT, trust_env=False)
        texts = await asyncio.gather(*(self._scrape(self._client, url) for url in self.urls))
        restarts = None
        if self.restarts is not None:
            restarts = {str(index + 1): count for index, count in self.restarts().items()}
        return merge([(str(i), text) for i, text in enumerate(texts, start=1)], restarts)

    async def not_ready(self) -> str | None:
        """Why the processes should get no new traffic: the first one that is not ready (or
        does not answer), or None when every one is."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT, trust_env=False)
        client = self._client

        async def ask(i: int, url: str) -> str | None:
            try:
                response = await client.get(url.removesuffix(METRICS_PATH) + READY_PATH)
            except httpx.HTTPError:
                return f"process {i} does not answer"
            if response.status_code == 200:
                return None
            return f"process {i} " + response.text.strip()[:200]

        answers = await asyncio.gather(*(ask(i, url) for i, url in enumerate(self.urls, start=1)))
        return next((a for a in answers if a is not None), None)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @staticmethod
    async def _scrape(client: httpx.AsyncClient, url: str) -> str | None:
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None


def _dialable(host: str) -> str:
    """The address to reach a listener bound to `host` (all interfaces: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class _MergedServer:
    """The merged endpoint on one address: its scrapes of the processes and its HTTP server."""

    def __init__(
        self,
        listen: str,
        count: int,
        restarts: Callable[[], Mapping[int, int]] | None,
        stopping: Callable[[], bool],
        configured: Callable[[], str | None],
    ) -> None:
        self.listen = listen
        host, port = parse_listen(listen)
        self._source = ProcessMetrics(host, port, count, restarts)
        self._stopping = stopping
        self._configured = configured
        self._server = MetricsServer(self._render, listen, ready=self._not_ready)

    @property
    def bound(self) -> str:
        return self._server.bound

    def _aim(self) -> None:
        """The processes serve on the configured P + i even while this endpoint stays on an
        older address (the configured one could not be bound): scrape them there."""
        configured = self._configured()
        if configured is not None:
            self._source.aim(*parse_listen(configured))

    async def _render(self) -> bytes:
        self._aim()
        return await self._source.render()

    async def _not_ready(self) -> str | None:
        if self._stopping():
            return "stopping"
        self._aim()
        return await self._source.not_ready()

    async def start(self) -> None:
        try:
            await self._server.start()
        except OSError:
            await self._source.close()
            raise

    async def stop(self) -> None:
        await self._server.stop()
        await self._source.close()

    def shares_its_port(self) -> bool:
        return self._server.shares_its_port()


class MergedMetricsServer:
    """The parent's metrics endpoint (the merge of its processes'), on a thread and event loop
    of its own: the parent's main thread waits for its children. `serve` asks for the address the
    applied configuration names; one task serves the last one asked for (listener.py)."""

    def __init__(
        self,
        count: int,
        warn: Callable[[str], None],
        restarts: Callable[[], Mapping[int, int]] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        info: Callable[[str], None] = lambda _message: None,
    ) -> None:
        self.count = count
        self.warn = warn
        self.loop = asyncio.new_event_loop()
        self.configured: str | None = None  # the address the configuration names (P)
        self.listener = SwitchedListener(
            lambda listen: _MergedServer(listen, count, restarts, stopping, lambda: self.configured),
            warn,
            info,
            what="merged metrics of the processes",
        )
        self.thread = threading.Thread(target=self.loop.run_forever, name="merged-metrics", daemon=True)
        self.thread.start()

    def serve(self, listen: str | None) -> None:
        """Serve the merged metrics on `listen` (None: not at all) from now on."""
        self.loop.call_soon_threadsafe(self._want, listen)

    def _want(self, listen: str | None) -> None:
        self.configured = listen
        self.listener.want(listen)

    def served(self, timeout: float = 10.0) -> str | None:
        """The address served once the last request was acted on (for tests and logs)."""

        async def settle() -> str | None:
            await self.listener.settled()
            return self.listener.listen

        return asyncio.run_coroutine_threadsafe(settle(), self.loop).result(timeout=timeout)

    def hand_over(self, timeout: float = 10.0) -> bool:
        """A stop began: if another router listens on the served address too (the one that
        replaces this one, `--replace`), stop serving there (answering the probes already
        queued), so that it answers them from now on. Whether it did."""

        async def hand_over() -> bool:
            server = self.listener.server
            if not isinstance(server, _MergedServer) or not server.shares_its_port():
                return False
            await self.listener.close()
            return True

        with contextlib.suppress(TimeoutError):
            return asyncio.run_coroutine_threadsafe(hand_over(), self.loop).result(timeout=timeout)
        return False

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError):  # the parent exits anyway; the thread is a daemon
            asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
