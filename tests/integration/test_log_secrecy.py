"""No secret in any output of a real router (either launcher) at the most verbose settings:
`termlog_verbosity=debug` and `flow_detail=4` (every flow printed with headers and whole
bodies), with the access log on.

Every malformed-request class mitmproxy's HTTP/1 layer reports (a bad chunk header, bare LF
chunks followed by another request, invalid, duplicate or conflicting Content-Length and
Transfer-Encoding, Transfer-Encoding on HTTP/1.0, invalid header names, a header line without a
colon, a space before the colon, a bad request line or version, a head cut by a half-close, a
body cut by a close, chunked trailers) and the router's own refusals (an oversized head, a
control byte, an absolute-form target, two tokens) is sent with a secret in each place a
client puts one: the query (`access_token=`, plain and percent-encoded key), `Authorization`,
`Proxy-Authorization`, `Cookie`, and a password in the body; also inside the very field the
parser quotes. Then ordinary requests with the same carriers, and /login, /register, /refresh
and /account/password exchanges whose answers carry access_token, refresh_token and a
Set-Cookie. None of those secrets may appear in stdout, stderr or the access log; every answer
still reaches the client byte for byte.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.harness import Fleet, Router, RouterStarter, free_port
from tests.hostile import exchange
from tests.standin import LOGIN_ACCESS_TOKEN, LOGIN_COOKIE, LOGIN_REFRESH_TOKEN

pytestmark = pytest.mark.integration

FLAGS = ["--set", "flow_detail=4", "--set", "termlog_verbosity=debug"]
HOST = b"Host: h"
SYNC = b"/_matrix/client/v3/sync"
LOGIN = b"/_matrix/client/v3/login"


class Secrets:
    """Every secret sent, with where it went, to look for in the output."""

    def __init__(self) -> None:
        self.sent: dict[str, str] = {}

    def new(self, where: str) -> str:
        secret = f"SeCrEt{len(self.sent):03d}x{secrets.token_hex(6)}"
        self.sent[secret] = where
        return secret


# --- where a client puts a secret -------------------------------------------------------------


class Carried:
    """A request's parts with a secret in one place."""

    def __init__(self, target: bytes, headers: list[bytes], body: bytes) -> None:
        self.target, self.headers, self.body = target, headers, body


def _plain(target: bytes) -> bytes:
    return target + (b"&" if b"?" in target else b"?") + b"standin_plain=1"


CARRIERS: dict[str, Callable[[str], Carried]] = {
    "query": lambda s: Carried(_plain(SYNC + b"?access_token=" + s.encode()), [], b""),
    "query-encoded-key": lambda s: Carried(_plain(SYNC + b"?%61ccess_token=" + s.encode()), [], b""),
    "authorization": lambda s: Carried(_plain(SYNC), [b"Authorization: Bearer syt_" + s.encode()], b""),
    "proxy-authorization": lambda s: Carried(_plain(SYNC), [b"Proxy-Authorization: Basic " + s.encode()], b""),
    "cookie": lambda s: Carried(_plain(SYNC), [b"Cookie: session=" + s.encode() + b"; other=1"], b""),
    "password": lambda s: Carried(
        _plain(LOGIN), [], json.dumps({"type": "m.login.password", "user": "alice", "password": s}).encode()
    ),
}


def head(method: bytes, target: bytes, headers: list[bytes], version: bytes = b"HTTP/1.1") -> bytes:
    return b"\r\n".join([method + b" " + target + b" " + version, HOST, *headers]) + b"\r\n\r\n"


def chunked(body: bytes) -> bytes:
    return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


def with_length(c: Carried) -> list[bytes]:
    return [*c.headers, b"Content-Length: %d" % len(c.body)] if c.body else c.headers


# --- malformed and refused requests: each builds the raw bytes from a carried secret and a
# second secret (`quoted`) written into the very field the parser complains about (where the
# request is refused before it has a head mitmproxy accepts: an accepted head's ordinary
# header values are what flow_detail >= 2 asks to see) ------------------------------------

