"""The mitmproxy-facing side: options, hooks, and nothing that could live in a pure module."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import httpx
from mitmproxy import command, ctx, exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from . import forward, tokens, wellformed
from .accesslog import AccessLogConfig, AccessLogFormatter, AccessRecord
from .config import ConfigError, RouterConfig, Upstream, WhoamiConfig, load_config, parse_upstream_url
from .engine import ROUTER, Decision, Engine
from .forwarding import ROUTER_HEADER_PREFIX, SPOOFABLE_HEADERS, TrustedProxies
from .health import HealthConfig, WorkerStates, check_worker
from .identity import IdentityResolver, Resolution, Source, TokenRejected, WhoamiCall, whoami_over_http
from .limits import ConnectionLimits
from .metrics import MetricsServer, RouterMetrics
from .query import query_param
from .routes import INITIAL_SYNC_ROUTE, MAIN, Balance, Match, room_from_path
from .sharedcache import SharedCache
from .signals import on_signal

log = logging.getLogger(__name__)
access_log = logging.getLogger("synapse_router.access")

METADATA_KEY = "synapse_router"
STREAM_THRESHOLD = 1024 * 1024  # bodies larger than this, or of unknown size, are streamed
MIN_TCP_TIMEOUT = 360  # seconds: above Synapse's longest long-poll (5 min) plus margin
LOGOUT_PATH = re.compile(r"^/_matrix/client/(?:api/v1|r0|v3|unstable)/logout(/all)?$")
CLIENT_SWEEP_INTERVAL = 1.0  # seconds between checks for clients that left a router-sent request
TOKEN_LABEL = re.compile(r"[0-9a-f]{8}")
# Libraries that log request headers (tokens included) at DEBUG: never below WARNING.
CHATTY_LOGGERS = ("httpx", "httpcore", "hpack", "h11")

# mitmproxy options a router cannot work without, and why.
REQUIRED_OPTIONS: dict[str, tuple[Any, str]] = {
    "connection_strategy": (
        "lazy",
        "an eager connection to the main process would fail every request when main is down",
    ),
    "block_global": (False, "clients on public addresses must be served"),
    "keep_host_header": (True, "Synapse must see the client's Host"),
    "anticache": (False, "it strips If-None-Match, which QR-login rendezvous needs"),
    "anticomp": (False, "the router never changes content encoding"),
    "http2": (False, "several long-polls multiplexed on one HTTP/2 connection would starve"),
}


class SynapseRouter:
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.config_path: str | None = None
        self.trusted = TrustedProxies()
        self.workers = WorkerStates()
        self.in_flight: dict[str, int] = {}
        self.identity: IdentityResolver | None = None
        self.main: Upstream | None = None  # the reverse-mode target, when in reverse mode
        self._http: httpx.AsyncClient | None = None  # whoami and health checks
        self._upstream = forward.UpstreamClient()  # requests the router sends (and retries) itself
        self._health_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        # router-sent requests in flight, by flow id: abandoned if their client leaves
        self._sending: dict[str, http.HTTPFlow] = {}
        # client connection id -> the flow waiting for its upstream connection (mitmproxy path)
        self._connecting: dict[str, http.HTTPFlow] = {}
        self.metrics = RouterMetrics()
        self.metrics.bind_cache_size(lambda: len(self.identity.users) if self.identity else 0)
        self.metrics.bind_shared_cache(
            lambda: self.identity.shared.available if self.identity and self.identity.shared else None
        )
        self._metrics_server: MetricsServer | None = None
        self._access: AccessLogFormatter | None = None
        self._access_file: Any = None  # an open text file, or None: the mitmproxy event log
        self.limits = ConnectionLimits(self.metrics)
        self.addons = [self.limits]  # sub-addons: mitmproxy calls their hooks after this one's

    # --- options ---

    def load(self, loader: Any) -> None:
        # httpx logs every whoami call at INFO, which mitmproxy shows by default; httpcore and
        # hpack print request headers, tokens included, at DEBUG (`termlog_verbosity=debug`).
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        loader.add_option(
            "router_config",
            str | None,
            None,
            "Path of the synapse-router YAML configuration (pools of workers, custom routes).",
        )

    def configure(self, updated: set[str]) -> None:
        if "router_config" in updated:
            try:
                config = self._load(ctx.options.router_config)
            except ConfigError as e:
                raise exceptions.OptionsError(f"router_config {ctx.options.router_config}: {e}") from e  # type: ignore[no-untyped-call]
            self._use(config, ctx.options.router_config)
        if "mode" in updated:
            target = _reverse_target(ctx.options.mode)
            if target is not None:
                self.main = target
        self._enforce_options(updated)

    def running(self) -> None:
        self._client()
        self._serve_metrics()
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._check_health_forever())
            self._sweep_task = asyncio.create_task(self._cancel_abandoned_forever())
            # `kill -HUP` reloads the configuration, as nginx does: mitmdump has no console.
            try:
                on_signal(signal.SIGHUP, self.reload)
            except (RuntimeError, ValueError):
                log.info("synapse-router: SIGHUP reload unavailable here; use the router.reload command")

    async def done(self) -> None:
        for task in (self._health_task, self._sweep_task):
            if task is not None:
                task.cancel()
        self._health_task = self._sweep_task = None
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        self._open_access_log(AccessLogConfig())
        if self.identity is not None and self.identity.shared is not None:
            await self.identity.shared.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._upstream.close()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                trust_env=False,
            )
        return self._http

    def _build_identity(self, config: WhoamiConfig) -> IdentityResolver:
        def base_url() -> str:
            if config.url is not None:
                return config.url.url
            return self.main.url if self.main is not None else "http://127.0.0.1:8008"

        shared = SharedCache(config.redis) if config.redis else None
        return IdentityResolver(
            config, self._observed(whoami_over_http(self._client, base_url, config.timeout)), shared=shared
        )

    def _observed(self, call: WhoamiCall) -> WhoamiCall:
        async def observed(
            token: str, as_user: str | None, user_agent: str | None, client_ip: str, budget: float
        ) -> str:
            started = time.perf_counter()
            outcome = "error"
            try:
                user = await call(token, as_user, user_agent, client_ip, budget)
                outcome = "user"
                return user
            except TokenRejected:
                outcome = "rejected"
                raise
            finally:
                self.metrics.observe_whoami(outcome, time.perf_counter() - started)

        return observed

    @staticmethod
    def _load(path: str | None) -> RouterConfig:
        if not path:
            log.warning("synapse-router: no router_config set: every request goes to the main process")
            return RouterConfig()
        return load_config(path)

    def _use(self, config: RouterConfig, path: str | None) -> None:
        """Switch to a configuration. In-flight flows keep the decision they were given."""
        self.engine = Engine(config)
        self.config_path = path
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.limits.use(config.limits)
        if self.identity is None or self.identity.config != config.whoami:
            old = self.identity
            self.identity = self._build_identity(config.whoami)
            if old is not None and old.shared is not None:
                asyncio.get_running_loop().create_task(old.shared.close())
        self.workers.config = config.health
        worker_urls = config.worker_urls()
        self.workers.track(worker_urls, config.drained_urls())
        self._upstream.keep_only(worker_urls)
        self._publish_worker_states()
        self._open_access_log(config.access_log)
        if self._metrics_server is not None and config.metrics_listen != self._metrics_server.listen:
            asyncio.get_running_loop().create_task(self._metrics_server.stop())
            self._metrics_server = None
            self._serve_metrics()
        pools = ", ".join(f"{name}={len(ws)}" for name, ws in config.pools.items()) or "none"
        log.info(f"synapse-router: loaded {path}: pools {pools}, {len(config.routes)} custom route(s)")

    def _serve_metrics(self) -> None:
        listen = self.engine.config.metrics_listen if self.engine else None
        if listen is None or self._metrics_server is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not running yet: running() starts it
            return
        server = self._metrics_server = MetricsServer(self.metrics.render, listen)

        async def start() -> None:
            try:
                await server.start()
            except OSError as e:
                log.error(f"synapse-router: cannot serve metrics on {listen}: {e.strerror or e}")
                return
            log.info(f"synapse-router: metrics on http://{listen}/metrics")

        loop.create_task(start())

    def _open_access_log(self, config: AccessLogConfig) -> None:
        if self._access_file is not None:
            self._access_file.close()
            self._access_file = None
        self._access = AccessLogFormatter(config.format, config.include_user) if config.enabled else None
        if config.enabled and config.path:
            self._access_file = open(config.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def _publish_worker_states(self) -> None:
        if self.engine is None:
            return
        for name, pool in self.engine.pools.items():
            for worker in pool.workers:
                health = self.workers.workers.get(worker.url)
                if health is not None:
                    self.metrics.set_worker_state(name, worker.url, health.up, health.drained)

    async def _check_health_forever(self) -> None:
        while True:
            config: HealthConfig = self.workers.config
            urls = list(self.workers.workers)
            results = await asyncio.gather(*(check_worker(self._client(), url, config) for url in urls))
            for url, (ok, reason) in zip(urls, results, strict=True):
                if self.workers.record_check(url, ok, reason):
                    self._log_state(url)
            await asyncio.sleep(config.interval)

    def _log_state(self, url: str) -> None:
        """A worker changed state: say so, and release the requests waiting on a dead one."""
        health = self.workers.workers.get(url)
        if health is None:
            return
        self._publish_worker_states()
        if health.up:
            log.info(f"synapse-router: worker {url} is UP")
        else:
            log.warning(f"synapse-router: worker {url} is DOWN: {health.reason}")
            self._upstream.abort(url)

    def _enforce_options(self, updated: set[str]) -> None:
        changes: dict[str, Any] = {}
        for name, (value, why) in REQUIRED_OPTIONS.items():
            if name in updated and name in ctx.options and getattr(ctx.options, name) != value:
                changes[name] = value
                log.info(f"synapse-router: setting {name}={value}: {why}")
        if "tcp_timeout" in updated and "tcp_timeout" in ctx.options and ctx.options.tcp_timeout < MIN_TCP_TIMEOUT:
            changes["tcp_timeout"] = MIN_TCP_TIMEOUT
            log.info(f"synapse-router: raising tcp_timeout to {MIN_TCP_TIMEOUT}s so 5-minute long-polls are never cut")
        if changes:
            ctx.options.update(**changes)  # type: ignore[no-untyped-call]

    # --- commands (mitmproxy console / mitmweb: `:router.explain ...`) ---

    @command.command("router.reload")
    def reload(self) -> None:
        """Reload the router configuration file; in-flight requests are not affected. A bad
        file is reported and the running configuration kept."""
        path = self.config_path or ctx.options.router_config
        try:
            config = self._load(path)
        except ConfigError as e:
            log.error(f"synapse-router: reload of {path} failed, keeping the running configuration: {e}")
            return
        self._use(config, path)

    @command.command("router.drain")
    def drain(self, worker: str) -> None:
        """Take a worker (URL as configured) out of rotation; its in-flight requests finish."""
        self._set_drained(worker, True)

    @command.command("router.undrain")
    def undrain(self, worker: str) -> None:
        """Put a drained worker back into rotation."""
        self._set_drained(worker, False)

    def _set_drained(self, worker: str, drained: bool) -> None:
        try:
            url = parse_upstream_url(worker).url
            changed = self.workers.set_drained(url, drained)
        except (ValueError, KeyError):
            known = ", ".join(self.workers.workers) or "none"
            raise exceptions.CommandError(f"unknown worker {worker!r}; workers: {known}") from None
        if changed:
            self._publish_worker_states()
            log.info(f"synapse-router: worker {url} {'drained' if drained else 'back in rotation'}")

    @command.command("router.workers")
    def list_workers(self) -> Sequence[str]:
        """Every worker with its pools, health, drain state and requests in flight."""
        if self.engine is None:
            return []
        pools_of: dict[str, list[str]] = {}
        for name, pool in self.engine.pools.items():
            for w in pool.workers:
                pools_of.setdefault(w.url, []).append(name)
        lines = []
        for url, health in self.workers.workers.items():
            state = "up" if health.up else f"DOWN ({health.reason})"
            if health.drained:
                state += ", drained"
            lines.append(
                f"{url} pools={','.join(pools_of.get(url, []))} {state} in_flight={self.in_flight.get(url, 0)}"
            )
        return lines

    @command.command("router.explain")
    def explain(self, path: str, method: str = "GET", who: str = "") -> Sequence[str]:
        """Where a request would go and why: route, pool chain, rendezvous ranking of the
        workers with their health. `who` is a user id (@alice:example.org), a token's
        8-hex-digit label as the access log and flows show it (resolved from the cache), or
        empty (keyed by 127.0.0.1). Never a token: mitmproxy saves commands in its history."""
        if self.engine is None:
            return ["no configuration loaded"]
        match = self.engine.match(method.upper(), path)
        resolution = None
        if who.startswith("@"):
            resolution = Resolution(who, Source.CACHE)
        elif who:
            if TOKEN_LABEL.fullmatch(who) is None:
                raise exceptions.CommandError(
                    "WHO is a user id (@user:server) or a token's 8-hex-digit label from the access log, "
                    "never a token (mitmproxy keeps a command history)"
                )
            user = self._user_of_label(who)
            resolution = Resolution(user, Source.CACHE) if user is not None else None
        key, key_kind = _balance_key(match, None, "127.0.0.1", resolution)
        return self.engine.explain(method.upper(), path, key, key_kind, self.workers.unusable)

    def _user_of_label(self, label: str) -> str | None:
        if self.identity is None:
            return None
        for key, user in list(self.identity.users.items()):
            if tokens.short_hash(key) == label:
                return user
        return None

    @command.command("router.flush")
    def flush(self) -> int:
        """Forget every cached token -> user answer; returns how many were dropped."""
        if self.identity is None:
            return 0
        dropped = len(self.identity.users) + len(self.identity.rejected)
        self.identity.clear()
        log.info(f"synapse-router: identity cache flushed ({dropped} entries)")
        return dropped

    # --- hooks ---

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Not `async def`: a cache hit routes synchronously; only a miss returns a coroutine,
        # which mitmproxy awaits, so the common case pays no task switch.
        self.limits.headers_complete(flow)
        if self.engine is None or flow.response is not None or flow.error is not None or not flow.live:
            return None
        request = flow.request
        client_ip = self._set_forwarding_headers(flow)
        match = self.engine.match(request.method, request.path)
        try:
            wellformed.check_request(request.method, request.authority, request.path, request.headers.fields)
            found = tokens.find_token(request.headers.get_all("authorization"), match.query)
        except wellformed.Refused as refused:
            self._refuse(flow, match, client_ip, refused)
            return None
        if found is not None and found.from_query:
            self._move_query_token_to_header(request, found, match)
        logout = LOGOUT_PATH.match(match.path) if found is not None else None
        if logout is not None and found is not None:
            flow.metadata[f"{METADATA_KEY}.logout"] = (logout.group(1) is not None, found.key)
        resolution = None
        if match.route is not None and match.route.balance is Balance.USER and found is not None and self.identity:
            resolution = self.identity.cached(found.key)
            if resolution is None:
                return self._route_after_whoami(flow, match, found, client_ip)
        self._route(flow, match, found, client_ip, resolution)
        return None

    async def _route_after_whoami(
        self, flow: http.HTTPFlow, match: Match, found: tokens.FoundToken, client_ip: str
    ) -> None:
        assert self.identity is not None
        resolution = await self.identity.resolve(
            found.key, found.token, found.as_user, flow.request.headers.get("user-agent"), client_ip
        )
        self._route(flow, match, found, client_ip, resolution)

    def _route(
        self,
        flow: http.HTTPFlow,
        match: Match,
        found: tokens.FoundToken | None,
        client_ip: str,
        resolution: Resolution | None,
    ) -> None:
        assert self.engine is not None
        key, key_kind = _balance_key(match, found, client_ip, resolution)
        decision = self.engine.select(match.route, key, key_kind, self.workers.unusable, self.in_flight)
        if resolution is not None:
            decision.identity = resolution.source.value
            self.metrics.observe_identity(decision.identity)
        for skipped in decision.fallbacks:
            self.metrics.observe_fallback(decision.route, skipped.split(":", 1)[0])
        if found is not None:
            flow.metadata[f"{METADATA_KEY}.token"] = tokens.short_hash(found.key)
        flow.metadata[f"{METADATA_KEY}.client_ip"] = client_ip
        self._apply(flow, decision)

    def _refuse(self, flow: http.HTTPFlow, match: Match, client_ip: str, refused: wellformed.Refused) -> None:
        """Answer a request the router will not pass on, with a Matrix error; nothing is sent."""
        route = match.route.name if match.route is not None else MAIN
        decision = Decision(route, ROUTER, None, "none", refused=refused.errcode)
        flow.metadata[f"{METADATA_KEY}.client_ip"] = client_ip
        flow.metadata[METADATA_KEY] = decision
        flow.response = matrix_error(refused.status, refused.errcode, str(refused))
        flow.comment = decision.summary()
        flow.marked = ":no_entry:"
        _redact_credentials(flow.request, None)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if not flow.metadata.get(f"{METADATA_KEY}.forward") or flow.response is not None:
            return None
        decision = self._decision(flow)
        return None if decision is None else self._forward_with_retry(flow, decision)

    async def _forward_with_retry(self, flow: http.HTTPFlow, decision: Decision) -> None:
        """Send the request to its worker; on a failed connection move on to the next worker
        (each failure marks one down, so this ends at main at the latest); after a worker that
        gave no response, retry once. A client that leaves cancels the exchange."""
        assert self.engine is not None
        request = flow.request
        method, path, headers = request.method, request.path, forward.request_headers(request.headers.fields)
        # A long-poll is in flight for up to minutes, in mitmweb's view: its token goes now.
        authorization = request.headers.get_all("authorization")
        _redact_credentials(request, flow.metadata.get(f"{METADATA_KEY}.token"))
        retried = False
        tried: set[str] = set()
        while True:
            upstream = decision.upstream
            if upstream is None:  # failed over to main: mitmproxy forwards it there, token and all
                request.headers.set_all("authorization", authorization)
                request.path = path
                return
            self._sending[flow.id] = flow
            try:
                answer = await self._upstream.send(
                    upstream, method, path, headers, self.workers.config.connect_timeout, owner=flow.id
                )
            except forward.BadRequest:
                flow.response = matrix_error(400, "M_INVALID_PARAM", "Invalid request header.")
                return
            except forward.NoResponse as e:
                if not flow.client_conn.state & ConnectionState.CAN_READ:
                    flow.kill()  # type: ignore[no-untyped-call]  # the client left: nothing to answer
                    return
                # A refused connection takes the worker down at once. A connect timeout or a
                # reset only moves this request: a burst filling the accept queue, or a client
                # abandoning its long-poll, look the same; the health checks judge the worker.
                if e.failure is forward.Failure.CONNECT_ERROR:
                    if self.workers.mark_down(upstream.url, str(e)):
                        self._log_state(upstream.url)
                connect_failed = e.failure is not forward.Failure.NO_RESPONSE
                if not connect_failed:  # the worker may have seen the request: resend it once
                    if retried:
                        flow.response = matrix_error(502, "M_UNKNOWN", "The server gave no response.")
                        return
                    retried = True
                    self.metrics.observe_retry(decision.pool)
                reason = "connect" if connect_failed else "no_response"
                decision = self._fail_over(flow, decision, tried, reason, str(e))
                continue
            finally:
                self._sending.pop(flow.id, None)
            flow.response = http.Response(
                http_version=b"HTTP/1.1",
                status_code=answer.status,
                reason=answer.reason,
                headers=http.Headers(answer.headers),
                content=None,
                trailers=None,
                timestamp_start=answer.headers_at,
                timestamp_end=time.time(),
            )
            flow.response.raw_content = answer.body
            return

    async def _cancel_abandoned_forever(self) -> None:
        """Cancel the router-sent exchanges whose client has closed its connection, as
        mitmproxy does for the requests it forwards (the worker connection is closed, so a
        client dropping long-polls cannot pin worker connections and descriptors)."""
        while True:
            await asyncio.sleep(CLIENT_SWEEP_INTERVAL)
            for flow_id, flow in list(self._sending.items()):
                if not flow.client_conn.state & ConnectionState.CAN_READ:
                    self._upstream.abandon(flow_id)

    def _fail_over(
        self, flow: http.HTTPFlow, failed: Decision, tried: set[str], reason: str, detail: str = ""
    ) -> Decision:
        """Move a request off a failed worker, never back to one it already tried. `reason` is
        a short fixed word (a metric label)."""
        assert self.engine is not None and failed.upstream is not None
        tried.add(failed.upstream.url)
        self.in_flight[failed.upstream.url] = max(0, self.in_flight.get(failed.upstream.url, 0) - 1)
        self.metrics.observe_failover(failed.pool, reason)
        why = f"{reason} ({detail})" if detail else reason
        decision = self.engine.failover(failed, self.workers.unusable | tried, self.in_flight, why)
        log.info(f"synapse-router: {failed.route}: failover {decision.failover}")
        self._apply(flow, decision)
        return decision

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        """Connect failover for requests mitmproxy forwards: probe the chosen worker within the
        connect timeout, and move the connection to the next worker if it does not answer."""
        flow = self._connecting.pop(data.client.id, None)
        decision = self._decision(flow) if flow is not None else None
        if flow is None or decision is None or decision.upstream is None:
            return
        if data.server.address != (decision.upstream.host, decision.upstream.port):
            return
        tried: set[str] = set()
        while (upstream := decision.upstream) is not None:
            error = await _probe(upstream, self.workers.config.connect_timeout)
            if error is None:
                break
            # Each failover excludes the failed worker, so this ends at main at the latest.
            if not error.startswith("no connection within") and self.workers.mark_down(
                upstream.url, f"connect failed: {error}"
            ):
                self._log_state(upstream.url)
            decision = self._fail_over(flow, decision, tried, "connect", error)
        target = decision.upstream or self.main
        if target is not None:
            data.server.address = (target.host, target.port)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        if data.server.address is None:
            return
        url = _url_of(self.workers.workers, data.server.address)
        if url is not None and self.workers.mark_down(url, f"connect failed: {data.server.error}"):
            self._log_state(url)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        decision = self._decision(flow)
        if decision is None or flow.response is None:
            return
        if decision.stream_bodies or _large_or_unknown(flow.request, flow.response):
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        if self._decision(flow) is None:  # answered before routing (a limit, mitmproxy itself)
            _redact_credentials(flow.request, None)
        decision = self._decision(flow)
        if decision is not None and flow.response is not None and self.engine and self.engine.config.debug_headers:
            flow.response.headers["X-Synapse-Router-Route"] = decision.route
            flow.response.headers["X-Synapse-Router-Pool"] = decision.pool
            flow.response.headers["X-Synapse-Router-Worker"] = decision.worker
        logout = flow.metadata.pop(f"{METADATA_KEY}.logout", None)
        if logout is not None and self.identity is not None and flow.response and flow.response.status_code == 200:
            everywhere, key = logout
            user = self.identity.users.get(key)
            self.identity.forget(key)
            if everywhere and user is not None:
                self.identity.forget_user(user)
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self._decision(flow) is None:  # refused by mitmproxy's parser, or failed before routing
            _redact_credentials(flow.request, None)
        self._finish(flow)

    # --- helpers ---

    def _set_forwarding_headers(self, flow: http.HTTPFlow) -> str:
        headers = flow.request.headers
        fwd = self.trusted.resolve(
            flow.client_conn.peername[0] if flow.client_conn.peername else "",
            headers.get("x-forwarded-for"),
            headers.get("x-forwarded-proto"),
            flow.client_conn.tls_established,
        )
        for name in SPOOFABLE_HEADERS:
            if name in headers:
                del headers[name]
        for name in [n for n in headers if n.lower().startswith(ROUTER_HEADER_PREFIX)]:
            del headers[name]
        headers["X-Forwarded-For"] = fwd.client_ip
        headers["X-Forwarded-Proto"] = fwd.proto
        return fwd.client_ip

    @staticmethod
    def _move_query_token_to_header(request: http.Request, found: tokens.FoundToken, match: Match) -> None:
        # Synapse accepts either form; a header keeps the token out of every printed URL.
        query = tokens.remove_query_token(match.query)
        request.path = f"{match.path}?{query}" if query else match.path
        request.headers["Authorization"] = f"Bearer {found.token}"

    def _apply(self, flow: http.HTTPFlow, decision: Decision) -> None:
        request = flow.request
        upstream = decision.upstream
        target = upstream or self.main
        if target is not None:
            host_header = request.host_header
            request.scheme = target.scheme
            request.host = target.host
            request.port = target.port
            request.host_header = host_header
        if upstream is not None:
            self.in_flight[upstream.url] = self.in_flight.get(upstream.url, 0) + 1
            if _router_may_retry(request, decision):
                flow.metadata[f"{METADATA_KEY}.forward"] = True
            else:
                self._connecting[flow.client_conn.id] = flow
        else:
            flow.metadata.pop(f"{METADATA_KEY}.forward", None)
        if decision.strip_accept_encoding and "accept-encoding" in request.headers:
            del request.headers["accept-encoding"]
        if decision.stream_bodies or _large_or_unknown(request, None):
            request.stream = True
        flow.metadata[METADATA_KEY] = decision
        flow.comment = decision.summary()
        if decision.failover or decision.fallbacks:
            flow.marked = ":warning:"  # stands out in mitmweb's flow list

    @staticmethod
    def _decision(flow: http.HTTPFlow) -> Decision | None:
        decision = flow.metadata.get(METADATA_KEY)
        return decision if isinstance(decision, Decision) else None

    def _finish(self, flow: http.HTTPFlow) -> None:
        decision = self._decision(flow)
        if decision is None:
            return
        flow.metadata[METADATA_KEY] = decision.as_dict()  # plain data: saved flows serialise it
        if self._connecting.get(flow.client_conn.id) is flow:
            del self._connecting[flow.client_conn.id]
        if decision.upstream is not None:
            url = decision.upstream.url
            self.in_flight[url] = max(0, self.in_flight.get(url, 0) - 1)
        _redact_credentials(flow.request, flow.metadata.get(f"{METADATA_KEY}.token"))
        self._observe(flow, decision)

    def _observe(self, flow: http.HTTPFlow, decision: Decision) -> None:
        request, response = flow.request, flow.response
        upstream_seconds = None
        if response is not None and response.timestamp_start and request.timestamp_end:
            upstream_seconds = max(0.0, (response.timestamp_end or response.timestamp_start) - request.timestamp_end)
        status = response.status_code if response is not None else None
        self.metrics.observe_request(
            decision.route, decision.pool, decision.worker, request.method, status, upstream_seconds
        )
        if self._access is None:
            return
        record = AccessRecord(
            time=request.timestamp_start,
            client_ip=flow.metadata.get(f"{METADATA_KEY}.client_ip", ""),
            method=request.method,
            path=request.path,
            status=status,
            bytes_sent=len(response.raw_content) if response is not None and response.raw_content is not None else None,
            upstream_ms=upstream_seconds * 1000 if upstream_seconds is not None else None,
            total_ms=(time.time() - request.timestamp_start) * 1000,
            user_id=decision.key if decision.key_kind == "user" else None,
            token_hash=flow.metadata.get(f"{METADATA_KEY}.token"),
        )
        record.set_decision(decision)
        line = self._access.format(record)
        if self._access_file is not None:
            self._access_file.write(line + "\n")
        else:
            access_log.info(line)


def _balance_key(
    match: Match, found: tokens.FoundToken | None, client_ip: str, resolution: Resolution | None
) -> tuple[str | None, str]:
    """The key the route balances on, and what kind of key it is (for logs and metrics)."""
    route = match.route
    if route is None:
        return None, "none"
    if route.balance is Balance.USER:
        if resolution is not None and resolution.user_id is not None:
            return resolution.user_id, "user"
        if found is not None:
            return found.key.hex(), "token"  # device-sticky until the user is known
        return client_ip, "ip"
    if route.balance is Balance.ROOM:
        room = room_from_path(match.path)
        return (room, "room") if room else (client_ip, "ip")
    if route.balance is Balance.IP:
        return client_ip, "ip"
    return None, "none"


def _reverse_target(modes: Sequence[str]) -> Upstream | None:
    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, ReverseMode):
            host, port = mode.address
            shown = f"[{host}]" if ":" in host else host
            scheme = mode.scheme if mode.scheme in ("http", "https") else "http"
            return parse_upstream_url(f"{scheme}://{shown}:{port}")
    return None


def _router_may_retry(request: http.Request, decision: Decision) -> bool:
    """Sync-family long-polls (`timeout` > 0: what is in flight when a worker dies) that are
    safe to resend: idempotent and bodiless. The router sends these itself so it can retry
    them; it holds their whole response in memory, so initial syncs (answered at once, never
    held, and the largest responses Synapse sends) stay on mitmproxy's path, which streams
    large bodies. Short requests stay there too, covered by connect failover."""
    if not (
        decision.matched is not None
        and decision.matched.balance is Balance.USER
        and decision.route != INITIAL_SYNC_ROUTE
        and request.method in forward.RETRYABLE_METHODS
        and "transfer-encoding" not in request.headers
        and request.headers.get("content-length", "0") == "0"
    ):
        return False
    timeout = query_param(request.path.partition("?")[2], "timeout")
    return timeout is not None and timeout.isdigit() and int(timeout) > 0


async def _probe(upstream: Upstream, timeout: float) -> str | None:
    """None if a TCP connection to the worker opens within the timeout, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(upstream.host, upstream.port), timeout)
    except TimeoutError:
        return f"no connection within {timeout:g}s"
    except OSError as e:
        return e.strerror or type(e).__name__
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


