"""Hostile clients against a real router (either launcher), checking one invariant on every
response: it answers exactly the request that client sent.

Each hostile request (written byte by byte on a raw socket) is followed by well-formed requests
of other users: long-poll syncs (`timeout` > 0, which the router sends itself over keep-alive
connections shared by every user) and ordinary requests (mitmproxy's path). Each must come back
with its own nonce (tests/hostile.py): a response left waiting on a shared upstream connection
by a smuggled request would be delivered to the next user, and shows up here as a foreign nonce.
On every test: no Python traceback in the router's output and no token of any request in it,
with `flow_detail=2` (request and response headers printed) and `termlog_verbosity=debug`.

The rules the router is held to (a hostile request gets one of these, never a worker's answer
to something else):
- a token is a plausible Matrix access token (printable ASCII 0x21-0x7E, 1..1024 characters);
  `Authorization` with scheme Bearer (any case) that is not exactly `Bearer <plausible>`, or a
  query `access_token` whose decoded value is not plausible: 401 M_UNKNOWN_TOKEN from the
  router, no whoami call;
- more than one token (two headers, two parameters, header and parameter): 400 M_INVALID_PARAM;
- absolute-form and authority-form targets: 400 M_UNRECOGNIZED;
- CR, LF or NUL surviving mitmproxy's parser in the method, target, or a header: 400;
- framing conflicts: mitmproxy's parser rejects them (any 4xx, or a closed connection) or frames
  them one way; oversized header blocks: 431 or a closed connection.
A session prints `hostile: N inputs, M responses checked, K cross-delivered` at its end.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.harness import Fleet, Router, RouterStarter, free_port
from tests.hostile import (
    STATS,
    Exchange,
    Reply,
    check_answers_itself,
    check_no_cross_delivery,
    check_own_standin_answer,
    check_router_error,
    exchange,
    leading_run,
    new_nonce,
    plausible_token,
    request,
)

pytestmark = pytest.mark.integration

NAMES = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    "ivan", "judy", "ken", "leo", "mike", "nina", "olga", "pete",
]  # fmt: skip
USERS = {f"tok-{name}-1": f"@{name}:test" for name in NAMES}
FRESH = {f"tok-fresh{i}-1": f"@fresh{i}:test" for i in range(8)}  # never used before test (3)
SYNC = b"/_matrix/client/v3/sync?since=s&timeout=1"  # a long-poll: the router sends it itself
MESSAGES = b"/_matrix/client/v3/rooms/!r:x/messages"  # mitmproxy's path
TARGETS = {"longpoll": SYNC, "messages": MESSAGES}
ROUTER_FLAGS = ["--set", "flow_detail=2", "--set", "termlog_verbosity=debug"]
TRACEBACK = "Traceback (most recent call last)"


def auth(token: bytes | str) -> bytes:
    return b"Authorization: Bearer " + (token.encode() if isinstance(token, str) else token)


class Env:
    """A fleet (main with whoami, a sync pool of two, a client_reader) and one router."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fleet = Fleet(tmp)
        self.starter = RouterStarter(tmp)
        self.fleet.add("main", whoami={**USERS, **FRESH})
        self.fleet.add("sync1")
        self.fleet.add("sync2")
        self.fleet.add("reader1")
        self.access_log = tmp / "access.log"
        self.metrics_port = free_port()
        self.router: Router = self._start()
        self.needs_restart = False
        self.secrets: set[str] = set(USERS)  # every token any test sent, to look for in the output
        # which users' long-polls each sync worker serves: follow-ups reach both
        self.users_of: dict[str, list[str]] = {}
        self._warm_up()
        assert len(self.users_of) == 2, f"all {len(USERS)} users on one worker: {self.users_of}"
        self._turn = 0

    def _warm_up(self) -> None:
        """Every user's token resolved (whoami) before the tests count whoami calls."""
        users_of: dict[str, list[str]] = {}
        for token in USERS:
            seen = self.get(SYNC, token)
            users_of.setdefault(seen["server"], []).append(token)
        self.users_of = users_of

    def _start(self) -> Router:
        config = {
            "workers": {
                "sync": [self.fleet["sync1"].url, self.fleet["sync2"].url],
                "client_reader": [self.fleet["reader1"].url],
            },
            "debug_headers": True,
            "access_log": {"enabled": True, "format": "json", "path": str(self.access_log)},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        return self.starter(self.fleet["main"].url, config, extra=ROUTER_FLAGS)

    def restart(self) -> None:
        """A fresh router (fresh pooled connections), after a test found the old one broken."""
        self.router.stop()
        self.router = self._start()
        self.needs_restart = False
        self._warm_up()

    def stop(self) -> None:
        self.starter.stop_all()
        self.fleet.stop()

    # --- requests ---

    def send(self, raw: bytes, settle: float = 0.3, timeout: float = 15.0) -> Exchange:
        return exchange(self.router.port, raw, timeout=timeout, settle=settle)

    def get(self, target: bytes, token: str, nonce: bytes | None = None) -> dict[str, Any]:
        """A well-formed request of a valid user; checks it got its own answer."""
        nonce = nonce or new_nonce()
        ex = self.send(request(b"GET", target, nonce, [auth(token)]), settle=0)
        check_no_cross_delivery(ex, nonce)
        assert ex.replies, f"{token} got no response: {ex.describe()}"
        reply = ex.replies[0]
        assert reply.status == 200, f"{token}: {reply.describe()}"
        seen = check_own_standin_answer(reply, nonce)
        assert seen["headers"].get("authorization") == f"Bearer {token}", f"{token} answered as another: {seen}"
        assert seen["method"] == "GET"
        return seen

    def follow_ups(self, everyone: bool = False) -> None:
        """Other users' well-formed requests, each of which must get its own answer: a
        long-poll on each sync worker (all users' with `everyone`) and two ordinary requests."""
        self._turn += 1
        if everyone:
            longpolls = [t for users in self.users_of.values() for t in users[:4]]
        else:
            longpolls = [users[self._turn % len(users)] for users in self.users_of.values()]
        for token in longpolls:
            seen = self.get(SYNC, token)
            assert seen["server"] in ("sync1", "sync2"), seen
        for i in range(2):
            token = NAMES[(self._turn + 5 * i) % len(NAMES)]
            seen = self.get(MESSAGES, f"tok-{token}-1")
            assert seen["server"] == "reader1", seen

    # --- what the router did ---

    def whoami_calls(self) -> int:
        return self.fleet["main"].stats()["whoami_calls"]

    def log(self) -> str:
        return self.router.log()

    def check_output(self, extra_secrets: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """No traceback and no token (as sent, decoded, or up to its first control character)
        in the router's output."""
        time.sleep(0.1)  # the last flows' lines (a late one is caught by the next check)
        text = self.log()
        assert TRACEBACK not in text, "traceback in the router's output:\n" + _around(text, TRACEBACK)
        for secret in self.secrets | set(extra_secrets):
            for shown in {secret, leading_run(secret)}:
                if len(shown) >= 8:
                    assert shown not in text, f"token {shown[:60]!r} in the router's output:\n" + _around(text, shown)


def _around(text: str, needle: str) -> str:
    i = text.find(needle)
    return text[max(0, i - 600) : i + 900]


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    env = Env(tmp_path_factory.mktemp("hostile"))
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture
def env(module_env: Env, request: pytest.FixtureRequest) -> Iterator[Env]:
    """The module's router; a test that failed leaves it to be restarted, so that one input's
    damage (e.g. a response left on a pooled connection) is not blamed on the next test."""
    if module_env.needs_restart:
        module_env.restart()
    failed_before = request.session.testsfailed
    yield module_env
    if request.session.testsfailed != failed_before:
        module_env.needs_restart = True


# ---------------------------------------------------------------------------------------------
# The corpus: one hostile request per row, then the follow-ups.
# ---------------------------------------------------------------------------------------------

Expect = Callable[[Exchange, bytes], None]


def unknown_token(ex: Exchange, nonce: bytes) -> None:
    error = check_router_error(ex.reply, 401, "M_UNKNOWN_TOKEN")
    assert error.get("soft_logout") is False, ex.reply.describe()


def invalid_param(ex: Exchange, nonce: bytes) -> None:
    check_router_error(ex.reply, 400, "M_INVALID_PARAM")


def unrecognized(ex: Exchange, nonce: bytes) -> None:
    check_router_error(ex.reply, 400, "M_UNRECOGNIZED")


def unrecognized_or_refused(ex: Exchange, nonce: bytes) -> None:
    if ex.replies and ex.reply.matrix_error is not None:
        unrecognized(ex, nonce)
    else:
        refused(ex, nonce)


def router_400(ex: Exchange, nonce: bytes) -> None:
    check_router_error(ex.reply, 400)


def rejected_token(ex: Exchange, nonce: bytes) -> None:
    """A token with a control character (CR, NUL, DEL, ...) in its header: refused as an invalid
    header (400) or an invalid token (401)."""
    check_router_error(ex.reply, (400, 401))


def from_worker(reply: Reply) -> bool:
    """Did a stand-in (Python's http.server) make this response, e.g. its own 431 or 400?"""
    return (reply.header(b"server") or b"").startswith(b"BaseHTTP")


def refused(ex: Exchange, nonce: bytes) -> None:
    """mitmproxy's parser or the router refuses it: any 4xx (HTML allowed), or a close; never
    forwarded (a worker's own refusal means it was)."""
    if ex.replies:
        assert 400 <= ex.reply.status < 500 and ex.reply.standin is None, ex.describe()
        assert not from_worker(ex.reply), f"forwarded, and refused by the worker: {ex.describe()}"


def too_large(ex: Exchange, nonce: bytes) -> None:
    """431 from the router, or a closed connection; not forwarded for a worker to refuse."""
    if ex.replies:
        assert ex.reply.status == 431, ex.describe()
        assert not from_worker(ex.reply), f"forwarded, and refused by the worker: {ex.describe()}"


def unknown_or_too_large(ex: Exchange, nonce: bytes) -> None:
    if ex.replies and ex.reply.status == 401:
        unknown_token(ex, nonce)
    elif ex.replies:
        assert ex.reply.status in (414, 431), ex.describe()
        assert not from_worker(ex.reply), f"forwarded, and refused by the worker: {ex.describe()}"


def anything_honest(ex: Exchange, nonce: bytes) -> None:
    """Only the invariant (checked for every row anyway)."""


def forwarded(check: Callable[[dict[str, Any]], None] | None = None) -> Expect:
    def expect(ex: Exchange, nonce: bytes) -> None:
        seen = check_own_standin_answer(ex.reply, nonce)
        if check is not None:
            check(seen)

    return expect


def sent_as(authorization: str) -> Callable[[dict[str, Any]], None]:
    def check(seen: dict[str, Any]) -> None:
        assert seen["headers"].get("authorization") == authorization, seen

    return check


def no_accept_encoding(seen: dict[str, Any]) -> None:
    assert seen["server"] == "main", seen
    assert "accept-encoding" not in seen["headers"], f"rendezvous reached main with Accept-Encoding: {seen}"


@dataclass
class Case:
    id: str
    build: Callable[[bytes], bytes]  # nonce -> the raw request
    expect: Expect
    tokens: tuple[str, ...] = ()  # secrets it carries (decoded), never to be printed
    whoami: bool = False  # may it cost a whoami call?


def with_param(target: bytes, param: bytes) -> bytes:
    return target + (b"&" if b"?" in target else b"?") + param


def q(token: str, target: bytes = SYNC) -> Callable[[bytes], bytes]:
    """`token` as written (percent-encoded by the caller) in `?access_token=`."""
    return lambda n: request(b"GET", with_param(target, b"access_token=" + token.encode()), n)


def h(value: bytes, target: bytes = SYNC, more: list[bytes] = ()) -> Callable[[bytes], bytes]:  # type: ignore[assignment]
    """An Authorization header line as given."""
    return lambda n: request(b"GET", target, n, [b"Authorization: " + value, *more])


SMUGGLE = "%0D%0A%0D%0AGET%20/_smuggled%20HTTP/1.1%0D%0AHost:%20x%0D%0AX-A:%20b"


def _query_token_cases() -> list[Case]:
    encoded = {
        "crlf-smuggle": SMUGGLE,
        "crlf-header": "%0D%0AX-Injected:%201",
        "lf": "%0AX-Injected:%201",
        "cr": "%0DX-Injected:%201",
        "nul": "%00",
        "nul-middle": "%00X",
        "crlf-lowercase": "%0d%0aX-Injected:%201",
        "crlf-mixed-case": "%0D%0aX-Injected:%201%0d%0A",
        "latin1-e9": "%E9",
        "utf8-e9": "%C3%A9",
        "space": "%20extra",
        "plus-space": "+extra",
        "tab": "%09extra",
        "del": "%7F",
    }
    cases = []
    for where, target in TARGETS.items():
        for name, tail in encoded.items():
            token = f"tok-q-{name}-{where}"
            decoded = token + _percent_decode(tail)
            cases.append(Case(f"query-{name}-{where}", q(token + tail, target), unknown_token, (token, decoded)))
    long5k = "tok-q-long-" + "x" * 4989
    long100k = "tok-q-huge-" + "y" * 99989
    cases += [
        Case("query-5000-chars", q(long5k), unknown_token, (long5k,)),
        Case("query-100000-chars", q(long100k), unknown_or_too_large, (long100k,)),
    ]
    return cases


def _percent_decode(text: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(text)


def _header_token_cases() -> list[Case]:
    cases = []
    for where, target in TARGETS.items():
        t = f"tok-h-{where}"
        cases += [
            Case(f"header-tab-{where}", h(b"Bearer\t" + t.encode() + b"-tab", target), unknown_token, (t + "-tab",)),
            Case(
                f"header-extra-{where}", h(b"Bearer " + t.encode() + b"-ex extra", target), unknown_token, (t + "-ex",)
            ),
            Case(
                f"header-two-spaces-{where}",
                h(b"Bearer  " + t.encode() + b"-2sp", target),
                unknown_token,
                (t + "-2sp",),
            ),
            # the scheme is case-insensitive (RFC 9110): a valid token is routed, sent as it came
            Case(
                f"header-lowercase-{where}", h(b"bearer tok-alice-1", target), forwarded(sent_as("bearer tok-alice-1"))
            ),
            Case(f"header-bare-scheme-{where}", h(b"Bearer", target), unknown_token),
            Case(
                f"header-utf8-{where}",
                h(b"Bearer tok-\xc3\xa9-1" + where.encode(), target),
                unknown_token,
                (f"tok-é-1{where}",),
            ),
            Case(f"header-latin1-{where}", h(b"Bearer tok-\xe9-1" + where.encode(), target), unknown_token),
            # DEL is a control character: an invalid header (400) or an invalid token (401)
            Case(
                f"header-del-{where}", h(b"Bearer " + t.encode() + b"-del\x7f", target), rejected_token, (t + "-del",)
            ),
            # raw CR / NUL survive mitmproxy's parser (it splits lines at LF only)
            Case(
                f"header-raw-cr-{where}",
                h(b"Bearer " + t.encode() + b"-cr\rX-Injected: 1", target),
                rejected_token,
                (t + "-cr",),
            ),
            Case(
                f"header-raw-nul-{where}",
                h(b"Bearer " + t.encode() + b"-nul\x00X", target),
                rejected_token,
                (t + "-nul",),
            ),
            # an obs-fold continuation: mitmproxy joins it with CRLF SP into the value
            Case(
                f"header-obs-fold-{where}",
                h(b"Bearer " + t.encode() + b"-fold\r\n X-Injected: 1", target),
                rejected_token,
                (t + "-fold",),
            ),
            # raw LF / CRLF end the header line: two honest headers as far as HTTP goes
            Case(
                f"header-raw-lf-{where}",
                h(b"Bearer " + t.encode() + b"-lf\nX-Injected: 1", target),
                anything_honest,
                (t + "-lf",),
                whoami=True,
            ),
            Case(
                f"header-raw-crlf-{where}",
                h(b"Bearer " + t.encode() + b"-crlf\r\nX-Injected: 1", target),
                anything_honest,
                (t + "-crlf",),
                whoami=True,
            ),
            Case(f"two-authorization-{where}", h(b"Bearer tok-alice-1", target, [auth("tok-bob-1")]), invalid_param),
            Case(
                f"two-authorization-same-{where}",
                h(b"Bearer tok-alice-1", target, [auth("tok-alice-1")]),
                invalid_param,
            ),
            Case(
                f"two-query-tokens-{where}",
                q("tok-alice-1&access_token=tok-bob-1", target),
                invalid_param,
            ),
            Case(
                f"header-and-query-{where}",
                h(b"Bearer tok-alice-1", with_param(target, b"access_token=tok-bob-1")),
                invalid_param,
            ),
            Case(
                f"header-and-encoded-query-name-{where}",
                h(b"Bearer tok-alice-1", with_param(target, b"access%5Ftoken=tok-bob-1")),
                invalid_param,
            ),
        ]
    long5k = "tok-h-long-" + "x" * 4989
    long100k = "tok-h-huge-" + "y" * 99989
    cases += [
        Case("header-5000-chars", h(b"Bearer " + long5k.encode()), unknown_token, (long5k,)),
        Case("header-100000-chars", h(b"Bearer " + long100k.encode()), unknown_or_too_large, (long100k,)),
    ]
    return cases


def _framing_cases() -> list[Case]:
    send = b"/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1"
    smuggled = b"GET /_smuggled HTTP/1.1\r\nHost: x\r\nX-Test-Nonce: n0nce00000000000000000000\r\n\r\n"

    def post(
        headers: list[bytes], body: bytes, method: bytes = b"PUT", target: bytes = send
    ) -> Callable[[bytes], bytes]:
        # a token of its own (unknown, plausible): a refused request's token must not be printed either
        token = b"tok-frame-" + hashlib.sha256(b"|".join([*headers, body, method, target])).hexdigest()[:12].encode()
        return lambda n: request(method, target, n, [auth(token), *headers], body)

    return [
        Case("two-content-length", post([b"Content-Length: 2", b"Content-Length: 40"], b"{}" + b" " * 38), refused),
        Case(
            "content-length-and-chunked",
            post([b"Content-Length: 6", b"Transfer-Encoding: chunked"], b"0\r\n\r\nG"),
            refused,
        ),
        Case("chunked-identity", post([b"Transfer-Encoding: chunked, identity"], b"0\r\n\r\n"), refused),
        Case(
            "two-transfer-encodings",
            post([b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"], b"0\r\n\r\n"),
            refused,
        ),
        Case("transfer-encoding-space-before-colon", post([b"Transfer-Encoding : chunked"], b"0\r\n\r\n"), refused),
        Case("transfer-encoding-obs-fold", post([b"Transfer-Encoding:", b" chunked"], b"0\r\n\r\n"), refused),
        Case("content-length-obs-fold", post([b"Content-Length: 2", b" 0"], b"{}"), refused),
        Case("other-header-obs-fold", post([b"X-Folded: a", b" b"], b"", method=b"GET", target=SYNC), router_400),
        Case(
            "get-with-body-longpoll",
            post([f"Content-Length: {len(smuggled)}".encode()], smuggled, b"GET", SYNC),
            anything_honest,
        ),
        Case(
            "get-with-body-messages",
            post([f"Content-Length: {len(smuggled)}".encode()], smuggled, b"GET", MESSAGES),
            anything_honest,
        ),
        Case("header-name-with-space", post([b"X-Bad Name: 1"], b"", method=b"GET", target=SYNC), refused),
        Case("header-raw-nul-in-other-header", post([b"X-Nul: a\x00b"], b"", method=b"GET", target=SYNC), router_400),
        Case("header-raw-cr-in-other-header", post([b"X-Cr: a\rb"], b"", method=b"GET", target=SYNC), router_400),
    ]


def _target_cases(worker_port: int) -> list[Case]:
    def raw_target(target: bytes, method: bytes = b"GET", query_nonce: bool = True) -> Callable[[bytes], bytes]:
        token = b"tok-target-" + hashlib.sha256(method + b" " + target).hexdigest()[:12].encode()
        return lambda n: request(method, target, n, [auth(token)], query_nonce=query_nonce)

    internal = f"http://127.0.0.1:{worker_port}".encode()
    rendezvous = [
        b"/_synapse/client/%72endezvous/x",
        b"/_synapse/client/rendezvou%73/abc",
        b"/_synapse/%63lient/rendezvous/abc",
        b"/_synapse/c%6cient/rendezvous/abc",
        b"/%5Fsynapse/client/rendezvous/abc",
        b"/_synapse/client/rendezvous/abc",
    ]
    cases = [
        Case(
            "rendezvous-" + path.decode(),
            (lambda p: lambda n: request(b"GET", p, n, [b"Accept-Encoding: gzip, br"]))(path),
            forwarded(no_accept_encoding),
        )
        for path in rendezvous
    ]
    cases += [
        Case("absolute-form-internal-worker", raw_target(internal + SYNC), unrecognized),
        Case("absolute-form-10.0.0.1", raw_target(b"http://10.0.0.1:8083" + SYNC), unrecognized),
        Case("absolute-form-own-host", raw_target(b"http://matrix.test" + MESSAGES), unrecognized),
        # mitmproxy in reverse mode answers a CONNECT itself (400), before any hook can
        Case("authority-form-connect", raw_target(internal[7:], b"CONNECT", False), unrecognized_or_refused),
        Case("authority-form-get", raw_target(internal[7:], b"GET", False), unrecognized_or_refused),
        Case("asterisk-form-options", raw_target(b"*", b"OPTIONS", False), anything_honest),
        Case("target-raw-nul-longpoll", raw_target(SYNC + b"&x=a\x00b"), router_400),
        Case("target-raw-nul-messages", raw_target(MESSAGES + b"?x=a\x00b"), router_400),
        Case("target-raw-cr", raw_target(SYNC + b"&x=a\rb"), refused),
        Case("method-raw-nul", raw_target(SYNC, b"GE\x00T"), router_400),
        Case("target-encoded-crlf-room", raw_target(b"/_matrix/client/v3/rooms/%0D%0AX:y/messages"), anything_honest),
        Case("target-encoded-nul-since", raw_target(SYNC + b"&since2=%00"), anything_honest),
        Case("target-raw-utf8-longpoll", raw_target(SYNC + b"&x=\xc3\xa9"), anything_honest),
        Case("target-raw-latin1-longpoll", raw_target(SYNC + b"&x=\xe9"), anything_honest),
        Case("target-raw-latin1-messages", raw_target(b"/_matrix/client/v3/rooms/!\xe9:x/messages"), anything_honest),
    ]
    return cases


def _oversized_cases() -> list[Case]:
    many = [b"X-Pad-%03d: %s" % (i, b"a" * 1000) for i in range(200)]  # about 200 KiB
    return [
        Case("200KiB-of-headers", lambda n: request(b"GET", SYNC, n, [auth("tok-erin-1"), *many]), too_large),
        Case(
            "one-200KiB-header",
            lambda n: request(b"GET", MESSAGES, n, [auth("tok-erin-1"), b"X-Big: " + b"b" * 200 * 1024]),
            too_large,
        ),
    ]


CORPUS_IDS = [c.id for c in (*_query_token_cases(), *_header_token_cases(), *_framing_cases(), *_target_cases(1))]
CORPUS_IDS += [c.id for c in _oversized_cases()]


def _case(env: Env, case_id: str) -> Case:
    port = env.fleet["sync1"].port
    cases = {c.id: c for c in (*_query_token_cases(), *_header_token_cases(), *_framing_cases())}
    cases |= {c.id: c for c in (*_target_cases(port), *_oversized_cases())}
    return cases[case_id]


@pytest.mark.parametrize("case_id", CORPUS_IDS)
def test_hostile_corpus(env: Env, case_id: str) -> None:
    case = _case(env, case_id)
    nonce = new_nonce()
    raw = case.build(nonce)
    env.secrets |= set(case.tokens) | {m.decode() for m in re.findall(rb"tok-(?:frame|target)-[0-9a-f]{12}", raw)}
    whoami_before = env.whoami_calls()
    STATS.inputs += 1
    ex = env.send(raw)
    check_answers_itself(ex, nonce)
    env.follow_ups(everyone=True)  # first: what a smuggled request did to other users matters most
    case.expect(ex, nonce)
    if not case.whoami and b"tok-frame-" not in raw and b"tok-target-" not in raw:
        assert env.whoami_calls() == whoami_before, "an invalid or refused token cost a whoami call"
    env.check_output()


# ---------------------------------------------------------------------------------------------
# Generated inputs: tokens (bytes and text) in the query and the header, and targets.
# ---------------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure's damage outlives it
    suppress_health_check=list(HealthCheck),
)
_counter = iter(range(10**9))


def _marked(generated: bytes) -> bytes:
    """A unique printable prefix, so that the token (and a log line cut at its first control
    character) can be looked for in the output."""
    return b"hx%08x" % next(_counter) + generated


def _fuzz_one(env: Env, raw: bytes, nonce: bytes, expect: Expect, may_call_whoami: bool) -> None:
    STATS.inputs += 1
    before = env.whoami_calls()
    ex = env.send(raw)
    check_answers_itself(ex, nonce)
    env.follow_ups()
    expect(ex, nonce)
    after = env.whoami_calls()
    assert after - before <= (1 if may_call_whoami else 0), f"whoami calls {before} -> {after} for {raw[:300]!r}"


def _query_token_check(env: Env, token: bytes, longpoll: bool) -> None:
    token = _marked(token)
    env.secrets |= {token.decode("utf-8", "replace"), quote_from_bytes(token, safe="")}
    target = SYNC if longpoll else MESSAGES
    nonce = new_nonce()
    raw = request(b"GET", with_param(target, b"access_token=" + quote_from_bytes(token, safe="").encode()), nonce)
    if plausible_token(token):

        def expect(ex: Exchange, n: bytes) -> None:
            seen = check_own_standin_answer(ex.reply, n)
            # forwarded as the client sent it (issue 22), byte for byte, never moved or added
            assert "authorization" not in seen["headers"], seen
            sent = "access_token=" + quote_from_bytes(token, safe="")
            assert sent in seen["path"].partition("?")[2].split("&"), seen

    else:
        expect = unknown_token
    _fuzz_one(env, raw, nonce, expect, plausible_token(token))


def _header_token_check(env: Env, token: bytes, longpoll: bool) -> None:
    token = _marked(token)
    env.secrets.add(token.decode("utf-8", "replace"))
    nonce = new_nonce()
    raw = request(b"GET", SYNC if longpoll else MESSAGES, nonce, [b"Authorization: Bearer " + token])
    value = (b"Bearer " + token).strip()  # as mitmproxy's parser reads the line
    sent = value[7:]
    invalid_header = any(c < 0x20 and c != 0x09 or c == 0x7F for c in value)  # a control character
    if invalid_header:
        expect: Expect = rejected_token
    elif value.startswith(b"Bearer ") and plausible_token(sent):

        def expect(ex: Exchange, n: bytes) -> None:
            seen = check_own_standin_answer(ex.reply, n)
            assert seen["headers"].get("authorization") == "Bearer " + sent.decode(), seen

    else:
        expect = unknown_token
    _fuzz_one(env, raw, nonce, expect, not invalid_header and plausible_token(sent))


NO_LF = st.binary(min_size=1, max_size=48).map(lambda b: b.replace(b"\n", b""))
LONGPOLL = st.booleans()


@FUZZ
@given(token=st.binary(min_size=1, max_size=48), longpoll=LONGPOLL)
def test_fuzz_query_token_bytes(env: Env, token: bytes, longpoll: bool) -> None:
    _query_token_check(env, token, longpoll)


@FUZZ
@given(token=st.text(min_size=1, max_size=32), longpoll=LONGPOLL)
def test_fuzz_query_token_text(env: Env, token: str, longpoll: bool) -> None:
    _query_token_check(env, token.encode("utf-8"), longpoll)


@FUZZ
@given(token=NO_LF, longpoll=LONGPOLL)
def test_fuzz_header_token_bytes(env: Env, token: bytes, longpoll: bool) -> None:
    _header_token_check(env, token, longpoll)


@FUZZ
@given(token=st.text(min_size=1, max_size=32).map(lambda t: t.encode("utf-8").replace(b"\n", b"")), longpoll=LONGPOLL)
def test_fuzz_header_token_text(env: Env, token: bytes, longpoll: bool) -> None:
    _header_token_check(env, token, longpoll)


@FUZZ
@given(
    part=st.binary(min_size=1, max_size=48).map(lambda b: b.replace(b"\n", b"")),
    encode=st.booleans(),
    longpoll=LONGPOLL,
)
def test_fuzz_target(env: Env, part: bytes, encode: bool, longpoll: bool) -> None:
    """Arbitrary bytes (raw, or percent-encoded) in a query value of a long-poll, or in the
    room id of an ordinary request: an answer to exactly this target, or a refusal."""
    if encode:
        part = quote_from_bytes(part, safe="").encode()
    target = SYNC + b"&x=" + part if longpoll else b"/_matrix/client/v3/rooms/!" + part + b":x/messages"
    nonce = new_nonce()
    raw = request(b"GET", target, nonce, [auth("tok-frank-1")])
    sent_target = raw.split(b"\r\n", 1)[0][4:-9]
    splits = any(c in part for c in b" \t\r\x0b\x0c")  # mitmproxy's request-line split

    def expect(ex: Exchange, n: bytes) -> None:
        if splits:
            refused(ex, n)
        elif b"\0" in part:
            router_400(ex, n)
        elif ex.replies and ex.reply.standin is not None:
            seen = ex.reply.standin
            assert seen["path"].encode("latin-1") == sent_target, f"sent {sent_target!r}, worker saw {seen['path']!r}"

    _fuzz_one(env, raw, nonce, expect, False)


def test_fuzz_output_clean(env: Env) -> None:
    """After the generated inputs: no traceback, no generated token in the output."""
    env.check_output()


# ---------------------------------------------------------------------------------------------
# Specific reproductions.
# ---------------------------------------------------------------------------------------------


def _curl(port: int, target: str, token: str | None = None) -> Exchange:
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "User-Agent: curl/8.5.0", "Accept: */*"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), settle=0)


def test_repro_1_curl_smuggled_response_goes_to_the_next_user(fleet: Fleet, start_router) -> None:
    """The reported reproduction, byte for byte as curl sends it: mallory's query token
    carries a second request; alice, bob, carol and dave must each get their own answer."""
    fleet.add("main", whoami=USERS)
    fleet.add("sync1")
    fleet.add("sync2")
    fleet.add("reader1")
    config = {"workers": {"sync": [fleet["sync1"].url, fleet["sync2"].url], "client_reader": [fleet["reader1"].url]}}
    router = start_router(fleet["main"].url, config, extra=ROUTER_FLAGS)
    mallory = _curl(router.port, f"/_matrix/client/v3/sync?since=s&timeout=1&access_token=tok-mallory-1{SMUGGLE}")
    STATS.inputs += 1
    got = {}
    for user in ("alice", "bob", "carol", "dave"):
        ex = _curl(router.port, "/_matrix/client/v3/sync?since=s&timeout=1", f"tok-{user}-1")
        STATS.responses += len(ex.replies)
        seen = ex.replies[0].standin if ex.replies else None
        if seen is None:
            got[user] = ex.describe()
        elif seen["path"] != "/_matrix/client/v3/sync?since=s&timeout=1":
            got[user] = f"the answer to {seen['path']}"
        elif seen["headers"].get("authorization") != f"Bearer tok-{user}-1":
            got[user] = f"the answer to {seen['headers'].get('authorization')}"
        else:
            got[user] = "own"
        if got[user] != "own":
            STATS.cross_delivered += 1
    assert got == dict.fromkeys(("alice", "bob", "carol", "dave"), "own"), f"what each user got: {got}"
    check_router_error(mallory.reply, 401, "M_UNKNOWN_TOKEN")
    time.sleep(0.3)
    assert TRACEBACK not in router.log()
    assert "tok-mallory-1" not in router.log()


def test_repro_2_dropped_longpoll_cancels_its_upstream_request(fleet: Fleet, start_router) -> None:
    """50 clients drop their router-sent long-polls: the router closes their upstream
    requests, so the workers' open connections fall back to what they were."""
    fleet.add("main", whoami=USERS)
    fleet.add("sync1")
    fleet.add("sync2")
    router = start_router(fleet["main"].url, {"workers": {"sync": [fleet["sync1"].url, fleet["sync2"].url]}})
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for token in USERS:  # resolved once: the long-polls below wait on no whoami
            assert client.get(f"/_matrix/client/v3/sync?since=s&timeout=1&access_token={token}").status_code == 200

    def open_upstream() -> int:
        return sum(fleet[name].stats()["open_connections"] for name in ("sync1", "sync2"))

    time.sleep(0.5)
    baseline = open_upstream()
    socks = []
    tokens = list(USERS)
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", router.port))
        nonce = new_nonce()
        target = b"/_matrix/client/v3/sync?since=s&timeout=30000&standin_delay=30"
        s.sendall(request(b"GET", target, nonce, [auth(tokens[i % len(tokens)])], close=False))
        socks.append(s)
    deadline = time.monotonic() + 10
    while open_upstream() < 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    in_flight = open_upstream()
    assert in_flight >= 50, f"the long-polls never all reached the workers ({in_flight} open, baseline {baseline})"
    for s in socks:
        s.close()
    deadline = time.monotonic() + 10  # generous: an "eventually", not a speed claim
    while (left := open_upstream()) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left <= baseline, (
        f"{left} upstream connections still open 10 s after 50 clients left ({baseline} before they came)"
    )
    assert TRACEBACK not in router.log()


def test_repro_3_nul_tokens_do_not_switch_whoami_off(fleet: Fleet, start_router, tmp_path: Path) -> None:
    fleet.add("main", whoami={**USERS, **FRESH})
    fleet.add("sync1")
    fleet.add("sync2")
    access = tmp_path / "access3.log"
    config = {
        "workers": {"sync": [fleet["sync1"].url, fleet["sync2"].url]},
        "debug_headers": True,
        "access_log": {"enabled": True, "format": "json", "path": str(access)},
    }
    router = start_router(fleet["main"].url, config, extra=ROUTER_FLAGS)
    for _ in range(4):
        nonce = new_nonce()
        STATS.inputs += 1
        ex = exchange(router.port, request(b"GET", SYNC + b"&access_token=x%00", nonce))
        check_answers_itself(ex, nonce)
        unknown_token(ex, nonce)
    before = fleet["main"].stats()["whoami_calls"]
    nonce = new_nonce()
    ex = exchange(router.port, request(b"GET", SYNC, nonce, [auth("tok-fresh0-1")]), settle=0)
    check_no_cross_delivery(ex, nonce)
    check_own_standin_answer(ex.reply, nonce)
    time.sleep(0.3)
    last = json.loads(access.read_text().splitlines()[-1])
    assert (last.get("identity"), last.get("key_kind")) == ("whoami", "user"), last
    assert fleet["main"].stats()["whoami_calls"] == before + 1
    assert TRACEBACK not in router.log()


def _requests_total(port: int, status_class: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 10
    while True:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            break
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "synapse_router_requests_total" and sample.labels.get("status_class") == status_class:
                total += sample.value
    return total


def test_repro_4_non_ascii_token_clean_401_logged_and_counted(env: Env) -> None:
    time.sleep(0.3)
    lines_before = len(env.access_log.read_text().splitlines()) if env.access_log.exists() else 0
    counted_before = _requests_total(env.metrics_port, "4xx")
    whoami_before = env.whoami_calls()
    env.secrets |= {"tok-é-1", "tok-\udce9-1"}
    for raw_builder in (
        lambda n: request(b"GET", SYNC, n, [b"Authorization: Bearer tok-\xc3\xa9-1"]),
        lambda n: request(b"GET", SYNC + b"&access_token=tok-%E9-1", n),
    ):
        nonce = new_nonce()
        STATS.inputs += 1
        ex = env.send(raw_builder(nonce))
        check_answers_itself(ex, nonce)
        unknown_token(ex, nonce)
    env.follow_ups(everyone=True)
    assert env.whoami_calls() == whoami_before
    env.check_output()
    entries = [json.loads(line) for line in env.access_log.read_text().splitlines()[lines_before:]]
    assert sum(1 for e in entries if e.get("status") == 401) == 2, entries
    assert _requests_total(env.metrics_port, "4xx") == counted_before + 2


def test_repro_5_no_token_of_a_malformed_credential_in_the_output(env: Env) -> None:
    secrets = {
        "tok-redact-two-a": None,
        "tok-redact-two-b": None,
        "tok-redact-tab": None,
        "tok-redact-extra": None,
        "tok-redact-query": None,
        "tok-redact-query-crlf": None,
    }
    env.secrets |= set(secrets)
    builders = [
        lambda n: request(b"GET", SYNC, n, [auth("tok-redact-two-a"), auth("tok-redact-two-b")]),
        lambda n: request(b"GET", MESSAGES, n, [b"Authorization: Bearer\ttok-redact-tab"]),
        lambda n: request(b"GET", SYNC, n, [b"Authorization: Bearer tok-redact-extra extra"]),
        lambda n: request(b"GET", MESSAGES + b"?access_token=tok-redact-query", n),
        lambda n: request(b"GET", SYNC + b"&access_token=tok-redact-query-crlf%0D%0AX:%201", n),
    ]
    for build in builders:
        nonce = new_nonce()
        STATS.inputs += 1
        ex = env.send(build(nonce))
        check_answers_itself(ex, nonce)
    env.follow_ups()
    env.check_output()


def test_repro_20_mitmproxy_error_lines_quote_no_client_byte(env: Env) -> None:
    """Issue 20: mitmproxy's HTTP/1 layer quoted the client's bytes in its log lines and flow
    errors (`illegal chunk header: bytearray(b'...')`, `Bad HTTP request line: b'...'`, `Client
    closed connection before completing request headers: b'...'`): two of them are what real
    buggy clients send (bare-LF chunks followed by the next request; a JSON body sent as if it
    were chunked)."""
    secrets = ["tok-quoted-next-request", "pw-quoted-login-body", "tok-quoted-request-line", "tok-quoted-half-close"]
    env.secrets |= set(secrets)
    create = b"/_matrix/client/v3/createRoom"
    login = b'{"type":"m.login.password","user":"alice","password":"pw-quoted-login-body"}'
    builders = [
        lambda n: (
            request(b"POST", create, n, [b"Transfer-Encoding: chunked"], b"2\n{}\n0\n\n", close=False)
            + request(b"GET", SYNC + b"&access_token=tok-quoted-next-request", n)
        ),
        lambda n: request(b"POST", b"/_matrix/client/v3/login", n, [b"Transfer-Encoding: chunked"], login + b"\r\n"),
        lambda n: (
            b"GET " + SYNC + b"&%61ccess_token=tok-quoted-request-line&nonce=" + n + b" HTTP/1.1 x\r\nHost: h\r\n\r\n"
        ),
    ]
    for build in builders:
        nonce = new_nonce()
        STATS.inputs += 1
        ex = env.send(build(nonce))
        check_answers_itself(ex, nonce)
    STATS.inputs += 1
    with socket.create_connection(("127.0.0.1", env.router.port), timeout=5) as sock:
        sock.sendall(b"GET " + SYNC + b"&%61ccess_token=tok-quoted-half-close HTTP/1.1\r\nHost: h\r\n")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(65536):
            pass
    env.follow_ups()
    env.check_output()


def test_repro_8_encoded_rendezvous_and_absolute_form(env: Env) -> None:
    nonce = new_nonce()
    STATS.inputs += 1
    ex = env.send(request(b"GET", b"/_synapse/client/%72endezvous/x", nonce, [b"Accept-Encoding: gzip"]))
    check_answers_itself(ex, nonce)
    no_accept_encoding(check_own_standin_answer(ex.reply, nonce))
    internal = f"http://127.0.0.1:{env.fleet['sync1'].port}".encode()
    nonce = new_nonce()
    STATS.inputs += 1
    ex = env.send(request(b"GET", internal + SYNC, nonce, [auth("tok-alice-1")]))
    check_answers_itself(ex, nonce)
    seen = ex.replies[0].standin if ex.replies else None
    assert seen is None or "127.0.0.1" not in seen["path"], f"the worker saw its own address: {seen}"
    unrecognized(ex, nonce)
    env.follow_ups()


def test_router_answers_to_head_carry_no_body(env: Env) -> None:
    """A router-made answer to HEAD is headers only: a body after it would be read as the
    start of the next response on the kept-alive connection (found by an outside trial:
    `illegal status line: b'{"errcode": ...}HTTP/1.1 ...'`)."""
    cases = [
        ("/_matrix/client/v3/sync?access_token=tok-%00-1", [], 401),
        ("/_matrix/client/v3/joined_rooms", [("Authorization", "Bearer tok-alice-1")] * 2, 400),
    ]
    connection = http.client.HTTPConnection("127.0.0.1", env.router.port, timeout=30)
    try:
        for path, headers, status in cases:
            connection.putrequest("HEAD", path)
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders()
            head = connection.getresponse()
            assert head.status == status and head.read() == b""
            assert head.getheader("access-control-allow-origin") == "*"
            connection.request("GET", "/_matrix/client/versions")
            after = connection.getresponse()
            assert after.status == 200 and b"versions" in after.read()
    finally:
        connection.close()
