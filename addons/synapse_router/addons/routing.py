"""Routing: where each request goes. Sanitises the request (client address headers, refused
bytes and tokens), decides (route, balance key, worker) and applies the decision to the flow;
moves a request to another worker when its worker failed (`fail_over`); `router.explain`."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence

from mitmproxy import command, exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1

from ..compat.connections import hold_reading
from ..config import RouterConfig
from ..edge import wellformed
from ..edge.client_address import TrustedProxies, without_spoofable
from ..edge.request_pacing import NOW
from ..identity import tokens
from ..identity.resolver import Resolution, Source
from ..observability.metrics import PACED_DELAYED, PACED_REFUSED
from ..routing import retry
from ..routing.engine import ROUTER, Decision, Engine
from ..routing.exchange import Exchange
from ..routing.retry import Sending
from ..routing.routes import MAIN, Balance, Match, room_from_path
from . import credentials, flowdata
from .responses import (
    LIMIT_EXCEEDED,
    answer_and_close,
    cors_preflight,
    matrix_error,
    no_process_available,
    respond,
    too_many_requests,
)
from .state import RouterState

log = logging.getLogger("synapse_router")

LOGOUT_PATH = re.compile(r"^/_matrix/client/(?:api/v1|r0|v3|unstable)/logout(/all)?$")
TOKEN_LABEL = re.compile(r"[0-9a-f]{8}")


class Routing:
    def __init__(self, state: RouterState) -> None:
        self.state = state

    def prepare(self, config: RouterConfig) -> Callable[[], None]:
        engine, trusted = Engine(config), TrustedProxies(config.trusted_proxies)
        limits = config.limits

        def switch() -> None:
            self.state.engine, self.state.trusted = engine, trusted
            self.state.pacing.use(
                limits.request_rate_per_address, limits.request_burst_per_address, limits.request_delay_max
            )

        return switch

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Not `async def`: a cache hit routes synchronously; only a miss (or a paced request)
        # returns a coroutine, which mitmproxy awaits, so the common case pays no task switch.
        state = self.state
        if state.engine is None or flow.response is not None or flow.error is not None or not flow.live:
            return None
        request = flow.request
        forwarded = "x-forwarded-for" in request.headers
        client_ip = self._set_forwarding_headers(flow)
        match = state.engine.match(request.method, request.path)
        # Paced before anything else is done on it: a request the router would refuse costs
        # its address a turn too, or a flood of malformed ones would go unpaced. A trusted
        # proxy's own requests (it names no client) are not paced.
        own = not forwarded and state.trusted.trusts_host(client_ip)
        admission = NOW if own else state.pacing.admit(client_ip)
        if admission.refused:
            self._refuse_paced(flow, match, client_ip, admission.retry_after)
            return None
        if admission.delay > 0.0 and state.stopping:
            self._refuse_paced(flow, match, client_ip, admission.delay)  # the next router serves it at once
            return None
        if admission.delay > 0.0:
            flowdata.set_paced(flow, admission.delay)  # the wait planned; the wait had, once over
            state.metrics.observe_paced(PACED_DELAYED)
            return self._after_turn(flow, admission.delay, match, client_ip)
        return self._check_and_route(flow, match, client_ip)

    def _check_and_route(self, flow: http.HTTPFlow, match: Match, client_ip: str) -> Awaitable[None] | None:
        request = flow.request
        try:
            method, fields, version = request.method, request.headers.fields, request.http_version
            names = wellformed.check_request(method, request.authority, request.path, fields, version)
            wellformed.check_message(method, fields, version, names)
            found = tokens.find_token(request.headers.get_all("authorization"), match.query, match.path)
        except wellformed.Refused as refused:
            self._refuse(flow, match, client_ip, refused)
            return None
        if found is not None:
            self.state.token_keys[flow] = found.key
        return self._identify_and_route(flow, match, found, client_ip)

    def _identify_and_route(
        self, flow: http.HTTPFlow, match: Match, found: tokens.FoundToken | None, client_ip: str
    ) -> Awaitable[None] | None:
        logout = LOGOUT_PATH.match(match.path) if found is not None else None
        if logout is not None and found is not None:
            flowdata.set_logout(flow, logout.group(1) is not None, found.key)
        resolution = None
        identity = self.state.identity
        if match.route is not None and match.route.balance is Balance.USER and found is not None and identity:
            resolution = identity.cached(found.key)
            if resolution is None:
                return self._route_after_whoami(flow, match, found, client_ip)
        self._route(flow, match, found, client_ip, resolution)
        return None

    async def _after_turn(self, flow: http.HTTPFlow, delay: float, match: Match, client_ip: str) -> None:
        """A paced request: its address's turn comes after `delay` seconds; nothing is done on
        it meanwhile (a client that left is not routed at all), and its body, which the router
        does not read meanwhile, is not timed (limits.body_timeout). A graceful stop ends the
        wait: the request is answered 429 at once, to be retried on the router that takes over
        (which starts every address afresh), rather than holding the stop until its turn."""
        flowdata.set_waiting(flow, True)
        # Its body waits in the kernel, not here; a request without one keeps its connection
        # read, so that a client leaving is seen at once.
        resume = hold_reading(flow.client_conn.id, pause=_has_body(flow.request))
        started = time.monotonic()
        try:
            came = await self.state.turns.wait(flow.id, delay)
        finally:
            resume()
            flowdata.set_waiting(flow, False)
            waited = time.monotonic() - started
            flowdata.set_paced(flow, waited)
            self.state.metrics.observe_paced_wait(waited)
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        if not came and flow.client_conn.state & ConnectionState.CAN_READ:
            self._refuse_paced(flow, match, client_ip, delay - waited)
            return
        # Its turn, or the stop's while its client has stopped sending (left: it ends as at its
        # turn, `client_gone`, never sent on; half-closed: served here).
        routing = self._check_and_route(flow, match, client_ip)
        if routing is not None:
            await routing

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        decision = flowdata.decision(flow)
        if decision is None or flow.response is None:
            return
        if flow.response.raw_content is not None:
            return  # already whole: an answer the router sent or made itself
        if flowdata.relayed(flow):  # a router-sent answer too long to hold: streamed, counted

            def count(chunk: bytes) -> bytes:
                flowdata.add_streamed_bytes(flow, len(chunk))
                return chunk

            flow.response.stream = count
            return
        if decision.stream_bodies or _large_or_unknown(flow.request, flow.response):
            flow.response.stream = True

    def apply(
        self,
        flow: http.HTTPFlow,
        decision: Decision,
        answer: bool = True,
        exchange: Exchange[http.HTTPFlow] | None = None,
    ) -> Exchange[http.HTTPFlow]:
        """Point the flow at its worker (or main), keeping the client's Host, and count its
        exchange there; a stream writer's write with no usable writer is answered 503 instead
        (`answer` False: by the caller). Returns the flow's exchange (`exchange`, else opened
        now); a closed one counts nothing."""
        if decision.writer_down:
            exchange = self._decided(flow, decision, exchange)
            exchange.count_on(None)
            exchange.sending = None
            if answer:
                respond(flow, no_process_available(self.state.workers.config.retry_after))
            flow.comment = decision.summary()
            flow.marked = ":warning:"
            return exchange
        request = flow.request
        upstream = decision.upstream
        target = upstream or self.state.main
        if target is not None:
            # The target itself, not through mitmproxy's host/port setters: they rewrite the Host
            # header, which must stay the client's (an origin-form request has no authority).
            data = request.data
            data.scheme, data.host, data.port = target.scheme.encode(), target.host, target.port
        exchange = self._decided(flow, decision, exchange)
        exchange.count_on(upstream.url if upstream is not None else None)
        sending = exchange.sending = _sending(request, decision) if target is not None else None
        if upstream is not None and sending is None:
            exchange.await_connection()
        if decision.strip_accept_encoding and "accept-encoding" in request.headers:
            del request.headers["accept-encoding"]
        # A request the router sends has a held body of known, bounded length: never streamed.
        if decision.stream_bodies or (sending is None and _large_or_unknown_request(request)):
            request.stream = True
        flow.comment = decision.summary()
        if decision.failover or decision.fallbacks:
            flow.marked = ":warning:"  # stands out in mitmweb's flow list
        return exchange

    def _decided(
        self, flow: http.HTTPFlow, decision: Decision, exchange: Exchange[http.HTTPFlow] | None = None
    ) -> Exchange[http.HTTPFlow]:
        """Give the flow its decision; its exchange (opened now if not given) is open until
        ExchangeOwner closes it (in `response`, `error` or `client_disconnected`)."""
        flowdata.set_decision(flow, decision)
        if exchange is not None:
            return exchange
        # A flow decided after its client left (while whoami answered) is opened all the same:
        # mitmproxy ends it with `error` after the hook (HttpStream.check_killed).
        return self.state.exchanges.open_exchange(flow, flow.client_conn.id, flow.id)

    def fail_over(
        self,
        flow: http.HTTPFlow,
        exchange: Exchange[http.HTTPFlow],
        failed: Decision,
        reason: str,
        detail: str = "",
        answer: bool = True,
    ) -> Decision:
        """Move a request off a failed worker (failover.py decided it may go on), never back to
        one its exchange already tried. `reason` is a short fixed word (a metric label). A write
        left without a writer is answered 503 (`answer` False: the caller answers it)."""
        state = self.state
        assert state.engine is not None and failed.upstream is not None
        tried = exchange.failed_on(failed.upstream.url)
        state.metrics.observe_failover(failed.pool, reason)
        why = f"{reason} ({detail})" if detail else reason
        decision = state.engine.failover(failed, state.workers.unusable | tried, state.in_flight, why)
        log.info(f"synapse-router: {failed.route}: failover {decision.failover}")
        self.apply(flow, decision, answer, exchange)
        return decision

    @command.command("router.explain")
    def explain(self, path: str, method: str = "GET", who: str = "") -> Sequence[str]:
        """Where a request would go and why: route, pool chain, rendezvous ranking of the
        workers with their health. `who` is a user id (@alice:example.org), a token's
        8-hex-digit label as the access log and flows show it (resolved from the cache), or
        empty (keyed by 127.0.0.1). Never a token: mitmproxy saves commands in its history."""
        engine = self.state.engine
        if engine is None:
            return ["no configuration loaded"]
        if tokens.TOKEN_PARAM in path:
            raise exceptions.CommandError("leave the access_token out of PATH (mitmproxy keeps a command history)")
        match = engine.match(method.upper(), path)
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
            if user is None:
                raise exceptions.CommandError(f"no cached token is labelled {who}: give its user id instead")
            resolution = Resolution(user, Source.CACHE)
        key, key_kind = _balance_key(match, None, "127.0.0.1", resolution)
        return engine.explain(method.upper(), path, key, key_kind, self.state.workers.unusable)

    def _user_of_label(self, label: str) -> str | None:
        identity = self.state.identity
        if identity is None:
            return None
        for key, user in list(identity.users.items()):
            if tokens.short_hash(key) == label:
                return user
        return None

    async def _route_after_whoami(
        self, flow: http.HTTPFlow, match: Match, found: tokens.FoundToken, client_ip: str
    ) -> None:
        assert self.state.identity is not None
        flowdata.set_waiting(flow, True)  # its body is not read meanwhile: not timed
        try:
            resolution = await self.state.identity.resolve(
                found.key, found.token, found.as_user, flow.request.headers.get("user-agent"), client_ip
            )
        finally:
            flowdata.set_waiting(flow, False)
        self._route(flow, match, found, client_ip, resolution)

    def _route(
        self,
        flow: http.HTTPFlow,
        match: Match,
        found: tokens.FoundToken | None,
        client_ip: str,
        resolution: Resolution | None,
    ) -> None:
        state = self.state
        assert state.engine is not None
        key, key_kind = _balance_key(match, found, client_ip, resolution)
        decision = state.engine.select(match.route, key, key_kind, state.workers.unusable, state.in_flight)
        if resolution is not None:
            decision.identity = resolution.source.value
            state.metrics.observe_identity(decision.identity)
        for skipped in decision.fallbacks:
            state.metrics.observe_fallback(decision.route, skipped.split(":", 1)[0])
        if found is not None:
            flowdata.set_token_label(flow, tokens.short_hash(found.key))
        flowdata.set_client_ip(flow, client_ip)
        self.apply(flow, decision)

    def _refuse(
        self,
        flow: http.HTTPFlow,
        match: Match,
        client_ip: str,
        refused: wellformed.Refused,
        response: http.Response | None = None,
    ) -> None:
        """Answer a request the router will not pass on, with a Matrix error (`response`, else
        one made from `refused`); nothing is sent."""
        route = match.route.name if match.route is not None else MAIN
        decision = Decision(route, ROUTER, None, "none", refused=refused.errcode)
        flowdata.set_client_ip(flow, client_ip)
        self._decided(flow, decision)
        if response is None:
            response = matrix_error(refused.status, refused.errcode, str(refused))
        flow.comment = decision.summary()
        flow.marked = ":no_entry:"
        credentials.redact(flow)
        if refused.close:
            # The body's framing is not trusted, so it is never read: answer now and close
            # (on mitmproxy's path the answer would wait for the body, up to body_timeout).
            answer_and_close(flow, response, str(refused), self.state.debug_headers)
        else:
            respond(flow, response)

    def _refuse_paced(self, flow: http.HTTPFlow, match: Match, client_ip: str, retry_after: float) -> None:
        """A request whose turn is beyond limits.request_delay_max: 429, as Synapse's own rate
        limits answer (`retry_after_ms` and Retry-After), and the connection closed: a client
        looping on it pays a reconnect (bounded by the per-address connection rate), and its
        body is never read."""
        self.state.metrics.observe_paced(PACED_REFUSED)
        refused = wellformed.Refused(429, LIMIT_EXCEEDED, "Too many requests from this address.", close=True)
        if flow.request.method == "OPTIONS":
            # A CORS preflight: a browser reads any answer but a 2xx as a network error, and
            # never shows its page the 429; Synapse answers every preflight 200 `{}` with its
            # CORS headers. The request it precedes gets the 429, with CORS headers, to read.
            self._refuse(flow, match, client_ip, refused, cors_preflight())
            return
        self._refuse(flow, match, client_ip, refused, too_many_requests(retry_after))

    def _set_forwarding_headers(self, flow: http.HTTPFlow) -> str:
        headers = flow.request.headers
        fwd = self.state.trusted.resolve(
            flow.client_conn.peername[0] if flow.client_conn.peername else "",
            headers.get("x-forwarded-for"),
            headers.get("x-forwarded-proto"),
            flow.client_conn.tls_established,
        )
        kept = without_spoofable(headers.fields)
        if kept is not None:
            headers.fields = kept
        headers.fields += ((b"X-Forwarded-For", fwd.client_ip.encode()), (b"X-Forwarded-Proto", fwd.proto.encode()))
        return fwd.client_ip


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


def _sending(request: http.Request, decision: Decision) -> Sending | None:
    """How the router sends this request (retry.py), or None for mitmproxy's path."""
    fields = request.headers.fields
    names = [name.lower() for name, _ in fields]  # one pass, not one of mitmproxy's lookups each
    content_length = None
    if b"content-length" in names:  # all of them, joined, as Headers.get gives them
        values = [value for lowered, (_, value) in zip(names, fields, strict=True) if lowered == b"content-length"]
        content_length = b", ".join(values).decode("latin-1")
    return retry.sending(
        request.method,
        request.path,
        content_length,
        decision.stream_bodies,
        b"transfer-encoding" in names or b"upgrade" in names,
    )


def _has_body(request: http.Request) -> bool:
    """Whether the request's head announces a body (any Transfer-Encoding, a Content-Length
    other than 0; not yet checked for well-formedness: when in doubt, a body)."""
    for name, value in request.headers.fields:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _large_or_unknown_request(request: http.Request) -> bool:
    fields = request.headers.fields
    if not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in fields):
        return False  # no body (the common case, decided without mitmproxy's header lookups)
    return _large_or_unknown(request, None)


def _large_or_unknown(request: http.Request, response: http.Response | None) -> bool:
    try:
        size = http1.expected_http_body_size(request, response)
    except ValueError:
        return False
    return size is None or size == -1 or size > retry.MAX_HELD_REQUEST
