"""The mitmproxy internals the lean launcher depends on (lean.py, "mitmproxy internals this
depends on"; commandline.py; childprocess.py): each test fails when a mitmproxy upgrade removes,
renames or reworks one of them, before the launcher breaks at run time. (limits.py's own
internals: tests/unit/test_limits.py, test_mitmproxy_internals_still_there.)"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import io
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import addonmanager, exceptions, hooks, log, master, options, optmanager
from mitmproxy.addons import core, disable_h2c, dumper, errorcheck, next_layer, proxyserver, termlog, tlsconfig
from mitmproxy.proxy.layers.http import HttpResponseHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main
from mitmproxy.utils import debug
from synapse_router.addons.isolation import isolate_hooks
from synapse_router.launcher.childprocess import SharedPortLoop
from synapse_router.launcher.lean import HookCachingAddonManager, LeanMaster, StartupCheck


def params(func: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(func).parameters)


# --- Master ---


async def test_master_constructor_attributes_and_legacy_log_events() -> None:
    assert params(master.Master.__init__) == ["self", "opts", "event_loop", "with_termlog"]
    plain = master.Master(options.Options(), with_termlog=True)
    try:
        assert isinstance(plain.options, options.Options)
        assert isinstance(plain.addons, addonmanager.AddonManager)
        assert [type(a) for a in plain.addons.chain] == [termlog.TermLog]  # what LeanMaster keeps
        assert isinstance(plain._legacy_log_events, log.LegacyLogEvents)
        assert callable(plain._legacy_log_events.uninstall)
        assert callable(plain.shutdown) and callable(plain.commands.dump)
        assert params(plain.commands.dump) == ["out"]
    finally:
        await plain.done()


class _RunningProbe:
    """Notes, in `running`, whether the proxy listens, and logs an error there when asked to."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.events: list[str] = []

    def running(self) -> None:
        self.events.append("running")
        if self.fail:
            logging.error("an error in the last part of start-up")


def _plain_master(probe: _RunningProbe, check: StartupCheck) -> master.Master:
    opts = options.Options(mode=["reverse:http://127.0.0.1:9"], listen_host="127.0.0.1", listen_port=0)
    plain = master.Master(opts)
    plain.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig())
    plain.addons.add(probe, check)
    return plain


async def test_master_run_finishes_the_errorcheck_after_the_last_startup_check() -> None:
    """StartupCheck tells a `--processes` parent "serving" from `finish()`: Master.run must find
    it as "errorcheck" and call `finish()` once the servers listen and `running` has run, after
    the last check for errors logged during start-up (an error there exits, never `finish()`)."""
    events: list[str] = []
    probe = _RunningProbe(fail=False)
    plain: master.Master

    def started() -> None:
        addrs = plain.addons.get("proxyserver").listen_addrs()
        with socket.create_connection(addrs[0][:2], timeout=5):
            events.append("finish, listening")
        plain.shutdown()

    plain = _plain_master(probe, StartupCheck(started))
    await asyncio.wait_for(plain.run(), 30)
    assert probe.events + events == ["running", "finish, listening"]

    failing = _RunningProbe(fail=True)
    plain = _plain_master(failing, StartupCheck(lambda: events.append("finish after an error")))
    with pytest.raises(SystemExit):
        await asyncio.wait_for(plain.run(), 30)
    assert failing.events == ["running"] and events == ["finish, listening"]  # no finish after the error


# --- AddonManager ---


async def test_addon_manager_chain_lookup_and_configure_receiver() -> None:
    plain = master.Master(options.Options())
    try:
        manager = plain.addons
        assert isinstance(manager.chain, list) and isinstance(manager.lookup, dict)
        assert params(manager._configure_all) == ["updated"]
        receivers = [ref() for ref in plain.options.changed.receivers]
        assert manager._configure_all in receivers  # what LeanMaster disconnects
        plain.options.changed.disconnect(manager._configure_all)
        assert manager._configure_all not in [ref() for ref in plain.options.changed.receivers]
    finally:
        await plain.done()