Builder = Callable[[Carried, bytes], bytes]
MALFORMED: dict[str, Builder] = {
    # issue 20's two real-client cases
    "bad-chunk-header": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked"]) + (c.body or q) + b"\r\n"
    ),
    "bare-lf-chunks-then-request": lambda c, q: (
        head(b"POST", _plain(b"/_matrix/client/v3/createRoom"), [b"Transfer-Encoding: chunked"])
        + b"2\n{}\n0\n\n"
        + head(b"POST" if c.body else b"GET", c.target, with_length(c))
        + c.body
    ),
    "invalid-content-length": lambda c, q: head(b"POST", c.target, [*c.headers, b"Content-Length: 1" + q]) + c.body,
    "duplicate-content-length": lambda c, q: (
        head(
            b"POST",
            c.target,
            [*c.headers, b"Content-Length: %d" % len(c.body), b"Content-Length: %d" % (len(c.body) + 1)],
        )
        + c.body
    ),
    "duplicate-transfer-encoding": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"])
        + chunked(c.body)
    ),
    "transfer-encoding-and-content-length": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(c.body)])
        + chunked(c.body)
    ),
    "transfer-encoding-http10": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked"], version=b"HTTP/1.0") + chunked(c.body)
    ),
    "unknown-transfer-encoding": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: x" + q]) + c.body
    ),
    "invalid-header-name": lambda c, q: head(b"GET", c.target, [*c.headers, b"Bad Name" + q + b": 1"]),
    "header-without-colon": lambda c, q: head(b"GET", c.target, [*c.headers, b"NoColonHere" + q]),
    "space-before-colon": lambda c, q: head(
        b"GET", c.target, [h.replace(b":", b" :", 1) for h in c.headers] + [b"X-Q : " + q]
    ),
    "bad-request-line": lambda c, q: (
        c.target.join([b"GET ", b" HTTP/1.1 " + q + b"\r\n"]) + b"\r\n".join([HOST, *c.headers]) + b"\r\n\r\n"
    ),
    "request-line-without-version": lambda c, q: (
        b"GET " + c.target + b"\r\n" + b"\r\n".join([HOST, *c.headers]) + b"\r\n\r\n"
    ),
    "bad-http-version": lambda c, q: head(b"GET", c.target, c.headers, version=b"HTTP/1." + q),
    "oversized-head": lambda c, q: head(b"GET", c.target, [*c.headers, b"X-Pad: " + b"a" * 70000]),
    "control-byte-in-value": lambda c, q: head(b"GET", c.target, [*c.headers, b"X-Ctl: a\x01b"]),
    "absolute-form": lambda c, q: head(b"GET", b"http://10.0.0.5:8083" + c.target, c.headers),
    "two-tokens": lambda c, q: head(
        b"GET", c.target + b"&access_token=" + q, [*c.headers, b"Authorization: Bearer " + q]
    ),
    "chunk-extension": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked"])
        + b"%x;ext=%s\r\n%s\r\n0\r\n\r\n" % (len(c.body or q), q, c.body or q)
    ),
}
# Sent, then the connection closed by the client (no answer comes).
CUT: dict[str, Builder] = {
    "head-cut-by-half-close": lambda c, q: b"\r\n".join(
        [b"GET " + c.target + b" HTTP/1.1", HOST, *c.headers, b"X-Q: " + q]
    ),
    "body-cut-by-close": lambda c, q: head(b"POST", c.target, [*c.headers, b"Content-Length: 100000"]) + (c.body or q),
    "chunked-body-cut-by-close": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked"]) + b"%x\r\n" % 100000 + (c.body or q)
    ),
    "chunked-trailers": lambda c, q: (
        head(b"POST", c.target, [*c.headers, b"Transfer-Encoding: chunked"])
        + b"%x\r\n%s\r\n0\r\nX-Trailer: %s\r\n\r\n" % (len(c.body or q), c.body or q, q)
    ),
}


def send_and_cut(port: int, raw: bytes, half_close: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        sock.settimeout(1)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass


class Env:
    def __init__(self, tmp: Path) -> None:
        self.fleet = Fleet(tmp)
        self.fleet.add("main", whoami={})
        self.fleet.add("reader1")
        self.starter = RouterStarter(tmp)
        self.access_log = tmp / "access.log"
        config = {
            "workers": {"client_reader": [self.fleet["reader1"].url]},
            "debug_headers": True,
            "access_log": {"enabled": True, "format": "json", "path": str(self.access_log)},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        }
        self.router: Router = self.starter(self.fleet["main"].url, config, extra=FLAGS)
        self.secrets = Secrets()

    def output(self) -> str:
        access = self.access_log.read_text(errors="replace") if self.access_log.exists() else ""
        return self.router.log() + "\n" + access

    def leaks(self, first: int = 0, wait: float = 0.5) -> list[str]:
        """Each secret (from the `first`-th sent on) found in the output, with where it was
        sent and the lines showing it."""
        time.sleep(wait)  # the router prints a flow once it is over
        out = self.output()
        found = []
        for secret, where in list(self.secrets.sent.items())[first:]:
            forms = {secret, quote(secret), secret.lower()}
            lines = [line for line in out.splitlines() if any(f in line for f in forms)]
            if lines:
                found.append(f"{where}: {secret}: {lines[:3]}")
        return found


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("secrecy"))
    yield e
    e.starter.stop_all()
    e.fleet.stop()


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_requests_leak_nothing(env: Env, kind: str) -> None:
    first = len(env.secrets.sent)
    for carrier, carry in CARRIERS.items():
        carried = carry(env.secrets.new(f"{kind} / {carrier}"))
        quoted = env.secrets.new(f"{kind} / quoted field").encode()
        exchange(env.router.port, MALFORMED[kind](carried, quoted), timeout=3, settle=0.2)
    assert env.router.proc.poll() is None
    assert not env.leaks(first), "\n".join(env.leaks(first, 0))


