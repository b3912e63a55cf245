"""Tools of the hostile-client suite (tests/integration/test_hostile.py): requests written byte by
byte on raw sockets, a small HTTP/1.1 response reader, and the one invariant every response
must satisfy: it answers exactly the request that client sent.

Every request carries a nonce (`n0nce` + 20 hex digits) in a query parameter and in an
`X-Test-Nonce` header. The stand-in echoes what it received, so a stand-in answer must carry its
request's nonce and no other; a response the router makes itself carries none at all.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

NONCE = re.compile(rb"n0nce[0-9a-f]{20}")
PLAUSIBLE = re.compile(rb"[\x21-\x7e]{1,1024}")
HOST = b"matrix.test"


def new_nonce() -> bytes:
    return b"n0nce" + secrets.token_hex(10).encode()


def plausible_token(token: bytes) -> bool:
    """What the router accepts as an access token: printable ASCII, no whitespace, 1..1024."""
    return PLAUSIBLE.fullmatch(token) is not None


def leading_run(token: str) -> str:
    """The token up to its first character that is not printable ASCII: what a log that stops
    at a control character would still show."""
    m = re.match(r"[\x21-\x7e]*", token)
    return m.group(0) if m else ""


@dataclass
class Stats:
    """Counted over a whole pytest session (one launcher), printed at its end."""

    inputs: int = 0
    responses: int = 0
    cross_delivered: int = 0

    def line(self) -> str:
        return (
            f"hostile: {self.inputs} inputs, {self.responses} responses checked, {self.cross_delivered} cross-delivered"
        )


STATS = Stats()


@dataclass
class Reply:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def standin(self) -> dict[str, Any] | None:
        """What the stand-in saw (headers as a lower-cased dict), if a stand-in answered."""
        body = self.json()
        if not isinstance(body, dict) or "server" not in body or "headers" not in body:
            return None
        return {**body, "headers": {k.lower(): v for k, v in body["headers"]}}

    @property
    def matrix_error(self) -> dict[str, Any] | None:
        """The router's own answer: a Matrix error without any stand-in field."""
        body = self.json()
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("errcode"), str)
            or not isinstance(body.get("error"), str)
            or {"server", "method", "path", "headers"} & set(body)
        ):
            return None
        return body

    def describe(self) -> str:
        return f"{self.status} {self.reason!r} {self.body[:300]!r}"


@dataclass
class Exchange:
    """What came back on one client connection."""

    sent: bytes
    replies: list[Reply] = field(default_factory=list)
    closed: bool = False  # the router closed (or reset) the connection
    leftover: bytes = b""  # bytes after the last complete response
    note: str = ""

    @property
    def reply(self) -> Reply:
        assert len(self.replies) == 1, f"expected one response, got {len(self.replies)}: {self.describe()}"
        return self.replies[0]

    def describe(self) -> str:
        shown = [r.describe() for r in self.replies]
        return f"replies={shown} closed={self.closed} leftover={self.leftover[:200]!r} {self.note}"


