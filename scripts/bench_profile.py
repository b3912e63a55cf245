"""Where one short request's and one long-poll's CPU, and one held long-poll's memory, go:
a breakdown by part (mitmproxy's layers and events, the router's hooks, framing, the
router-sent client, logging, metrics, the isolation wrapper), rerunnable after a change.

    .venv/bin/python scripts/bench_profile.py cpu [--launchers lean mitmdump] [--seconds 15]
    .venv/bin/python scripts/bench_profile.py memory [--launchers lean mitmdump] [--held 1000]
    .venv/bin/python scripts/bench_profile.py all

Upstreams: scripts/bench_burst.py's asyncio stand-ins (main answering whoami for every
`syt_bench_<i>` token, two sync workers answering a request with `timeout=<ms>` after that long).
The router (`lean`: synapse-router, `lean-uvloop`: synapse-router --event-loop uvloop,
`mitmdump`: mitmdump -s addons/router.py) has the two
workers as its sync pool and the default limits, `flow_detail=0`, the access log on (logfmt, to
a file) so that its cost is in the profile, as a production router's would be.

cpu: py-spy (`record --nonblocking --format raw --full-filenames`, idle samples left out, so
samples are CPU, not wall time) samples the proxy while
  short     wrk -t1 -c16 sends `GET /_matrix/client/v3/sync?since=s1&timeout=0` (a sync answered
            at once, routed by user from a warm identity cache) for `--seconds`;
  longpoll  `--longpolls` long-polls (`timeout=--hold` ms, new connection each, 50 warm tokens)
            opened evenly over `--spread` s, each held by the worker and then answered: its
            whole life (accept, route, router-sent exchange, hold, answer, close).
CPU per request is the proxy's own utime+stime (/proc) over the phase / requests; each part's
share of py-spy's samples times that gives microseconds per request. Every sample is given to
the innermost frame that belongs to a part ("self" table; standard-library helpers such as
re, enum, dataclasses, functools, json are charged to their caller), and, in the second table,
to every part on its stack ("inclusive": a hook's figure includes what it calls). Samples are
statistics: on this shared machine a part's share moves by about +-1 point between runs; the
total instruction count of a request (scripts/bench_callgrind.py) is the repeatable figure.

memory: the proxy runs under tracemalloc (10 frames) through this script (`_traced`), which on a
real-time signal (SIGRTMIN + 5; mitmproxy takes SIGUSR1 and SIGUSR2) writes a snapshot and a
count of live objects by type (gc). Snapshots are taken with the proxy idle and warm, then with
`--held` long-polls held by the workers (not waited for afterwards); the difference, per held
long-poll, is broken down by the part whose code allocated it (innermost frame, as above), and
the object types each held long-poll adds are listed. A second run without tracemalloc gives
the RSS growth per held long-poll (tracemalloc's own bookkeeping inflates RSS). Kernel socket
buffers are not in either figure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_burst import (  # noqa: E402
    SYNC_PATH,
    TOKEN_PREFIX,
    Processes,
    Upstreams,
    free_port,
    raise_nofile,
    upstreams,
    wait_port,
)
from scripts.procstat import cpu_seconds, rss_kib  # noqa: E402
from scripts.wrkstat import parse_wrk  # noqa: E402
from tests.harness import unpaced  # noqa: E402

BIN = Path(sys.executable).parent
PY_SPY = BIN / "py-spy"
SNAPSHOT_SIGNAL = signal.SIGRTMIN + 5  # mitmproxy dumps its state on SIGUSR1 and SIGUSR2

# (substring of a frame's file, or of "file:function", part). First match wins, innermost frame first.
PARTS: list[tuple[str, str]] = [
    ("synapse_router/observability/accesslog.py", "router: access log formatting"),
    ("synapse_router/observability/metrics.py", "router: metrics"),
    ("prometheus_client/", "router: metrics"),
    ("synapse_router/addons/isolation.py", "router: isolation wrapper"),
    ("synapse_router/edge/upstream_client.py", "router-sent client"),
    ("synapse_router/edge/connect.py", "router-sent client"),
    ("synapse_router/edge/relay.py", "router-sent client"),
    ("synapse_router/compat/http1.py", "framing (mitmproxy http1, h11 readers)"),
    ("mitmproxy/net/http/", "framing (mitmproxy http1, h11 readers)"),
    ("/h11/", "framing (mitmproxy http1, h11 readers)"),
    ("synapse_router/routing/", "router: routing logic (pure)"),
    ("synapse_router/identity/", "router: identity (tokens, cache)"),
    ("synapse_router/edge/", "router: edge checks (wellformed, limits, client address)"),
    ("synapse_router/launcher/lean.py", "mitmproxy: hook dispatch"),
    ("synapse_router/addons/", "router hook: {module}"),
    ("synapse_router/addon.py", "router hook: addon (SynapseRouter)"),
    ("synapse_router/", "router: other"),
    ("mitmproxy/addonmanager.py", "mitmproxy: hook dispatch"),
    ("mitmproxy/hooks.py", "mitmproxy: hook dispatch"),
    ("mitmproxy/addons/script.py", "mitmproxy: hook dispatch"),
    ("mitmproxy/utils/typecheck.py", "mitmproxy: __debug__ type checks"),
    ("mitmproxy/addons/", "mitmproxy: built-in addons"),
    ("mitmproxy/log.py", "logging"),
    ("/logging/", "logging"),
    ("mitmproxy/proxy/layers/http/", "mitmproxy: HTTP layer"),
    ("mitmproxy/proxy/server.py", "mitmproxy: connection handler (server.py)"),
    ("mitmproxy/proxy/", "mitmproxy: layers, events, commands"),
    ("mitmproxy/http.py", "mitmproxy: flow and message objects"),
    ("mitmproxy/flow.py", "mitmproxy: flow and message objects"),
    ("mitmproxy/connection.py", "mitmproxy: flow and message objects"),
    ("mitmproxy/coretypes/", "mitmproxy: flow and message objects"),
    ("mitmproxy/", "mitmproxy: other"),
    ("/asyncio/", "event loop, sockets (asyncio)"),
    ("/selectors.py", "event loop, sockets (asyncio)"),
    ("/socket.py", "event loop, sockets (asyncio)"),
    ("/ssl.py", "event loop, sockets (asyncio)"),
]
# Library helpers charged to their caller.
TRANSPARENT = re.compile(
    r"/python3\.\d+/(re/|enum|dataclasses|functools|contextlib|typing|abc|copy|weakref|json/|collections/|"
    r"_weakrefset|ipaddress|urllib/|string|hashlib|hmac|base64|datetime|inspect|types|operator|"
    r"traceback|linecache|uuid|posixpath|os\.py)|/site-packages/(idna|wsproto|urwid|publicsuffix2)/|^<"
)
# Parts whose figure in the inclusive table includes what they call (substring -> label).
INCLUSIVE: list[tuple[str, str]] = [
    ("mitmproxy/proxy/server.py", "mitmproxy connection handler (everything on a connection's task)"),
    ("mitmproxy/proxy/layers/http/", "mitmproxy HTTP layer"),
    ("mitmproxy/addonmanager.py:", "every hook: dispatch and the addons' code"),
    ("synapse_router/addons/isolation.py", "router: isolation wrapper"),
    ("synapse_router/addons/", "router hook: {module}"),
    ("synapse_router/edge/upstream_client.py", "router-sent client"),
    ("/h11/", "h11"),
    ("mitmproxy/net/http/http1/", "mitmproxy http1 head parsing/assembly"),
    ("synapse_router/observability/accesslog.py", "access log formatting"),
    ("/logging/", "logging (stdlib)"),
    ("synapse_router/observability/metrics.py", "metrics (router's calls)"),
    ("mitmproxy/utils/typecheck.py", "mitmproxy __debug__ type checks (typecheck.py)"),
    ("mitmproxy/http.py:__post_init__", "mitmproxy Request/Response __post_init__ (debug only)"),
    ("mitmproxy/http.py:__init__", "mitmproxy Request/Response construction"),
]

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def part_of(path: str, func: str, rules: Sequence[tuple[str, str]]) -> str | None:
    where = f"{path}:{func}"
    for needle, label in rules:
        if needle in where:
            if "{module}" in label:
                return label.format(module=Path(path).stem)
            return label
    return None


def classify_stack(frames: Sequence[tuple[str, str]]) -> str:
    """The part a sample (frames outermost first, as (file, function)) is charged to."""
    for path, func in reversed(frames):
        if TRANSPARENT.search(path):
            continue
        found = part_of(path, func, PARTS)
        if found is not None:
            return found
        return "other (python: " + Path(path).name + ")"
    return "other"


def inclusive_parts(frames: Sequence[tuple[str, str]]) -> set[str]:
    found = set()
    for path, func in frames:
        label = part_of(path, func, INCLUSIVE)
        if label is not None:
            found.add(label)
    return found


def parse_raw(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) output: `frame;frame;... COUNT`, frames `func (file:line)`."""
    samples = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = FRAME.match(frame)
            frames.append((match["file"], match["func"]) if match else (frame, ""))
        samples.append((frames, int(count)))
    return samples


