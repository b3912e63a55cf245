"""The `limits` key and the ConnectionLimits addon (integration: tests/integration/test_limits.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource

import pytest
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.net.http import http1
from mitmproxy.proxy import server
from mitmproxy.proxy.server_hooks import ClientConnectedHook, ClientDisconnectedHook
from mitmproxy.test import taddons, tflow, tutils
from synapse_router.addons.connection_limits import ConnectionLimits
from synapse_router.config import ConfigError, RouterConfig, parse_config
from synapse_router.edge.descriptors import raise_nofile_limit
from synapse_router.edge.limits import (
    FD_MARGIN,
    LimitsConfig,
    LimitsConfigError,
    Throttle,
    derived_max_connections,
    fd_budget_warning,
    fit_to_nofile,
    header_block_size,
    parse_limits,
    too_large_body,
)
from synapse_router.launcher.main import LeanMaster
from synapse_router.observability.metrics import RouterMetrics

# --- parsing ---


def test_defaults() -> None:
    assert parse_limits(None) == LimitsConfig(60.0, 75.0, 65536, 10000)
    assert parse_limits({}) == LimitsConfig()
    assert RouterConfig().limits == LimitsConfig()
    assert parse_config("workers: {}").limits == LimitsConfig()


def test_body_timeout() -> None:
    assert LimitsConfig().body_timeout == 60.0
    assert parse_limits({"body_timeout": 2}).body_timeout == 2.0
    for bad in (0, -1, "60s", True, math.inf):
        with pytest.raises(LimitsConfigError) as info:
            parse_limits({"body_timeout": bad})
        assert info.value.key == "body_timeout"
        assert "must be a number > 0" in info.value.reason


def test_values() -> None:
    raw = {"header_timeout": 1, "keepalive_timeout": 0.5, "max_header_bytes": 4096, "max_connections": 3}
    config = parse_limits(raw)
    assert config == LimitsConfig(1.0, 0.5, 4096, 3)
    assert isinstance(config.header_timeout, float)


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"header_timeout": 0}, "header_timeout", "must be a number > 0"),
        ({"header_timeout": -1}, "header_timeout", "must be a number > 0"),
        ({"keepalive_timeout": "75s"}, "keepalive_timeout", "must be a number > 0"),
        ({"keepalive_timeout": True}, "keepalive_timeout", "must be a number > 0"),
        ({"keepalive_timeout": math.inf}, "keepalive_timeout", "must be a number > 0"),
        ({"header_timeout": math.nan}, "header_timeout", "must be a number > 0"),
        ({"max_header_bytes": 100}, "max_header_bytes", "must be an integer >= 1024"),
        ({"max_header_bytes": 65536.0}, "max_header_bytes", "must be an integer >= 1024"),
        ({"max_connections": 0}, "max_connections", "must be an integer >= 1"),
        ({"max_connections": None}, "max_connections", "must be an integer >= 1"),
        ({"max_conns": 5}, "max_conns", "unknown key"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str, words: str) -> None:
    with pytest.raises(LimitsConfigError) as info:
        parse_limits(raw)
    assert info.value.key == key
    assert words in info.value.reason


def test_not_a_mapping() -> None:
    with pytest.raises(LimitsConfigError) as info:
        parse_limits([1, 2])
    assert info.value.key == ""
    assert "expected a mapping" in str(info.value)


def test_config_error_names_key_and_line() -> None:
    text = "workers: {}\nlimits:\n  header_timeout: 0\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert str(info.value) == "limits.header_timeout (line 3): must be a number > 0 (seconds), got 0"
    with pytest.raises(ConfigError) as info:
        parse_config("limits: 5\n")
    assert str(info.value).startswith("limits (line 1): expected a mapping")


def test_config_parses_limits() -> None:
    config = parse_config("limits: {header_timeout: 10, max_connections: 500}\n")
    assert config.limits == LimitsConfig(header_timeout=10.0, max_connections=500)


# --- pure helpers ---


def test_header_block_size_is_the_assembled_head() -> None:
    request = tutils.treq(headers=((b"host", b"example.org"), (b"authorization", b"Bearer abc"), (b"x", b"")))
    expected = len(http1.assemble_request_head(request))
    assert request.authority == ""  # origin form, as clients send to a reverse proxy
    assert header_block_size(request.method, request.path, request.http_version, request.headers.fields) == expected


def test_too_large_body_is_a_matrix_error() -> None:
    body = json.loads(too_large_body(4096))
    assert body["errcode"] == "M_TOO_LARGE"
    assert "4096" in body["error"]


def test_throttle_reports_first_then_once_per_interval_with_count() -> None:
    throttle = Throttle(10)
    assert throttle.hit(100.0) == 1
    assert [throttle.hit(100.0 + i) for i in range(1, 6)] == [0] * 5
    assert throttle.take(105.0) == 0
    assert throttle.take(110.0) == 5  # what was held back, once the interval is over
    assert throttle.take(125.0) == 0
    assert throttle.hit(125.0) == 1


def test_fd_budget_warning() -> None:
    assert fd_budget_warning(10000, None) is None
    assert fd_budget_warning(10000, 2 * 10000 + FD_MARGIN) is None
    warning = fd_budget_warning(10000, 4096)
    assert warning is not None
    assert "limits.max_connections=10000" in warning and "4096" in warning
    assert f"at most {(4096 - FD_MARGIN) // 2}" in warning
    small = fd_budget_warning(10, 100)
    assert small is not None and "at most" not in small


def test_default_max_connections_fits_the_open_files_limit() -> None:
    """Not set: 10000, or what fits in the open-files limit (this machine's 20000 included,
    which 10000 connections' 20256 descriptors do not fit); set: kept, the warning's business."""
    assert derived_max_connections(20000) == 9872 == (20000 - FD_MARGIN) // 2
    assert derived_max_connections(2 * 10000 + FD_MARGIN) == 10000
    assert derived_max_connections(1048576) == 10000
    assert derived_max_connections(1024) == 384
    assert derived_max_connections(200) == 50  # a quarter of a tiny limit
    assert derived_max_connections(1) == 1
    config, note = fit_to_nofile(parse_limits({}), 20000)
    assert config.max_connections == 9872 and not config.max_connections_set
    assert note is not None and "not set: 9872" in note and "open-files limit 20000" in note and "ulimit -n" in note
    assert fit_to_nofile(parse_limits({}), 1048576) == (LimitsConfig(), None)  # the default fits: nothing said
    assert fit_to_nofile(parse_limits({}), None) == (LimitsConfig(), None)  # unknown or unlimited
    explicit = parse_limits({"max_connections": 10000})
    assert explicit.max_connections_set
    assert fit_to_nofile(explicit, 20000) == (explicit, None)
    assert fd_budget_warning(explicit.max_connections, 20000) is not None


async def test_default_max_connections_is_derived_once_and_an_explicit_one_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = ConnectionLimits(None)
    limits._nofile_raised, limits._nofile = True, 20000  # this machine's limit, without touching the process's
    with caplog.at_level(logging.INFO, logger="synapse_router.edge.limits"):
        limits.use(parse_limits({}))
        limits.use(parse_limits({"header_timeout": 5}))  # a reload: said once
        assert limits.config.max_connections == 9872
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        assert "limits.max_connections not set: 9872" in caplog.records[0].getMessage()
        caplog.clear()
        limits.use(parse_limits({"max_connections": 10000}))
        assert limits.config.max_connections == 10000
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "needs about 20256 file descriptors" in caplog.records[0].getMessage()


def test_raise_nofile_limit_lifts_soft_to_hard() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft, 256) if hard == resource.RLIM_INFINITY else min(soft, hard // 2, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        now = raise_nofile_limit()
        new_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert new_soft >= lowered
        if hard != resource.RLIM_INFINITY:
            assert new_soft == hard == now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


# --- the addon ---


def _client() -> connection.Client:
    return tflow.tclient_conn()


def _sample(metrics: RouterMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


async def test_connection_cap_refuses_and_counts() -> None:
    metrics = RouterMetrics()
    limits = ConnectionLimits(metrics, LimitsConfig(max_connections=2))
    with taddons.context(limits, Proxyserver()):
        clients = [_client() for _ in range(3)]
        for client in clients:
            limits.client_connected(client)
        assert [c.error for c in clients[:2]] == [None, None]
        assert clients[2].error and "max_connections" in clients[2].error
        assert limits.open_connections == 2
        assert _sample(metrics, "synapse_router_client_connections") == 2
        assert _sample(metrics, "synapse_router_client_connections_refused_total") == 1
        limits.client_disconnected(clients[2])  # mitmproxy reports the refused one's end too
        assert limits.open_connections == 2
        limits.client_disconnected(clients[0])
        third = _client()
        limits.client_connected(third)
        assert third.error is None
        limits.done()


async def test_refusals_log_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    limits = ConnectionLimits(None, LimitsConfig(max_connections=1))
    with taddons.context(limits, Proxyserver()), caplog.at_level(logging.WARNING):
        for _ in range(50):
            limits.client_connected(_client())
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1
        assert "refused 1 client connection" in refused[0].getMessage()
        limits.done()


async def test_oversized_head_answered_431_and_closed() -> None:
    metrics = RouterMetrics()
    limits = ConnectionLimits(metrics, LimitsConfig(max_header_bytes=2048))
    with taddons.context(limits, Proxyserver()):
        small, big = tflow.tflow(), tflow.tflow()
        for flow in (small, big):
            limits.client_connected(flow.client_conn)
        big.request.headers["x-big"] = "a" * 2048
        limits.requestheaders(small)
        limits.requestheaders(big)
        assert small.response is None
        assert big.response is not None and big.response.status_code == 431
        assert big.response.headers["connection"] == "close"
        assert json.loads(big.response.content or b"")["errcode"] == "M_TOO_LARGE"
        assert _sample(metrics, "synapse_router_client_connections_closed_total", {"reason": "header_too_large"}) == 1
        limits.done()


async def test_deadlines_run_only_while_no_request_is_in_flight() -> None:
    limits = ConnectionLimits(None, LimitsConfig(header_timeout=60, keepalive_timeout=75))
    with taddons.context(limits, Proxyserver()):
        first, second = tflow.tflow(), tflow.tflow()
        second.client_conn = first.client_conn
        conn_id = first.client_conn.id
        limits.client_connected(first.client_conn)
        state = limits._conns[conn_id]
        assert state.deadline is not None and state.reason == "header_timeout"  # from connecting
        assert state.timer is not None and state.timer.when() == state.deadline
        header_deadline = state.deadline
        limits.requestheaders(first)
        limits.requestheaders(second)  # (pipelined)
        assert state.deadline is None
        limits.response(first)
        assert state.deadline is None  # the second is still in flight
        limits.error(second)
        assert state.deadline is not None and state.reason == "keepalive_timeout"  # idle now
        assert state.deadline - header_deadline > 10
        # The header timer is not moved per exchange: it fires first and waits for the deadline.
        assert state.timer is not None and state.timer.when() == header_deadline
        limits.error(second)  # reported twice: no harm
        upgraded = tflow.tflow(resp=True)
        upgraded.client_conn = first.client_conn
        upgraded.response.status_code = 101
        limits.requestheaders(upgraded)
        limits.response(upgraded)
        assert state.deadline is None  # an upgraded connection is never idle-timed
        limits.client_disconnected(first.client_conn)
        assert limits.open_connections == 0
        assert state.timer is None
        limits.done()


async def test_a_timer_fired_early_waits_for_the_latest_deadline() -> None:
    """Requests on a keep-alive connection push its deadline later without a new timer; the
    timer that fires before the deadline is set again for it and closes nothing."""
    limits = ConnectionLimits(None, LimitsConfig(header_timeout=0.1, keepalive_timeout=0.3))
    proxyserver = Proxyserver()
    with taddons.context(limits, proxyserver):
        flow = tflow.tflow()
        client = flow.client_conn
        task = asyncio.get_running_loop().create_task(asyncio.sleep(60))
        fake_handler = type("H", (), {})()
        fake_handler.client = client
        fake_handler.transports = {client: server.ConnectionIO(handler=task, reader=None, writer=None)}
        proxyserver.connections[client.id] = fake_handler
        limits.client_connected(client)
        limits.requestheaders(flow)
        limits.response(flow)  # idle: closed 0.3 s from now, the header timer (0.1 s) still set
        await asyncio.sleep(0.15)
        assert not task.done()  # the header timer fired early and waited
        assert limits._conns[client.id].timer is not None
        await asyncio.sleep(0.4)
        assert task.cancelled()
        limits.done()


async def test_expired_timer_closes_only_an_idle_connection() -> None:
    limits = ConnectionLimits(None, LimitsConfig(header_timeout=0.05, keepalive_timeout=0.05))
    proxyserver = Proxyserver()
    with taddons.context(limits, proxyserver):
        flow = tflow.tflow()
        client = flow.client_conn
        task = asyncio.get_running_loop().create_task(asyncio.sleep(60))
        fake_handler = type("H", (), {})()
        fake_handler.client = client
        fake_handler.transports = {client: server.ConnectionIO(handler=task, reader=None, writer=None)}
        proxyserver.connections[client.id] = fake_handler
        limits.client_connected(client)
        limits.requestheaders(flow)
        await asyncio.sleep(0.2)
        assert not task.done()  # in flight: never cut
        limits.response(flow)
        await asyncio.sleep(0.2)
        assert task.cancelled()
        limits.done()


async def test_loop_resource_errors_collapse_into_one_line(caplog: pytest.LogCaptureFixture) -> None:
    metrics = RouterMetrics()
    limits = ConnectionLimits(metrics)
    loop = asyncio.get_running_loop()
    seen: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        with taddons.context(limits, Proxyserver()), caplog.at_level(logging.ERROR):
            limits.running()
            for _ in range(1000):
                emfile = OSError(24, "Too many open files")
                loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": emfile})
            loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
            lines = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
            assert len(lines) == 1
            assert [c["message"] for c in seen] == ["something else"]  # passed on
            assert _sample(metrics, "synapse_router_accept_resource_errors_total") == 1000
            limits.done()
            assert loop.get_exception_handler() is not None
            loop.call_exception_handler({"message": "after", "exception": OSError(24, "Too many open files")})
            assert seen[-1]["message"] == "after"  # restored
    finally:
        loop.set_exception_handler(None)


async def test_lean_launcher_dispatches_the_sub_addon_hooks() -> None:
    """The router holds ConnectionLimits as a sub-addon; HookCachingAddonManager's cached hook
    lists must include the hooks of sub-addons, as mitmproxy's own AddonManager does."""
    lean = LeanMaster(options.Options())
    try:
        limits = lean.router.limits
        # first to see a request: an oversized head costs nothing else
        assert next(a for a in lean.router.addons if hasattr(a, "requestheaders")) is limits
        client = _client()
        await lean.addons.trigger_event(ClientConnectedHook(client))
        assert limits.open_connections == 1
        await lean.addons.trigger_event(ClientDisconnectedHook(client))
        assert limits.open_connections == 0
        hooks = lean.addons._hooks["client_connected"]
        assert limits.client_connected in hooks
    finally:
        await lean.done()


def test_listen_backlog() -> None:
    assert LimitsConfig().listen_backlog == 4096
    assert parse_limits({"listen_backlog": 512}).listen_backlog == 512
    with pytest.raises(LimitsConfigError, match="listen_backlog"):
        parse_limits({"listen_backlog": 0})
