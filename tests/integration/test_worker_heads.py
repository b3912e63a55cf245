"""Malformed worker response heads on the path mitmproxy forwards (media downloads, streamed
bodies), answered as nginx answers them ("upstream sent ... while reading response header
from upstream": 502), with a Matrix error, and recorded as 502 in the access log (issue 20's
streamed-path gaps). Real router processes; a scripted worker that answers fixed bytes."""

from __future__ import annotations

import gzip
import json
import socket
import time
from pathlib import Path

import pytest

from .conftest import Fleet
from .test_retry import _ScriptedWorker

pytestmark = pytest.mark.integration

HEALTH = {"interval": 3600}  # the scripted worker answers /health; no check runs during the test
GZ = gzip.compress(b'{"secret": "not for the client"}')

MALFORMED_HEADS = {
    # mitmproxy's own validation refused these with its HTML 502, and the access log said 200
    "Content-Length and Transfer-Encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "two Transfer-Encoding fields": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "a header name that is not a token": b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 2\r\n\r\n{}",
    "Transfer-Encoding on HTTP/1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    # these mitmproxy relayed: gzip-coded and read until the worker closed, a head over 64 KiB
    "Transfer-Encoding gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + GZ,
    "Transfer-Encoding gzip, chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(GZ), GZ)
    ),
    "a head over 64 KiB": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    # an outside trial: relayed as `HTTP/1.1 2000 OK` and logged status=2000
    "a status code of four digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n{}",
}


def _access_statuses(log: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(raw) for raw in log.read_text().splitlines()] if log.exists() else []
        if len(lines) >= count:
            return [line["status"] for line in lines]
        assert time.monotonic() < deadline, f"{len(lines)} access log lines, expected {count}"
        time.sleep(0.05)


@pytest.mark.parametrize("answer", list(MALFORMED_HEADS.values()), ids=list(MALFORMED_HEADS))
def test_a_malformed_worker_head_on_mitmproxys_path_gets_a_matrix_502_logged_502(
    fleet: Fleet, start_router, tmp_path, answer: bytes
) -> None:
    fleet.add("main")
    worker = _ScriptedWorker(answer)
    log = tmp_path / "access.log"
    config = {
        "workers": {"media": [worker.url]},
        "health": HEALTH,
        "access_log": {"enabled": True, "format": "json", "path": str(log)},
    }
    router = start_router(fleet["main"].url, config)
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(b"GET /_matrix/media/v3/download/test.local/abc HTTP/1.1\r\nHost: test.local\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):  # the router closes the connection after its answer
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), received[:300]
    assert b"content-type: application/json" in head.lower(), head
    assert json.loads(body) == {"errcode": "M_UNKNOWN", "error": "The server gave an invalid response."}
    assert b"aaaa" not in received and GZ not in received
    assert _access_statuses(log, 1) == [502]


ROUTER_SENT_HEADS = {
    "a status code of four digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n{}",
    "a header line without a colon": (
        b"HTTP/1.1 200 OK\r\nSet-Cookie session=WORKERLEAK77\r\nContent-Length: 2\r\n\r\n{}"
    ),
}


@pytest.mark.parametrize("answer", list(ROUTER_SENT_HEADS.values()), ids=list(ROUTER_SENT_HEADS))
def test_a_malformed_worker_head_on_the_router_sent_path_is_resent_and_never_quoted(
    fleet: Fleet, start_router, tmp_path, answer: bytes
) -> None:
    """A GET the router sends itself goes on to main when its worker's head is malformed; the
    access log's failover reason says so in the router's words, never quoting the worker's
    bytes (an outside trial found `Invalid header line: b'Set-Cookie session=...'` there)."""
    fleet.add("main")
    worker = _ScriptedWorker(answer)
    log = tmp_path / "access.log"
    config = {
        "workers": {"room": [worker.url]},
        "health": HEALTH,
        "access_log": {"enabled": True, "format": "json", "path": str(log)},
    }
    router = start_router(fleet["main"].url, config)
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(b"GET /_matrix/client/v3/rooms/!r:test.local/messages HTTP/1.1\r\nHost: test.local\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 "), received[:300]  # main's answer, after the resend
    assert _access_statuses(log, 1) == [200]
    text = log.read_text() + router.log()
    assert "malformed response" in log.read_text()
    assert b"WORKERLEAK77" not in received and "WORKERLEAK77" not in text and '"status": 2000' not in log.read_text()