@dataclass
class CpuProfile:
    launcher: str
    workload: str
    requests: int
    cpu_seconds: float
    samples: int
    self_parts: dict[str, int] = field(default_factory=dict)
    inclusive: dict[str, int] = field(default_factory=dict)
    load: str = ""

    @property
    def us_per_request(self) -> float:
        return self.cpu_seconds * 1e6 / max(self.requests, 1)


def breakdown(launcher: str, workload: str, requests: int, cpu: float, raw: str, load: str) -> CpuProfile:
    profile = CpuProfile(launcher, workload, requests, cpu, 0, load=load)
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, count in parse_raw(raw):
        profile.samples += count
        selfs[classify_stack(frames)] += count
        for label in inclusive_parts(frames):
            incl[label] += count
    profile.self_parts = dict(selfs)
    profile.inclusive = dict(incl)
    return profile


# --------------------------------------------------------------------------- proxies


def proxy_command(launcher: str, up: Upstreams, port: int, config: Path, traced: bool = False) -> list[str]:
    base = [str(BIN / "synapse-router")] if launcher.startswith("lean") else [str(BIN / "mitmdump")]
    if launcher == "lean-uvloop":
        base += ["--event-loop", "uvloop"]
    if launcher == "mitmdump":
        base += ["-s", str(ROOT / "addons" / "router.py")]
    if traced:
        base = [sys.executable, __file__, "_traced", launcher, *base[1:]]
    return [
        *base,
        "--mode", f"reverse:{up.main}@127.0.0.1:{port}",
        "--set", f"router_config={config}",
        "--set", "flow_detail=0",
        "--set", "termlog_verbosity=warn",
    ]  # fmt: skip


