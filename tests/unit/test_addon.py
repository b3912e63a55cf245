"""The mitmproxy-facing addon, driven through mitmproxy's own test context."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import addonmanager, exceptions, http
from mitmproxy.addons.anticache import AntiCache
from mitmproxy.addons.block import Block
from mitmproxy.addons.errorcheck import ErrorCheckHandler
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils
from synapse_router.addon import METADATA_KEY, SynapseRouter
from synapse_router.addons.configuration import Configuration
from synapse_router.identity.resolver import Source
from synapse_router.identity.tokens import short_hash, token_key
from synapse_router.routing.retry import Sending

CONFIG = """
workers:
  sync: [http://10.0.0.1:8083, http://10.0.0.2:8083, http://10.0.0.3:8083]
  client_reader: [http://10.0.0.9:8083]
"""


@pytest.fixture
def router(tmp_path: Path):
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG)
    addon = SynapseRouter()
    with taddons.context(addon, Proxyserver(), Block(), AntiCache()) as tctx:
        tctx.configure(addon, router_config=str(path), mode=["reverse:http://10.0.0.100:8008"])
        yield addon, tctx


def hook(addon: SynapseRouter, name: str, *args: object) -> object:
    """Call hook `name` as mitmproxy does: on the router, then on each of its addons in order.
    Returns what an addon returned for mitmproxy to await (None if nothing)."""
    pending = []
    for each in addonmanager.traverse([addon]):
        func = getattr(each, name, None)
        if func is not None and (result := func(*args)) is not None:
            pending.append(result)
    assert len(pending) <= 1
    return pending[0] if pending else None


def make_flow(path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    flow = tflow.tflow()
    flow.request = tutils.treq(method=method.encode(), path=path.encode(), host="10.0.0.100", port=8008)
    flow.request.headers["Host"] = "matrix.example.org"
    for k, v in (headers or {}).items():
        flow.request.headers[k] = v
    return flow


def test_enforces_router_options(router) -> None:
    addon, tctx = router
    tctx.configure(
        addon,
        connection_strategy="eager",
        block_global=True,
        keep_host_header=False,
        http2=True,
        anticache=True,
        tcp_timeout=60,
    )
    options = tctx.master.options
    assert options.anticache is False
    assert options.connection_strategy == "lazy"
    assert options.block_global is False
    assert options.keep_host_header is True
    assert options.http2 is False
    assert options.tcp_timeout >= 360


def test_bad_config_is_options_error(router, tmp_path: Path) -> None:
    addon, tctx = router
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  sync: [nope]\n")
    with pytest.raises(exceptions.OptionsError, match=r"workers.sync\[0\] \(line 2\)"):
        tctx.configure(addon, router_config=str(bad))


async def test_cached_user_routes_without_waiting(router) -> None:
    addon, _ = router
    assert addon.identity is not None
    for device in ("tokA", "tokB", "tokC"):
        addon.identity.users[token_key(device)] = "@alice:example.org"
    workers = set()
    for device in ("tokA", "tokB", "tokC"):
        flow = make_flow("/_matrix/client/v3/sync?since=s1", {"Authorization": f"Bearer {device}"})
        assert hook(addon, "requestheaders", flow) is None  # a cache hit needs no await
        decision = flow.metadata[METADATA_KEY]
        assert decision.identity == Source.CACHE and decision.key_kind == "user"
        workers.add((flow.request.host, flow.request.port))
        assert flow.request.host_header == "matrix.example.org"
        assert "tok" not in (flow.comment or "")
    assert len(workers) == 1


async def test_query_token_used_where_it_is_and_left_there(router) -> None:
    # Issue 22: credentials are forwarded as the client sent them (Synapse reads some only
    # from the query: federation's OpenID userinfo).
    addon, _ = router
    assert addon.identity is not None
    addon.identity.users[token_key("qtok")] = "@bob:example.org"
    flow = make_flow("/_matrix/client/v3/sync?since=s1&access_token=qtok&timeout=30000")
    hook(addon, "requestheaders", flow)
    assert flow.request.path == "/_matrix/client/v3/sync?since=s1&access_token=qtok&timeout=30000"
    assert "Authorization" not in flow.request.headers
    assert "key=user identity=cache" in flow.comment  # resolved from the query token


async def test_credentials_redacted_once_answered(router) -> None:
    addon, _ = router
    flow = make_flow("/_matrix/client/versions", {"Authorization": "Bearer sekrit"})
    hook(addon, "requestheaders", flow)
    flow.response = tutils.tresp()
    hook(addon, "response", flow)
    assert "sekrit" not in flow.request.headers["Authorization"]
    assert flow.request.headers["Authorization"].startswith("Bearer <redacted:")
    assert flow.metadata[METADATA_KEY]["pool"] == "client_reader"  # plain data once finished


async def test_redacted_header_carries_the_same_label_as_the_access_log(router) -> None:
    addon, _ = router
    # An appservice acting as a user: the label is of (token, user_id), as everywhere else.
    flow = make_flow("/_matrix/client/versions?user_id=%40bot%3Aexample.org", {"Authorization": "Bearer astok"})
    hook(addon, "requestheaders", flow)
    flow.response = tutils.tresp()
    hook(addon, "response", flow)
    label = short_hash(token_key("astok", "@bot:example.org"))
    assert flow.request.headers["Authorization"] == f"Bearer <redacted:{label}>"


async def test_logout_all_evicts_every_token_of_the_user(router) -> None:
    addon, _ = router
    assert addon.identity is not None
    for t in ("a1", "a2", "a3"):
        addon.identity.users[token_key(t)] = "@alice:example.org"
    addon.identity.users[token_key("b1")] = "@bob:example.org"
    flow = make_flow("/_matrix/client/v3/logout/all", {"Authorization": "Bearer a1"}, method="POST")
    hook(addon, "requestheaders", flow)
    flow.response = tutils.tresp(status_code=200)
    hook(addon, "response", flow)
    assert len(addon.identity.users) == 1 and token_key("b1") in addon.identity.users


async def test_failed_logout_evicts_nothing(router) -> None:
    addon, _ = router
    assert addon.identity is not None
    addon.identity.users[token_key("a1")] = "@alice:example.org"
    flow = make_flow("/_matrix/client/v3/logout", {"Authorization": "Bearer a1"}, method="POST")
    hook(addon, "requestheaders", flow)
    flow.response = tutils.tresp(status_code=500)
    hook(addon, "response", flow)
    assert token_key("a1") in addon.identity.users


async def test_no_token_keys_by_client_address(router) -> None:
    addon, _ = router
    flow = make_flow("/_matrix/client/v3/sync?since=1")
    hook(addon, "requestheaders", flow)
    assert flow.metadata[METADATA_KEY].key_kind == "ip"


async def test_unrouted_request_keeps_main_target(router) -> None:
    addon, _ = router
    flow = make_flow("/_matrix/client/v3/rooms/!r:x/upgrade", method="POST")
    hook(addon, "requestheaders", flow)
    assert (flow.request.host, flow.request.port) == ("10.0.0.100", 8008)
    assert flow.metadata[METADATA_KEY].pool == "main"


def _call(tctx, name: str, *args: str):
    return tctx.master.commands.call_strings(name, list(args))


async def test_explain_command_shows_ranking_and_choice(router) -> None:
    addon, tctx = router
    lines = _call(tctx, "router.explain", "/_matrix/client/v3/sync?since=s1", "GET", "@alice:example.org")
    text = "\n".join(lines)
    assert "route sync" in text and "balance user" in text
    assert "pool chain: sync -> (generic: not configured) -> main" in text
    assert text.count("<- chosen") == 1
    flow = make_flow("/_matrix/client/v3/sync?since=s1", {"Authorization": "Bearer t"})
    assert addon.identity is not None
    addon.identity.users[token_key("t")] = "@alice:example.org"
    hook(addon, "requestheaders", flow)
    chosen = next(line for line in lines if "<- chosen" in line)
    assert f"http://{flow.request.host}:{flow.request.port}" in chosen


async def test_explain_refuses_tokens_and_takes_their_label(router) -> None:
    # mitmproxy saves every command in its history file: a token there would be on disk.
    addon, tctx = router
    with pytest.raises(exceptions.CommandError) as refused:
        _call(tctx, "router.explain", "/_matrix/client/v3/sync", "GET", "syt_secret_token_1")
    assert "syt_secret_token_1" not in str(refused.value)
    assert addon.identity is not None
    addon.identity.users[token_key("syt_secret_token_1")] = "@alice:example.org"
    label = short_hash(token_key("syt_secret_token_1"))
    by_label = _call(tctx, "router.explain", "/_matrix/client/v3/sync", "GET", label)
    by_user = _call(tctx, "router.explain", "/_matrix/client/v3/sync", "GET", "@alice:example.org")
    assert "key user" in by_label[0] and by_label[-1] == by_user[-1]


async def test_drain_moves_users_and_undrain_brings_them_back(router) -> None:
    addon, tctx = router
    assert addon.identity is not None
    users = [f"@u{i}:example.org" for i in range(30)]
    for i, user in enumerate(users):
        addon.identity.users[token_key(f"t{i}")] = user

    def where() -> dict[int, str]:
        out = {}
        for i in range(len(users)):
            flow = make_flow("/_matrix/client/v3/sync?since=1", {"Authorization": f"Bearer t{i}"})
            hook(addon, "requestheaders", flow)
            out[i] = flow.metadata[METADATA_KEY].worker
            hook(addon, "response", flow)
        return out

    before = where()
    _call(tctx, "router.drain", "http://10.0.0.2:8083/")
    during = where()
    assert "http://10.0.0.2:8083" not in during.values()
    assert all(during[i] == w for i, w in before.items() if w != "http://10.0.0.2:8083")
    assert any("drained" in line for line in _call(tctx, "router.workers"))
    _call(tctx, "router.undrain", "http://10.0.0.2:8083")
    assert where() == before
    with pytest.raises(exceptions.CommandError, match="unknown worker"):
        _call(tctx, "router.drain", "http://10.9.9.9:1")


async def test_drained_by_configuration_comes_back_when_the_configuration_says_so(router) -> None:
    addon, tctx = router
    path = Path(tctx.master.options.router_config)
    drained = CONFIG.replace("http://10.0.0.2:8083,", "{url: http://10.0.0.2:8083, drained: true},")
    path.write_text(drained)
    _call(tctx, "router.reload")
    assert "http://10.0.0.2:8083" in addon.workers.unusable
    path.write_text(CONFIG)  # the flag removed: back in rotation at the reload
    _call(tctx, "router.reload")
    assert "http://10.0.0.2:8083" not in addon.workers.unusable
    # A drain by command is the operator's word: a reload that does not mention it keeps it.
    _call(tctx, "router.drain", "http://10.0.0.3:8083")
    _call(tctx, "router.reload")
    assert "http://10.0.0.3:8083" in addon.workers.unusable
    # A command undrains what the configuration drained, until the next reload says otherwise.
    path.write_text(drained)
    _call(tctx, "router.reload")
    _call(tctx, "router.undrain", "http://10.0.0.2:8083")
    assert "http://10.0.0.2:8083" not in addon.workers.unusable
    path.write_text(CONFIG)
    _call(tctx, "router.reload")
    assert "http://10.0.0.2:8083" not in addon.workers.unusable


async def test_a_sighup_during_start_up_waits_for_its_end(router, caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy exits 1 on an error logged during start-up: a bad file sent with an early
    SIGHUP must not stop the router (found by an outside trial: exit 1 within ~2 s of
    `listening at`). The reload happens, and is reported, once start-up is over."""
    addon, tctx = router
    configuration = next(a for a in addon.addons if isinstance(a, Configuration))
    Path(tctx.master.options.router_config).write_text("workers: [broken\n")
    startup_check = ErrorCheckHandler()
    startup_check.install()
    try:
        configuration.reload_when_started()
        await asyncio.sleep(0.3)
        assert startup_check.has_errored == []
    finally:
        startup_check.uninstall()
    for _ in range(20):
        await asyncio.sleep(0.1)
        if any(r.levelname == "ERROR" and "reload of" in r.getMessage() for r in caplog.records):
            break
    else:
        raise AssertionError("the reload deferred past start-up never happened")


async def test_flush_and_reload(router, tmp_path: Path) -> None:
    addon, tctx = router
    assert addon.identity is not None
    addon.identity.users[token_key("t")] = "@a:x"
    assert _call(tctx, "router.flush") == 1
    assert len(addon.identity.users) == 0
    path = Path(tctx.master.options.router_config)
    path.write_text(CONFIG + "  room: [http://10.0.0.7:8083]\n")
    _call(tctx, "router.reload")
    assert addon.engine is not None and "room" in addon.engine.pools
    path.write_text("workers: [broken\n")
    _call(tctx, "router.reload")  # reported, and the running configuration kept
    assert "room" in addon.engine.pools


async def _holding_worker(release: asyncio.Event, seen: list[bytes]) -> asyncio.Server:
    """A loopback worker that reads a request and answers only once `release` is set."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@contextlib.contextmanager
def _long_poll_to(tmp_path: Path, worker_port: int) -> Iterator[tuple[SynapseRouter, http.HTTPFlow]]:
    """A router whose one sync worker listens on `worker_port` (main: 127.0.0.1:9), and a
    long-poll of a known user routed by it, ready for its `request` hook."""
    path = tmp_path / "router.yaml"
    path.write_text(f"workers:\n  sync: [http://127.0.0.1:{worker_port}]\n")
    addon = SynapseRouter()
    with taddons.context(addon, Proxyserver(), Block(), AntiCache()) as tctx:
        tctx.configure(addon, router_config=str(path), mode=["reverse:http://127.0.0.1:9"])
        assert addon.identity is not None
        addon.identity.users[token_key("sekrit")] = "@alice:example.org"
        flow = make_flow("/_matrix/client/v3/sync?since=s1&timeout=30000", {"Authorization": "Bearer sekrit"})
        flow.request.content = b""
        hook(addon, "requestheaders", flow)
        yield addon, flow


async def test_long_poll_token_hidden_while_in_flight_and_sent_upstream(tmp_path: Path) -> None:
    release, seen = asyncio.Event(), []
    worker = await _holding_worker(release, seen)
    with _long_poll_to(tmp_path, worker.sockets[0].getsockname()[1]) as (addon, flow):
        sending = hook(addon, "request", flow)
        assert sending is not None  # the router sends this long-poll itself
        task = asyncio.ensure_future(sending)
        while not seen:
            await asyncio.sleep(0.01)
        assert b"\r\nAuthorization: Bearer sekrit\r\n" in seen[0]  # the worker got the token
        label = short_hash(token_key("sekrit"))
        assert flow.request.headers["Authorization"] == f"Bearer <redacted:{label}>"  # mitmweb does not
        release.set()
        await asyncio.wait_for(task, 5)
        assert flow.response is not None and flow.response.status_code == 200
    worker.close()


async def test_long_poll_with_no_process_left_gets_a_matrix_error(tmp_path: Path) -> None:
    # The worker and main both refuse: the router itself answers, as Synapse would format it.
    with socket.socket() as refusing:  # bound, not listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        with _long_poll_to(tmp_path, refusing.getsockname()[1]) as (addon, flow):
            sending = hook(addon, "request", flow)
            assert sending is not None
            await asyncio.wait_for(sending, 5)
    assert flow.response is not None and flow.response.status_code == 503
    assert flow.response.json()["errcode"] == "M_UNKNOWN" and flow.response.headers["Retry-After"] == "5"
    assert flow.response.headers["Content-Type"] == "application/json"
    assert "sekrit" not in str(flow.request.headers)


@pytest.mark.parametrize(
    ("path", "headers", "status", "errcode"),
    [
        ("/_matrix/client/v3/sync?since=1&access_token=t%0D%0AX-A:%20b", {}, 401, "M_UNKNOWN_TOKEN"),
        ("/_matrix/client/v3/sync?since=1", {"Authorization": "Bearer tok extra"}, 401, "M_UNKNOWN_TOKEN"),
        ("/_matrix/client/v3/sync?since=1&access_token=q", {"Authorization": "Bearer h"}, 400, "M_INVALID_PARAM"),
        ("/_matrix/client/v3/sync?since=1", {"X-Evil": "a\rb"}, 400, "M_INVALID_PARAM"),
    ],
)
def test_refused_requests_are_answered_by_the_router_with_a_matrix_error(
    router, path: str, headers: dict[str, str], status: int, errcode: str
) -> None:
    addon, _ = router
    flow = make_flow(path, headers)
    assert hook(addon, "requestheaders", flow) is None  # answered at once: no whoami call
    assert flow.response is not None and flow.response.status_code == status
    body = flow.response.json()
    assert body["errcode"] == errcode and body["error"]
    hook(addon, "response", flow)
    shown = flow.request.path + str(flow.request.headers) + (flow.comment or "")
    for secret in ("t%0D%0A", "tok extra", "Bearer h", "access_token=q"):
        assert secret not in shown
    assert flow.metadata[METADATA_KEY]["refused"] == errcode and flow.metadata[METADATA_KEY]["worker"] == "router"
    assert 'status_class="4xx",worker="router"' in addon.metrics.render().decode()


def test_absolute_form_target_is_refused(router) -> None:
    addon, _ = router
    flow = make_flow("/_matrix/client/v3/sync?since=1", {"Authorization": "Bearer tok"})
    flow.request.authority = "10.0.0.1:8083"
    hook(addon, "requestheaders", flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert flow.response.json()["errcode"] == "M_UNRECOGNIZED"


def test_each_hook_is_owned_by_one_addon_and_runs_in_list_order() -> None:
    # The router is a composition of small addons: it holds no hook itself, and each hook
    # runs in its addons' list order (limits first, the exchange's owner late; Observation
    # observes what the owner hands it, and holds no per-flow end hook).
    router = SynapseRouter()
    hooks_of = {name for name in dir(router) if name in {"requestheaders", "request", "response", "error"}}
    assert not hooks_of
    owners = [type(a).__name__ for a in router.addons if hasattr(a, "requestheaders")]
    assert owners == ["ConnectionLimits", "Routing"]
    owners = [type(a).__name__ for a in router.addons if hasattr(a, "response")]
    assert owners == ["ConnectionLimits", "WhoamiIdentity", "ExchangeOwner", "GracefulStop"]
    for end in ("error", "client_disconnected"):
        assert "ExchangeOwner" in [type(a).__name__ for a in router.addons if hasattr(a, end)]
        assert "Observation" not in [type(a).__name__ for a in router.addons if hasattr(a, end)]
    assert [type(a).__name__ for a in router.addons if hasattr(a, "request")] == ["RouterSent"]


async def test_a_reload_whose_access_log_cannot_be_opened_changes_nothing(router, tmp_path: Path) -> None:
    addon, tctx = router
    path = Path(tctx.master.options.router_config)
    before = addon.engine
    path.write_text(
        CONFIG + "  room: [http://10.0.0.7:8083]\naccess_log: {enabled: true, path: /nonexistent/dir/access.log}\n"
    )
    _call(tctx, "router.reload")  # reported in the log, not raised as a bare OSError
    assert addon.engine is before and "room" not in addon.engine.pools
    assert addon.observation._access is None  # the access log still goes nowhere new
    with pytest.raises(exceptions.OptionsError, match="cannot open /nonexistent/dir/access.log"):
        tctx.configure(addon, router_config=str(path))
    assert addon.engine is before


async def test_a_worker_removed_by_a_reload_loses_its_series(router) -> None:
    addon, tctx = router
    path = Path(tctx.master.options.router_config)
    flow = make_flow("/_matrix/client/v3/sync?since=1", {"Authorization": "Bearer t"})
    assert addon.identity is not None
    addon.identity.users[token_key("t")] = "@alice:example.org"
    hook(addon, "requestheaders", flow)
    flow.response = tutils.tresp()
    hook(addon, "response", flow)
    text = addon.metrics.render().decode()
    assert 'worker="http://10.0.0.9:8083"' in text
    path.write_text(CONFIG.replace("  client_reader: [http://10.0.0.9:8083]\n", ""))
    _call(tctx, "router.reload")
    text = addon.metrics.render().decode()
    assert "10.0.0.9" not in text
    assert 'synapse_router_worker_up{pool="sync",worker="http://10.0.0.1:8083"} 1.0' in text


async def test_explain_refuses_a_token_in_the_path_and_an_unknown_label(router) -> None:
    _, tctx = router
    with pytest.raises(exceptions.CommandError) as refused:
        _call(tctx, "router.explain", "/_matrix/client/v3/sync?access_token=syt_secret", "GET")
    assert "syt_secret" not in str(refused.value)
    with pytest.raises(exceptions.CommandError, match="no cached token"):
        _call(tctx, "router.explain", "/_matrix/client/v3/sync", "GET", "deadbeef")


def test_tokens_are_scrubbed_from_every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    # mitmproxy logs a malformed request line as it came; libraries print headers at DEBUG.
    import logging

    from synapse_router.addons.credentials import LogRedaction

    redaction = LogRedaction()
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redaction.load(None)
        assert any(isinstance(f, logging.Filter) for f in handler.filters)
        record = logging.LogRecord(
            "mitmproxy.proxy.server",
            logging.INFO,
            "",
            0,
            "Bad HTTP request line: %r",
            (b"GET /sync?since=s&access_token=syt_secret&x=1",),
            None,
        )
        handler.filter(record)
        line = record.getMessage()
        assert "syt_secret" not in line and "access_token=<redacted>&x=1" in line
        record = logging.LogRecord("httpcore", logging.DEBUG, "", 0, "Authorization: Bearer syt_other", None, None)
        handler.filter(record)
        assert record.getMessage() == "Authorization: Bearer <redacted>"
        assert logging.getLogger("httpcore").level == logging.WARNING
    finally:
        redaction.done()
        root.removeHandler(handler)
    assert not handler.filters


async def test_a_request_ending_on_a_removed_worker_does_not_bring_its_series_back(router) -> None:
    addon, tctx = router
    path = Path(tctx.master.options.router_config)
    flow = make_flow("/_matrix/client/v3/rooms/!r:x/messages")  # client_reader: 10.0.0.9
    hook(addon, "requestheaders", flow)
    assert flow.request.host == "10.0.0.9"
    path.write_text(CONFIG.replace("  client_reader: [http://10.0.0.9:8083]\n", ""))
    _call(tctx, "router.reload")  # while the request is in flight
    flow.response = tutils.tresp()
    hook(addon, "response", flow)
    assert "10.0.0.9" not in addon.metrics.render().decode()


async def test_a_request_ending_on_a_worker_moved_to_another_pool_does_not_bring_its_old_series_back(
    router,
) -> None:
    addon, tctx = router
    path = Path(tctx.master.options.router_config)
    flow = make_flow("/_matrix/client/v3/rooms/!r:x/messages")  # client_reader: 10.0.0.9
    hook(addon, "requestheaders", flow)
    assert flow.request.host == "10.0.0.9"
    moved = CONFIG.replace("  client_reader: [http://10.0.0.9:8083]\n", "  room: [http://10.0.0.9:8083]\n")
    path.write_text(moved)
    _call(tctx, "router.reload")  # while the request is in flight: the worker is still configured
    flow.response = tutils.tresp()
    hook(addon, "response", flow)
    rendered = addon.metrics.render().decode()
    assert 'pool="room",worker="http://10.0.0.9:8083"' in rendered
    assert 'pool="client_reader",worker="http://10.0.0.9:8083"' not in rendered


SS = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
SEND = "/_matrix/client/v3/rooms/!r:x/send/m.room.message"


@pytest.mark.parametrize(
    ("method", "path", "body", "how"),
    [
        ("GET", "/_matrix/client/v3/sync?since=s1&timeout=30000", b"", Sending.RESEND),
        ("GET", "/_matrix/client/v3/sync?since=s1&timeout=0", b"", Sending.RESEND),
        ("GET", "/_matrix/client/v3/sync?timeout=30000", b"", Sending.RESEND),  # initial: handed back if huge
        ("HEAD", "/_matrix/client/v3/profile/@a:x", b"", Sending.RESEND),
        ("OPTIONS", "/_matrix/client/v3/profile/@a:x", b"", Sending.RESEND),
        ("GET", "/_matrix/client/v1/media/download/x/y", b"", None),  # media streams
        ("POST", "/_matrix/client/v1/media/upload", b"x", None),
        ("POST", f"{SS}?pos=p1&timeout=30000", b"{}", Sending.RESEND),
        ("POST", f"{SS}?pos=p1&timeout=0", b"{}", Sending.ONCE),
        ("POST", f"{SS}?timeout=30000", b"{}", Sending.ONCE),  # initial
        ("POST", f"{SS}?pos=p&timeout=9", b"x" * 70_000, Sending.ONCE),  # over the resend bound
        ("POST", "/_matrix/client/v3/sync?since=s1&timeout=30000", b"{}", Sending.ONCE),
        ("POST", "/_matrix/client/v3/keys/query", b"{}", Sending.ONCE),
        ("PUT", f"{SEND}/txn1", b"{}", Sending.RESEND),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/redact/$e/txn1", b"{}", Sending.RESEND),
        ("PUT", f"{SEND}/txn1?user_id=@b:x", b"{}", Sending.ONCE),  # appservice: no device
        ("PUT", f"{SEND}/txn1?org.matrix.msc4140.delay=5000", b"{}", Sending.ONCE),  # delayed event
        ("PUT", f"{SEND}/txn1", b"x" * 70_000, Sending.ONCE),
        ("PUT", "/_matrix/client/v3/sendToDevice/m.x/txn1", b"{}", Sending.ONCE),  # deduplicated per process
        ("PUT", "/_matrix/client/v3/rooms/!r:x/state/m.room.name/", b"{}", Sending.ONCE),
        ("POST", "/_matrix/client/v3/keys/upload", b"x" * (2 * 1024 * 1024), None),  # streamed
    ],
)
def test_which_requests_the_router_sends_itself(
    router, method: str, path: str, body: bytes, how: Sending | None
) -> None:
    addon, _ = router
    assert addon.identity is not None
    addon.identity.users[token_key("t")] = "@alice:example.org"
    flow = make_flow(path, {"Authorization": "Bearer t", "Content-Length": str(len(body))}, method=method)
    flow.request.raw_content = body
    hook(addon, "requestheaders", flow)
    exchange = addon.state.exchanges.find(flow.client_conn.id, flow.id)
    assert exchange is not None and exchange.sending is how


def test_a_flow_ended_by_neither_response_nor_error_is_ended_when_its_client_goes(router) -> None:
    """mitmproxy's HTTP layer can fail without calling `error` (a chunked body with trailers in
    mitmproxy 12): the flow's in-flight count and registration go when its client does."""
    addon, _ = router
    flow = make_flow("/_matrix/client/v3/rooms/!r:x/messages")  # client_reader: 10.0.0.9
    other = make_flow("/_matrix/client/v3/rooms/!r:x/messages")  # another client, still there
    hook(addon, "requestheaders", flow)
    hook(addon, "requestheaders", other)
    url = "http://10.0.0.9:8083"
    assert addon.state.in_flight[url] == 2
    hook(addon, "client_disconnected", flow.client_conn)
    assert addon.state.in_flight[url] == 1
    assert flow.client_conn.id not in addon.state.exchanges.open
    assert 'synapse_router_requests_total{method="GET",pool="client_reader",route="room_read",status_class="error"' in (
        addon.metrics.render().decode()
    )
    other.response = tutils.tresp()
    hook(addon, "response", other)
    assert addon.state.in_flight[url] == 0 and addon.state.exchanges.open == {}
    hook(addon, "client_disconnected", other.client_conn)  # already over: nothing counted twice
    assert addon.state.in_flight[url] == 0


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_workers_unknown_token_answer_evicts_the_tokens_cached_user(router, gzipped: bool) -> None:
    import gzip
    import json

    addon, _ = router
    assert addon.identity is not None
    key = token_key("revoked")
    addon.identity.users[key] = "@alice:example.org"
    flow = make_flow("/_matrix/client/v3/sync?since=s1", {"Authorization": "Bearer revoked"})
    hook(addon, "requestheaders", flow)
    body = json.dumps({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed.", "soft_logout": False})
    headers = {"content-type": "application/json"}
    raw = body.encode()
    if gzipped:
        raw, headers["content-encoding"] = gzip.compress(raw), "gzip"
    flow.response = http.Response.make(401, b"", headers)
    flow.response.raw_content = raw  # as it came (make() would encode it once more)
    hook(addon, "response", flow)
    assert key not in addon.identity.users


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, b'{"errcode": "M_MISSING_TOKEN", "error": "Missing access token"}'),
        (403, b'{"errcode": "M_UNKNOWN_TOKEN", "error": "not a 401"}'),
        (401, b"M_UNKNOWN_TOKEN but not JSON"),
        (200, b'{"errcode": "M_UNKNOWN_TOKEN"}'),
    ],
)
def test_other_answers_keep_the_cached_user(router, status: int, body: bytes) -> None:
    addon, _ = router
    assert addon.identity is not None
    key = token_key("kept")
    addon.identity.users[key] = "@alice:example.org"
    flow = make_flow("/_matrix/client/v3/sync?since=s1", {"Authorization": "Bearer kept"})
    hook(addon, "requestheaders", flow)
    flow.response = http.Response.make(status, body, {"content-type": "application/json"})
    hook(addon, "response", flow)
    assert addon.identity.users.get(key) == "@alice:example.org"