def test_addon_manager_methods_the_caching_manager_overrides_or_calls() -> None:
    manager = addonmanager.AddonManager
    assert params(manager.__init__) == ["self", "master"]
    assert params(manager.add) == ["self", "addons"]
    assert inspect.signature(manager.add).parameters["addons"].kind is inspect.Parameter.VAR_POSITIONAL
    assert params(manager.remove) == ["self", "addon"]
    assert params(manager.clear) == ["self"]
    assert params(manager.get) == ["self", "name"]
    assert params(manager.invoke_addon_sync) == ["self", "addon", "event"]
    assert params(manager.trigger_event) == ["self", "event"]
    assert inspect.iscoroutinefunction(manager.trigger_event)


@pytest.mark.parametrize("manager_class", [addonmanager.AddonManager, HookCachingAddonManager])
async def test_both_managers_run_every_part_after_one_that_raises_and_stop_at_addon_halt(
    manager_class: type[addonmanager.AddonManager], caplog: pytest.LogCaptureFixture
) -> None:
    """The router's parts are isolated (addons/isolation.py), so mitmproxy's AddonManager (whose
    safecall would skip the later children of a parent) and the lean launcher's caching manager
    call the same hooks in the same order: a part that raises is logged without its message and
    the later parts run (sync and async hooks alike); AddonHalt still stops the event."""
    calls: list[str] = []

    class Part:
        def __init__(self, name: str, fail: type[BaseException] | None = None, is_async: bool = False) -> None:
            self.name, self.fail, self.is_async = name, fail, is_async

        def response(self, flow: object) -> Any:
            if self.is_async:
                return self._later()
            self._act()
            return None

        async def _later(self) -> None:
            await asyncio.sleep(0)
            self._act()

        def _act(self) -> None:
            calls.append(self.name)
            if self.fail is not None:
                raise self.fail("Bearer syt_secret_in_message")

    class Parent:
        def __init__(self, parts: list[Part]) -> None:
            self.addons = parts
            isolate_hooks(parts)

    after = Part("after")
    manager = manager_class(type("FakeMaster", (), {"options": options.Options()})())
    manager.chain = [Parent([Part("a", RuntimeError), Part("b", KeyError, is_async=True), Part("c")]), after]
    await manager.trigger_event(HttpResponseHook(None))  # type: ignore[arg-type]
    assert calls == ["a", "b", "c", "after"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert [e.split(" at ")[0] for e in errors] == [
        "synapse-router: Part.response failed with RuntimeError",
        "synapse-router: Part.response failed with KeyError",
    ]
    assert not any("secret" in e for e in errors)

    calls.clear()
    manager = manager_class(type("FakeMaster", (), {"options": options.Options()})())
    manager.chain = [Parent([Part("a"), Part("halt", exceptions.AddonHalt), Part("c")]), after]
    await manager.trigger_event(HttpResponseHook(None))  # type: ignore[arg-type]
    assert calls == ["a", "halt"]


# --- the addon classes ---


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (core.Core, "core"),
        (disable_h2c.DisableH2C, "disableh2c"),
        (proxyserver.Proxyserver, "proxyserver"),
        (next_layer.NextLayer, "nextlayer"),
        (tlsconfig.TlsConfig, "tlsconfig"),
        (dumper.Dumper, "dumper"),
        (termlog.TermLog, "termlog"),
    ],
)
def test_addon_classes_build_without_arguments_under_their_names(cls: type, name: str) -> None:
    required = [
        p
        for p in inspect.signature(cls).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert required == []
    assert addonmanager._get_name(cls.__new__(cls)) == name


def test_errorcheck_hooks_startup_check_builds_on() -> None:
    assert issubclass(StartupCheck, errorcheck.ErrorCheck)
    assert params(errorcheck.ErrorCheck.__init__) == ["self", "repeat_errors_on_stderr"]
    assert params(errorcheck.ErrorCheck.finish) == ["self"]
    assert inspect.iscoroutinefunction(errorcheck.ErrorCheck.shutdown_if_errored)
    check = StartupCheck()
    try:
        assert addonmanager._get_name(check) == "errorcheck"
    finally:
        check.finish()


async def test_the_lean_chain_defines_the_options_the_launcher_sets() -> None:
    lean = LeanMaster(options.Options())
    try:
        names = [addonmanager._get_name(a) for a in lean.addons.chain]
        assert names == [
            "termlog",
            "core",
            "disableh2c",
            "proxyserver",
            "synapserouter",
            "nextlayer",
            "tlsconfig",
            "dumper",
            "errorcheck",
        ]
        assert {"termlog_verbosity", "dumper_filter", "flow_detail", "mode", "listen_port", "confdir"} <= set(
            lean.options.keys()
        )
        assert isinstance(lean.options.deferred, dict)
    finally:
        await lean.done()


# --- options and mitmdump's command line ---


def test_mitmdump_parser_and_process_options() -> None:
    assert params(cmdline.mitmdump) == ["opts"]
    assert params(mitmproxy_main.process_options) == ["parser", "opts", "args"]
    parser = cmdline.mitmdump(options.Options())
    assert isinstance(parser, argparse.ArgumentParser)
    args = parser.parse_args(["-q", "--set", "flow_detail=0", "~q"])
    assert args.quiet is True and not args.verbose
    assert args.setoptions == ["flow_detail=0"] and args.filter_args == ["~q"]
    assert args.options is False and args.commands is False


def test_option_manager_functions() -> None:
    assert params(options.Options.set) == ["self", "specs", "defer"]
    assert params(optmanager.load_paths) == ["opts", "paths"]
    assert params(optmanager.dump_defaults) == ["opts", "out"]
    opts = options.Options()
    opts.set("no_such_option=1", defer=True)
    assert list(opts.deferred) == ["no_such_option"]  # what apply_options inspects and deletes from
    optmanager.dump_defaults(opts, io.StringIO())
    assert params(hooks.ConfigureHook) == ["updated"]
    assert params(debug.register_info_dumpers) == []
    assert ProxyMode.parse("reverse:http://127.0.0.1:8008@8080").listen_port(None) == 8080
    assert issubclass(exceptions.OptionsError, exceptions.MitmproxyException)
    assert issubclass(exceptions.AddonHalt, exceptions.MitmproxyException)


# --- listening sockets (SharedPortLoop) ---


def test_shared_port_loop_sets_so_reuseport_on_a_start_server_socket() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = SharedPortLoop()
    loop.shared_ports = frozenset({port})

    async def listen() -> list[int]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        try:
            return [s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in server.sockets]
        finally:
            server.close()
            await server.wait_closed()

    try:
        assert all(loop.run_until_complete(listen()))
    finally:
        loop.close()


class _KillOnError:
    """What StreamedErrors does in the `error` hook, reduced to the kill; records the hook ran."""

    def __init__(self, kill: bool) -> None:
        self.kill = kill
        self.errors: list[str] = []
        self.started = asyncio.Event()

    def running(self) -> None:
        self.started.set()

    def error(self, flow: Any) -> None:
        self.errors.append(flow.error.msg)
        if self.kill:
            flow.kill()


async def _answer_through_a_proxy_to_a_worker_that_hangs_up(addon: _KillOnError) -> bytes:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # no response at all: mitmproxy's client layer sees a protocol error

    worker = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    worker_port = worker.sockets[0].getsockname()[1]
    opts = options.Options(mode=[f"reverse:http://127.0.0.1:{worker_port}"], listen_host="127.0.0.1", listen_port=0)
    plain = master.Master(opts)
    plain.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(), addon)
    run = asyncio.create_task(plain.run())
    try:
        await asyncio.wait_for(addon.started.wait(), 30)
        host, port = plain.addons.get("proxyserver").listen_addrs()[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return answer
    finally:
        plain.shutdown()
        await asyncio.wait_for(run, 30)
        worker.close()


async def test_a_flow_killed_in_the_error_hook_gets_no_error_page() -> None:
    """StreamedErrors (addons/streamed_errors.py) writes its Matrix 502 in the `error` hook and
    kills the flow: mitmproxy must run that hook before its client layer writes the HTML page,
    and must then write nothing for a killed flow (only close the connection)."""
    from mitmproxy.proxy.layers.http._events import ErrorCode

    left_alone = _KillOnError(kill=False)
    page = await _answer_through_a_proxy_to_a_worker_that_hangs_up(left_alone)
    assert page.startswith(b"HTTP/1.1 502 ") and left_alone.errors, page  # the page the kill must prevent
    killed = _KillOnError(kill=True)
    assert await _answer_through_a_proxy_to_a_worker_that_hangs_up(killed) == b""
    assert killed.errors == left_alone.errors
    assert ErrorCode.KILL.http_status_code() is None
    assert ErrorCode.GENERIC_SERVER_ERROR.http_status_code() == 502