@pytest.mark.parametrize("kind", sorted(CUT))
def test_requests_cut_by_the_client_leak_nothing(env: Env, kind: str) -> None:
    first = len(env.secrets.sent)
    for carrier, carry in CARRIERS.items():
        carried = carry(env.secrets.new(f"{kind} / {carrier}"))
        quoted = env.secrets.new(f"{kind} / quoted field").encode()
        send_and_cut(env.router.port, CUT[kind](carried, quoted), half_close=kind.startswith("head"))
    assert env.router.proc.poll() is None
    assert not env.leaks(first), "\n".join(env.leaks(first, 0))


def test_well_formed_requests_leak_nothing(env: Env) -> None:
    first = len(env.secrets.sent)
    for carrier, carry in CARRIERS.items():
        c = carry(env.secrets.new(f"well-formed / {carrier}"))
        ex = exchange(
            env.router.port, head(b"POST" if c.body else b"GET", c.target, with_length(c)) + c.body, timeout=5
        )
        assert ex.replies, f"{carrier}: {ex.describe()}"
    assert not env.leaks(first), "\n".join(env.leaks(first, 0))


ANSWERED = {
    "login": (LOGIN, lambda s: {"type": "m.login.password", "user": "alice", "password": s}),
    "register": (
        b"/_matrix/client/v3/register",
        lambda s: {"username": "alice", "password": s, "auth": {"type": "m.login.dummy", "session": "x"}},
    ),
    "refresh": (b"/_matrix/client/v3/refresh", lambda s: {"refresh_token": s}),
    "password-change": (
        b"/_matrix/client/v3/account/password",
        lambda s: {"new_password": s, "auth": {"type": "m.login.password", "password": s + "old"}},
    ),
    "login-token": (LOGIN, lambda s: {"type": "m.login.token", "token": s}),
    "escaped-key": (LOGIN, lambda s: {"type": "m.login.password", "password": s}),  # sent as pass\u0077ord
}


@pytest.mark.parametrize("name", sorted(ANSWERED))
def test_token_answers_leak_nothing_and_reach_the_client_intact(env: Env, name: str) -> None:
    """Synapse's answers to /login, /register, /refresh carry access_token and refresh_token
    (and here a Set-Cookie): none is printed at flow_detail=4, and the client gets every byte."""
    path, make = ANSWERED[name]
    first = len(env.secrets.sent)
    secret = env.secrets.new(f"{name} request body")
    body = json.dumps(make(secret)).encode()
    if name == "escaped-key":  # the key as a client may spell it: JSON escapes
        body = body.replace(b'"password"', b'"pass\\u0077ord"')
    raw = head(b"POST", path + b"?standin_login=1", [b"Content-Length: %d" % len(body), b"Connection: close"]) + body
    ex = exchange(env.router.port, raw, timeout=5)
    assert ex.replies and ex.replies[0].status == 200, ex.describe()
    answer = ex.replies[0].json()
    assert answer["access_token"] == LOGIN_ACCESS_TOKEN
    assert answer["refresh_token"] == LOGIN_REFRESH_TOKEN
    assert ex.replies[0].header(b"set-cookie") == f"session={LOGIN_COOKIE}; Path=/; HttpOnly".encode()
    for answered in (LOGIN_ACCESS_TOKEN, LOGIN_REFRESH_TOKEN, LOGIN_COOKIE):
        env.secrets.sent.pop(answered, None)
        env.secrets.sent[answered] = "an answer's token or cookie"
    assert not env.leaks(first), "\n".join(env.leaks(first, 0))