def _url_of(workers: dict[str, Any], address: tuple[str, int]) -> str | None:
    for url in workers:
        upstream = parse_upstream_url(url)
        if (upstream.host, upstream.port) == (address[0], address[1]):
            return url
    return None


def _large_or_unknown(request: http.Request, response: http.Response | None) -> bool:
    try:
        size = http1.expected_http_body_size(request, response)
    except ValueError:
        return False
    return size is None or size == -1 or size > STREAM_THRESHOLD


def _redact_credentials(request: http.Request, header_label: str | None) -> None:
    """Keep every credential of a request out of what mitmproxy shows, saves or prints: each
    Authorization header (however malformed; a bearer token keeps its short label, the routed
    token's when there is one, as the access log shows it) and each access_token parameter."""
    values = request.headers.get_all("authorization")
    if values:
        request.headers.set_all("authorization", [tokens.redact_authorization(v, header_label) for v in values])
    path, sep, query = request.path.partition("?")
    if sep and any(tokens.is_token_param(p) for p in query.split("&")):
        label = tokens.short_hash(tokens.token_key(query_param(query, tokens.TOKEN_PARAM) or ""))
        request.path = f"{path}?{tokens.redact_query_token(query, label)}"


def matrix_error(status: int, errcode: str, message: str, retry_after: int | None = None) -> http.Response:
    """A response the router makes itself, as Synapse would: a Matrix error body."""
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = json.dumps({"errcode": errcode, "error": message} | ({"soft_logout": False} if status == 401 else {}))
    return http.Response.make(status, body.encode(), headers)
