"""HTTP/1.1 request-side edge cases (issue 20), answered as nginx answers them, against a real
router (either launcher) and a real stand-in worker, on raw sockets: empty lines before a
request line, malformed chunked bodies, trailer fields, a stalled body (`limits.body_timeout`),
a Transfer-Encoding other than chunked, the HTTP/2 preface, HTTP/1.1 without Host, TRACE, and
TLS on the plain listener. Every case is answered at once (or proxied), never left to hang, and
the router's output holds no byte the client sent in the broken part and no traceback.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Fleet, Router, RouterStarter, free_port
from tests.hostile import (
    Exchange,
    check_own_standin_answer,
    check_router_error,
    exchange,
    new_nonce,
    parse_replies,
    request,
)

pytestmark = pytest.mark.integration

SEND = b"/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1"
VERSIONS = b"/_matrix/client/versions"
BODY_TIMEOUT = 1.5
GRACE = 5.0  # a timer fires within its timeout + GRACE seconds on a busy machine
TRACEBACK = "Traceback (most recent call last)"
MARK = b"edgemark"  # in the broken part of a request: must never reach the router's output


class Env:
    def __init__(self, tmp: Path) -> None:
        self.fleet = Fleet(tmp)
        self.starter = RouterStarter(tmp)
        self.fleet.add("main")
        self.access_log = tmp / "access.log"
        self.metrics_port = free_port()
        config = {
            "workers": {},
            "access_log": {"enabled": True, "format": "json", "path": str(self.access_log)},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "limits": {"body_timeout": BODY_TIMEOUT},
        }
        extra = ["--set", "flow_detail=2", "--set", "termlog_verbosity=debug"]
        self.router: Router = self.starter(self.fleet["main"].url, config, extra=extra)

    def send(self, raw: bytes, timeout: float = 10.0, settle: float = 0.3) -> Exchange:
        return exchange(self.router.port, raw, timeout=timeout, settle=settle)

    def requests_seen(self) -> dict[str, int]:
        return dict(self.fleet["main"].stats()["requests"])

    def access_lines(self) -> list[dict[str, Any]]:
        time.sleep(0.2)
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line]

    def check_output(self) -> None:
        time.sleep(0.1)
        text = self.router.log()
        assert TRACEBACK not in text, text[text.find(TRACEBACK) - 500 :][:3000]
        assert MARK.decode() not in text, text[text.find(MARK.decode()) - 500 :][:1500]
        assert MARK.decode() not in self.access_log.read_text()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("edges"))
    try:
        yield e
    finally:
        e.starter.stop_all()
        e.fleet.stop()


def chunked(body: bytes, nonce: bytes) -> bytes:
    return request(b"PUT", SEND, nonce, [b"Transfer-Encoding: chunked"], body)


# --- empty lines before the request line (RFC 9112 2.2) --------------------------------------


@pytest.mark.parametrize("blank", [b"\r\n", b"\n", b"\r\n\r\n"])
def test_empty_lines_before_the_first_request_line_are_ignored(env: Env, blank: bytes) -> None:
    nonce = new_nonce()
    ex = env.send(blank + request(b"GET", VERSIONS, nonce))
    check_own_standin_answer(ex.reply, nonce)
    assert ex.reply.status == 200


def test_crlf_after_a_post_body_then_the_next_request_on_the_connection(env: Env) -> None:
    """A client that appends CRLF after its body, then sends its next request on the same
    keep-alive connection (in the same packet, or once the first answer came)."""
    first, second, third = new_nonce(), new_nonce(), new_nonce()
    post = request(b"POST", b"/_matrix/client/v3/login", first, [b"Content-Length: 2"], b"{}", close=False)
    with socket.create_connection(("127.0.0.1", env.router.port), timeout=10) as sock:
        sock.sendall(post + b"\r\n" + request(b"GET", VERSIONS, second, close=False))
        data = b""
        while len(parse_replies(data, eof=False)[0]) < 2:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {parse_replies(data, eof=True)[0]}"
            data += chunk
        replies, rest = parse_replies(data, eof=False)
        assert not rest
        check_own_standin_answer(replies[0], first)
        check_own_standin_answer(replies[1], second)
        # and once more, the CRLF after the body and the next request in separate writes
        sock.sendall(post.replace(first, third) + b"\r\n")
        data = b""
        while not parse_replies(data, eof=False)[0]:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        check_own_standin_answer(parse_replies(data, eof=False)[0][0], third)
        last = new_nonce()
        sock.sendall(request(b"GET", VERSIONS, last))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        check_own_standin_answer(parse_replies(data, eof=True)[0][0], last)


def test_a_flood_of_empty_lines_is_refused_not_held(env: Env) -> None:
    ex = env.send(b"\r\n" * 5000 + request(b"GET", VERSIONS, new_nonce()))
    check_router_error(ex.reply, 400)
    assert ex.closed


# --- malformed chunked bodies -------------------------------------------------------------------

BAD_CHUNKS = {
    "hex-prefix": b"0x5\r\n" + MARK[:5] + b"\r\n0\r\n\r\n",
    "leading-space": b" 5\r\n" + MARK[:5] + b"\r\n0\r\n\r\n",
    "plus": b"+5\r\n" + MARK[:5] + b"\r\n0\r\n\r\n",
    "minus": b"-5\r\n" + MARK[:5] + b"\r\n0\r\n\r\n",
    "nul-after-size": b"5\x00\r\n" + MARK[:5] + b"\r\n0\r\n\r\n",
    "25-digit-size": b"0" * 24 + b"5\r\n" + MARK[:5] + b"\r\n0\r\n\r\n",
    "data-longer-than-size": b"5\r\n" + MARK + b"\r\n0\r\n\r\n",
    "size-is-the-mark": MARK + b"\r\nhello\r\n0\r\n\r\n",
    "bare-lf-chunk-lines": b"5\n" + MARK[:5] + b"\n0\n\n",
    "chunk-line-without-end": b"5;" + MARK + b"x" * 40000,
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_malformed_chunked_body_is_answered_400_and_logged(env: Env, case: str) -> None:
    nonce = new_nonce()
    seen_before = env.requests_seen().get("PUT", 0)
    ex = env.send(chunked(BAD_CHUNKS[case], nonce))
    check_router_error(ex.reply, 400, "M_UNKNOWN")
    assert ex.closed, ex.describe()
    line = [entry for entry in env.access_lines() if entry["path"] == SEND.decode()][-1]
    assert line["status"] == 400 and line["client_error"] == "bad_chunked_body", line
    assert env.requests_seen().get("PUT", 0) <= seen_before + 1  # at most the head went on
    env.check_output()


# --- trailer fields -------------------------------------------------------------------------


def test_chunked_body_with_trailer_fields_is_proxied_without_them(env: Env) -> None:
    nonce = new_nonce()
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: " + MARK + b"\r\nX-Other: 2\r\n\r\n"
    ex = env.send(chunked(body, nonce))
    seen = check_own_standin_answer(ex.reply, nonce)
    assert ex.reply.status == 200
    assert seen["body_bytes"] == 11, seen
    assert MARK.decode() not in json.dumps(seen)
    env.check_output()


# --- a stalled body (limits.body_timeout) ---------------------------------------------------


def _read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"connection still open after {seconds}s; received {data[:300]!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_body_is_answered_408_and_closed(env: Env, framing: str) -> None:
    nonce = new_nonce()
    if framing == "chunked":
        raw = request(b"PUT", SEND, nonce, [b"Transfer-Encoding: chunked"], b"2\r\n{}\r\n", close=False)
    else:
        raw = request(b"PUT", SEND, nonce, [b"Content-Length: 100"], b'{"a":', close=False)
    with socket.create_connection(("127.0.0.1", env.router.port), timeout=30) as sock:
        sock.sendall(raw)
        data = _read_until_closed(sock, BODY_TIMEOUT + GRACE)
    replies, _ = parse_replies(data, eof=True)
    assert len(replies) == 1, data[:500]
    check_router_error(replies[0], 408)
    line = [entry for entry in env.access_lines() if entry["path"] == SEND.decode()][-1]
    assert line["status"] == 408 and line["client_error"] == "body_timeout", line
    assert line["failure"] == "client_error", line  # answered, then closed: not "the client left first"
    metrics = httpx.get(f"http://127.0.0.1:{env.metrics_port}/metrics").text
    assert re.search(r'synapse_router_client_connections_closed_total\{reason="body_timeout"\} [1-9]', metrics)
    env.check_output()


def test_a_slow_body_that_keeps_coming_is_not_cut(env: Env) -> None:
    """body_timeout is the time between two reads, not a total (nginx client_body_timeout)."""
    nonce = new_nonce()
    body = b'{"k": "' + b"v" * 8 + b'"}'
    head = request(b"PUT", SEND, nonce, [f"Content-Length: {len(body)}".encode()], b"")
    with socket.create_connection(("127.0.0.1", env.router.port), timeout=30) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for byte in body:  # a byte every BODY_TIMEOUT / 5: in all well over BODY_TIMEOUT
            time.sleep(BODY_TIMEOUT / 5)
            sock.sendall(bytes([byte]))
        assert time.monotonic() - started > 2 * BODY_TIMEOUT
        data = _read_until_closed(sock, 15)
    replies, _ = parse_replies(data, eof=True)
    seen = check_own_standin_answer(replies[0], nonce)
    assert seen["body_bytes"] == len(body)


# --- refused before any worker ---------------------------------------------------------------


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity", b"gzip"])
def test_transfer_encoding_other_than_chunked_is_refused(env: Env, coding: bytes) -> None:
    nonce = new_nonce()
    before = env.requests_seen()
    ex = env.send(request(b"PUT", SEND, nonce, [b"Transfer-Encoding: " + coding], b"2\r\n{}\r\n0\r\n\r\n"))
    assert ex.replies, ex.describe()
    if ex.reply.matrix_error is None:  # mitmproxy's parser refused it first (its HTML 400)
        assert ex.reply.status == 400 and ex.closed, ex.describe()
    else:
        check_router_error(ex.reply, 501, "M_UNRECOGNIZED")
        assert ex.closed, ex.describe()
    assert env.requests_seen() == before
    env.check_output()


@pytest.mark.parametrize("method", [b"GET", b"PUT"])
def test_a_refused_transfer_coding_is_answered_before_any_body_arrives(env: Env, method: bytes) -> None:
    """A client that sends `Transfer-Encoding: gzip, chunked` and waits for the answer before
    sending its body (or never sends one) gets the 501 at once: the router does not wait for a
    body it will not read (nginx answers at once too). Was answered after limits.body_timeout,
    logged client_error=body_timeout."""
    path = VERSIONS if method == b"GET" else SEND
    raw = request(method, path, new_nonce(), [b"Transfer-Encoding: gzip, chunked"], b"", close=False)
    with socket.create_connection(("127.0.0.1", env.router.port), timeout=30) as sock:
        sock.sendall(raw)
        data = _read_until_closed(sock, BODY_TIMEOUT + GRACE)
    replies, _ = parse_replies(data, eof=True)
    assert len(replies) == 1, data[:500]
    check_router_error(replies[0], 501, "M_UNRECOGNIZED")
    assert replies[0].header(b"connection") == b"close", replies[0]
    line = [entry for entry in env.access_lines() if entry["path"] == path.decode()][-1]
    assert line["status"] == 501 and line.get("client_error") is None, line
    env.check_output()


def test_a_content_length_with_a_leading_zero_is_refused_by_mitmproxy(env: Env) -> None:
    """`Content-Length: 02` is valid by RFC 9110 (nginx and Twisted read 2); mitmproxy's
    parser refuses it with its HTML 400 and the router leaves it so (docs/security.md)."""
    before = env.requests_seen()
    ex = env.send(request(b"PUT", SEND, new_nonce(), [b"Content-Length: 02"], b"{}"))
    assert ex.reply.status == 400 and ex.reply.matrix_error is None and ex.closed, ex.describe()
    assert env.requests_seen() == before
    env.check_output()


def test_http2_prior_knowledge_preface_is_answered_505(env: Env) -> None:
    ex = env.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    check_router_error(ex.reply, 505, "M_UNRECOGNIZED")
    assert ex.closed
    env.check_output()


def test_http11_without_host_is_refused_http10_is_proxied(env: Env) -> None:
    before = env.requests_seen()
    ex = env.send(b"GET /_matrix/client/versions?n=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
    check_router_error(ex.reply, 400, "M_UNRECOGNIZED")
    assert env.requests_seen() == before
    nonce = new_nonce()
    ex = env.send(b"GET /_matrix/client/versions?n=" + nonce + b" HTTP/1.0\r\nX-Test-Nonce: " + nonce + b"\r\n\r\n")
    check_own_standin_answer(ex.reply, nonce)
    assert ex.reply.status == 200


@pytest.mark.parametrize("method", [b"TRACE", b"trace", b"TRACK"])
def test_trace_is_refused_405(env: Env, method: bytes) -> None:
    before = env.requests_seen()
    ex = env.send(request(method, VERSIONS, new_nonce()))
    check_router_error(ex.reply, 405, "M_UNRECOGNIZED")
    assert env.requests_seen() == before


def test_every_edge_case_left_the_router_clean(env: Env) -> None:
    env.check_output()
    nonce = new_nonce()
    check_own_standin_answer(env.send(request(b"GET", VERSIONS, nonce)).reply, nonce)


def _tls_handshake(port: int) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="matrix.test") as tls:
                tls.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
                return "answered: " + tls.recv(65536).decode(errors="replace")[:200]
        except (ssl.SSLError, OSError) as e:
            return f"refused: {e!r}"


def test_tls_on_the_plain_listener_is_refused(env: Env) -> None:
    """Without a certificate configured (mitmproxy's `certs`), a TLS client hello on the plain
    port is refused: no handshake with mitmproxy's self-made CA, nothing reaches a worker."""
    before = env.requests_seen()
    outcome = _tls_handshake(env.router.port)
    assert outcome.startswith("refused"), outcome
    assert env.requests_seen() == before
    time.sleep(0.2)
    assert "TLS client hello from 127.0.0.1:" in env.router.log()
    env.check_output()


def _self_signed_pem(path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matrix.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("matrix.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(key_pem + cert.public_bytes(serialization.Encoding.PEM))


def test_tls_with_a_configured_certificate_is_terminated_with_it(
    fleet: Fleet, start_router: RouterStarter, tmp_path: Path
) -> None:
    pem = tmp_path / "cert.pem"
    _self_signed_pem(pem)
    fleet.add("main")
    router = start_router(fleet["main"].url, {"workers": {}}, extra=["--set", f"certs=*={pem}"])
    context = ssl.create_default_context(cafile=str(pem))  # trusts exactly the configured certificate
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="matrix.test") as tls:
            tls.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    replies, _ = parse_replies(data, eof=True)
    assert replies and replies[0].status == 200, data[:300]
    seen = replies[0].standin
    assert seen is not None and seen["headers"]["x-forwarded-proto"] == "https", seen
    nonce = new_nonce()  # plain HTTP on the same port still served
    plain = exchange(router.port, request(b"GET", VERSIONS, nonce))
    assert check_own_standin_answer(plain.reply, nonce)["headers"]["x-forwarded-proto"] == "http"
