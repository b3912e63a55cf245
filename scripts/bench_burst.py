"""Reconnect storms: a burst of new long-poll connections through the router under both
launchers and through nginx, on the same loopback upstreams, in one run (issue 13).

    .venv/bin/python scripts/bench_burst.py [--burst 8000] [--spread 2] [--hold 20]
                                            [--steady 2000] [--steady-hold 40] [--tokens 1000]
                                            [--proxies lean,mitmdump,nginx] [--clients 1]

Upstreams: a main process (answers whoami for every `syt_bench_<i>` token, and /health) and two
sync workers, each a small asyncio HTTP/1.1 server in its own process that answers a request
carrying `timeout=<ms>` after that many milliseconds (a Synapse /sync long-poll with nothing to
say) and anything else at once.

Proxies, one at a time, each started afresh for each phase (a reconnect storm hits a freshly
restarted proxy): `lean` is `synapse-router` (one process), `mitmdump` is
`mitmdump -s addons/router.py`, both with the same router configuration (the two workers as the
sync pool, main as the reverse target, default limits) and `--set flow_detail=0`; `nginx` is
Debian's nginx (installed with apt-get if missing, its default service kept from starting) run
with a private prefix on loopback: one worker process, `listen ... backlog=4096` (the router's
default), the sync pool hashed by `Authorization` as the router keys by user, the rest to main.
Every proxy inherits this script's open-files limit, raised to 65536 where allowed (else to the
hard limit; printed with the machine's state).

Phases, per proxy:
1. burst: `--burst` new connections opened within `--spread` seconds, each sending one
   `GET /_matrix/client/v3/sync?since=...&timeout=<hold>` (tokens `syt_bench_<i % tokens>`,
   unknown to the fresh router: whoami calls and its new-token limits take part) and waiting
   for the answer until spread + hold + 240 s (`--wait`). Printed: answered/N, connect errors,
   other failures, when the client made its last connect call and when its last connection
   was established (client side: the client shares the 2 cores too), the slowest connect (SYN
   back-off shows here), time from t0 to the last answer, the proxy's CPU seconds (utime+stime
   from /proc, all its processes) over the phase, its RSS before and at peak (sampled every
   0.1 s), KiB per held long-poll ((peak - before) / N), and the kernel's ListenOverflows /
   ListenDrops meanwhile (machine-wide counters: other work on the machine counts too).
2. steady: `--steady` long-polls opened at an even pace over 10 s, held `--steady-hold` s.
   Printed: when the upstreams held all of them, CPU ms per long-poll over its whole life
   (open, hold, answer), and from then until 1 s before the first answer (the proxy only holds
   them) its CPU % of one core and KiB per held long-poll ((RSS peak - before) / N).

Every process this script starts is stopped by pid at the end. Runs in 5 to 15 minutes (the
busier the machine, the longer the router takes to absorb the burst).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.procstat import cpu_seconds, process_tree, rss_kib  # noqa: E402
from tests.harness import unpaced  # noqa: E402

BIN = Path(sys.executable).parent
NOFILE = 65536  # open-files limit wanted for this script, its clients and the proxies
TOKEN_PREFIX = "syt_bench_"
SYNC_PATH = "/_matrix/client/v3/sync"
STEADY_OPEN_SECONDS = 10.0


def say(message: str) -> None:
    print(f"[bench_burst] {message}", file=sys.stderr, flush=True)


def raise_nofile(wanted: int = NOFILE) -> int:
    """Raise this process's open-files limit towards `wanted` (the hard limit too where allowed,
    else up to the hard limit); return the soft limit now in force. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((wanted, max(wanted, hard)), (min(wanted, hard), hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f}s")


def netstat(*keys: str) -> dict[str, int]:
    """Counters of /proc/net/netstat's TcpExt line (machine-wide)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for i in range(0, len(lines) - 1, 2):
        if lines[i].startswith("TcpExt:"):
            names, values = lines[i].split()[1:], lines[i + 1].split()[1:]
            table = dict(zip(names, (int(v) for v in values), strict=True))
            return {k: table.get(k, 0) for k in keys}
    return dict.fromkeys(keys, 0)


# --------------------------------------------------------------------------- upstream stand-in


@dataclass
class Held:
    """Long-polls an upstream stand-in holds now (`GET /__bench/held` answers it)."""

    count: int = 0


class UpstreamProtocol(asyncio.Protocol):
    """One client connection of the upstream stand-in: HTTP/1.1 keep-alive, requests in order,
    a request with `timeout=<ms>` answered after that long, a closed connection forgotten."""

    def __init__(self, name: str, held: Held) -> None:
        self.name = name
        self.held = held
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.pending: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.held.count -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        while self.pending is None and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            url = urlsplit(target)
            query = parse_qs(url.query)
            if url.path.endswith("/account/whoami"):
                token = headers.get("authorization", "").removeprefix("Bearer ")
                if not token.startswith(TOKEN_PREFIX):
                    self.answer(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown access token"})
                    continue
                n = token.removeprefix(TOKEN_PREFIX)
                self.answer(200, {"user_id": f"@bench{n}:bench.test", "device_id": f"D{n}", "is_guest": False})
            elif "timeout" in query and url.path != "/health":
                delay = int(query["timeout"][0]) / 1000
                body = {"next_batch": "s2_bench", "rooms": {}, "server": self.name}
                self.pending = asyncio.get_running_loop().call_later(delay, self.answer_held, body)
                self.held.count += 1
            elif url.path == "/__bench/held":
                self.answer(200, {"held": self.held.count})
            else:
                self.answer(200, {"server": self.name, "method": method})

    def answer_held(self, body: dict[str, Any]) -> None:
        self.pending = None
        self.held.count -= 1
        self.answer(200, body)
        self.next_request()

    def answer(self, status: int, body: dict[str, Any]) -> None:
        if self.transport is None:
            return
        payload = json.dumps(body).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        self.transport.write(head.encode() + payload)


async def serve_upstream(name: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    held = Held()
    server = await loop.create_server(lambda: UpstreamProtocol(name, held), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


# --------------------------------------------------------------------------- client


class PollProtocol(asyncio.Protocol):
    """One long-poll: send the request on connect, wait for a complete response, close."""

    def __init__(self, request: bytes, done: asyncio.Future[int]) -> None:
        self.request = request
        self.done = done
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.done.done():
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (h.partition(":") for h in head[1:]) if k.lower() == "content-length"), 0)
        if len(self.buffer) >= end + 4 + length:
            self.done.set_result(int(head[0].split(" ", 2)[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before the response: {exc!r}"))


async def one_poll(port: int, index: int, tokens: int, hold_ms: int, t0: float, deadline: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    token = f"{TOKEN_PREFIX}{index % tokens}"
    request = (
        f"GET {SYNC_PATH}?since=s1_bench_{index}&timeout={hold_ms} HTTP/1.1\r\n"
        f"Host: bench.test\r\nAuthorization: Bearer {token}\r\nUser-Agent: bench_burst\r\n\r\n"
    ).encode()
    done: asyncio.Future[int] = loop.create_future()
    started = time.time()
    result: dict[str, Any] = {"start": started - t0, "connect": None, "answer": None, "status": None, "error": None}
    transport = None
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: PollProtocol(request, done), "127.0.0.1", port),
            timeout=max(0.1, deadline - time.time()),
        )
        result["connect"] = time.time() - started
    except (OSError, TimeoutError) as e:
        result["error"] = f"connect: {type(e).__name__}"
        return result
    try:
        result["status"] = await asyncio.wait_for(done, timeout=max(0.1, deadline - time.time()))
        result["answer"] = time.time() - t0
    except TimeoutError:
        result["error"] = "no answer by the deadline"
    except ConnectionError as e:
        result["error"] = f"closed: {str(e)[:80]}"
    finally:
        transport.close()
    return result


async def run_clients(
    port: int, offset: int, stride: int, total: int, spread: float, tokens: int, hold_ms: int, t0: float, wait: float
) -> list[dict[str, Any]]:
    """Open connections offset, offset + stride, ... < total, connection i at t0 + i * spread / total."""
    deadline = t0 + spread + hold_ms / 1000 + wait
    tasks = []
    for i in range(offset, total, stride):
        if (delay := t0 + i * spread / total - time.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_poll(port, i, tokens, hold_ms, t0, deadline)))
    return list(await asyncio.gather(*tasks))


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this run starts, stopped by pid at the end (newest first)."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], int]] = []

    def start(
        self, cmd: Sequence[str], log: Path, stop_signal: int = signal.SIGINT, **kw: Any
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append((proc, stop_signal))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for i, (p, sig) in enumerate(self.procs):
            if p is proc:
                del self.procs[i]
                terminate(p, sig)
                return

    def stop_all(self) -> None:
        while self.procs:
            proc, sig = self.procs.pop()
            terminate(proc, sig)


def terminate(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def ensure_nginx() -> str | None:
    """Debian's nginx, installed with apt-get if missing, without starting its default service."""
    found = nginx_binary()
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    say("apt-get install nginx (its default service is kept from starting)")
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\n# written by bench_burst.py during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx"]
    try:
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    finally:
        if created:
            policy.unlink(missing_ok=True)
    return nginx_binary()


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream sync {{
        hash $http_authorization consistent;
{sync_servers}
        keepalive 256;
    }}
    upstream main {{
        server {main};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /_matrix/client/v3/sync {{
            proxy_pass http://sync;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 600s;
        }}
        location / {{
            proxy_pass http://main;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"""


@dataclass
class Upstreams:
    main: str
    workers: list[str]

    def held(self) -> int:
        """Long-polls the upstreams hold now."""
        total = 0
        for url in [self.main, *self.workers]:
            with urllib.request.urlopen(f"{url}/__bench/held", timeout=5) as response:
                total += int(json.load(response)["held"])
        return total


@dataclass
class Proxy:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(*self.pids())

    def rss(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += rss_kib(pid)
        return total


def start_proxy(kind: str, up: Upstreams, work: Path, procs: Processes, nginx: str | None) -> Proxy:
    port = free_port()
    base = work / f"{kind}-{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind in ("lean", "mitmdump"):
        config = base.with_suffix(".yaml")
        config.write_text(json.dumps(unpaced({"workers": {"sync": up.workers}})))  # JSON is YAML
        launcher = [str(BIN / "synapse-router")] if kind == "lean" else [str(BIN / "mitmdump"), "-s"]
        if kind == "mitmdump":
            launcher.append(str(ROOT / "addons" / "router.py"))
        cmd = [
            *launcher,
            "--mode", f"reverse:{up.main}@127.0.0.1:{port}",
            "--set", f"router_config={config}",
            "--set", "flow_detail=0",
        ]  # fmt: skip
        log = base.with_suffix(".log")
        proc = procs.start(cmd, log, cwd=ROOT, env=env)
    elif kind == "nginx":
        assert nginx is not None
        base.mkdir()
        servers = "\n".join(f"        server {w.split('://', 1)[1]};" for w in up.workers)
        conf = base / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                user="user root;\n" if os.geteuid() == 0 else "",
                tmp=base,
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                sync_servers=servers,
                main=up.main.split("://", 1)[1],
                port=port,
            )
        )
        log = base / "error.log"
        cmd = [nginx, "-p", str(base), "-e", str(log), "-c", str(conf)]
        proc = procs.start(cmd, base / "stdout.log", stop_signal=signal.SIGQUIT)
    else:
        raise ValueError(kind)
    wait_port(port, proc)
    return Proxy(kind, port, proc, log)


def warm_up(proxy: Proxy, timeout: float = 30.0) -> None:
    """One answered long-poll (timeout=1 ms) through the proxy: its upstream path works, and for the
    router the health checks have had their first round."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        result = asyncio.run(one_poll(proxy.port, 0, 1, 1, time.time(), time.time() + 10))
        if result["status"] == 200:
            return
        last = result
        time.sleep(0.5)
    raise RuntimeError(f"{proxy.kind} does not answer a long-poll: {last}")


# --------------------------------------------------------------------------- phases


def run_load(
    proxy: Proxy, total: int, spread: float, hold_ms: int, args: Any, work: Path, sample: Any = None
) -> list[dict[str, Any]]:
    """Run `total` long-polls, connection i opened at t0 + i * spread / total, over `args.clients`
    client processes (client c opens every clients-th connection from c); return their results.
    `sample(seconds since t0)` is called every 0.1 s while they run."""
    t0 = time.time() + 1.0  # the clients' common start, after their start-up
    clients = []
    for c in range(args.clients):
        out = work / f"client-{c}.json"
        cmd = [
            sys.executable, __file__, "_client", str(proxy.port), str(c), str(args.clients), str(total),
            str(spread), str(args.tokens), str(hold_ms), repr(t0), str(args.wait), str(out),
        ]  # fmt: skip
        clients.append((subprocess.Popen(cmd), out))
    while any(proc.poll() is None for proc, _ in clients):
        if sample is not None:
            sample(time.time() - t0)
        time.sleep(0.1)
    results: list[dict[str, Any]] = []
    for proc, out in clients:
        if proc.returncode != 0:
            raise RuntimeError(f"client exited with {proc.returncode}")
        results += json.loads(out.read_text())
        out.unlink()
    return results


@dataclass
class BurstRow:
    kind: str
    n: int
    answered: int
    connect_errors: int
    other_failures: int
    failure_kinds: dict[str, int]
    connect_max: float
    connect_slow: int
    connected_by: float  # seconds from t0 to the last connection established (client side)
    syn_by: float  # seconds from t0 to the last connect call (client side)
    last_answer: float
    cpu: float
    rss_before: int
    rss_peak: int
    overflows: int
    drops: int


def burst_phase(kind: str, up: Upstreams, work: Path, procs: Processes, nginx: str | None, args: Any) -> BurstRow:
    proxy = start_proxy(kind, up, work, procs, nginx)
    try:
        warm_up(proxy)
        time.sleep(1)
        rss_before = proxy.rss()
        peak = [rss_before]
        net0 = netstat("ListenOverflows", "ListenDrops")
        cpu0 = proxy.cpu()

        def sample(_now: float) -> None:
            peak[0] = max(peak[0], proxy.rss())

        results = run_load(proxy, args.burst, args.spread, int(args.hold * 1000), args, work, sample)
        cpu = proxy.cpu() - cpu0
        net1 = netstat("ListenOverflows", "ListenDrops")
    finally:
        procs.stop(proxy.proc)
    answered = [r for r in results if r["status"] == 200]
    kinds: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            key = r["error"] or f"status {r['status']}"
            kinds[key] = kinds.get(key, 0) + 1
    connects = [r["connect"] for r in results if r["connect"] is not None]
    return BurstRow(
        kind=kind,
        n=len(results),
        answered=len(answered),
        connect_errors=sum(1 for r in results if (r["error"] or "").startswith("connect")),
        other_failures=sum(1 for r in results if r["status"] != 200 and not (r["error"] or "").startswith("connect")),
        failure_kinds=kinds,
        connect_max=max(connects, default=0.0),
        connect_slow=sum(1 for c in connects if c > 0.9),
        syn_by=max((r["start"] for r in results), default=0.0),
        connected_by=max((r["start"] + r["connect"] for r in results if r["connect"] is not None), default=0.0),
        last_answer=max((r["answer"] for r in answered), default=0.0),
        cpu=cpu,
        rss_before=rss_before,
        rss_peak=peak[0],
        overflows=net1["ListenOverflows"] - net0["ListenOverflows"],
        drops=net1["ListenDrops"] - net0["ListenDrops"],
    )


@dataclass
class SteadyRow:
    kind: str
    n: int
    answered: int
    cpu_total: float
    cpu_held: float | None  # CPU seconds per second while all are held (None: never all held)
    all_held_at: float | None  # seconds from t0 until the upstreams held all N
    rss_before: int
    rss_held: int


def steady_phase(kind: str, up: Upstreams, work: Path, procs: Processes, nginx: str | None, args: Any) -> SteadyRow:
    proxy = start_proxy(kind, up, work, procs, nginx)
    # From when the upstreams hold all N (every one opened and forwarded) to 1 s before the
    # first is answered: the proxy only holds them.
    end = args.steady_hold - 1.0
    marks: dict[str, tuple[float, float]] = {}
    held_rss = [0]
    try:
        warm_up(proxy)
        time.sleep(1)
        rss_before = proxy.rss()
        cpu0 = proxy.cpu()

        def sample(now: float) -> None:
            if "start" not in marks and now < end and up.held() >= args.steady:
                marks["start"] = (now, proxy.cpu())
            if "start" in marks and now >= end and "end" not in marks:
                marks["end"] = (now, proxy.cpu())
            if "start" in marks and "end" not in marks:
                held_rss[0] = max(held_rss[0], proxy.rss())

        results = run_load(proxy, args.steady, STEADY_OPEN_SECONDS, int(args.steady_hold * 1000), args, work, sample)
        cpu_total = proxy.cpu() - cpu0
    finally:
        procs.stop(proxy.proc)
    cpu_held = None
    if "end" in marks:
        (s_at, s_cpu), (e_at, e_cpu) = marks["start"], marks["end"]
        cpu_held = (e_cpu - s_cpu) / (e_at - s_at)
    return SteadyRow(
        kind=kind,
        n=len(results),
        answered=sum(1 for r in results if r["status"] == 200),
        cpu_total=cpu_total,
        cpu_held=cpu_held,
        all_held_at=marks["start"][0] if "start" in marks else None,
        rss_before=rss_before,
        rss_held=held_rss[0],
    )


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def upstreams(work: Path, procs: Processes) -> Iterator[Upstreams]:
    ports = {name: free_port() for name in ("main", "sync1", "sync2")}
    started = []
    for name, port in ports.items():
        cmd = [sys.executable, __file__, "_upstream", name, str(port)]
        proc = procs.start(cmd, work / f"upstream-{name}.log", stop_signal=signal.SIGTERM)
        started.append(proc)
        wait_port(port, proc)
    yield Upstreams(f"http://127.0.0.1:{ports['main']}", [f"http://127.0.0.1:{ports[n]}" for n in ("sync1", "sync2")])


def machine_state(nofile: int) -> str:
    load = Path("/proc/loadavg").read_text().split()[:3]
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    syn_backlog = Path("/proc/sys/net/ipv4/tcp_max_syn_backlog").read_text().strip()
    cookies = Path("/proc/sys/net/ipv4/tcp_syncookies").read_text().strip()
    return (
        f"{os.cpu_count()} cores, load average {' '.join(load)}, somaxconn {somaxconn}, "
        f"tcp_max_syn_backlog {syn_backlog}, tcp_syncookies {cookies}, open-files limit {nofile}"
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=8000, help="new connections in the burst")
    parser.add_argument("--spread", type=float, default=2.0, help="seconds over which the burst opens")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the upstream holds a burst long-poll")
    parser.add_argument("--wait", type=float, default=240.0, help="seconds past spread + hold a client waits")
    parser.add_argument("--steady", type=int, default=2000, help="long-polls held in the steady phase (0: skip)")
    parser.add_argument("--steady-hold", type=float, default=40.0, help="seconds each steady long-poll is held")
    parser.add_argument("--tokens", type=int, default=1000, help="distinct access tokens")
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--keep", type=Path, help="keep the proxies' logs and configurations in this directory")
    parser.add_argument("--proxies", default="lean,mitmdump,nginx", help="comma-separated: lean, mitmdump, nginx")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.proxies.split(",") if k.strip()]
    if args.steady and args.steady_hold < STEADY_OPEN_SECONDS + 10:
        parser.error(f"--steady-hold must be >= {STEADY_OPEN_SECONDS + 10:.0f}")
    nofile = raise_nofile()
    if nofile < 2 * args.burst + 1000:
        say(f"warning: open-files limit {nofile}: too low for {args.burst} client + upstream connections")
    nginx = ensure_nginx() if "nginx" in kinds else None
    if "nginx" in kinds and nginx is None:
        say("nginx is not available (apt-get needs root): its rows are skipped")
        kinds.remove("nginx")
    state = machine_state(nofile)
    say(state)
    procs = Processes()
    bursts: list[BurstRow] = []
    steadies: list[SteadyRow] = []
    with tempfile.TemporaryDirectory(prefix="bench_burst-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        try:
            with upstreams(work, procs) as up:
                for kind in kinds:
                    say(f"{kind}: burst of {args.burst} within {args.spread:g} s, held {args.hold:g} s")
                    bursts.append(burst_phase(kind, up, work, procs, nginx, args))
                    report_failures(bursts[-1], work, kind)
                if args.steady:
                    for kind in kinds:
                        say(f"{kind}: {args.steady} long-polls held {args.steady_hold:g} s")
                        steadies.append(steady_phase(kind, up, work, procs, nginx, args))
        finally:
            procs.stop_all()
    print_tables(args, state, bursts, steadies)
    return 0 if all(b.answered == b.n for b in bursts) else 1


def report_failures(row: BurstRow, work: Path, kind: str) -> None:
    if row.failure_kinds:
        say(f"{kind}: failures {row.failure_kinds}")
        for log in work.glob(f"{kind}-*"):
            path = log / "error.log" if log.is_dir() else log
            if path.suffix == ".log" and path.exists():
                lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()][-15:]
                say(f"{path.name} (last lines):\n  " + "\n  ".join(lines))


NAMES = {
    "lean": "router, synapse-router (1 process)",
    "mitmdump": "router, mitmdump -s addons/router.py",
    "nginx": "nginx",
}


def print_tables(args: Any, state: str, bursts: list[BurstRow], steadies: list[SteadyRow]) -> None:
    print(f"\nMachine: {state}")
    print(f"\nBurst: {args.burst} new long-polls within {args.spread:g} s, each held {args.hold:g} s upstream\n")
    print(
        "| proxy | answered/N | connect errors | other failures | last connect call s | all connected by s "
        "| slowest connect s (> 0.9 s) "
        "| last answer s | CPU s | RSS before MiB | RSS peak MiB | KiB per held long-poll "
        "| ListenOverflows/Drops |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in bursts:
        per = (b.rss_peak - b.rss_before) / b.n if b.n else 0.0
        print(
            f"| {NAMES[b.kind]} | {b.answered}/{b.n} | {b.connect_errors} | {b.other_failures} "
            f"| {b.syn_by:.2f} | {b.connected_by:.2f} | {b.connect_max:.2f} ({b.connect_slow}) "
            f"| {b.last_answer:.1f} | {b.cpu:.2f} "
            f"| {b.rss_before / 1024:.1f} | {b.rss_peak / 1024:.1f} | {per:.1f} | {b.overflows}/{b.drops} |"
        )
    for b in bursts:
        if b.failure_kinds:
            print(f"- {NAMES[b.kind]}: {b.failure_kinds}")
    if steadies:
        print(
            f"\nSteady: {args.steady} long-polls opened over {STEADY_OPEN_SECONDS:g} s, each held "
            f"{args.steady_hold:g} s\n"
        )
        print(
            "| proxy | answered/N | all held upstream at s | CPU ms per long-poll | CPU % while held "
            "| KiB per held long-poll |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for s in steadies:
            per_kib = (s.rss_held - s.rss_before) / s.n if s.n else 0.0
            held_at = f"{s.all_held_at:.1f}" if s.all_held_at is not None else "never"
            cpu_held = f"{100 * s.cpu_held:.2f}" if s.cpu_held is not None else "-"
            kib = f"{per_kib:.1f}" if s.cpu_held is not None else "-"
            print(
                f"| {NAMES[s.kind]} | {s.answered}/{s.n} | {held_at} | {1000 * s.cpu_total / s.n:.3f} "
                f"| {cpu_held} | {kib} |"
            )


def internal(argv: list[str]) -> int:
    """The upstream stand-in and client processes this script starts."""
    if argv[0] == "_upstream":
        raise_nofile()
        asyncio.run(serve_upstream(argv[1], int(argv[2])))
        return 0
    port, offset, stride, total = (int(a) for a in argv[1:5])
    spread, tokens, hold_ms, t0, wait = float(argv[5]), int(argv[6]), int(argv[7]), float(argv[8]), float(argv[9])
    raise_nofile()
    results = asyncio.run(run_clients(port, offset, stride, total, spread, tokens, hold_ms, t0, wait))
    Path(argv[10]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_upstream", "_client"):
        sys.exit(internal(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
