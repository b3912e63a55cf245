"""One Prometheus endpoint for the N processes of `synapse-router --processes N`.

With `metrics.listen` on port P, process i (1-based) serves its own metrics on P + i and the
parent serves P: every process's exposition (asked on the process's private channel,
channels.py) with each sample labelled `process="i"`, plus `synapse_router_process_up{process}`
(0 for a process not serving, i.e. starting or dead, which is not asked, or that did not
answer within SCRAPE_TIMEOUT) and
`synapse_router_process_restarts_total{process}` (how often the parent restarted that process
after it died). Counters are not summed here: `sum without (process) (...)` does that in
PromQL, and a process that exits takes its series with it instead of making a summed counter go
backwards. The parent serves the merge with MergedMetricsServer, on a thread of its own.
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
    """Renders the merged metrics of the processes, each asked on its slot's private channel
    (`addresses`, channels.py: never another router's process, wherever `metrics.listen` is)."""

    def __init__(
        self,
        addresses: Sequence[str],
        restarts: Callable[[], Mapping[int, int]] | None = None,
        serving: Callable[[int], bool] = lambda _index: True,
    ) -> None:
        self.addresses = list(addresses)
        self.restarts = restarts  # slot index (0-based) -> restarts
        # slot index (0-based) -> whether its process serves: one starting (restarted after it
        # died) would hold a scrape or `/ready` until it serves or SCRAPE_TIMEOUT passes
        self.serving = serving
        self._clients: list[httpx.AsyncClient] | None = None

    def _each(self) -> list[httpx.AsyncClient]:
        if self._clients is None:
            self._clients = [
                httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=address), timeout=SCRAPE_TIMEOUT)
                for address in self.addresses
            ]
        return self._clients

    async def render(self) -> bytes:
        clients = self._each()
        texts = await asyncio.gather(*(self._scrape(index, client) for index, client in enumerate(clients)))
        restarts = None
        if self.restarts is not None:
            restarts = {str(index + 1): count for index, count in self.restarts().items()}
        return merge([(str(i), text) for i, text in enumerate(texts, start=1)], restarts)

    async def not_ready(self) -> str | None:
        """Why the processes should get no new traffic: the first one that is not ready (or
        not serving, or not answering), or None when every one is."""

        async def ask(index: int, client: httpx.AsyncClient) -> str | None:
            name = f"process {index + 1}"
            if not self.serving(index):
                return f"{name} is not serving (starting, or exited)"
            try:
                response = await client.get(f"http://{_HOST}{READY_PATH}")
            except httpx.HTTPError:
                return f"{name} does not answer"
            if response.status_code == 200:
                return None
            return f"{name} " + response.text.strip()[:200]

        answers = await asyncio.gather(*(ask(index, client) for index, client in enumerate(self._each())))
        return next((a for a in answers if a is not None), None)

    async def close(self) -> None:
        clients, self._clients = self._clients, None
        for client in clients or ():
            await client.aclose()

    async def _scrape(self, index: int, client: httpx.AsyncClient) -> str | None:
        if not self.serving(index):
            return None
        try:
            response = await client.get(f"http://{_HOST}{METRICS_PATH}")
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None


_HOST = "process"  # the Host of a request on a private channel (any name: the socket is the address)


class _MergedServer:
    """The merged endpoint on one address: an HTTP server answering from the processes' scrapes."""

    def __init__(self, listen: str, source: ProcessMetrics, stopping: Callable[[], bool]) -> None:
        self.listen = listen
        self._source = source
        self._stopping = stopping
        self._server = MetricsServer(source.render, listen, ready=self._not_ready)

    @property
    def bound(self) -> str:
        return self._server.bound

    async def _not_ready(self) -> str | None:
        if self._stopping():
            return "stopping"
        return await self._source.not_ready()

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    def shares_its_port(self) -> bool:
        return self._server.shares_its_port()


class MergedMetricsServer:
    """The parent's metrics endpoint (the merge of its processes', asked on their private
    channels: `addresses`), on a thread and event loop of its own: the parent's main thread
    waits for its children. `serve` asks for the address the applied configuration names; one
    task serves the last one asked for (listener.py)."""

    def __init__(
        self,
        addresses: Sequence[str],
        warn: Callable[[str], None],
        restarts: Callable[[], Mapping[int, int]] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        info: Callable[[str], None] = lambda _message: None,
        serving: Callable[[int], bool] = lambda _index: True,
    ) -> None:
        self.warn = warn
        self.loop = asyncio.new_event_loop()
        self.source = ProcessMetrics(addresses, restarts, serving)
        self.listener = SwitchedListener(
            lambda listen: _MergedServer(listen, self.source, stopping),
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
        async def close() -> None:
            await self.listener.close()
            await self.source.close()

        with contextlib.suppress(TimeoutError):  # the parent exits anyway; the thread is a daemon
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
