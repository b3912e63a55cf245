"""End-to-end benchmarks: the router vs bare mitmdump vs nginx, in front of a real Synapse
deployment (scripts/synapse_deploy.py) and in front of a loopback stand-in, in one run.

    .venv/bin/python scripts/bench_e2e.py [--duration 6] [--connections 16] [--longpolls 2000]
                                          [--longpoll auto|real|standin|both|none] [--skip-real]
                                          [--keep-deployment]

1. Throughput and p50/p99 latency (`wrk`, Debian package) and the proxy's CPU per request
   (from /proc/PID/stat) for:
     real Synapse:  GET /_matrix/client/versions (to main), and an authenticated
                    GET /_matrix/client/v3/sync?since=<now>&timeout=0 (to the user's sync worker);
     stand-in:      GET /_matrix/client/v3/sync?since=s1&timeout=0 (tests/standin.py),
   each straight to the upstream (the ceiling), through nginx (Debian's nginx-light or nginx,
   our own instance: generated config, keepalive upstream, one worker process), through bare
   mitmdump (reverse mode, the router's options) and through the router (mitmdump + addon).
   The bare proxies go to the very process the router picks, so all rows do the same work.
2. whoami calls the router made vs sync requests it served (real: Synapse's own access logs of
   main and the workers; stand-in: its whoami counter).
3. RSS and CPU of the router holding N concurrent 30 s sync long-polls (default 2,000), against
   the real workers (100 users, 20 long-polls each), and against stand-ins (`standin_delay=30`)
   if Synapse did not cope (or with --longpoll standin/both).
4. What limits us: for each row, which process was busiest (CPU share of one core).

Every process it starts (proxies, stand-ins, and the deployment if it was not running) is
stopped by pid at the end. The deployment is brought up if needed and taken down again only if
this run started it (and --keep-deployment is not given). Runs in about 3 to 4 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.procstat import children, cpu_seconds, rss_kib  # noqa: E402
from scripts.wrkstat import parse_wrk  # noqa: E402
from tests.e2e.deployment import Deployment, bring_up  # noqa: E402
from tests.e2e.matrix_helpers import parse_access_line, register_user  # noqa: E402
from tests.harness import MITMDUMP, Fleet, Standin, free_port, router_command, unpaced, wait_for_port  # noqa: E402

# What the router enforces, given to bare mitmdump too: both run with the same options.
MITM_OPTIONS = [
    "-q",
    "--set", "connection_strategy=lazy",
    "--set", "keep_host_header=true",
    "--set", "http2=false",
]  # fmt: skip
# A sync that wakes only for room events: no presence, typing, receipts or account data.
QUIET_FILTER = json.dumps(
    {
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {"ephemeral": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}},
    },
    separators=(",", ":"),
)
STANDIN_TOKEN = "syt_YmVuY2g_bench_e2e_standin_token"


def quiet_filter(marker: str) -> str:
    """QUIET_FILTER made unique: Synapse answers identical concurrent syncs (same user, device,
    since, filter) from one shared computation, so a second connection of a device would
    return with the first, early. A distinct filter per connection keeps them independent."""
    flt = json.loads(QUIET_FILTER)
    flt["account_data"]["not_types"].append(marker)
    return json.dumps(flt, separators=(",", ":"))


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this run starts, stopped by pid at the end (newest first)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], int]] = []

    def start(
        self, name: str, cmd: Sequence[str], log: Path, stop_signal: int = signal.SIGINT, **kw: Any
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append((name, proc, stop_signal))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for i, (_name, p, sig) in enumerate(self.procs):
            if p is proc:
                _terminate(p, sig)
                del self.procs[i]
                return

    def stop_all(self) -> None:
        while self.procs:
            _name, proc, sig = self.procs.pop()
            _terminate(proc, sig)


def _terminate(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        header, values = next(
            (lines[i].split(), lines[i + 1].split()) for i in range(0, len(lines), 2) if lines[i].startswith("TcpExt:")
        )
        return int(values[header.index("ListenOverflows")])
    return -1


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, max(wanted, soft)))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))  # root may raise the hard limit
            return wanted
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0, headers: Any = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {url}")
        try:
            r = httpx.get(url, headers=headers, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s: {last}")


# --------------------------------------------------------------------------- stand-ins


def add_standin(fleet: Fleet, name: str, whoami: dict[str, str] | None = None) -> Standin:
    return fleet.add(name, whoami=whoami)


# --------------------------------------------------------------------------- proxies


@dataclass
class Proxy:
    kind: str  # router | mitmdump | nginx | direct
    url: str
    proc: subprocess.Popen[bytes] | None  # None: direct to the upstream
    log: Path | None = None

    def cpu(self) -> float:
        if self.proc is None:
            return 0.0
        pid = self.proc.pid
        return cpu_seconds(pid, *children(pid)) if self.kind == "nginx" else cpu_seconds(pid)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def ensure_nginx() -> str | None:
    """Debian's nginx-light (or nginx) without letting the package start its default service."""
    found = nginx_binary()
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    say("apt-get install nginx-light (its default service is kept from starting)")
    policy = Path("/usr/sbin/policy-rc.d")
    created = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# written by bench_e2e.py during apt-get install\nexit 101\n")
        policy.chmod(0o755)
        created = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for package in ("nginx-light", "nginx"):
            result = subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                env=env,
                capture_output=True,
                text=True,
            )
            if result.returncode != 0 and "Unable to locate" in result.stderr:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                result = subprocess.run(
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                    env=env,
                    capture_output=True,
                    text=True,
                )
            if result.returncode == 0:
                break
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
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 300m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    procs: Processes = field(default_factory=Processes)
    nginx: str | None = None
    counter: int = 0

    @property
    def kinds(self) -> list[str]:
        return ["direct", *(["nginx"] if self.nginx else []), "mitmdump", "router"]

    def _next(self, kind: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:02d}-{kind}"

    def start_proxy(
        self, kind: str, upstream: str, main: str, router_config: dict[str, Any] | None = None, logged: bool = False
    ) -> Proxy:
        """`upstream`: where the bare proxies send everything; `main`: the router's reverse target.
        `logged`: the router logs its events (workers down/up, failovers), not each flow."""
        base = self._next(kind)
        port = free_port()
        if kind == "direct":
            return Proxy(kind, upstream, None)
        if kind == "router":
            config_path = base.with_suffix(".yaml")
            config_path.write_text(yaml.safe_dump(unpaced(router_config or {})))
            options = ["--set", "flow_detail=0", *MITM_OPTIONS[1:]] if logged else MITM_OPTIONS
            cmd = router_command(main, port, config_path, options)
            proc = self.procs.start(kind, cmd, base.with_suffix(".log"), cwd=ROOT)
        elif kind == "mitmdump":
            cmd = [str(MITMDUMP), "--mode", f"reverse:{upstream}@127.0.0.1:{port}", *MITM_OPTIONS]
            proc = self.procs.start(kind, cmd, base.with_suffix(".log"), cwd=ROOT)
        elif kind == "nginx":
            assert self.nginx is not None
            tmp = base
            tmp.mkdir()
            hostport = upstream.split("://", 1)[1].rstrip("/")
            conf = tmp / "nginx.conf"
            user = "user root;\n" if os.geteuid() == 0 else ""  # its temp dirs are in our private tmp
            conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, upstream=hostport, port=port))
            cmd = [self.nginx, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
            proc = self.procs.start(kind, cmd, tmp / "stdout.log", stop_signal=signal.SIGQUIT)
        else:
            raise ValueError(kind)
        wait_for_port(port, proc)
        return Proxy(kind, f"http://127.0.0.1:{port}", proc, base.with_suffix(".log") if kind != "nginx" else None)

    def stop_proxy(self, proxy: Proxy) -> None:
        if proxy.proc is not None:
            self.procs.stop(proxy.proc)


# --------------------------------------------------------------------------- wrk


@dataclass
class Row:
    target: str
    request: str
    proxy: str
    command: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    bad: int = 0  # non-2xx responses and socket errors
    proxy_ms_per_req: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)  # process -> CPU % of one core
    note: str = ""

    def limit(self) -> str:
        if not self.busy:
            return "?"
        name, pct = max(self.busy.items(), key=lambda kv: kv[1])
        total = sum(self.busy.values())
        if total >= 170:
            return f"both cores busy ({total:.0f}%), most: {name} {pct:.0f}%"
        if pct >= 75:
            return f"{name} ({pct:.0f}% of a core)"
        return f"no process saturated (most: {name} {pct:.0f}%)"


