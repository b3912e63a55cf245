"""WhoamiIdentity: who is behind each access token (identity/resolver.py, asked over HTTP),
forgetting tokens that log out, and `router.flush`."""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable

import httpx
from mitmproxy import command, http
from mitmproxy.utils import asyncio_utils

from ..config import RouterConfig, WhoamiConfig
from ..identity.resolver import IdentityResolver, TokenRejected, WhoamiCall, whoami_over_http
from ..identity.sharedcache import SharedCache
from ..identity.tokens import short_hash
from . import flowdata
from .state import RouterState

log = logging.getLogger("synapse_router")


class WhoamiIdentity:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self._http: httpx.AsyncClient | None = None
        state.metrics.bind_cache_size(lambda: len(state.identity.users) if state.identity else 0)
        state.metrics.bind_shared_cache(
            lambda: state.identity.shared.available if state.identity and state.identity.shared else None
        )

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        current = self.state.identity
        if current is not None and current.config == config.whoami:
            return lambda: None
        resolver = self._build(config.whoami)
        if current is not None:
            resolver.keep_answers(current)  # what stays right is kept (IdentityResolver.keep_answers)

        def switch() -> None:
            self.state.identity = resolver
            if current is not None and current.shared is not None:
                asyncio_utils.create_task(current.shared.close(), name="old shared cache close", keep_ref=True)

        return switch

    def response(self, flow: http.HTTPFlow) -> None:
        """After a successful logout, forget the token (and, after /logout/all, the user's others);
        after a worker's 401 M_UNKNOWN_TOKEN (a token revoked, a MAS session ended), forget it at
        once instead of routing it as its user until cache_ttl."""
        key = self.state.token_keys.pop(flow, None)
        identity = self.state.identity
        if key is not None and identity is not None and flow.response is not None and unknown_token(flow.response):
            identity.forget(key)
            log.info(f"synapse-router: token {short_hash(key)} refused by Synapse (M_UNKNOWN_TOKEN): forgotten")
        logout = flowdata.pop_logout(flow)
        if logout is None or identity is None or flow.response is None or flow.response.status_code != 200:
            return
        everywhere, key = logout
        user = identity.users.get(key)
        identity.forget(key)
        if everywhere and user is not None:
            identity.forget_user(user)

    def error(self, flow: http.HTTPFlow) -> None:
        self.state.token_keys.pop(flow, None)

    async def done(self) -> None:
        identity = self.state.identity
        if identity is not None and identity.shared is not None:
            await identity.shared.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @command.command("router.flush")
    def flush(self) -> int:
        """Forget every cached token -> user answer; returns how many were dropped."""
        identity = self.state.identity
        if identity is None:
            return 0
        dropped = len(identity.users) + len(identity.rejected)
        identity.clear()
        log.info(f"synapse-router: identity cache flushed ({dropped} entries)")
        return dropped

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32), trust_env=False
            )
        return self._http

    def _build(self, config: WhoamiConfig) -> IdentityResolver:
        state = self.state

        def base_url() -> str:
            if config.url is not None:
                return config.url.url
            return state.main.url if state.main is not None else "http://127.0.0.1:8008"

        shared = SharedCache(config.redis) if config.redis else None
        call = self._observed(whoami_over_http(self._client, base_url, config.timeout))
        # Asking main (the default): its health checks must fail too before timeouts pause whoami.
        main_failing = (lambda: state.main_reachable is False) if config.url is None else None
        return IdentityResolver(config, call, shared=shared, main_failing=main_failing)

    def _observed(self, call: WhoamiCall) -> WhoamiCall:
        metrics = self.state.metrics

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
                metrics.observe_whoami(outcome, time.perf_counter() - started)

        return observed


MAX_ERROR_BODY = 64 * 1024  # a Matrix error is a few hundred bytes: a larger body is not one


def unknown_token(response: http.Response) -> bool:
    """A Matrix 401 M_UNKNOWN_TOKEN (Synapse's answer for a revoked or expired token): read from
    at most MAX_ERROR_BODY bytes, decompressed (gzip, deflate: Synapse compresses for clients
    that accept it) to at most as many."""
    if response.status_code != 401:
        return False
    body = response.raw_content
    if body is None or len(body) > MAX_ERROR_BODY:
        return False
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "deflate", "x-gzip"):
        try:
            body = zlib.decompressobj(wbits=47).decompress(body, MAX_ERROR_BODY)
        except zlib.error:
            return False
    elif encoding not in ("", "identity"):
        return False
    if b"M_UNKNOWN_TOKEN" not in body:
        return False
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("errcode") == "M_UNKNOWN_TOKEN"
