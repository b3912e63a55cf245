"""HealthChecks: which workers may take requests. Active `/health` checks, passive marking on
a refused connection, drain and undrain, and the per-worker gauges (routing/availability.py holds the state)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import httpx
from mitmproxy import command, exceptions
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.utils import asyncio_utils

from ..config import RouterConfig
from ..routing.availability import HealthConfig
from ..routing.upstream import parse_upstream_url
from .state import RouterState

log = logging.getLogger("synapse_router")


class HealthChecks:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._main_streak = 0  # main's checks: > 0 passed in a row, < 0 failed in a row

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        def switch() -> None:
            workers = self.state.workers
            workers.config = config.health
            workers.track(config.worker_urls(), config.drained_urls())
            self.publish(config)

        return switch

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio_utils.create_task(self._check_forever(), name="health checks", keep_ref=True)

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        """A refused connection on mitmproxy's path takes the worker down at once."""
        if data.server.address is None:
            return
        url = self._url_of(data.server.address)
        if url is not None:
            self.mark_down(url, f"connect failed: {data.server.error}")

    def mark_down(self, url: str, reason: str) -> None:
        """A passive failure (a refused connection): down at once, and said so if it was up."""
        if self.state.workers.mark_down(url, reason):
            self.changed(url)

    def changed(self, url: str) -> None:
        """A worker changed state: say so; its kept-alive connections go. The requests waiting on
        it are cut (and resent) if it is dead or wedged: its connections failed, or it has sent
        nothing on any of them for as long as its health checks have been failing. A worker
        that timed out its checks but still answers requests is busy (a storm of initial
        syncs): cutting would throw away work done and pile it onto the others."""
        health = self.state.workers.workers.get(url)
        if health is None:
            return
        self.publish()
        if health.up:
            log.info(f"synapse-router: worker {url} is UP")
        else:
            log.warning(f"synapse-router: worker {url} is DOWN: {health.reason}")
            config = self.state.workers.config
            failing_for = config.timeout + (config.fall - 1) * config.interval
            wedged = self.state.upstream.silent_for(url) >= failing_for
            self.state.upstream.abort(url, cut_busy=health.unreachable or wedged)

    def publish(self, config: RouterConfig | None = None) -> None:
        """The per-worker gauges; a worker no longer configured loses its series."""
        engine = self.state.engine
        pools = config.pools if config is not None else engine.config.pools if engine is not None else {}
        published: set[tuple[str, str]] = set()
        for name, workers in pools.items():
            for worker in workers:
                health = self.state.workers.workers.get(worker.url)
                if health is not None:
                    self.state.metrics.set_worker_state(name, worker.url, health.up, health.drained)
                    published.add((name, worker.url))
        for pool, url in self.state.published - published:
            self.state.metrics.remove_worker(pool, url)
        self.state.published = frozenset(published)

    # --- commands (mitmproxy console / mitmweb: `:router.drain ...`) ---

    @command.command("router.drain")
    def drain(self, worker: str) -> None:
        """Take a worker (URL as configured) out of rotation; its in-flight requests finish."""
        self._set_drained(worker, True)

    @command.command("router.undrain")
    def undrain(self, worker: str) -> None:
        """Put a drained worker back into rotation."""
        self._set_drained(worker, False)

    @command.command("router.workers")
    def list_workers(self) -> Sequence[str]:
        """Every worker with its pools, health, drain state and requests in flight."""
        engine = self.state.engine
        if engine is None:
            return []
        pools_of: dict[str, list[str]] = {}
        for name, pool in engine.pools.items():
            for w in pool.workers:
                pools_of.setdefault(w.url, []).append(name)
        lines = []
        for url, health in self.state.workers.workers.items():
            state = "up" if health.up else f"DOWN ({health.reason})"
            if health.drained:
                state += ", drained"
            in_flight = self.state.in_flight.get(url, 0)
            lines.append(f"{url} pools={','.join(pools_of.get(url, []))} {state} in_flight={in_flight}")
        return lines

    def _set_drained(self, worker: str, drained: bool) -> None:
        try:
            url = parse_upstream_url(worker).url
            changed = self.state.workers.set_drained(url, drained)
        except (ValueError, KeyError):
            known = ", ".join(self.state.workers.workers) or "none"
            raise exceptions.CommandError(f"unknown worker {worker!r}; workers: {known}") from None
        if changed:
            self.publish()
            log.info(f"synapse-router: worker {url} {'drained' if drained else 'back in rotation'}")

    async def _check_forever(self) -> None:
        while True:
            config: HealthConfig = self.state.workers.config
            try:
                await self._check_all(config)
            except Exception:  # one bad round must not end the checks for good
                log.exception("synapse-router: health check round failed")
            await asyncio.sleep(config.interval)

    async def _check_all(self, config: HealthConfig) -> None:
        urls = list(self.state.workers.workers)
        main = self.state.main
        checks = [check_worker(self._client(), url, config) for url in urls]
        if main is not None:
            checks.append(check_worker(self._client(), main.url, config))
        results = await asyncio.gather(*checks)
        for url, (ok, reason, unreachable) in zip(urls, results, strict=False):
            if self.state.workers.record_check(url, ok, reason, unreachable):
                self.changed(url)
        if main is not None:
            ok, reason, _ = results[-1]
            self._record_main(ok, reason, config)

    def _record_main(self, ok: bool, reason: str, config: HealthConfig) -> None:
        """Main is never taken out of routing (it is the last resort); its checks only decide
        readiness: unreachable after `fall` failures in a row, reachable after `rise` passes."""
        if ok:
            self._main_streak = max(self._main_streak, 0) + 1
        else:
            self._main_streak = min(self._main_streak, 0) - 1
        was = self.state.main_reachable
        if self._main_streak >= config.rise or (was is None and ok):
            self.state.main_reachable = True
        elif -self._main_streak >= config.fall:
            self.state.main_reachable = False
        if self.state.main_reachable is False and was is not False:
            log.warning(f"synapse-router: main is unreachable ({reason}): not ready")
        elif self.state.main_reachable and was is False:
            log.info("synapse-router: main is reachable again: ready")

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32), trust_env=False
            )
        return self._http

    def _url_of(self, address: tuple[str, int]) -> str | None:
        for url in self.state.workers.workers:
            upstream = parse_upstream_url(url)
            if (upstream.host, upstream.port) == (address[0], address[1]):
                return url
        return None


async def check_worker(client: httpx.AsyncClient, url: str, config: HealthConfig) -> tuple[bool, str, bool]:
    """One active check: GET <url><path> must answer 200 within the timeout. Returns (ok, why
    not, whether the connection itself failed: refused, reset, closed unanswered)."""
    try:
        response = await client.get(url + config.path, timeout=config.timeout)
    except httpx.TimeoutException:
        return False, "health check timed out", False
    except (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as e:
        return False, f"health check failed: {type(e).__name__}", True
    except httpx.HTTPError as e:
        return False, f"health check failed: {type(e).__name__}", False
    if response.status_code != 200:
        return False, f"health check answered {response.status_code}", False
    return True, "", False
