"""`synapse-router`: a lean launcher that embeds mitmproxy with only what a reverse router needs.

    synapse-router --mode reverse:http://MAIN:8008@8080 --set router_config=config/router.yaml
    synapse-router --processes 4 --mode reverse:http://MAIN:8008@8080 --set router_config=...

It takes mitmdump's command line (mitmproxy's own `cmdline.mitmdump` parser, so `--mode`/`-m`,
`--set NAME=VALUE`, `-q`, `-v`, `--listen-host`, `-p`, `--options`, a trailing flow filter, ...
mean what they mean to mitmdump) minus `-s`: the router is built in. Exits 1 with the message on a
bad option or `router_config`, prints each flow unless `-q`, and stops cleanly on SIGINT/SIGTERM.

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
router sets `block_global=false` anyway; its `name in ctx.options` guards skip absent options,
as for `anticache`/`anticomp`), AntiCache, AntiComp, StripDnsHttpsRecords, DnsResolver (DNS
mode), UpdateAltSvc (rewrites `Alt-Svc`, which Synapse does not send), MapRemote/MapLocal,
ModifyBody/ModifyHeaders, StickyCookie/StickyAuth, ProxyAuth, UpstreamAuth, Onboarding,
ClientPlayback/ServerPlayback, Save/SaveHar (`-w`), ScriptLoader (`-s`), ReadFile (`-r`),
KeepServing, Browser, Comment, Cut, Export, CommandHistory. An option of a left-out addon is an
error on the command line ("Unknown option(s)"), never silently ignored, except the value the
router would set anyway (`--set block_global=false`, `anticache=false`, `anticomp=false`, as in
a mitmdump command line); in `~/.mitmproxy/config.yaml`, which mitmdump also reads, a warning.

Many processes (`--processes N`, Linux): a parent starts N children (this module with a hidden
`--launcher-child` flag), each a complete router on the same port, forwards SIGINT, SIGTERM and
SIGHUP (configuration reload) to them, restarts none, and exits when they have all exited (with
the first non-zero status, else 0). Process 1 is started alone first, so a bad configuration
is reported once; the others start when it serves, and if one of them cannot start, all are
stopped (later, the survivors of a crash keep serving). Routing needs no coordination: rendezvous
hashing over the same configuration sends a user (or room) to the same worker from every
process. Each process has its own identity cache (`whoami.redis` shares one), health checks and
balance state (`round_robin`/`least_conn` are per process). A child asks the kernel to SIGTERM
it if the parent dies (PR_SET_PDEATHSIG), so a SIGKILLed parent leaves no orphan.

Sharing the port. mitmproxy's `AsyncioServerInstance.listen` calls
`asyncio.start_server(handler, host, port)` without `reuse_port`. A child runs on an event loop
of its own class (SharedPortLoop) whose `create_server` adds `reuse_port=True` for the proxy's
listen ports, so each child binds its own SO_REUSEPORT socket and no mitmproxy class is changed
(a `ServerInstance` subclass registers itself for its mode and mitmproxy refuses a second
`reverse` class; replacing `ReverseInstance.listen` would patch mitmproxy process-wide).
Against the alternative, one socket bound by the parent and inherited by every child (one
shared accept queue): with SO_REUSEPORT the kernel spreads new connections evenly by a hash of
the 4-tuple and wakes one process per connection, with no thundering herd; but it does not look
at load (a busy child still gets its share, where a shared queue lets the idle one accept
first), connections still waiting in a child's own queue when that child exits are reset, and
any other process of the same user that sets SO_REUSEPORT on the port would silently share it.
A keep-alive connection stays on one process either way. Metrics (`metrics.listen`, port P):
process i (1-based) serves its own on P + i, and the parent serves on P all of them merged, each
sample labelled `process="i"` (synapse_router/processmetrics.py), so one scrape target covers N
processes; pick P outside the ephemeral port range (9105 is) with the next N ports free. The
parent finds P in the `--set router_config=` file (again on SIGHUP).

mitmproxy internals this depends on (mitmproxy 12.3): `Master` (its `addons`, `options`,
`with_termlog`, `_legacy_log_events`, and `run()` looking up the "errorcheck" addon and calling its `finish()` after
the last start-up check); AddonManager's `chain`, `lookup`, `_iter_hooks()` and the
`_configure_all` receiver it connects to `options.changed`; the addon classes above;
`tools.cmdline.mitmdump` and `tools.main.process_options` (mitmdump's argument handling); and
the proxy's listening sockets being made by `loop.create_server(factory, host, port)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master, options, optmanager
from mitmproxy.addons import core, disable_h2c, dumper, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main
from mitmproxy.utils import debug

from .addon import REQUIRED_OPTIONS, SynapseRouter
from .config import ConfigError, load_config
from .metrics import MetricsServer, parse_listen
from .processmetrics import ProcessMetrics
from .signals import on_signal

log = logging.getLogger(__name__)

PROG = "synapse-router"
CHILD_FLAG = "--launcher-child"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ChildSlot:
    """Who a child process is: `index` of `count` (0-based), its parent, and the pipe it
    writes one byte to once it serves."""

    index: int
    count: int
    parent_pid: int
    ready_fd: int

    def flag(self) -> str:
        return f"{CHILD_FLAG}={self.index}/{self.count}/{self.parent_pid}/{self.ready_fd}"

    @classmethod
    def parse(cls, text: str) -> ChildSlot:
        try:
            index, count, parent_pid, ready_fd = (int(part) for part in text.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected INDEX/COUNT/PARENT_PID/FD, got {text!r}") from None
        return cls(index, count, parent_pid, ready_fd)

    @property
    def label(self) -> str:
        return f"process {self.index + 1}/{self.count}"


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
    OptionsError propagates, any other exception is logged as "Addon error". The lists are
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
            funcs = self._hooks[event.name] = [f for a in self.chain for _, f in self._iter_hooks(a, event)]
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
                log.error(f"Addon error: {e}", exc_info=True)


class LeanMaster(master.Master):
    """mitmproxy's Master with the lean addon chain; `on_started` is called once it serves."""

    def __init__(self, opts: options.Options, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(opts, with_termlog=True)
        # Swap in the caching manager, keeping what Master registered (TermLog) in it.
        plain = self.addons
        self.options.changed.disconnect(plain._configure_all)
        self.addons = HookCachingAddonManager(self)
        self.addons.chain, self.addons.lookup = plain.chain, plain.lookup
        self.router = SynapseRouter()
        self.addons.add(*lean_addons(self.router, on_started))
        # The deprecated `add_log` hook, for third-party scripts this launcher does not load:
        # per log record it costs a hook dispatch and a byte in the event loop's self-pipe.
        self._legacy_log_events.uninstall()

    def configure_router(self) -> None:
        """Give the router every option once they are final, as mitmdump's ScriptLoader does for
        a script (a built-in addon is only told about options set after it was added). A
        router_config already applied by `--set` is not loaded a second time."""
        keys = set(self.options.keys())  # type: ignore[no-untyped-call]
        if self.router.engine is not None:
            keys.discard("router_config")
        self.addons.invoke_addon_sync(self.router, hooks.ConfigureHook(keys))


class SharedPortLoop(asyncio.SelectorEventLoop):
    """The event loop of a `--processes` child. Listening sockets on `shared_ports` get
    SO_REUSEPORT, so N children can serve one port; the router's metrics listener moves to
    port + `metrics_offset` (process i serves its own metrics on P + i)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_ports: frozenset[int] = frozenset()
        self.metrics_offset = 0
        self.metrics_port: Callable[[], int | None] = lambda: None

    async def create_server(
        self, protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any
    ) -> asyncio.Server:
        if port and port in self.shared_ports:
            kwargs["reuse_port"] = True
        elif port and self.metrics_offset and port == self.metrics_port():
            port, configured = port + self.metrics_offset, port
            log.info(f"{PROG}: metrics of this process on port {port} ({configured} + {self.metrics_offset})")
        return await super().create_server(protocol_factory, host, port, **kwargs)


def make_parser(opts: options.Options) -> argparse.ArgumentParser:
    """mitmdump's parser over the options the lean addons define (absent ones have no flag)."""
    parser = cmdline.mitmdump(opts)  # type: ignore[no-untyped-call]
    parser.prog = PROG
    parser.usage = "%(prog)s [--processes N] [options] [filter]"
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="Serve the listen port from N router processes (Linux SO_REUSEPORT). Default 1.",
    )
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _configure_logging() -> None:
    """As mitmproxy.tools.main.run does."""
    logging.getLogger().setLevel(logging.DEBUG)
    for name, level in (("tornado", logging.WARNING), ("asyncio", logging.WARNING), ("hpack", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("quic").setLevel(logging.WARNING)


def _apply_options(opts: options.Options, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--set, ~/.mitmproxy/config.yaml and the flags, in mitmdump's order. Raises OptionsError."""
    _check_router_config(args.setoptions)
    # -q/-v before --set: mitmdump loads the router script after the flags have quietened the log.
    if args.quiet or args.verbose:
        opts.update(termlog_verbosity="debug" if args.verbose else "error")  # type: ignore[no-untyped-call]
    opts.set(*args.setoptions, defer=True)
    given = {spec.split("=", 1)[0] for spec in args.setoptions}
    for name in sorted(given & set(opts.deferred) & set(REQUIRED_OPTIONS)):
        value = str(REQUIRED_OPTIONS[name][0]).lower()
        if _last_value(args.setoptions, name).lower() == value:
            # What the router would set anyway; without the addon that defines it, it is already so.
            del opts.deferred[name]
            log.info(f"{PROG}: {name}={value} holds without the addon that defines it; not loaded")
    unknown = sorted(given & set(opts.deferred))
    if unknown:
        raise exceptions.OptionsError(  # type: ignore[no-untyped-call]
            f"Unknown option(s): {', '.join(unknown)} ({PROG} loads only the addons a reverse router needs; "
            f"`{PROG} --options` lists its options)"
        )
    optmanager.load_paths(opts, os.path.join(opts.confdir, "config.yaml"), os.path.join(opts.confdir, "config.yml"))
    if opts.deferred:
        log.warning(f"{PROG}: ignoring option(s) of addons it does not load: {', '.join(sorted(opts.deferred))}")
        opts.deferred.clear()
    mitmproxy_main.process_options(parser, opts, args)  # type: ignore[no-untyped-call]
    if args.filter_args:
        log.info(f'Only processing flows that match "{" & ".join(args.filter_args)}"')
        opts.update(dumper_filter=" ".join(args.filter_args))  # type: ignore[no-untyped-call]


def _last_value(specs: Sequence[str], name: str) -> str:
    """The value the last `--set name[=value]` gives (a bare boolean name means true)."""
    value = ""
    for spec in specs:
        key, sep, text = spec.partition("=")
        if key == name:
            value = text if sep else "true"
    return value


def _metrics_listen(argv: Sequence[str]) -> str | None:
    """`metrics.listen` of the router_config that `--set` gives on a command line, if any (a
    bad file is the children's to report)."""
    specs = []
    arguments = iter(argv)
    for arg in arguments:
        if arg == "--set":
            specs.append(next(arguments, ""))
        elif arg.startswith("--set="):
            specs.append(arg.removeprefix("--set="))
    path = _last_value(specs, "router_config")
    if not path:
        return None
    try:
        return load_config(path).metrics_listen
    except ConfigError:
        return None


def _check_router_config(specs: Sequence[str]) -> None:
    """Report a bad router_config before it is applied: the router's own OptionsError would be
    the same, but mitmproxy's rollback re-configures the router first, which logs misleading
    lines ("no router_config set", "loaded None")."""
    paths = [spec.split("=", 1)[1] for spec in specs if spec.startswith("router_config=")]
    if paths and paths[-1]:
        try:
            load_config(paths[-1])
        except ConfigError as e:
            raise exceptions.OptionsError(f"router_config {paths[-1]}: {e}") from e  # type: ignore[no-untyped-call]


def _listen_ports(opts: options.Options) -> frozenset[int]:
    ports = set()
    for spec in opts.mode:
        port = ProxyMode.parse(spec).listen_port(opts.listen_port)
        if not port:
            raise exceptions.OptionsError(  # type: ignore[no-untyped-call]
                f"--processes needs a fixed listen port, not {port} (mode {spec}; e.g. reverse:URL@8080)"
            )
        ports.add(port)
    return frozenset(ports)


def _metrics_port(router: SynapseRouter) -> int | None:
    listen = router.engine.config.metrics_listen if router.engine is not None else None
    return parse_listen(listen)[1] if listen else None


async def _serve(argv: Sequence[str], slot: ChildSlot | None) -> None:
    _configure_logging()
    debug.register_info_dumpers()  # type: ignore[no-untyped-call]
    opts = options.Options()
    lean = LeanMaster(opts, on_started=_ready_signal(slot) if slot is not None else None)
    parser = make_parser(opts)
    args = parser.parse_args(argv)
    loop = asyncio.get_running_loop()
    try:
        _apply_options(opts, parser, args)
        if slot is not None and isinstance(loop, SharedPortLoop):
            loop.shared_ports = _listen_ports(opts)
            loop.metrics_offset = slot.index + 1
            loop.metrics_port = lambda: _metrics_port(lean.router)
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


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """At shutdown asyncio.run cancels the handlers of connections still open; Python 3.12.1's
    StreamReaderProtocol then reports the CancelledError as "Exception in callback" (fixed in
    later CPython releases). That is no error; anything else is reported as usual. (While
    mitmproxy runs, its own handler is installed and this one is restored afterwards.)"""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def _ready_signal(slot: ChildSlot) -> Callable[[], None]:
    def ready() -> None:
        log.info(f"{PROG}: {slot.label} (pid {os.getpid()}) serving")
        with contextlib.suppress(OSError):
            os.write(slot.ready_fd, b"1")
            os.close(slot.ready_fd)

    return ready


def serve(argv: Sequence[str], slot: ChildSlot | None = None) -> int:
    """Run one router process until SIGINT/SIGTERM; raises SystemExit(1) on a start-up error."""
    if slot is None:
        asyncio.run(_serve(argv, None))
        return 0
    _die_with_parent(slot.parent_pid)
    # SIGHUP (reload) may be forwarded before the router installs its handler: do not die of it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(_serve(argv, slot), loop_factory=SharedPortLoop)
    return 0


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(f"{PROG}: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


@dataclass
class Child:
    slot: ChildSlot
    proc: subprocess.Popen[bytes]
    ready_read: int


class MergedMetricsServer:
    """The parent's metrics endpoint (the merge of its processes'), on a thread and event loop
    of its own: the parent's main thread waits for its children."""

    def __init__(self, count: int, warn: Callable[[str], None]) -> None:
        self.count = count
        self.warn = warn
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="merged-metrics", daemon=True)
        self.thread.start()
        self._server: MetricsServer | None = None
        self._source: ProcessMetrics | None = None

    def serve(self, listen: str | None) -> None:
        """Serve the merged metrics on `listen` (None: not at all) from now on."""
        asyncio.run_coroutine_threadsafe(self._serve(listen), self.loop)

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError):  # the parent exits anyway; the thread is a daemon
            asyncio.run_coroutine_threadsafe(self._serve(None), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _serve(self, listen: str | None) -> None:
        if self._server is not None and self._server.listen == listen:
            return
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._source is not None:
            await self._source.close()
            self._source = None
        if listen is None:
            return
        host, port = parse_listen(listen)
        source = ProcessMetrics(host, port, self.count)
        server = MetricsServer(source.render, listen)
        try:
            await server.start()
        except OSError as e:
            self.warn(f"merged metrics of the processes not served on {listen}: {e.strerror or e}")
            await source.close()
            return
        self._server, self._source = server, source


class Supervisor:
    """The `--processes N` parent: starts the children, forwards signals, reaps them, and
    serves their merged metrics."""

    def __init__(self, argv: Sequence[str], count: int, quiet: bool) -> None:
        self.argv = list(argv)
        self.count = count
        self.quiet = quiet
        self.children: dict[int, Child] = {}  # pid -> child, while running
        self.stopping = False
        self.status = 0
        self.metrics: MergedMetricsServer | None = None

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        elif self.metrics is not None:
            self.metrics.serve(_metrics_listen(self.argv))
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _start(self, index: int) -> Child:
        ready_read, ready_write = os.pipe()
        slot = ChildSlot(index, self.count, os.getpid(), ready_write)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synapse_router.launcher", *self.argv, slot.flag()], pass_fds=(ready_write,)
            )
        finally:
            os.close(ready_write)
        child = Child(slot, proc, ready_read)
        self.children[proc.pid] = child
        return child

    @staticmethod
    def _wait_ready(child: Child) -> bool:
        """True once the child serves; False if it exited first (its write end closed)."""
        try:
            return os.read(child.ready_read, 1) == b"1"
        finally:
            os.close(child.ready_read)

    def _reap(self) -> None:
        """Wait for any child to exit (without reaping it behind Popen's back), then reap it."""
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            self.children.clear()
            return
        if info is None or info.si_pid not in self.children:
            return
        child = self.children.pop(info.si_pid)
        code = child.proc.wait()
        code = 128 - code if code < 0 else code
        if code and not self.status:
            self.status = code
        if not self.stopping and self.children:
            self.say(f"{child.slot.label} (pid {child.proc.pid}) exited with {code}; {len(self.children)} left")

    def run(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)
        try:
            # The first process alone: a bad configuration is reported once, not N times.
            if self._wait_ready(self._start(0)) and not self.stopping:
                self.metrics = MergedMetricsServer(self.count, self.warn)
                self.metrics.serve(_metrics_listen(self.argv))
                rest = [self._start(i) for i in range(1, self.count)]
                started = [self._wait_ready(child) for child in rest]  # every pipe read and closed
                if self.stopping:
                    pass
                elif all(started):
                    pids = ", ".join(str(pid) for pid in self.children)
                    self.say(f"{self.count} processes serving (pids {pids})")
                else:  # all or nothing at start-up; later, the survivors keep serving
                    self.say("a process failed to start: stopping the others")
                    self._forward(signal.SIGTERM, None)
            while self.children:
                self._reap()
            return self.status
        finally:
            for pid in list(self.children):  # only on an unexpected error in the parent itself
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for child in list(self.children.values()):
                child.proc.wait()
            if self.metrics is not None:
                self.metrics.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `synapse-router`."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--processes", type=int, default=1)
    pre.add_argument(CHILD_FLAG, type=ChildSlot.parse, default=None)
    known, _ = pre.parse_known_args(arguments)
    if known.launcher_child is not None:
        child_argv = [a for a in arguments if not a.startswith(CHILD_FLAG)]
        return serve(child_argv, known.launcher_child)
    if known.processes < 1:
        print(f"{PROG}: --processes must be at least 1", file=sys.stderr)
        return 2
    if known.processes == 1:
        return serve(arguments)
    if not sys.platform.startswith("linux"):
        print(f"{PROG}: --processes needs Linux (SO_REUSEPORT load balancing)", file=sys.stderr)
        return 2
    rest = _without_processes(arguments)
    quiet = "-q" in rest or "--quiet" in rest
    return Supervisor(rest, known.processes, quiet).run()


def _without_processes(arguments: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in arguments:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
