"""Router metrics: exact values, bounded labels, the exposition server, and the Grafana dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from synapse_router.identity.resolver import Source
from synapse_router.observability.metrics import (
    IDENTITY_SOURCES,
    UPSTREAM_BUCKETS,
    RouterMetrics,
    normalise_method,
    status_class,
)
from synapse_router.observability.metrics_server import MetricsServer
from synapse_router.routing.upstream import parse_listen

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"
W1 = "http://10.0.0.1:8083"
W2 = "http://10.0.0.2:8083"


def value(m: RouterMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def req(m: RouterMetrics, **labels: str) -> float | None:
    return value(m, "synapse_router_requests_total", **labels)


@pytest.fixture
def m() -> RouterMetrics:
    return RouterMetrics()


# --- requests ---------------------------------------------------------------------------------


def test_requests_counted_exactly(m: RouterMetrics) -> None:
    for _ in range(3):
        m.observe_request("sync", "sync", W1, "GET", 200, 0.004)
    m.observe_request("sync", "sync", W1, "GET", 504, 30.0)
    m.observe_request("sync", "sync", W2, "GET", None, None)
    m.observe_request("main", "main", "main", "POST", 201, 0.02)

    assert req(m, route="sync", pool="sync", worker=W1, method="GET", status_class="2xx") == 3
    assert req(m, route="sync", pool="sync", worker=W1, method="GET", status_class="5xx") == 1
    assert req(m, route="sync", pool="sync", worker=W2, method="GET", status_class="error") == 1
    assert req(m, route="main", pool="main", worker="main", method="POST", status_class="2xx") == 1
    assert req(m, route="sync", pool="sync", worker=W1, method="POST", status_class="2xx") is None

    assert value(m, "synapse_router_upstream_seconds_count", pool="sync", worker=W1) == 4
    assert value(m, "synapse_router_upstream_seconds_sum", pool="sync", worker=W1) == pytest.approx(30.012)
    # no response and no upstream time: counted, but nothing observed in the histogram
    assert value(m, "synapse_router_upstream_seconds_count", pool="sync", worker=W2) is None


@pytest.mark.parametrize(
    ("method", "label"),
    [
        ("GET", "GET"),
        ("HEAD", "HEAD"),
        ("POST", "POST"),
        ("PUT", "PUT"),
        ("DELETE", "DELETE"),
        ("OPTIONS", "OPTIONS"),
        ("PATCH", "PATCH"),
        ("PROPFIND", "OTHER"),
        ("get", "OTHER"),  # methods are case-sensitive
        ("X" * 500, "OTHER"),
        ("", "OTHER"),
    ],
)
def test_method_normalised(method: str, label: str) -> None:
    assert normalise_method(method) == label


def test_method_cardinality_is_bounded(m: RouterMetrics) -> None:
    for i in range(200):
        m.observe_request("r", "p", W1, f"M{i}", 200, None)
    methods = {s.labels["method"] for s in _samples(m, "synapse_router_requests_total")}
    assert methods == {"OTHER"}
    assert req(m, route="r", pool="p", worker=W1, method="OTHER", status_class="2xx") == 200


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (100, "1xx"),
        (101, "1xx"),
        (200, "2xx"),
        (206, "2xx"),
        (304, "3xx"),
        (404, "4xx"),
        (429, "4xx"),
        (500, "5xx"),
        (599, "5xx"),
        (None, "error"),
        (0, "error"),
        (99, "error"),
        (600, "error"),
        (999, "error"),
    ],
)
def test_status_class(status: int | None, label: str) -> None:
    assert status_class(status) == label


def test_status_class_cardinality_is_bounded(m: RouterMetrics) -> None:
    for status in [None, *range(0, 1000, 7)]:
        m.observe_request("r", "p", W1, "GET", status, None)
    classes = {s.labels["status_class"] for s in _samples(m, "synapse_router_requests_total")}
    assert classes == {"1xx", "2xx", "3xx", "4xx", "5xx", "error"}


def test_upstream_histogram_buckets(m: RouterMetrics) -> None:
    assert UPSTREAM_BUCKETS[0] == 0.001 and 30.0 in UPSTREAM_BUCKETS and UPSTREAM_BUCKETS[-1] >= 300
    assert list(UPSTREAM_BUCKETS) == sorted(UPSTREAM_BUCKETS)
    for seconds in (0.0005, 0.001, 0.003, 29.9, 45.0, 1000.0):
        m.observe_request("sync", "sync", W1, "GET", 200, seconds)

    buckets = {
        s.labels["le"]: s.value
        for s in _samples(m, "synapse_router_upstream_seconds_bucket")
        if s.labels["worker"] == W1 and s.name.endswith("_bucket")
    }
    assert list(buckets) == [
        *("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5"),
        *("1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "300.0", "+Inf"),
    ]

    def bucket(le: float) -> float:
        return buckets[repr(le)]

    assert bucket(0.001) == 2  # 0.5 ms and exactly 1 ms
    assert bucket(0.0025) == 2
    assert bucket(0.005) == 3
    assert bucket(30.0) == 4  # a 29.9 s long-poll
    assert bucket(60.0) == 5
    assert bucket(300.0) == 5
    assert buckets["+Inf"] == 6


def test_negative_or_nonfinite_upstream_time(m: RouterMetrics) -> None:
    m.observe_request("r", "p", W1, "GET", 200, -0.5)  # a clock step: observed as 0
    m.observe_request("r", "p", W1, "GET", 200, math.nan)  # not observed
    m.observe_request("r", "p", W1, "GET", 200, math.inf)
    assert value(m, "synapse_router_upstream_seconds_count", pool="p", worker=W1) == 1
    assert value(m, "synapse_router_upstream_seconds_sum", pool="p", worker=W1) == 0
    assert req(m, route="r", pool="p", worker=W1, method="GET", status_class="2xx") == 3


# --- identity ---------------------------------------------------------------------------------


def test_whoami(m: RouterMetrics) -> None:
    for outcome in ("user", "rejected", "error"):
        assert value(m, "synapse_router_whoami_calls_total", outcome=outcome) == 0  # present from the start
    m.observe_whoami("user", 0.003)
    m.observe_whoami("user", 0.004)
    m.observe_whoami("rejected", 0.002)
    m.observe_whoami("error", 2.0)
    m.observe_whoami("something new", 0.1)
    assert value(m, "synapse_router_whoami_calls_total", outcome="user") == 2
    assert value(m, "synapse_router_whoami_calls_total", outcome="rejected") == 1
    assert value(m, "synapse_router_whoami_calls_total", outcome="error") == 1
    assert value(m, "synapse_router_whoami_calls_total", outcome="other") == 1
    assert value(m, "synapse_router_whoami_calls_total", outcome="something new") is None
    assert value(m, "synapse_router_whoami_seconds_count") == 5
    assert value(m, "synapse_router_whoami_seconds_sum") == pytest.approx(2.109)
    assert value(m, "synapse_router_whoami_seconds_bucket", le="0.005") == 3


def test_identity_sources_match_identity_module(m: RouterMetrics) -> None:
    assert set(IDENTITY_SOURCES) == {s.value for s in Source}
    for source in Source:
        assert value(m, "synapse_router_identity_lookups_total", source=source.value) == 0
    for source, times in [(Source.CACHE, 5), (Source.WHOAMI, 2), (Source.COALESCED, 1), (Source.NEGATIVE, 3)]:
        for _ in range(times):
            m.observe_identity(source)
    m.observe_identity("")  # a request without a token: no lookup
    m.observe_identity("bogus")
    assert value(m, "synapse_router_identity_lookups_total", source="cache") == 5
    assert value(m, "synapse_router_identity_lookups_total", source="whoami") == 2
    assert value(m, "synapse_router_identity_lookups_total", source="coalesced") == 1
    assert value(m, "synapse_router_identity_lookups_total", source="negative") == 3
    assert value(m, "synapse_router_identity_lookups_total", source="unresolved") == 0
    assert value(m, "synapse_router_identity_lookups_total", source="other") == 1
    assert value(m, "synapse_router_identity_lookups_total", source="") is None


def test_cache_size_callback(m: RouterMetrics) -> None:
    assert value(m, "synapse_router_identity_cache_entries") == 0
    cache = {b"a": "@a:x", b"b": "@b:x"}
    m.bind_cache_size(lambda: len(cache))
    assert value(m, "synapse_router_identity_cache_entries") == 2
    cache[b"c"] = "@c:x"
    assert value(m, "synapse_router_identity_cache_entries") == 3  # read at each scrape
    m.bind_cache_size(lambda: 7)  # a new resolver after a reload
    assert value(m, "synapse_router_identity_cache_entries") == 7


def test_failing_cache_size_callback_does_not_break_the_scrape(m: RouterMetrics) -> None:
    def broken() -> int:
        raise RuntimeError("boom")

    m.bind_cache_size(broken)
    m.observe_retry("sync")
    text = m.render().decode()
    assert "synapse_router_identity_cache_entries NaN" in text
    assert 'synapse_router_retries_total{pool="sync"} 1.0' in text


# --- workers and failures ---------------------------------------------------------------------


def test_worker_state(m: RouterMetrics) -> None:
    m.set_worker_state("sync", W1, up=True, drained=False)
    m.set_worker_state("sync", W2, up=False, drained=True)
    assert value(m, "synapse_router_worker_up", pool="sync", worker=W1) == 1
    assert value(m, "synapse_router_worker_drained", pool="sync", worker=W1) == 0
    assert value(m, "synapse_router_worker_up", pool="sync", worker=W2) == 0
    assert value(m, "synapse_router_worker_drained", pool="sync", worker=W2) == 1
    m.set_worker_state("sync", W2, up=True, drained=False)
    assert value(m, "synapse_router_worker_up", pool="sync", worker=W2) == 1
    assert value(m, "synapse_router_worker_drained", pool="sync", worker=W2) == 0
    m.remove_worker("sync", W2)
    m.remove_worker("sync", "http://never.added:1")
    assert value(m, "synapse_router_worker_up", pool="sync", worker=W2) is None
    assert value(m, "synapse_router_worker_drained", pool="sync", worker=W2) is None
    assert value(m, "synapse_router_worker_up", pool="sync", worker=W1) == 1


def test_failovers_retries_fallbacks(m: RouterMetrics) -> None:
    m.observe_failover("sync", "connect")
    m.observe_failover("sync", "connect")
    m.observe_failover("sync", "timeout")
    m.observe_retry("client_reader")
    m.observe_fallback("initial_sync", "initial_sync")
    m.observe_fallback("initial_sync", "initial_sync")
    m.observe_fallback("room", "room")
    assert value(m, "synapse_router_failovers_total", pool="sync", reason="connect") == 2
    assert value(m, "synapse_router_failovers_total", pool="sync", reason="timeout") == 1
    assert value(m, "synapse_router_retries_total", pool="client_reader") == 1
    assert value(m, "synapse_router_fallbacks_total", route="initial_sync", from_pool="initial_sync") == 2
    assert value(m, "synapse_router_fallbacks_total", route="room", from_pool="room") == 1


def test_label_names_are_bounded_kinds_only(m: RouterMetrics) -> None:
    _exercise(m)
    allowed = {"route", "pool", "worker", "method", "status_class", "outcome", "source", "reason", "from_pool", "le"}
    for family in m.registry.collect():
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample


# --- registries -------------------------------------------------------------------------------


def test_own_registry_not_the_global_one() -> None:
    a, b = RouterMetrics(), RouterMetrics()  # would raise "Duplicated timeseries" in a shared registry
    a.observe_retry("sync")
    assert a.registry is not b.registry
    assert a.registry is not prometheus_client.REGISTRY
    assert b.registry.get_sample_value("synapse_router_retries_total", {"pool": "sync"}) is None
    assert prometheus_client.REGISTRY.get_sample_value("synapse_router_retries_total", {"pool": "sync"}) is None


def test_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    m = RouterMetrics(registry)
    m.observe_retry("sync")
    assert m.registry is registry
    assert registry.get_sample_value("synapse_router_retries_total", {"pool": "sync"}) == 1


def test_render_is_valid_exposition(m: RouterMetrics) -> None:
    _exercise(m)
    text = m.render().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "synapse_router_requests",
        "synapse_router_upstream_seconds",
        "synapse_router_whoami_calls",
        "synapse_router_whoami_seconds",
        "synapse_router_identity_lookups",
        "synapse_router_identity_cache_entries",
        "synapse_router_worker_up",
        "synapse_router_worker_drained",
        "synapse_router_failovers",
        "synapse_router_retries",
        "synapse_router_fallbacks",
    } <= names
    assert "# TYPE synapse_router_requests_total counter" in text
    assert "# TYPE synapse_router_upstream_seconds histogram" in text


# --- parse_listen -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9105", ("127.0.0.1", 9105)),
        ("0.0.0.0:9105", ("0.0.0.0", 9105)),
        ("localhost:0", ("localhost", 0)),
        ("metrics.internal.example:65535", ("metrics.internal.example", 65535)),
        ("[::1]:9105", ("::1", 9105)),
        ("[::]:9105", ("::", 9105)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "host:port"),
        ("9105", "host:port"),
        ("localhost", "host:port"),
        (":9105", "no host"),
        ("localhost:", "invalid port"),
        ("localhost:65536", "invalid port"),
        ("localhost:-1", "invalid port"),
        ("localhost: 9105", "invalid port"),
        ("localhost:http", "invalid port"),
        ("::1:9105", "brackets"),
        ("[::1]", "invalid port"),
        ("[not-v6]:9105", "not an IPv6 address"),
        ("300.1.1.1:9105", "not an IPv4 address"),
        ("under_score:9105", "not a valid host name"),
        ("http://localhost:9105", "brackets"),
        ("bad host:9105", "not a valid host name"),
        ("host\n:9105", "not a valid host name"),
    ],
)
def test_parse_listen_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def test_parse_listen_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(9105)  # type: ignore[arg-type]


# --- MetricsServer ----------------------------------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[tuple[RouterMetrics, MetricsServer]]:
    m = RouterMetrics()
    m.observe_request("sync", "sync", W1, "GET", 200, 0.01)
    server = MetricsServer(m.render, "127.0.0.1:0", read_timeout=1.0)
    await server.start()
    try:
        yield m, server
    finally:
        await server.stop()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0, *, eof: bool = False) -> bytes:
    """Send raw bytes (then end the sending side, with `eof`), read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if eof:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def test_server_serves_metrics(served: tuple[RouterMetrics, MetricsServer]) -> None:
    m, server = served
    assert server.port > 0
    response = await get(server.port, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert response.headers["connection"] == "close"
    assert response.content == m.render()
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    [sample] = [s for s in families["synapse_router_requests"].samples if s.name.endswith("_total")]
    assert sample.value == 1 and sample.labels["worker"] == W1

    m.observe_request("sync", "sync", W1, "GET", 200, 0.01)  # live: every scrape renders anew
    assert 'status_class="2xx",worker="http://10.0.0.1:8083"} 2.0' in (await get(server.port, "/metrics")).text


async def test_server_ignores_query_string(served: tuple[RouterMetrics, MetricsServer]) -> None:
    _, server = served
    assert (await get(server.port, "/metrics?name[]=x")).status_code == 200


@pytest.mark.parametrize("path", ["/", "/metrics/", "/metricsx", "/favicon.ico", "/_matrix/client/versions"])
async def test_server_404(served: tuple[RouterMetrics, MetricsServer], path: str) -> None:
    _, server = served
    response = await get(server.port, path)
    assert response.status_code == 404
    assert b"synapse_router" not in response.content


async def test_server_head_and_wrong_method(served: tuple[RouterMetrics, MetricsServer]) -> None:
    _, server = served
    head = await raw_exchange(server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")  # headers only
    post = await raw_exchange(server.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert b"Allow: GET, HEAD\r\n" in post


async def test_server_health_answers_ok_without_rendering(
    served: tuple[RouterMetrics, MetricsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server = served

    def broken() -> bytes:
        raise RuntimeError("a probe must not pay for, or fail with, a scrape")

    monkeypatch.setattr(server, "render", broken)
    response = await get(server.port, "/health?probe=1")
    assert (response.status_code, response.content) == (200, b"OK\n")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["connection"] == "close"
    head = await raw_exchange(server.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    post = await raw_exchange(server.port, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in post
    assert (await get(server.port, "/health/")).status_code == 404
    assert (await get(server.port, "/healthz")).status_code == 404


async def test_a_second_server_shares_the_port_and_keeps_it_when_the_first_stops() -> None:
    """A rolling restart: the new router's endpoint binds beside the old one's, and serves
    alone once the old one has stopped."""
    old = MetricsServer(RouterMetrics().render, "127.0.0.1:0")
    await old.start()
    new = MetricsServer(RouterMetrics().render, f"127.0.0.1:{old.port}")
    try:
        await new.start()
        assert new.port == old.port
        await old.stop()
        assert (await get(new.port, "/health")).status_code == 200
    finally:
        await old.stop()
        await new.stop()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def test_probes_queued_or_being_read_when_the_server_stops_are_answered() -> None:
    """A rolling restart: the old router's endpoint stops while probes wait in its accept queue
    (the kernel spread them over both SO_REUSEPORT listeners) or are half sent. Each is
    answered; closing the listener used to reset the queued ones and close the half-read one."""
    server = MetricsServer(RouterMetrics().render, "127.0.0.1:0", read_timeout=5.0)
    await server.start()
    port = server.port
    # Half a request on an accepted connection: the server is reading it when the stop begins.
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    half.sendall(b"GET /health HTTP/1.1\r\n")
    # A whole probe after it: answered once the half-sent one (queued before it) was accepted.
    assert (await get(port, "/health")).status_code == 200
    # Connected while the event loop does not run: left in the accept queue when stop() begins.
    queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    for sock in queued:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0.05)
    half.sendall(b"Host: x\r\n\r\n")
    await stopping
    for sock in [half, *queued]:
        with sock:
            answer = await asyncio.to_thread(_read_all, sock)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"OK\n"), answer
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello-ish start
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
        b"\r\n",
    ],
)
async def test_server_survives_malformed_requests(served: tuple[RouterMetrics, MetricsServer], garbage: bytes) -> None:
    _, server = served
    response = await raw_exchange(server.port, garbage)
    assert response.startswith(b"HTTP/1.1 400 ")
    assert (await get(server.port, "/metrics")).status_code == 200


async def test_server_survives_oversized_and_truncated_requests(served: tuple[RouterMetrics, MetricsServer]) -> None:
    _, server = served
    response = await raw_exchange(server.port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
    assert response == b"" or response.startswith(b"HTTP/1.1 414 ")  # the reset may beat the answer
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    response = await raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
    assert response == b"" or response.startswith(b"HTTP/1.1 431 ")
    assert await raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost", eof=True) == b""  # ended mid-line
    assert await raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", eof=True) == b""
    assert await raw_exchange(server.port, b"", eof=True) == b""
    assert (await get(server.port, "/metrics")).status_code == 200


async def test_server_render_failure_is_a_500(
    served: tuple[RouterMetrics, MetricsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server = served

    def broken() -> bytes:
        raise RuntimeError("collector bug")

    monkeypatch.setattr(server, "render", broken)
    assert (await get(server.port, "/metrics")).status_code == 500
    monkeypatch.undo()
    assert (await get(server.port, "/metrics")).status_code == 200


async def test_server_times_out_slow_clients() -> None:
    server = MetricsServer(RouterMetrics().render, "127.0.0.1:0", read_timeout=0.2)
    await server.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\n", timeout=5.0) == b""
        assert loop.time() - started < 3.0
    finally:
        await server.stop()


async def test_server_limits_connections() -> None:
    server = MetricsServer(RouterMetrics().render, "127.0.0.1:0", max_connections=1, read_timeout=5.0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.sleep(0.05)  # let the server accept it
        assert await raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""  # over the limit
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        await writer.wait_closed()
        assert (await get(server.port, "/metrics")).status_code == 200
    finally:
        await server.stop()


async def test_server_many_concurrent_scrapes(served: tuple[RouterMetrics, MetricsServer]) -> None:
    _, server = served
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        url = f"http://127.0.0.1:{server.port}/metrics"
        responses = await asyncio.gather(*(client.get(url) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}


async def test_stop_closes_listener_and_idle_connections() -> None:
    server = MetricsServer(RouterMetrics().render, "127.0.0.1:0", read_timeout=60.0)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # idle: sends nothing
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(), 5)  # does not wait for the idle client's 60 s
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.stop()  # idempotent


async def test_server_restart_and_port_before_start() -> None:
    server = MetricsServer(RouterMetrics().render, "127.0.0.1:0")
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.port
    await server.start()
    await server.start()  # idempotent
    await server.stop()
    await server.start()
    try:
        assert (await get(server.port, "/metrics")).status_code == 200
    finally:
        await server.stop()


async def test_server_ipv6_loopback() -> None:
    server = MetricsServer(RouterMetrics().render, "[::1]:0")
    try:
        await server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            assert (await client.get(f"http://[::1]:{server.port}/metrics")).status_code == 200
    finally:
        await server.stop()


def test_server_rejects_bad_listen_address() -> None:
    with pytest.raises(ValueError, match="brackets"):
        MetricsServer(RouterMetrics().render, "::1:9105")


# --- the Grafana dashboard --------------------------------------------------------------------

_METRIC = re.compile(r"\bsynapse_router_[a-z0-9_]+\b")


def _dashboard() -> dict[str, object]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _walk(node: object) -> Iterator[tuple[str, object]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _queries(dashboard: dict[str, object]) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    out = [v for k, v in _walk(dashboard) if k in ("expr", "definition") and isinstance(v, str)]
    out += [v["query"] for k, v in _walk(dashboard) if k == "query" and isinstance(v, dict) and "query" in v]
    return out


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert 36 <= int(dashboard["schemaVersion"]) <= 41  # type: ignore[call-overload]
    inputs = dashboard["__inputs"]
    assert isinstance(inputs, list)
    assert [i["name"] for i in inputs] == ["DS_PROMETHEUS"]
    datasources = [v for k, v in _walk(dashboard) if k == "datasource" and isinstance(v, dict)]
    assert datasources
    for ds in datasources:
        assert ds in ({"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, {"type": "grafana", "uid": "-- Grafana --"})
    panels = dashboard["panels"]
    assert isinstance(panels, list)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in panels)
    for wanted in ("by route", "by worker", "5xx", "latency", "whoami", "hit ratio", "cache entries", "Worker state"):
        assert wanted in titles


def test_dashboard_references_only_registered_metrics(m: RouterMetrics) -> None:
    _exercise(m)
    samples = {s.name for family in m.registry.collect() for s in family.samples}
    labels = {k for family in m.registry.collect() for s in family.samples for k in s.labels}
    queries = _queries(_dashboard())
    assert len(queries) > 10

    referenced = {name for q in queries for name in _METRIC.findall(q)}
    assert referenced - samples == set()
    # every metric the router registers is on the dashboard somewhere
    families = {f.name for f in m.registry.collect()}
    for family in families:
        assert any(name.startswith(family) for name in referenced), family

    for q in queries:
        for group in re.findall(r"\bby \(([^)]*)\)", q):
            assert {g.strip() for g in group.split(",")} <= labels | {"le"}, q
        for matchers in re.findall(r"\{([^}]*)\}", q):
            names = {part.split("=")[0].rstrip("!~").strip() for part in matchers.split(",") if "=" in part}
            assert names <= labels, q
        # rate() only over counters and histogram series
        for name in re.findall(r"\brate\((synapse_router_[a-z0-9_]+)", q):
            assert name.endswith(("_total", "_bucket", "_sum", "_count")), q
        for name in re.findall(r"histogram_quantile\([^,]+,[^(]*\(rate\((synapse_router_[a-z0-9_]+)", q):
            assert name.endswith("_bucket"), q


# --- helpers ----------------------------------------------------------------------------------


def _samples(m: RouterMetrics, name: str) -> list[prometheus_client.samples.Sample]:
    return [s for family in m.registry.collect() for s in family.samples if s.name == name]


def _exercise(m: RouterMetrics) -> None:
    """One observation of everything, so every labelled series exists."""
    m.observe_request("sync", "sync", W1, "GET", 200, 0.01)
    m.observe_whoami("user", 0.01)
    m.observe_identity("cache")
    m.bind_cache_size(lambda: 3)
    m.set_worker_state("sync", W1, up=True, drained=False)
    m.bind_in_flight(lambda: {W1: 2})
    m.observe_failover("sync", "connect")
    m.observe_retry("sync")
    m.observe_fallback("initial_sync", "initial_sync")
