"""Answers of any size on the path the router sends itself (every request with a held body):
relayed intact with bounded memory, resent only while nothing of them reached the client, and
bounded in time by `health.read_timeout` (a long-poll's own `timeout` excepted). Real router
(both launchers), real stand-in workers on loopback."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.standin import pattern_sha256

from .conftest import Fleet

pytestmark = pytest.mark.integration

ROOM = "!room:test.local"
MESSAGES = f"/_matrix/client/v3/rooms/{ROOM}/messages"  # a GET the router sends itself
SEND = f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message"  # a POST it sends, never resent
SS = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
MIB = 1024 * 1024
HEALTH = {"interval": 0.3, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}


def _start(fleet: Fleet, start_router, tmp_path: Path, names: list[str], **extra: object):
    fleet.add("main")
    for name in names:
        fleet.add(name)
    access = tmp_path / "access.log"
    config = {
        "workers": {"room": [fleet[n].url for n in names], "sync": [fleet[n].url for n in names]},
        "health": {**HEALTH, **extra.pop("health", {})},  # type: ignore[dict-item]
        "access_log": {"enabled": True, "format": "json", "path": str(access)},
        **extra,
    }
    return start_router(fleet["main"].url, config), access


def _fetch(client: httpx.Client, method: str, url: str, body: bytes = b"") -> tuple[int, int, str, httpx.Headers]:
    """Status, body size and SHA-256, headers; the body read as it arrives, never held."""
    digest = hashlib.sha256()
    size = 0
    with client.stream(method, url, content=body) as r:
        for chunk in r.iter_raw():
            digest.update(chunk)
            size += len(chunk)
        return r.status_code, size, digest.hexdigest(), r.headers


Case = tuple[str, str, bytes]  # method, URL, request body


def _large_answer_kinds(size: int) -> list[Case]:
    """A GET and a POST the router sends itself, each answered with and without a length."""
    return [
        ("GET", f"{MESSAGES}?standin_bytes={size}", b""),
        ("GET", f"{MESSAGES}?standin_bytes={size}&standin_chunked=1", b""),
        ("POST", f"{SEND}?standin_bytes={size}", b'{"body": "x"}'),
        ("POST", f"{SEND}?standin_bytes={size}&standin_chunked=1", b'{"body": "x"}'),
    ]


def _fetch_at_once(client: httpx.Client, cases: list[Case]) -> list[tuple[int, int, str, httpx.Headers]]:
    """Every case at the same time, one thread each; the results in the cases' order."""
    results: list[tuple[int, int, str, httpx.Headers] | None] = [None] * len(cases)

    def run(i: int) -> None:
        method, url, body = cases[i]
        results[i] = _fetch(client, method, url, body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [cases[i][:2] for i, r in enumerate(results) if r is None]
    assert not missing, f"no answer for {missing}"
    return [r for r in results if r is not None]


def _access(access: Path) -> list[dict]:
    return [json.loads(line) for line in access.read_text().splitlines()]


def _received(fleet: Fleet, names: list[str], method: str) -> dict[str, int]:
    return {n: fleet[n].stats()["requests"].get(method, 0) for n in names}


def test_60_mib_answers_are_relayed_intact_with_bounded_memory(fleet: Fleet, start_router, tmp_path) -> None:
    # 12 clients fetching 60 MiB at once took 1.4 GiB: every answer was held whole. Now the
    # router holds at most limits.response_buffer of each; the rest streams through.
    router, access = _start(fleet, start_router, tmp_path, ["w1"])
    size = 60 * MIB
    expected = pattern_sha256(size)
    with httpx.Client(base_url=router.url, timeout=120) as client:
        assert _fetch(client, "GET", f"{MESSAGES}?standin_delay=0")[0] == 200  # warmed up
        baseline = router.rss_peak_kib()
        cases = _large_answer_kinds(size)
        results = _fetch_at_once(client, cases)
        status, length, _, headers = _fetch(client, "HEAD", f"{MESSAGES}?standin_bytes={size}")
    for (method, url, _), (status_, got, digest, _) in zip(cases, results, strict=True):
        assert (status_, got) == (200, size), (method, url, status_, got)
        assert digest == expected, (method, url)
    assert (status, length, headers["content-length"]) == (200, 0, str(size))  # HEAD: bodiless
    growth_mib = (router.rss_peak_kib() - baseline) / 1024
    assert growth_mib < 48, f"router peak memory grew {growth_mib:.0f} MiB relaying 4 x 60 MiB at once"
    lines = _access(access)
    big = [line for line in lines if line["method"] in ("GET", "POST") and line.get("bytes_sent") == size]
    assert len(big) == 4 and all(line["status"] == 200 for line in big), lines
    assert all(line["worker"] == fleet["w1"].url for line in big), big


def test_fifty_60_mib_answers_at_once_are_relayed_within_the_memory_bound(fleet: Fleet, start_router, tmp_path) -> None:
    """Issue 20's figure: 50 concurrent 60 MiB answers, GET and POST, chunked and not. The
    previous router held each whole (6 GiB for 50; +2.3 GiB for 20). Each exchange now holds at
    most limits.response_buffer (256 KiB) plus its head and the relay's socket buffers, under
    limits.buffer_budget (64 MiB) for all: 96 MiB of growth is far above what the budget allows
    plus the 50 relays' fixed buffers, and far below one held answer per request."""
    router, access = _start(fleet, start_router, tmp_path, ["w1"])
    size = 60 * MIB
    expected = pattern_sha256(size)
    kinds = _large_answer_kinds(size)
    cases = [kinds[i % len(kinds)] for i in range(50)]
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    with httpx.Client(base_url=router.url, timeout=300, limits=limits) as client:
        assert _fetch(client, "GET", f"{MESSAGES}?standin_delay=0")[0] == 200  # warmed up
        baseline = router.rss_peak_kib()
        results = _fetch_at_once(client, cases)
    for (method, url, _), (status, got, digest, _) in zip(cases, results, strict=True):
        assert (status, got, digest) == (200, size, expected), (method, url, status, got)
    growth_mib = (router.rss_peak_kib() - baseline) / 1024
    assert growth_mib < 96, f"router peak memory grew {growth_mib:.0f} MiB relaying 50 x 60 MiB at once"
    big = [line for line in _access(access) if line["method"] in ("GET", "POST") and line.get("bytes_sent") == size]
    assert len(big) == 50 and all(line["status"] == 200 for line in big)


def test_a_post_answer_over_64_mib_is_relayed(fleet: Fleet, start_router, tmp_path) -> None:
    # Was: 502 "The response was too large to relay." after the worker had acted.
    router, access = _start(fleet, start_router, tmp_path, ["w1"])
    size = 70 * MIB
    with httpx.Client(base_url=router.url, timeout=120) as client:
        status, got, digest, headers = _fetch(client, "POST", f"{SEND}?standin_bytes={size}", b"{}")
    assert (status, got) == (200, size)
    assert digest == pattern_sha256(size)
    assert headers["x-standin"] == "w1"
    assert fleet["w1"].stats()["requests"]["POST"] == 1


@pytest.mark.parametrize("size", [200_000, 60 * MIB], ids=["small", "60MiB"])
def test_a_safe_request_whose_worker_dies_before_any_byte_reached_the_client_is_resent(
    fleet: Fleet, start_router, tmp_path, size: int
) -> None:
    # The worker sends its head and 100 KB, then dies: less than limits.response_buffer, so
    # nothing of the answer left the router, and the GET goes to the next worker.
    names = ["w1", "w2", "w3"]
    router, access = _start(fleet, start_router, tmp_path, names)
    with httpx.Client(base_url=router.url, timeout=120) as client:
        victim = client.get(MESSAGES).headers["x-standin"]
        before = _received(fleet, names, "GET")
        status, got, digest, headers = _fetch(
            client, "GET", f"{MESSAGES}?standin_bytes={size}&standin_cut_on={victim}&standin_cut_after=100000"
        )
    assert (status, got) == (200, size)
    assert digest == pattern_sha256(size)
    assert headers["x-standin"] != victim
    after = _received(fleet, names, "GET")
    # Exactly one GET reached the survivors: the resend (the victim may have seen two: a
    # failed kept-alive connection is tried once more on a fresh one).
    assert sum(after[n] - before[n] for n in names if n != victim) == 1, (before, after)
    line = _access(access)[-1]
    assert line["status"] == 200 and "no_response" in str(line.get("failover", "")), line


def test_an_answer_already_streaming_is_never_resent(fleet: Fleet, start_router, tmp_path) -> None:
    # Past the buffer, bytes of the answer reached the client: a resend would splice two
    # answers. The client's answer is cut (as nginx's would be) and no other worker is asked.
    names = ["w1", "w2"]
    router, _ = _start(fleet, start_router, tmp_path, names)
    size = 60 * MIB
    with httpx.Client(base_url=router.url, timeout=120) as client:
        victim = client.get(MESSAGES).headers["x-standin"]
        before = _received(fleet, names, "GET")
        with pytest.raises(httpx.RemoteProtocolError):
            _fetch(
                client, "GET", f"{MESSAGES}?standin_bytes={size}&standin_cut_on={victim}&standin_cut_after={8 * MIB}"
            )
    time.sleep(0.5)
    after = _received(fleet, names, "GET")
    assert sum(after.values()) - sum(before.values()) == 1, (before, after)


def test_the_buffer_budget_spent_answers_stream_from_their_head(fleet: Fleet, start_router, tmp_path) -> None:
    # buffer_budget 0: nothing is held beyond a head, so even a small answer is streamed, and a
    # worker dying under it is no more resent (the degraded mode: streams, never grows).
    names = ["w1", "w2"]
    router, _ = _start(fleet, start_router, tmp_path, names, limits={"buffer_budget": 0})
    with httpx.Client(base_url=router.url, timeout=60) as client:
        status, got, digest, _ = _fetch(client, "GET", f"{MESSAGES}?standin_bytes=200000")
        assert (status, got, digest) == (200, 200000, pattern_sha256(200000))
        victim = client.get(MESSAGES).headers["x-standin"]
        before = _received(fleet, names, "GET")
        with pytest.raises(httpx.RemoteProtocolError):
            _fetch(client, "GET", f"{MESSAGES}?standin_bytes=200000&standin_cut_on={victim}&standin_cut_after=100000")
    time.sleep(0.5)
    assert sum(_received(fleet, names, "GET").values()) - sum(before.values()) == 1


def test_a_post_the_worker_never_answers_gets_a_matrix_504_after_the_read_timeout(
    fleet: Fleet, start_router, tmp_path
) -> None:
    # Was: held until the client gave up (the worker's accept queue and the router's memory
    # with it).
    router, access = _start(fleet, start_router, tmp_path, ["w1"], health={"read_timeout": 2})
    with httpx.Client(base_url=router.url, timeout=30) as client:
        started = time.monotonic()
        r = client.post(f"{SEND}?standin_hang=1", content=b"{}")
        waited = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert waited >= 2, waited  # not before the read timeout
    assert fleet["w1"].stats()["requests"]["POST"] == 1  # not resent
    line = _access(access)[-1]
    assert line["status"] == 504 and line["method"] == "POST", line


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/_matrix/client/v3/sync?since=s1&timeout=4000"), ("POST", f"{SS}?pos=1&timeout=4000")],
    ids=["sync", "sliding-sync"],
)
def test_a_long_poll_is_not_cut_before_its_own_timeout(fleet: Fleet, start_router, tmp_path, method, path) -> None:
    # read_timeout 1 s, the client asked for 4 s: the worker answers after 3 s, well past the
    # read timeout but within the client's own long-poll time (+ the read timeout).
    router, _ = _start(fleet, start_router, tmp_path, ["w1"], health={"read_timeout": 1})
    body = b'{"lists": {}}' if method == "POST" else b""
    with httpx.Client(base_url=router.url, timeout=30) as client:
        r = client.request(method, f"{path}&standin_delay=3", content=body)
        assert r.status_code == 200, r.text
        assert r.json()["server"] == "w1"
        # Past its own time and the read timeout, it is cut: 504.
        r = client.request(method, f"{path}&standin_delay=8", content=body)
        assert r.status_code == 504, r.text


def test_a_workers_early_413_during_a_streamed_upload_reaches_the_client(fleet: Fleet, start_router, tmp_path) -> None:
    # Kept: an upload over 1 MiB is streamed by mitmproxy, and a worker refusing it before
    # reading it answers the client itself.
    router, _ = _start(fleet, start_router, tmp_path, ["w1"])
    head = (f"POST {SEND}?standin_early_status=413 HTTP/1.1\r\nHost: x\r\nContent-Length: {20 * MIB}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", router.port), timeout=20) as sock:
        sock.sendall(head + b"x" * 65536)  # the head and a first part; the rest never comes
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