def _parse_one(data: bytes, eof: bool) -> tuple[Reply, bytes] | None:
    """One complete response from the front of `data`, and the bytes after it; None if the
    response is not complete yet. `eof`: the connection has ended after `data`."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status_text, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or not status_text.isdigit():
        raise ValueError(f"not an HTTP/1.x response: {data[:200]!r}")
    status = int(status_text)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    reply = Reply(status, reason, headers, b"")
    rest_data = data[end + 4 :]
    if status in (204, 304) or 100 <= status < 200:
        return reply, rest_data
    encoding = (reply.header(b"transfer-encoding") or b"").lower()
    if b"chunked" in encoding:
        body = bytearray()
        pos = 0
        while True:
            eol = rest_data.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(rest_data[pos:eol].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                trailer_end = rest_data.find(b"\r\n\r\n", eol)
                if rest_data[eol : eol + 4] == b"\r\n\r\n":
                    return Reply(status, reason, headers, bytes(body)), rest_data[eol + 4 :]
                if trailer_end < 0:
                    return None
                return Reply(status, reason, headers, bytes(body)), rest_data[trailer_end + 4 :]
            if len(rest_data) < eol + 2 + size + 2:
                return None
            body += rest_data[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
    length = reply.header(b"content-length")
    if length is None:  # delimited by the connection's end: complete only then
        return (Reply(status, reason, headers, rest_data), b"") if eof else None
    n = int(length)
    if len(rest_data) < n:
        return None
    reply.body = rest_data[:n]
    return reply, rest_data[n:]


def parse_replies(data: bytes, eof: bool) -> tuple[list[Reply], bytes]:
    replies = []
    while data:
        parsed = _parse_one(data, eof)
        if parsed is None:
            break
        reply, data = parsed
        replies.append(reply)
    return replies, data


def exchange(port: int, raw: bytes, timeout: float = 15.0, settle: float = 0.3) -> Exchange:
    """Send `raw` on a new connection and read every response until the router closes it, or
    until `settle` seconds after a complete response with the connection still open, or until
    `timeout`. Never raises on a reset: that is `closed`."""
    result = Exchange(raw)
    data = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except OSError as e:  # the router closed before reading everything (too large)
            result.note = f"send: {e!r}"
        eof = False
        while True:
            replies, _ = parse_replies(data, eof=False)
            wait_until = deadline if not replies else min(deadline, time.monotonic() + settle)
            if settle == 0 and replies:
                break
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                if not replies:
                    result.note += f" no complete response within {timeout}s"
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:  # reset
                result.note += f" recv: {e!r}"
                eof = True
                break
            if not chunk:
                eof = True
                break
            data += chunk
    result.closed = eof
    result.replies, result.leftover = parse_replies(data, eof=eof)
    return result


def request(
    method: bytes,
    target: bytes,
    nonce: bytes,
    headers: list[bytes] = (),  # type: ignore[assignment]
    body: bytes = b"",
    query_nonce: bool = True,
    close: bool = True,
) -> bytes:
    """A request as raw bytes: `headers` are whole header lines, written as given."""
    if query_nonce:
        target += (b"&" if b"?" in target else b"?") + b"nonce=" + nonce
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + HOST, b"X-Test-Nonce: " + nonce, *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def foreign_nonces(reply: Reply, nonce: bytes | None) -> set[bytes]:
    seen = set(NONCE.findall(reply.body))
    for k, v in reply.headers:
        seen |= set(NONCE.findall(k + b":" + v))
    return seen - ({nonce} if nonce else set())


def check_no_cross_delivery(ex: Exchange, nonce: bytes | None) -> None:
    """No response on this connection carries another request's nonce."""
    for reply in ex.replies:
        STATS.responses += 1
        foreign = foreign_nonces(reply, nonce)
        if foreign:
            STATS.cross_delivered += 1
            raise AssertionError(
                f"CROSS-DELIVERED: a response carrying another request's nonce {sorted(foreign)} "
                f"answered this one ({nonce!r}): {reply.describe()}"
            )


def check_own_standin_answer(reply: Reply, nonce: bytes) -> dict[str, Any]:
    """A stand-in answered, and it answered this request."""
    seen = reply.standin
    assert seen is not None, f"expected a stand-in answer to {nonce!r}, got {reply.describe()}"
    assert NONCE.findall(reply.body) and set(NONCE.findall(reply.body)) == {nonce}, reply.describe()
    assert seen["headers"].get("x-test-nonce") == nonce.decode(), f"answer to another request: {reply.describe()}"
    return seen


def check_router_error(reply: Reply, status: int | tuple[int, ...], errcode: str | None = None) -> dict[str, Any]:
    """The router answered itself with a Matrix error."""
    statuses = (status,) if isinstance(status, int) else status
    error = reply.matrix_error
    assert reply.status in statuses and error is not None, (
        f"expected a router error {statuses} {errcode or ''}, got {reply.describe()}"
    )
    if errcode is not None:
        assert error["errcode"] == errcode, reply.describe()
    assert not NONCE.findall(reply.body), reply.describe()
    # Like Synapse's own answers, readable by a web client (Element Web reads soft_logout).
    assert reply.header(b"access-control-allow-origin") == b"*", reply.describe()
    return error


def check_answers_itself(ex: Exchange, nonce: bytes, allow_close: bool = True) -> None:
    """The invariant alone: the stand-in's answer to this request, or an error (the router's
    Matrix error, or any 4xx), or a closed connection; never another request's answer."""
    check_no_cross_delivery(ex, nonce)
    assert len(ex.replies) <= 1, f"one request, several responses: {ex.describe()}"
    if not ex.replies:
        assert allow_close and ex.closed, f"no response and the connection still open: {ex.describe()}"
        return
    reply = ex.replies[0]
    if reply.standin is not None:
        check_own_standin_answer(reply, nonce)
    elif reply.matrix_error is not None:
        assert reply.status >= 400, reply.describe()
    else:
        assert 400 <= reply.status < 500, (
            f"neither the stand-in's echo of this request, nor the router's Matrix error, nor a 4xx: {reply.describe()}"
        )