def router_config(up: Upstreams, work: Path, launcher: str) -> Path:
    config = work / f"router-{launcher}.yaml"
    access = {"enabled": True, "format": "logfmt", "path": str(work / f"access-{launcher}.log")}
    # Health checks hourly: background work does not depend on how long a phase takes.
    doc = {"workers": {"sync": up.workers}, "access_log": access, "health": {"interval": 3600}}
    config.write_text(json.dumps(unpaced(doc)))
    return config


@contextlib.contextmanager
def proxy(
    launcher: str, up: Upstreams, work: Path, procs: Processes, traced: bool = False, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    cmd = proxy_command(launcher, up, port, router_config(up, work, launcher), traced)
    log = work / f"{launcher}-{port}.log"
    proc = procs.start(cmd, log, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        wait_port(port, proc, timeout=600 if traced else 120)
        yield proc, port
    finally:
        procs.stop(proc)


def poll_clients(port: int, total: int, spread: float, tokens: int, hold_ms: int, wait: float, out: Path) -> Any:
    """scripts/bench_burst.py's client process: `total` long-polls, one connection each."""
    t0 = time.time() + 0.5
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_burst.py"), "_client", str(port), "0", "1", str(total),
        str(spread), str(tokens), str(hold_ms), repr(t0), str(wait), str(out),
    ]  # fmt: skip
    return subprocess.Popen(cmd)


def finished_polls(client: Any, out: Path) -> list[dict[str, Any]]:
    if client.wait() != 0:
        raise RuntimeError(f"long-poll client exited with {client.returncode}")
    results: list[dict[str, Any]] = json.loads(out.read_text())
    failed = [r for r in results if r["status"] != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} long-polls failed, e.g. {failed[0]}")
    return results


def warm(port: int, tokens: int, work: Path, wait: float = 60) -> None:
    """Every token of the load once (whoami, identity cache), answered at once."""
    out = work / "warm.json"
    finished_polls(poll_clients(port, tokens, 0.5, tokens, 1, wait, out), out)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- cpu


def py_spy(pid: int, seconds: float, out: Path, rate: int) -> subprocess.Popen[bytes]:
    cmd = [
        str(PY_SPY), "record", "--pid", str(pid), "--nonblocking", "--format", "raw", "--full-filenames",
        "--rate", str(rate), "--duration", str(max(1, round(seconds))), "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_short(launcher: str, up: Upstreams, work: Path, procs: Processes, args: argparse.Namespace) -> CpuProfile:
    with proxy(launcher, up, work, procs) as (proc, port):
        warm(port, 1, work)
        url = f"http://127.0.0.1:{port}{SYNC_PATH}?since=s1&timeout=0"
        wrk = [
            "wrk",
            "-t1",
            "-c16",
            f"-d{args.seconds}s",
            "--timeout",
            "60s",  # a loaded machine answers late; the figures are per answered request
            "--latency",
            "-H",
            f"Authorization: Bearer {TOKEN_PREFIX}0",
            url,
        ]
        subprocess.run([*wrk[:3], "-d2s", *wrk[4:]], check=True, capture_output=True)  # warm-up
        raw = work / f"short-{launcher}.raw"
        spy = py_spy(proc.pid, args.seconds, raw, args.rate)
        cpu0 = cpu_seconds(proc.pid)
        result = subprocess.run(wrk, check=True, capture_output=True, text=True).stdout
        cpu = cpu_seconds(proc.pid) - cpu0
        _, spy_err = spy.communicate()
        figures = parse_wrk(result, strict=True)
        if figures["non_2xx"] or figures["socket_errors"]:
            raise RuntimeError(f"{launcher}: wrk saw errors: {result}")
        if not raw.exists():
            raise RuntimeError(f"py-spy wrote nothing: {spy_err.decode(errors='replace')[-400:]}")
        return breakdown(launcher, "short", int(figures["requests"]), cpu, raw.read_text(), loadavg())


def profile_longpoll(
    launcher: str, up: Upstreams, work: Path, procs: Processes, args: argparse.Namespace
) -> CpuProfile:
    with proxy(launcher, up, work, procs) as (proc, port):
        warm(port, 50, work)
        out = work / "longpoll.json"
        raw = work / f"longpoll-{launcher}.raw"
        cpu0 = cpu_seconds(proc.pid)
        client = poll_clients(port, args.longpolls, args.spread, 50, args.hold, 120, out)
        spy = py_spy(proc.pid, args.spread + args.hold / 1000 + 3, raw, args.rate)
        results = finished_polls(client, out)
        cpu = cpu_seconds(proc.pid) - cpu0
        _, spy_err = spy.communicate()
        if not raw.exists():
            raise RuntimeError(f"py-spy wrote nothing: {spy_err.decode(errors='replace')[-400:]}")
        return breakdown(launcher, "longpoll", len(results), cpu, raw.read_text(), loadavg())


def cpu_tables(profiles: list[CpuProfile]) -> str:
    lines = []
    for title, attr in (("self", "self_parts"), ("inclusive", "inclusive")):
        labels: list[str] = []
        for p in profiles:
            for label, _ in sorted(getattr(p, attr).items(), key=lambda kv: -kv[1]):
                if label not in labels:
                    labels.append(label)
        heads = [f"{p.workload}, {p.launcher}" for p in profiles]
        lines.append(f"### CPU per request by part ({title}): us per request (% of samples)")
        lines.append("")
        lines.append("| part | " + " | ".join(heads) + " |")
        lines.append("| --- |" + " ---: |" * len(profiles))
        for label in labels:
            cells = []
            for p in profiles:
                n = getattr(p, attr).get(label, 0)
                share = n / max(p.samples, 1)
                cells.append(f"{share * p.us_per_request:.0f} ({100 * share:.1f}%)" if n else "-")
            if title == "self" or any(c != "-" for c in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        total = [f"**{p.us_per_request:.0f}** ({p.samples} samples)" for p in profiles]
        lines.append("| total CPU per request (/proc) | " + " | ".join(total) + " |")
        lines.append("")
    lines.append(
        "requests: " + ", ".join(f"{p.workload} {p.launcher} {p.requests} (load average {p.load})" for p in profiles)
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory


def traced_main(argv: list[str]) -> int:
    """`_traced LAUNCHER ARGS...`: the proxy under tracemalloc; SNAPSHOT_SIGNAL writes a snapshot to
    $BENCH_PROFILE_SNAPSHOT.N (N counting from 1) and live object counts by type beside it."""
    launcher, rest = argv[0], argv[1:]
    from mitmproxy.tools.main import mitmdump  # imported untraced: start-up takes minutes traced
    from synapse_router.launcher.main import main as lean_main

    if launcher == "mitmdump":
        import synapse_router.addon  # noqa: F401  (what the script loads)
    tracemalloc.start(10)
    taken = [0]
    target = os.environ["BENCH_PROFILE_SNAPSHOT"]

    def snapshot(_signum: int, _frame: FrameType | None) -> None:
        taken[0] += 1
        gc.collect()
        counts = collections.Counter(type(o).__module__ + "." + type(o).__qualname__ for o in gc.get_objects())
        tracemalloc.take_snapshot().dump(f"{target}.{taken[0]}")
        Path(f"{target}.{taken[0]}.types.json").write_text(json.dumps(counts))
        Path(f"{target}.{taken[0]}.done").write_text("")

    signal.signal(SNAPSHOT_SIGNAL, snapshot)
    if launcher.startswith("lean"):
        return lean_main(rest)
    sys.argv = ["mitmdump", *rest]
    mitmdump()
    return 0


def take_snapshot(proc: subprocess.Popen[bytes], base: str, n: int) -> tuple[tracemalloc.Snapshot, dict[str, int]]:
    os.kill(proc.pid, SNAPSHOT_SIGNAL)
    done = Path(f"{base}.{n}.done")
    deadline = time.monotonic() + 1200
    while not done.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("no snapshot from the traced proxy")
        time.sleep(0.2)
    types = json.loads(Path(f"{base}.{n}.types.json").read_text())
    return tracemalloc.Snapshot.load(f"{base}.{n}"), types


@dataclass
class MemoryProfile:
    launcher: str
    held: int
    traced_bytes: int
    parts: dict[str, int]
    types: list[tuple[str, float]]
    rss_kib_per_poll: float
    load: str


def held_now(up: Upstreams) -> int:
    with contextlib.suppress(OSError, ValueError):
        return up.held()
    return -1


def hold(port: int, up: Upstreams, work: Path, args: argparse.Namespace) -> tuple[Any, Path]:
    out = work / "held.json"
    client = poll_clients(port, args.held, args.held / 500, 50, args.hold_memory * 1000, 600, out)
    deadline = time.monotonic() + args.hold_memory
    while held_now(up) < args.held:
        if time.monotonic() > deadline or client.poll() is not None:
            raise RuntimeError(f"only {held_now(up)} of {args.held} long-polls held")
        time.sleep(0.2)
    time.sleep(1.0)
    return client, out


def profile_memory(
    launcher: str, up: Upstreams, work: Path, procs: Processes, args: argparse.Namespace
) -> MemoryProfile:
    # Without tracemalloc: RSS growth per held long-poll.
    with proxy(launcher, up, work, procs) as (proc, port):
        warm(port, 50, work)
        time.sleep(1.0)
        before = rss_kib(proc.pid)
        client, out = hold(port, up, work, args)
        during = rss_kib(proc.pid)
        client.kill()  # the answers are the CPU profile's business
        client.wait()
    rss_per_poll = (during - before) / args.held
    # With tracemalloc: who allocated it.
    base = str(work / f"snapshot-{launcher}")
    with proxy(launcher, up, work, procs, traced=True, env={"BENCH_PROFILE_SNAPSHOT": base}) as (proc, port):
        warm(port, 50, work, wait=600)  # tracemalloc slows the proxy several times
        time.sleep(1.0)
        first, types0 = take_snapshot(proc, base, 1)
        client, out = hold(port, up, work, args)
        second, types1 = take_snapshot(proc, base, 2)
        client.kill()  # the answers are the CPU profile's business
        client.wait()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for stat in second.compare_to(first, "traceback"):
        frames = [(f.filename, "") for f in stat.traceback]  # oldest first
        parts[classify_stack(frames)] += stat.size_diff
        total += stat.size_diff
    growth = {name: (types1.get(name, 0) - types0.get(name, 0)) / args.held for name in set(types0) | set(types1)}
    top = sorted(((n, g) for n, g in growth.items() if g >= 0.5), key=lambda kv: -kv[1])[:25]
    return MemoryProfile(launcher, args.held, total, dict(parts), top, rss_per_poll, loadavg())


def memory_tables(profiles: list[MemoryProfile]) -> str:
    lines = ["### Memory per held long-poll by part (tracemalloc): bytes (% of traced growth)", ""]
    labels: list[str] = []
    for p in profiles:
        for label, _ in sorted(p.parts.items(), key=lambda kv: -kv[1]):
            if label not in labels:
                labels.append(label)
    lines.append("| part | " + " | ".join(p.launcher for p in profiles) + " |")
    lines.append("| --- |" + " ---: |" * len(profiles))
    for label in labels:
        cells = []
        for p in profiles:
            size = p.parts.get(label, 0) / p.held
            cells.append(f"{size:,.0f} ({100 * p.parts.get(label, 0) / max(p.traced_bytes, 1):.1f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| **traced, per held long-poll** | "
        + " | ".join(f"**{p.traced_bytes / p.held:,.0f}**" for p in profiles)
        + " |"
    )
    lines.append(
        "| RSS growth per held long-poll, untraced run | "
        + " | ".join(f"{p.rss_kib_per_poll * 1024:,.0f} ({p.rss_kib_per_poll:.1f} KiB)" for p in profiles)
        + " |"
    )
    lines.append("")
    for p in profiles:
        lines.append(f"Live objects added per held long-poll, {p.launcher} (gc-tracked, >= 0.5 each):")
        lines.append("")
        lines.append(", ".join(f"`{name}` {count:.1f}" for name, count in p.types))
        lines.append("")
    lines.append(", ".join(f"{p.launcher}: {p.held} held, load average {p.load}" for p in profiles))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["cpu", "memory", "all"])
    parser.add_argument(
        "--launchers", nargs="+", choices=["lean", "lean-uvloop", "mitmdump"], default=["lean", "mitmdump"]
    )
    parser.add_argument("--workloads", nargs="+", choices=["short", "longpoll"], default=["short", "longpoll"])
    parser.add_argument("--seconds", type=int, default=15, help="wrk seconds of the short workload")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--longpolls", type=int, default=2000, help="long-polls of the longpoll workload")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds over which they are opened")
    parser.add_argument("--hold", type=int, default=5000, help="milliseconds each is held by the worker")
    parser.add_argument("--held", type=int, default=1000, help="long-polls held for the memory snapshot")
    parser.add_argument(
        "--hold-memory", type=int, default=60, help="seconds they are held (the snapshot is taken then)"
    )
    parser.add_argument("--keep", metavar="DIR", help="keep logs, py-spy output and snapshots in DIR")
    args = parser.parse_args(argv)
    if not PY_SPY.exists() or not shutil.which("wrk"):
        sys.exit("needs py-spy in the virtualenv (.venv/bin/pip install py-spy) and wrk (apt-get install wrk)")
    raise_nofile()
    print("$ " + shlex.join([Path(sys.executable).name, "scripts/bench_profile.py", *argv]))
    print(f"{os.cpu_count()} CPUs, load average {loadavg()} at start", flush=True)
    procs = Processes()
    cpu: list[CpuProfile] = []
    memory: list[MemoryProfile] = []
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            with upstreams(work, procs) as up:
                if args.what in ("cpu", "all"):
                    for workload in args.workloads:
                        for launcher in args.launchers:
                            run = profile_short if workload == "short" else profile_longpoll
                            p = run(launcher, up, work, procs, args)
                            print(
                                f"  {workload} {launcher}: {p.us_per_request:.0f} us CPU/request, {p.samples} samples",
                                flush=True,
                            )
                            cpu.append(p)
                if args.what in ("memory", "all"):
                    for launcher in args.launchers:
                        m = profile_memory(launcher, up, work, procs, args)
                        print(
                            f"  memory {launcher}: {m.traced_bytes / m.held:,.0f} traced bytes per held long-poll",
                            flush=True,
                        )
                        memory.append(m)
        finally:
            procs.stop_all()
    print()
    if cpu:
        print(cpu_tables(cpu))
        print()
    if memory:
        print(memory_tables(memory))
    print(f"\nload average {loadavg()} at end")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_traced":
        sys.exit(traced_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