def run_wrk(
    url: str, headers: Sequence[str], duration: int, connections: int, watch: dict[str, Callable[[], float]]
) -> tuple[dict[str, float], dict[str, float]]:
    """wrk's figures, and the CPU seconds each watched process (and wrk) used during the run."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    before = {name: read() for name, read in watch.items()}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    used = {name: read() - before[name] for name, read in watch.items()}
    used["wrk"] = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    result: dict[str, float] = {"elapsed": elapsed, **parse_wrk(out)}
    result["bad"] = result.pop("non_2xx") + result.pop("socket_errors")
    return result, used


def shown_command(url: str, headers: Sequence[str], duration: int, connections: int) -> str:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for h in headers:
        cmd += ["-H", re.sub(r"Bearer \S+", "Bearer $TOKEN", h)]
    return shlex.join([*cmd, url])


def measure(
    bench: Bench,
    target: str,
    request: str,
    proxy: Proxy,
    path: str,
    headers: Sequence[str],
    upstream_procs: dict[str, int],
) -> Row:
    args = bench.args
    url = proxy.url + path
    row = Row(target, request, proxy.kind, shown_command(url, headers, args.duration, args.connections))
    header_map = dict(h.split(": ", 1) for h in headers)
    try:
        wait_http(url, proxy.proc, headers=header_map)  # also warms the router's identity cache
        for _ in range(20):
            httpx.get(url, headers=header_map, timeout=10)
    except RuntimeError as e:
        row.note = f"not answering: {e}"
        return row
    watch: dict[str, Callable[[], float]] = {}
    if proxy.proc is not None:
        watch[proxy.kind] = proxy.cpu
    for name, pid in upstream_procs.items():
        watch[name] = functools.partial(cpu_seconds, pid)
    figures, used = run_wrk(url, headers, args.duration, args.connections, watch)
    elapsed = figures["elapsed"]
    row.rps = figures.get("rps", 0.0)
    row.p50_ms = figures.get("p50", 0.0)
    row.p99_ms = figures.get("p99", 0.0)
    row.requests = int(figures.get("requests", 0))
    row.bad = int(figures["bad"])
    if proxy.proc is not None and row.requests:
        row.proxy_ms_per_req = 1000 * used[proxy.kind] / row.requests
    row.busy = {name: 100 * seconds / elapsed for name, seconds in used.items()}
    return row


# --------------------------------------------------------------------------- real deployment


def bring_up_deployment() -> Deployment:
    say("using or bringing up the Synapse deployment (scripts/synapse_deploy.py)")
    return bring_up(ROOT / ".synapse-deploy")


class LogTail:
    """Access lines appended to a Synapse log since this object was made."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0

    def entries(self) -> Iterator[Any]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            for line in f:
                entry = parse_access_line(line)
                if entry is not None:
                    yield entry


