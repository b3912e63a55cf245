"""The lean Master: mitmproxy embedded with only what a reverse router needs, and one router
process run with it (`serve`).

Why: mitmdump loads ~35 addons and mitmproxy's AddonManager looks every hook up on every addon
(`getattr`) for every event of every flow; about half of mitmdump's CPU per request is that
dispatch. Two changes: nine addons instead of ~35, and an AddonManager that builds each event's
list of hook functions once (HookCachingAddonManager) instead of walking the chain per event.
The chain, in mitmdump's order (hook order matters: Proxyserver's self-connect check must see
the address before the router's `server_connect` moves it, and the router must redact tokens in
`response` before Dumper prints the flow):

    TermLog (Master's)   log lines on stdout, `termlog_verbosity`
    Core                 `server` option, option sanity checks, core commands
    DisableH2C           strips h2c upgrades / kills HTTP/2 prior-knowledge requests, as mitmdump
    Proxyserver          the listening servers and connection options (connection_strategy, ...)
    SynapseRouter        the router (where mitmdump's ScriptLoader would hold it)
    NextLayer            protocol detection (reverse proxy -> HTTP, TLS when the client speaks it)
    TlsConfig            TLS towards https:// workers/main and from TLS clients (`--certs`)
    Dumper               per-flow output, `flow_detail`, `dumper_filter`
    ErrorCheck           exits 1 when an error is logged during start-up (e.g. port in use);
                         here StartupCheck, which also tells a `--processes` parent "serving"

Left out, each a no-op for this router or a feature it never uses: Block and BlockList (the
router sets `block_global=false` anyway; the `name in ctx.options` guards of
addons/required_options.py skip absent options, as for `anticache`/`anticomp`), AntiCache,
AntiComp, StripDnsHttpsRecords, DnsResolver (DNS mode), UpdateAltSvc (rewrites `Alt-Svc`, which
Synapse does not send), MapRemote/MapLocal, ModifyBody/ModifyHeaders, StickyCookie/StickyAuth,
ProxyAuth, UpstreamAuth, Onboarding, ClientPlayback/ServerPlayback, Save/SaveHar (`-w`),
ScriptLoader (`-s`), ReadFile (`-r`), KeepServing, Browser, Comment, Cut, Export,
CommandHistory (their options: commandline.py).

mitmproxy internals this depends on (mitmproxy 12.3): the private ones in
compat/addonmanager.py (`_iter_hooks()`, `_configure_all`, `_legacy_log_events`), run by
tests/unit/test_compat_addonmanager.py; and, tested by tests/unit/test_mitmproxy_internals.py,
`Master` (its `addons`, `options`, `with_termlog`, and `run()` looking up the "errorcheck"
addon and calling its `finish()` after the last start-up check); the addon classes above;
`tools.cmdline.mitmdump` and `tools.main.process_options` (mitmdump's argument handling,
commandline.py); and the proxy's listening sockets being made by
`loop.create_server(factory, host, port)` (childprocess.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master, options, optmanager
from mitmproxy.addons import core, disable_h2c, dumper, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.utils import debug

from ..addon import SynapseRouter
from ..addons.isolation import report
from ..compat.addonmanager import drop_legacy_log_events, hook_functions, swap_addon_manager
from ..config import RouterConfig, load_config
from . import sdnotify
from .applied import applied_loader
from .channels import served_socket
from .childprocess import ChildSlot, SharedPorts, die_with_parent, ready_signal, replace
from .commandline import PROG, apply_options, make_parser, router_config_path
from .eventloop import DEFAULT as DEFAULT_EVENT_LOOP
from .eventloop import chosen_event_loop, loop_factory, loop_name
from .signals import on_signal

log = logging.getLogger(__name__)


class StartupCheck(errorcheck.ErrorCheck):
    """mitmproxy's ErrorCheck (exit 1 on an error logged during start-up) that also says when
    start-up is over: Master.run calls `finish()` once the servers listen, `running` has run and
    the last check passed."""

    name = "errorcheck"  # Master.run looks the check up by this name

    def __init__(self, on_started: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._on_started = on_started

    def finish(self) -> None:
        super().finish()  # type: ignore[no-untyped-call]
        if self._on_started is not None:
            self._on_started()


def lean_addons(router: SynapseRouter, on_started: Callable[[], None] | None = None) -> list[Any]:
    """The addon chain after Master's TermLog, in mitmdump's relative order (see module doc)."""
    return [
        core.Core(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]
        router,
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        dumper.Dumper(),
        StartupCheck(on_started),
    ]


class HookCachingAddonManager(addonmanager.AddonManager):
    """mitmproxy's AddonManager with `trigger_event` (every hook of every flow and connection)
    calling each event's hook functions from a list built once per event name, instead of a
    traverse + getattr per addon and a `safecall` context manager per call. Same semantics for
    this chain: addons in chain order, awaitables awaited, AddonHalt stops the event,
    OptionsError propagates, any other exception is logged (where it was raised, not its message,
    which may quote a client's bytes) and the next hook runs, which is what mitmproxy's
    safecall does for the router too, since its parts are isolated (addons/isolation.py). The lists are
    rebuilt after an addon is added or removed; no addon here grows or drops hooks at run time."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)  # type: ignore[no-untyped-call]
        self._hooks: dict[str, list[Callable[..., Any]]] = {}

    def add(self, *addons: Any) -> None:
        self._hooks.clear()
        super().add(*addons)  # type: ignore[no-untyped-call]
        self._hooks.clear()

    def remove(self, addon: Any) -> None:
        self._hooks.clear()
        super().remove(addon)  # type: ignore[no-untyped-call]

    def clear(self) -> None:
        self._hooks.clear()
        super().clear()  # type: ignore[no-untyped-call]

    async def trigger_event(self, event: hooks.Hook) -> None:
        funcs = self._hooks.get(event.name)
        if funcs is None:
            funcs = self._hooks[event.name] = hook_functions(self, event)
        args = event.args()
        for func in funcs:
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                report(f"{getattr(func, '__qualname__', func)}", e)


class LeanMaster(master.Master):
    """mitmproxy's Master with the lean addon chain; `on_started` is called once it serves."""

    def __init__(self, opts: options.Options, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(opts, with_termlog=True)
        # Swap in the caching manager, keeping what Master registered (TermLog) in it.
        manager = HookCachingAddonManager(self)
        swap_addon_manager(self, manager)
        self.router = SynapseRouter()
        manager.add(*lean_addons(self.router, on_started))
        drop_legacy_log_events(self)  # the deprecated `add_log` hook, for scripts not loaded here

    def configure_router(self) -> None:
        """Give the router every option once they are final, as mitmdump's ScriptLoader does for
        a script (a built-in addon is only told about options set after it was added). A
        router_config already applied by `--set` is not loaded a second time."""
        keys = set(self.options.keys())  # type: ignore[no-untyped-call]
        if self.router.engine is not None:
            keys.discard("router_config")
        self.addons.invoke_addon_sync(self.router, hooks.ConfigureHook(keys))


def serve(argv: Sequence[str], slot: ChildSlot | None = None, applied: str | None = None) -> int:
    """Run one router process until SIGINT/SIGTERM (`slot`: as a child of `--processes N`,
    `applied`: the file holding the configuration its parent applied, read instead of the
    operator's router_config); raises SystemExit(1) on a start-up error."""
    try:
        factory = loop_factory(chosen_event_loop(argv, os.environ))
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if slot is None:
        asyncio.run(_serve(argv, None), loop_factory=factory)
        return 0
    die_with_parent(slot.parent_pid)
    # SIGHUP (reload) may be forwarded before the router installs its handler: do not die of it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(_serve(argv, slot, applied), loop_factory=factory)
    return 0


async def _serve(argv: Sequence[str], slot: ChildSlot | None, applied: str | None = None) -> None:
    _configure_logging()
    debug.register_info_dumpers()  # type: ignore[no-untyped-call]
    opts = options.Options()
    when_started: list[Callable[[], None]] = []

    def started() -> None:
        for callback in when_started:
            callback()

    lean = LeanMaster(opts, on_started=started)
    parser = make_parser(opts)
    args = parser.parse_args(argv)
    if slot is not None:
        when_started.append(ready_signal(slot))
        if slot.channel_fd >= 0:
            lean.router.metrics_listener.channel = served_socket(slot.channel_fd)
    else:
        when_started.append(sdnotify.ready)  # systemd Type=notify
        if args.replace is not None:
            when_started.append(replace(args.replace))
    load: Callable[[str], RouterConfig] = load_config
    if applied is not None:
        load = applied_loader(router_config_path(argv), applied)
        lean.router.configuration.load_file = load
    loop = asyncio.get_running_loop()
    if loop_name(loop) != DEFAULT_EVENT_LOOP:
        log.info(f"{PROG}: on {loop_name(loop)}'s event loop")
    try:
        apply_options(opts, parser, args, load)
        if isinstance(loop, SharedPorts):
            loop.share(opts, slot, lean.router)
        lean.configure_router()
        if args.options:
            optmanager.dump_defaults(opts, sys.stdout)
            return
        if args.commands:
            lean.commands.dump()
            return
    except exceptions.OptionsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(1)

    on_signal(signal.SIGINT, lean.shutdown)
    on_signal(signal.SIGTERM, lean.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    loop.set_exception_handler(_ignore_cancelled)
    await lean.run()


def _configure_logging() -> None:
    """As mitmproxy.tools.main.run does."""
    logging.getLogger().setLevel(logging.DEBUG)
    for name, level in (("tornado", logging.WARNING), ("asyncio", logging.WARNING), ("hpack", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("quic").setLevel(logging.WARNING)


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """At shutdown asyncio.run cancels the handlers of connections still open; Python 3.12.1's
    StreamReaderProtocol then reports the CancelledError as "Exception in callback" (fixed in
    later CPython releases). That is no error; anything else is reported as usual. (While
    mitmproxy runs, its own handler is installed and this one is restored afterwards.)"""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)