def count_lines(tails: dict[str, LogTail], users: set[str], fragment: str) -> dict[str, int]:
    return {
        name: sum(1 for e in tail.entries() if e.user in users and fragment in e.path) for name, tail in tails.items()
    }


def new_user(dep: Deployment, label: str) -> tuple[str, str]:
    name = f"bench{label}{time.strftime('%y%m%d%H%M%S')}{os.urandom(3).hex()}"
    reg = register_user(dep.main, dep.info["registration_shared_secret"], name, "bench-password")
    return str(reg["user_id"]), str(reg["access_token"])


def initial_since(base_url: str, token: str, filter_json: str | None = None) -> str:
    query = "timeout=0" + (f"&filter={quote(filter_json)}" if filter_json else "")
    r = httpx.get(
        f"{base_url}/_matrix/client/v3/sync?{query}", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    r.raise_for_status()
    return str(r.json()["next_batch"])


def where_synced(dep: Deployment, tails: dict[str, LogTail], user: str) -> str | None:
    for _ in range(50):
        counts = count_lines(tails, {user}, "/sync")
        serving = [n for n, c in counts.items() if c]
        if serving:
            return serving[0]
        time.sleep(0.1)
    return None


def bench_real(bench: Bench, dep: Deployment) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    workers = list(dep.workers.values())
    router_config = {"workers": {"sync": workers}}  # no client_reader: /versions goes to main
    user, token = new_user(dep, "w")
    since = initial_since(dep.main, token)
    sync_path = f"/_matrix/client/v3/sync?since={quote(since)}&timeout=0"
    auth = [f"Authorization: Bearer {token}"]

    # Which worker does the router send this user's syncs to? The workers' logs say.
    tails = {n: LogTail(p) for n, p in dep.logs.items()}
    router = bench.start_proxy("router", dep.main, dep.main, router_config)
    try:
        wait_http(router.url + sync_path, router.proc, headers=dict(h.split(": ", 1) for h in auth))
        worker = where_synced(dep, tails, user)
    finally:
        bench.stop_proxy(router)
    if worker is None or worker not in dep.workers:
        raise RuntimeError(f"could not tell which worker serves {user}'s syncs through the router")
    worker_url = dep.workers[worker]
    say(f"real: {user}'s syncs go to {worker} ({worker_url})")

    for request, path, headers, upstream, upstream_name in (
        ("GET /versions", "/_matrix/client/versions", [], dep.main, "main"),
        ("GET /sync?since&timeout=0", sync_path, auth, worker_url, worker),
    ):
        upstream_procs = {f"synapse {upstream_name}": dep.pids[upstream_name]}
        if upstream_name != "main":
            upstream_procs["synapse main"] = dep.pids["main"]  # whoami
        for kind in bench.kinds:
            say(f"real: {request} via {kind}")
            proxy = bench.start_proxy(kind, upstream, dep.main, router_config)
            try:
                tails = {n: LogTail(p) for n, p in dep.logs.items()}
                row = measure(bench, "synapse", request, proxy, path, headers, upstream_procs)
                if kind == "router" and "sync" in request:
                    time.sleep(0.5)
                    whoami = count_lines({"main": tails["main"]}, {user}, "/account/whoami")["main"]
                    syncs = count_lines(tails, {user}, "/sync")
                    served = sum(syncs.values())
                    row.note = f"whoami {whoami} / syncs {served}"
                    notes.append(
                        f"real deployment, router, {request}: {whoami} whoami call(s) in main's access log for "
                        f"{served} syncs of the user in the workers' logs "
                        f"({', '.join(f'{n}={c}' for n, c in syncs.items() if c)})"
                    )
                rows.append(row)
            finally:
                bench.stop_proxy(proxy)
    return rows, notes


# --------------------------------------------------------------------------- stand-ins


def bench_standin(bench: Bench) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    fleet = Fleet(bench.work)
    try:
        main = add_standin(fleet, "main", whoami={STANDIN_TOKEN: "@bench:test.local"})
        worker = add_standin(fleet, "sync1")
        router_config = {"workers": {"sync": [worker.url]}}
        path = "/_matrix/client/v3/sync?since=s1&timeout=0"
        auth = [f"Authorization: Bearer {STANDIN_TOKEN}"]
        assert worker.proc is not None
        for kind in bench.kinds:
            say(f"stand-in: GET /sync via {kind}")
            proxy = bench.start_proxy(kind, worker.url, main.url, router_config)
            try:
                before = main.stats()["whoami_calls"]
                row = measure(
                    bench, "stand-in", "GET /sync?since&timeout=0", proxy, path, auth, {"stand-in": worker.proc.pid}
                )
                if kind == "router":
                    whoami = main.stats()["whoami_calls"] - before
                    row.note = f"whoami {whoami} / syncs {row.requests + 21}+"
                    notes.append(
                        f"stand-in, router: {whoami} whoami call(s) for {row.requests} wrk syncs (+ warm-up requests)"
                    )
                rows.append(row)
            finally:
                bench.stop_proxy(proxy)
    finally:
        fleet.stop()
    return rows, notes


# --------------------------------------------------------------------------- long-polls


@dataclass
class LongPollResult:
    target: str
    requested: int
    ok: int = 0
    early: int = 0  # 200 but returned well before the timeout
    failed: dict[str, int] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    ramp_s: float = 0.0
    rss_idle_kib: int = 0
    rss_peak_kib: int = 0
    hwm_kib: int = 0
    cpu_ramp_s: float = 0.0
    cpu_hold_pct: float = 0.0
    cpu_total_s: float = 0.0
    whoami: int | None = None
    syncs_logged: int | None = None
    note: str = ""

    served: dict[str, int] = field(default_factory=dict)  # process -> long-polls Synapse logged
    events: dict[str, int] = field(default_factory=dict)  # router log: worker down/up, failovers
    log_path: str = ""
    listen_overflows: int = 0  # SYNs dropped on a full accept queue (any socket) during the run

    def why_not(self) -> str:
        reasons = []
        if self.failed:
            reasons.append(f"failed {self.failed}")
        if self.early:
            reasons.append(f"{self.early} returned early")
        if self.served.get("main"):
            reasons.append(f"{self.served['main']} served by main (the router failed over)")
        if self.durations and statistics.median(self.durations) > 45:
            reasons.append(f"median duration {statistics.median(self.durations):.0f}s for 30 s long-polls")
        return "; ".join(reasons) or "?"

    def copes(self) -> bool:
        good = self.ok - self.early
        on_main = self.served.get("main", 0)
        slow = bool(self.durations) and statistics.median(self.durations) > 45
        return self.requested > 0 and good >= 0.99 * self.requested and not self.failed and not on_main and not slow


async def _long_polls(
    url: str, requests: list[tuple[str, str]], hold_s: float, rate: float, router_pid: int, result: LongPollResult
) -> None:
    """`requests`: (path, token) pairs, opened `rate` per second (0: all at once), each held by
    the upstream for `hold_s`; samples the router's RSS and CPU meanwhile."""
    n = len(requests)
    # Several clients: one httpx connection pool with thousands of requests in flight spends
    # its time scanning the pool (tens of seconds of client-side delay at 2,000).
    per_client = 100
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    timeout = httpx.Timeout(hold_s + 90, connect=60, pool=60)
    done = 0
    first_done: float | None = None
    started = time.monotonic()
    cpu0 = cpu_seconds(router_pid)
    peak = rss_kib(router_pid)
    overflows0 = listen_overflows()
    samples: list[tuple[float, float]] = []  # (time, router CPU seconds), once every request is open

    async def one(client: httpx.AsyncClient, path: str, token: str) -> None:
        nonlocal done, first_done
        t0 = time.monotonic()
        try:
            r = await client.get(path, headers={"Authorization": f"Bearer {token}"})
            elapsed = time.monotonic() - t0
            if r.status_code == 200:
                with contextlib.suppress(ValueError, AttributeError):
                    server = r.json().get("server")  # a stand-in names itself
                    if isinstance(server, str):
                        result.served[server] = result.served.get(server, 0) + 1
                result.ok += 1
                result.durations.append(elapsed)
                if elapsed < hold_s * 0.8:
                    result.early += 1
            else:
                key = f"HTTP {r.status_code}"
                result.failed[key] = result.failed.get(key, 0) + 1
        except httpx.HTTPError as e:
            key = type(e).__name__
            result.failed[key] = result.failed.get(key, 0) + 1
        finally:
            done += 1
            if first_done is None:
                first_done = time.monotonic()

    ramped = asyncio.Event()

    async def sampler() -> None:
        nonlocal peak
        while done < n:
            peak = max(peak, rss_kib(router_pid))
            if ramped.is_set() and first_done is None:
                samples.append((time.monotonic(), cpu_seconds(router_pid)))
            await asyncio.sleep(0.5)

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout))
            for _ in range((n + per_client - 1) // per_client)
        ]
        watcher = asyncio.ensure_future(sampler())
        tasks = []
        for i, (path, token) in enumerate(requests):
            tasks.append(asyncio.ensure_future(one(clients[i // per_client], path, token)))
            if rate > 0:
                delay = started + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        # Every request is sent; the ramp is over once the router has (almost) stopped working.
        last = cpu_seconds(router_pid)
        while time.monotonic() - started < hold_s * 0.8 and done < n:
            await asyncio.sleep(1.0)
            now = cpu_seconds(router_pid)
            if now - last < 0.05:
                break
            last = now
        result.ramp_s = time.monotonic() - started
        result.cpu_ramp_s = cpu_seconds(router_pid) - cpu0
        ramped.set()
        await asyncio.gather(*tasks)
        watcher.cancel()
    result.rss_peak_kib = peak
    result.listen_overflows = listen_overflows() - overflows0
    result.hwm_kib = rss_kib(router_pid, "VmHWM")
    result.cpu_total_s = cpu_seconds(router_pid) - cpu0
    if len(samples) >= 2:
        result.cpu_hold_pct = 100 * (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])


def longpoll_real(bench: Bench, dep: Deployment, n: int, users: int = 100) -> LongPollResult:
    result = LongPollResult("router -> 3 Synapse workers", n)
    say(f"long-polls (real): registering {users} users")
    with ThreadPoolExecutor(4) as pool:
        accounts = list(pool.map(lambda i: new_user(dep, "lp"), range(users)))
        sinces = list(pool.map(lambda acc: initial_since(dep.main, acc[1], QUIET_FILTER), accounts))
    requests = []
    for i in range(n):
        (_user, token), since = accounts[i % users], sinces[i % users]
        path = (
            f"/_matrix/client/v3/sync?since={quote(since)}&timeout=30000"
            f"&filter={quote(quiet_filter(f'bench.lp.{i}'))}&set_presence=offline"
        )
        requests.append((path, token))
    router = bench.start_proxy(
        "router", dep.main, dep.main, {"workers": {"sync": list(dep.workers.values())}}, logged=True
    )
    try:
        assert router.proc is not None
        wait_http(router.url + "/_matrix/client/versions", router.proc)
        time.sleep(1.0)
        result.rss_idle_kib = rss_kib(router.proc.pid)
        tails = {name: LogTail(path) for name, path in dep.logs.items()}
        say(f"long-polls (real): {n} x 30 s through the router")
        asyncio.run(_long_polls(router.url, requests, 30.0, bench.args.longpoll_rate, router.proc.pid, result))
        time.sleep(0.5)
        ids = {user for user, _ in accounts}
        result.whoami = count_lines({"main": tails["main"]}, ids, "/account/whoami")["main"]
        result.served = count_lines(tails, ids, "/sync")
        result.syncs_logged = sum(result.served.values())
    finally:
        bench.stop_proxy(router)
        result.events = router_events(router.log)
        result.log_path = str(router.log)
    return result


def router_events(log: Path | None) -> dict[str, int]:
    """What the router said about its workers: DOWN (by reason), UP, failovers (by reason)."""
    events: dict[str, int] = {}
    if log is None or not log.exists():
        return events
    for line in log.read_text(errors="replace").splitlines():
        if m := re.search(r"worker (\S+) is DOWN: (.*)", line):
            key = f"DOWN {m.group(1)}: {re.sub(r'[0-9.]+s', 'Ns', m.group(2))[:80]}"
        elif m := re.search(r"worker (\S+) is UP", line):
            key = f"UP {m.group(1)}"
        elif m := re.search(r"failover \S+ -> (\S+): (.*)", line):
            key = f"failover -> {m.group(1)}: {m.group(2)[:60]}"
        else:
            continue
        events[key] = events.get(key, 0) + 1
    return events


def longpoll_standin(bench: Bench, n: int, users: int = 100, kind: str = "router") -> LongPollResult:
    """Through the router (3 stand-in workers), or through bare mitmdump (to one of them)."""
    label = "router -> 3 stand-ins" if kind == "router" else "bare mitmdump -> 1 stand-in (baseline)"
    result = LongPollResult(label, n)
    fleet = Fleet(bench.work)
    tokens = {f"syt_bench_lp_{i:04d}": f"@lp{i}:test.local" for i in range(users)}
    try:
        main = add_standin(fleet, "main", whoami=tokens)
        workers = [add_standin(fleet, f"sync{i}") for i in range(1, 4)]
        token_list = list(tokens)
        requests = [
            ("/_matrix/client/v3/sync?since=s1&timeout=30000&standin_delay=30", token_list[i % users]) for i in range(n)
        ]
        config = {"workers": {"sync": [w.url for w in workers]}}
        router = bench.start_proxy(kind, workers[0].url, main.url, config, logged=True)
        try:
            assert router.proc is not None
            wait_http(router.url + "/_matrix/client/versions", router.proc)
            time.sleep(1.0)
            result.rss_idle_kib = rss_kib(router.proc.pid)
            say(f"long-polls (stand-in): {n} x 30 s through {kind}")
            asyncio.run(_long_polls(router.url, requests, 30.0, bench.args.longpoll_rate, router.proc.pid, result))
            if kind == "router":
                result.whoami = main.stats()["whoami_calls"]
                result.syncs_logged = n
        finally:
            bench.stop_proxy(router)
            result.events = router_events(router.log)
            result.log_path = str(router.log)
    finally:
        fleet.stop()
    return result


# --------------------------------------------------------------------------- report


def print_rows(rows: list[Row]) -> None:
    header = (
        f"| {'upstream':<8} | {'request':<25} | {'proxy':<8} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | "
        f"{'bad':>4} | {'proxy CPU ms/req':>16} | {'busiest (CPU % of one core)':<44} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        if r.note.startswith("not answering"):
            print(f"| {r.target:<8} | {r.request:<25} | {r.proxy:<8} | {r.note}")
            continue
        cpu = f"{r.proxy_ms_per_req:.3f}" if r.proxy != "direct" else "-"
        print(
            f"| {r.target:<8} | {r.request:<25} | {r.proxy:<8} | {r.rps:>8.0f} | {r.p50_ms:>7.2f} | {r.p99_ms:>7.2f} | "
            f"{r.bad:>4} | {cpu:>16} | {r.limit():<44} |"
        )
    print()
    print("Commands (URL per row; the proxy's port changes each run):")
    for r in rows:
        print(f"  {r.target} / {r.proxy}: {r.command}")
    print()
    print("CPU of every watched process during each run (% of one core):")
    for r in rows:
        busy = ", ".join(f"{n} {p:.0f}%" for n, p in sorted(r.busy.items(), key=lambda kv: -kv[1]))
        print(f"  {r.target} / {r.request} / {r.proxy}: {busy}")


def print_longpoll(r: LongPollResult, rate: float) -> None:
    d = sorted(r.durations)
    dist = f"min {d[0]:.1f}s, p50 {statistics.median(d):.1f}s, max {d[-1]:.1f}s" if d else "no successful long-poll"
    per = (r.rss_peak_kib - r.rss_idle_kib) / max(1, r.requested)
    how = f"opened {rate:g}/s" if rate > 0 else "opened all at once"
    print(f"### {r.requested} concurrent 30 s long-polls ({how}): {r.target}")
    print(f"  answered 200: {r.ok} (returned early: {r.early}); failed: {r.failed or 0}; durations {dist}")
    print(f"  ramp (all sent, proxy busy): {r.ramp_s:.1f}s, proxy CPU {r.cpu_ramp_s:.2f}s")
    print(
        f"  proxy RSS: idle {r.rss_idle_kib / 1024:.0f} MiB, peak {r.rss_peak_kib / 1024:.0f} MiB "
        f"(VmHWM {r.hwm_kib / 1024:.0f} MiB): {per:.1f} KiB per long-poll"
    )
    print(
        f"  proxy CPU: {r.cpu_total_s:.2f}s in all = {1000 * r.cpu_total_s / max(1, r.requested):.2f} ms per "
        f"long-poll; {r.cpu_hold_pct:.1f}% of a core while holding them"
    )
    if r.whoami is not None:
        print(f"  whoami calls: {r.whoami} for {r.syncs_logged} syncs served")
    if r.served:
        print(f"  long-polls served (Synapse's access logs / the stand-ins' answers): {r.served}")
    print(f"  kernel: {r.listen_overflows} connection(s) dropped on a full listen queue (TcpExt ListenOverflows)")
    for event, count in sorted(r.events.items(), key=lambda kv: -kv[1]):
        print(f"  router log: {count} x {event}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run (default %(default)s)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default %(default)s)")
    parser.add_argument("--longpolls", type=int, default=2000, help="concurrent long-polls (default %(default)s)")
    parser.add_argument(
        "--longpoll",
        choices=["auto", "real", "standin", "both", "none"],
        default="auto",
        help="auto: against the real workers, and against stand-ins too if Synapse did not cope",
    )
    parser.add_argument(
        "--longpoll-rate",
        type=float,
        default=80,
        help="long-polls opened per second (default %(default)s: all 2,000 open within 25 s; 0: all at once)",
    )
    parser.add_argument(
        "--longpoll-baseline", action="store_true", help="also hold the long-polls with bare mitmdump (+40 s)"
    )
    parser.add_argument("--skip-real", action="store_true", help="stand-ins only (no Synapse deployment)")
    parser.add_argument("--skip-wrk", action="store_true", help="long-polls only")
    parser.add_argument("--work-dir", type=Path, help="keep configs and proxy logs here (default: a temp dir, removed)")
    parser.add_argument("--keep-deployment", action="store_true", help="never take the deployment down")
    args = parser.parse_args()

    if not MITMDUMP.exists():
        sys.exit(f"{MITMDUMP} not found: run this with the project's virtualenv, .venv/bin/python")
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    fd_limit = raise_fd_limit(4 * args.longpolls + 1024)
    started = time.monotonic()
    command = shlex.join([".venv/bin/python", "scripts/bench_e2e.py", *sys.argv[1:]])
    rows: list[Row] = []
    notes: list[str] = []
    longpolls: list[LongPollResult] = []
    dep: Deployment | None = None
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            tmp = str(tempfile.mkdtemp(prefix="bench-e2e-", dir=args.work_dir))
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-"))
        bench = Bench(args, Path(tmp))
        bench.nginx = ensure_nginx()
        try:
            if not args.skip_real:
                dep = bring_up_deployment()
                if not args.skip_wrk:
                    rows_real, notes_real = bench_real(bench, dep)
                    rows += rows_real
                    notes += notes_real
            if not args.skip_wrk:
                rows_s, notes_s = bench_standin(bench)
                rows += rows_s
                notes += notes_s
            want_real = args.longpoll in ("auto", "real", "both") and dep is not None
            if args.longpolls > 0 and want_real and dep is not None:
                longpolls.append(longpoll_real(bench, dep, args.longpolls))
            copes = bool(longpolls) and longpolls[-1].copes()
            if args.longpolls > 0 and (args.longpoll in ("standin", "both") or (args.longpoll == "auto" and not copes)):
                longpolls.append(longpoll_standin(bench, args.longpolls))
            if args.longpolls > 0 and args.longpoll_baseline:
                longpolls.append(longpoll_standin(bench, args.longpolls, kind="mitmdump"))
        finally:
            bench.procs.stop_all()
            if dep is not None and dep.started_here and not args.keep_deployment:
                say("taking the deployment down again (this run started it)")
                dep.run("down", timeout=300)

    print()
    print(f"## bench_e2e: {command}")
    versions = []
    with contextlib.suppress(Exception):
        versions.append(
            "mitmproxy "
            + subprocess.run([str(MITMDUMP), "--version"], capture_output=True, text=True).stdout.split()[1]
        )
    if bench.nginx:
        out = subprocess.run([bench.nginx, "-v"], capture_output=True, text=True).stderr.strip()
        versions.append(out.replace("nginx version: ", ""))
    if dep is not None:
        versions.append(f"Synapse {dep.info.get('synapse_version')}")
    print(
        f"machine: {os.cpu_count()} cores; {', '.join(versions)}; wrk -t1 -c{args.connections} -d{args.duration}s; "
        f"open files limit {fd_limit}"
    )
    print()
    print_rows(rows)
    print()
    for note in notes:
        print(f"- {note}")
    print()
    for lp in longpolls:
        print_longpoll(lp, args.longpoll_rate)
    print("## What limits us")
    for line in limits_summary(rows, longpolls):
        print(f"- {line}")
    print(f"\n(bench took {time.monotonic() - started:.0f}s)")
    return 0


def limits_summary(rows: list[Row], longpolls: list[LongPollResult]) -> list[str]:
    lines = []
    by = {(r.target, r.request, r.proxy): r for r in rows}
    for target, request in dict.fromkeys((r.target, r.request) for r in rows):
        direct = by.get((target, request, "direct"))
        parts = []
        for kind in ("nginx", "mitmdump", "router"):
            r = by.get((target, request, kind))
            if r is None or not r.rps:
                continue
            share = f" ({100 * r.rps / direct.rps:.0f}% of direct)" if direct and direct.rps else ""
            parts.append(f"{kind} {r.rps:.0f} req/s{share}, limit: {r.limit()}")
        if direct and direct.rps:
            parts.insert(0, f"direct {direct.rps:.0f} req/s, limit: {direct.limit()}")
        lines.append(f"{target} {request}: " + "; ".join(parts))
    for kind in ("mitmdump", "router"):
        costs = [r.proxy_ms_per_req for r in rows if r.proxy == kind and r.proxy_ms_per_req]
        if costs:
            lines.append(
                f"{kind} CPU per request {min(costs):.2f}-{max(costs):.2f} ms: one core tops out near "
                f"{1000 / max(costs):.0f}-{1000 / min(costs):.0f} req/s (mitmproxy runs on one thread)"
            )
    nginx_costs = [r.proxy_ms_per_req for r in rows if r.proxy == "nginx" and r.proxy_ms_per_req]
    if nginx_costs:
        lines.append(f"nginx CPU per request {min(nginx_costs):.3f}-{max(nginx_costs):.3f} ms")
    for lp in longpolls:
        lines.append(
            f"long-polls ({lp.target}): {lp.ok}/{lp.requested} ok, proxy "
            f"{(lp.rss_peak_kib - lp.rss_idle_kib) / max(1, lp.requested):.1f} KiB and "
            f"{1000 * lp.cpu_total_s / max(1, lp.requested):.2f} ms CPU per long-poll; "
            f"{'all held as expected' if lp.copes() else 'NOT as expected: ' + lp.why_not()}"
        )
        downs = sum(c for e, c in lp.events.items() if e.startswith("DOWN") and "ConnectTimeout" in e)
        abandoned = sum(c for e, c in lp.events.items() if "marked down while waiting" in e)
        if downs:
            cause = (
                f"the kernel dropped {lp.listen_overflows} connection(s) on full listen queues (Synapse listens "
                "with a backlog of 50), so SYNs were retried after 1-3 s"
                if lp.listen_overflows > 0
                else "no listen queue overflowed, so the router's own event loop was late (CPU-bound)"
            )
            lines.append(
                f"  why: {downs} worker(s) marked DOWN on one ConnectTimeout each: {cause}; the router's connect "
                f"timeout (2 s) fired, a single passive failure takes a worker down, and {abandoned} long-polls "
                "in flight on it were abandoned and re-sent (to main once every worker was down)"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
