"""The chaos soak (issue 21): a real Synapse with workers, the router in front, mixed traffic from
many users, a fault schedule, and invariants checked during and after.

    scripts/soak [--duration SECONDS] [--launcher both|synapse-router|mitmdump] [--seed N]
                 [--users N] [--keep-deployment] [--work DIR]

What runs (everything on loopback):

- Synapse: scripts/synapse_deploy.py's default topology (main + generic1..3, PostgreSQL, Redis) in
  its own state directory `.soak-deploy/` with SYNAPSE_DEPLOY_BASE_PORT=18600 (main 18608,
  workers 18681-18683, Redis 16979); brought up if it is not running, taken down at the end if
  this run started it (unless --keep-deployment).
- The router on 127.0.0.1:28600, metrics on 127.0.0.1:28610 (28611.. per process with
  `--processes`), in phases that share the duration: `synapse-router` (one process),
  `synapse-router --processes 2`, `mitmdump -s addons/router.py` (--launcher picks them).
  Its configuration pools the three workers as sync, client_reader, room and generic, shares
  the identity cache through the deployment's Redis and writes an access log per router
  instance.
- Traffic (httpx, asyncio) from 127.0.0.1: per user a /sync long-poll loop, a sender
  (PUT .../send/m.room.message/{txnId}) and, for half of them, a simplified-sliding-sync
  long-poll loop; media upload + download of the same bytes; password logins, whoami and
  logouts of a churn user; room history, profile and /versions reads.
- Hostile clients from 127.0.0.2 (so the access log tells them apart): slowloris heads,
  trickled bodies, malformed chunked bodies, oversized heads, garbage request lines.
- Faults, one at a time, in a seeded order that covers every kind: SIGKILL of a worker (then
  start-worker) or of main (then `up`), SIGSTOP of a worker or main (then SIGCONT), Redis
  SIGKILLed and restarted, a SIGHUP storm (valid files moving generic3 between pools, invalid
  YAML, a non-UTF-8 file, the metrics address changed twice in one turn, then the final file),
  `--replace` rolling restarts (synapse-router phases), SIGKILL of a `--processes` child.

Invariants (each violation is printed with its evidence; the exit status is 1 if any):

- safe_requests: no client-visible error on a safe request (GET, sliding-sync POST, send with a
  txnId) that Synapse did not send (Synapse's answers carry `Server: Synapse/...`, the router's
  do not): a router-made 502/503/504 is excused only while the target named by the debug header
  (`X-Synapse-Router-Worker`) was down or stopped, a 504 (`health.read_timeout`) also while
  main was (a worker's request waiting on main is never answered); a transport error only while
  a router process was being killed; an answer cut mid-body (its head passed on: media is
  streamed) only while its worker (the debug header) was down. Errors on unsafe requests
  (uploads, logins, logouts) are counted.
- sends_exactly_once: each txnId's body appears exactly once in the room's timeline
  (/messages on main after the run); a send that failed, at most once.
- in_flight_zero: `synapse_router_worker_in_flight` back to 0 after traffic stops.
- descriptors: open descriptors of every router process back to their baseline after traffic
  stops (within the idle upstream connections the router's pool may keep, see below).
- listeners: each router process's listening sockets back to the baseline set after every
  storm and at the end (no leaked metrics listener).
- upstream_connections: router->Synapse connections after traffic stops bounded by the
  clients' peak concurrency (the pool keeps idle connections, upstream_client.py).
- rss: peak RSS of each router process under --max-rss-mib (printed at start/peak/end).
- metrics_health: `/metrics` and `/health` answer on every probe (every 0.5 s) except while a
  router process was down or during a storm's metrics-address move.
- counted_once: requests_total (the instance's /metrics) == the instance's access-log lines,
  and access-log lines with a status from the traffic clients == responses those clients got
  (exact only where no router process was SIGKILLed; otherwise printed, not judged).
- removed_series: no /metrics series of a (pool, worker) the final configuration does not have.
- tracebacks: no `Traceback` in any router log.
- graceful_exit: every router stopped by SIGTERM (end of phase, --replace) exits 0.

asyncio tasks inside the router are not exposed by it: not checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("SYNAPSE_DEPLOY_BASE_PORT", "18600")

import httpx  # noqa: E402
import yaml  # noqa: E402

from tests import hostile  # noqa: E402
from tests.e2e.deployment import Deployment, bring_up  # noqa: E402
from tests.e2e.matrix_helpers import register_user  # noqa: E402
from tests.harness import router_command  # noqa: E402

ALL_FAULTS = (
    "kill_worker",
    "stop_worker",
    "stop_main",
    "kill_redis",
    "hup_storm",
    "kill_main",
    "replace",
    "kill_child",
)
PHASE_OF: dict[str, str] = {}  # router instance name -> phase
PROXY_PORT = 28600
METRICS_PORT = 28610
METRICS_ALT = (28620, 28630)  # where a storm moves the metrics address and back
STATE_DIR = ROOT / ".soak-deploy"
SLIDING = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
LONGPOLL_MS = 8000
HOSTILE_SOURCE = "127.0.0.2"
HOSTILE_THREADS = 3
REPLACE_WAIT = 300.0
HEALTH = {"interval": 0.5, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}
SLACK = 3.0  # seconds added to a fault window (health checks notice within about 1 s)


def now() -> float:
    return time.time()


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- what happened -----------------------------------------------------------------------------


@dataclass
class Record:
    phase: str
    kind: str
    method: str
    safe: bool
    t0: float
    t1: float = 0.0
    status: int | None = None
    synapse: bool = False  # the answer carried Synapse's Server header
    worker: str = ""  # X-Synapse-Router-Worker
    error: str = ""  # the exception's type when no answer came
    cut: str = ""  # the exception's type when the answer's head came and its body broke off
    body: str = ""  # the start of a non-2xx answer the router made


@dataclass
class Violation:
    invariant: str
    detail: str


@dataclass
class ProcStats:
    start_rss: int = 0
    peak_rss: int = 0
    end_rss: int = 0
    start_fd: int = 0
    peak_fd: int = 0
    end_fd: int = 0


@dataclass
class Soak:
    args: argparse.Namespace
    dep: Deployment
    work: Path
    rng: random.Random
    run_id: str
    records: list[Record] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    down: dict[str, list[list[float]]] = field(default_factory=lambda: defaultdict(list))
    router_down: list[list[float]] = field(default_factory=list)  # a router process killed
    stops: list[float] = field(default_factory=list)  # a replaced router began its graceful stop
    metrics_moved: list[list[float]] = field(default_factory=list)  # storms
    probe_failures: list[tuple[float, str, str]] = field(default_factory=list)
    probes: int = 0
    hostile_outcomes: Counter[str] = field(default_factory=Counter)
    sent: dict[str, str] = field(default_factory=dict)  # txnId -> "ok" | "failed"
    proc_stats: dict[str, ProcStats] = field(default_factory=dict)
    phase: str = ""
    peak_concurrency: int = 0
    in_progress: int = 0

    counter_drops: list[str] = field(default_factory=list)
    storm_pairs: set[tuple[str, str]] = field(default_factory=set)
    storming: bool = False
    replacing: bool = False
    fault_cycle: list[str] = field(default_factory=list)
    fault_index: int = 0

    def next_fault(self, applicable: set[str]) -> str:
        if not self.fault_cycle:
            self.fault_cycle = sorted(ALL_FAULTS)
            self.rng.shuffle(self.fault_cycle)
        while True:
            kind = self.fault_cycle[self.fault_index % len(self.fault_cycle)]
            self.fault_index += 1
            if kind in applicable:
                return kind

    def violate(self, invariant: str, detail: str) -> None:
        say(f"VIOLATION {invariant}: {detail}")
        self.violations.append(Violation(invariant, detail))


# --- the router --------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state hex) of the process's network namespace."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
                table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    return table


def sockets_of(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket the process holds."""
    inodes: list[int] = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.append(int(target[8:-1]))
    table = _tcp_table(pid)
    return [table[i] for i in inodes if i in table]


def other_fds(pid: int) -> list[str]:
    """What the process's descriptors that are not TCP sockets of its table are: files, pipes,
    anon inodes, unix sockets, and sockets no table lists (a TCP socket whose connection was
    reset and never closed: `socket:orphan`)."""
    tcp = _tcp_table(pid)
    unix: set[int] = set()
    with contextlib.suppress(OSError):
        unix = {int(line.split()[6]) for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]}
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode in tcp:
                        continue
                    target = "socket:unix" if inode in unix else "socket:orphan"
                out.append(re.sub(r"\[\d+\]$", "", target))
    return sorted(out)


def listeners_of(pid: int) -> list[int]:
    return sorted(local for local, _, state in sockets_of(pid) if state == "0A")


@dataclass
class RouterInstance:
    name: str
    launcher: str
    processes: int
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    access_path: Path
    variant: str = "base"
    children_killed: int = 0
    # (pool, worker) pairs a reload removed at some point: their requests_total series were
    # dropped by design (metrics.remove_worker), so they are left out of the exact count.
    touched: set[tuple[str, str]] = field(default_factory=set)

    def pids(self) -> list[int]:
        if self.proc.poll() is not None:
            return []
        return [self.proc.pid, *children_of(self.proc.pid)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def config_for(soak: Soak, access_path: Path, metrics_port: int, variant: str) -> dict[str, Any]:
    g = list(soak.dep.workers.values())
    workers: dict[str, Any] = {"sync": g, "client_reader": g[:2], "room": g, "generic": g}
    if variant == "moved":  # generic3 leaves sync and joins client_reader
        workers = {"sync": g[:2], "client_reader": g, "room": g, "generic": g}
    redis = soak.dep.info["redis"]
    return {
        "workers": workers,
        "health": HEALTH,
        "whoami": {"timeout": 10, "redis": f"redis://{redis['host']}:{redis['port']}/0"},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "access_log": {"enabled": True, "format": "logfmt", "path": str(access_path)},
        "debug_headers": True,
    }


def pool_pairs(config: dict[str, Any]) -> set[tuple[str, str]]:
    return {(pool, w if isinstance(w, str) else w["url"]) for pool, ws in config["workers"].items() for w in ws}


def start_router(soak: Soak, launcher: str, processes: int, replace: RouterInstance | None = None) -> RouterInstance:
    n = len(list(soak.work.glob("router-*.yaml")))
    name = f"router-{n}"
    config_path = soak.work / f"{name}.yaml"
    access_path = soak.work / f"{name}.access.log"
    log_path = soak.work / f"{name}.log"
    variant = replace.variant if replace else "base"
    config_path.write_text(yaml.safe_dump(config_for(soak, access_path, METRICS_PORT, variant)))
    extra: list[str] = []
    if launcher == "mitmdump":
        extra += ["--set", "flow_detail=0"]
    if processes > 1:
        extra += ["--processes", str(processes)]
    if replace is not None:
        extra += ["--replace", str(replace.proc.pid)]
    cmd = router_command(soak.dep.main, PROXY_PORT, config_path, extra, launcher=launcher)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    inst = RouterInstance(name, launcher, processes, proc, config_path, log_path, access_path, variant)
    PHASE_OF[name] = soak.phase
    say(
        f"started {name}: {launcher} processes={processes} pid={proc.pid}"
        + (f" replacing {replace.name}" if replace else "")
    )
    return inst


_STOPPING = re.compile(r"^\[(\d\d):(\d\d):(\d\d\.\d+)\] synapse-router: stopping: ", re.M)


def stop_times(inst: RouterInstance) -> list[float]:
    """When each process of a router began its graceful stop (its "stopping:" log line, UTC)."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    out = []
    for h, m, sec in _STOPPING.findall(inst.log()):
        midnight = time.mktime(time.strptime(day, "%Y-%m-%d")) - time.timezone
        out.append(midnight + int(h) * 3600 + int(m) * 60 + float(sec))
    return out


def wait_serving(soak: Soak, inst: RouterInstance, timeout: float = REPLACE_WAIT) -> None:
    """Until the router answers /health and a request through its port (counted as a "probe"
    record: it is in the access log too) with all its processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inst.proc.poll() is not None:
            raise RuntimeError(f"{inst.name} exited with {inst.proc.returncode}:\n{inst.log()[-3000:]}")
        try:
            ok = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/health", timeout=2).status_code == 200
            if ok:
                rec = Record(soak.phase, "probe", "GET", True, now())
                try:
                    r = httpx.get(f"http://127.0.0.1:{PROXY_PORT}/_matrix/client/versions", timeout=5)
                    rec.status, rec.synapse = r.status_code, r.headers.get("server", "").startswith("Synapse/")
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    rec.error, ok = type(e).__name__, False
                finally:
                    rec.t1 = now()
                    soak.records.append(rec)
            kids = children_of(inst.proc.pid) if inst.processes > 1 else [inst.proc.pid]
            if ok and len(kids) >= inst.processes and all(PROXY_PORT in listeners_of(k) for k in kids):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{inst.name} did not serve within {timeout}s:\n{inst.log()[-3000:]}")


def stop_router(soak: Soak, inst: RouterInstance, timeout: float = 60.0) -> None:
    if inst.proc.poll() is None:
        inst.proc.send_signal(signal.SIGTERM)
    try:
        code = inst.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        soak.violate("graceful_exit", f"{inst.name} still running {timeout}s after SIGTERM; killed")
        inst.proc.kill()
        inst.proc.wait()
        return
    if code != 0:
        soak.violate("graceful_exit", f"{inst.name} exited {code} after SIGTERM:\n{inst.log()[-1500:]}")


# --- metrics -----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def scrape(port: int = METRICS_PORT) -> list[tuple[str, dict[str, str], float]]:
    return parse_metrics(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)


# --- traffic -----------------------------------------------------------------------------------


@dataclass
class User:
    localpart: str
    user_id: str
    password: str
    token: str


class Traffic:
    def __init__(self, soak: Soak, users: list[User], churn: User, room: str) -> None:
        self.soak = soak
        self.users = users
        self.churn = churn
        self.room = room
        self.stop = asyncio.Event()
        self.base = f"http://127.0.0.1:{PROXY_PORT}"
        self.counter = 0

    async def call(
        self,
        client: httpx.AsyncClient,
        kind: str,
        method: str,
        path: str,
        safe: bool,
        token: str | None = None,
        **kw: Any,
    ) -> httpx.Response | None:
        soak = self.soak
        rec = Record(soak.phase, kind, method, safe, now())
        soak.in_progress += 1
        soak.peak_concurrency = max(soak.peak_concurrency, soak.in_progress)
        headers = dict(kw.pop("headers", {}) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with client.stream(method, self.base + path, headers=headers, **kw) as resp:
                rec.status = resp.status_code
                rec.synapse = resp.headers.get("server", "").startswith("Synapse/")
                rec.worker = resp.headers.get("x-synapse-router-worker", "")
                try:
                    await resp.aread()
                except httpx.HTTPError as e:  # the head came, the body broke off
                    rec.cut = type(e).__name__
                    return None
        except httpx.HTTPError as e:
            rec.status = None
            rec.error = type(e).__name__
            return None
        else:
            if not rec.synapse and not 200 <= resp.status_code < 300:
                rec.body = resp.text[:200]
            return resp
        finally:
            rec.t1 = now()
            soak.in_progress -= 1
            soak.records.append(rec)

    def client(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(connect=15, read=LONGPOLL_MS / 1000 + 90, write=30, pool=60)
        return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=8))

    async def pause(self, low: float, high: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.soak.rng.uniform(low, high))

    async def sync_loop(self, user: User) -> None:
        async with self.client() as c:
            since = None
            while not self.stop.is_set():
                q = f"?timeout={LONGPOLL_MS}" + (f"&since={since}" if since else "")
                r = await self.call(c, "sync", "GET", "/_matrix/client/v3/sync" + q, True, user.token)
                if r is not None and r.status_code == 200:
                    since = r.json().get("next_batch", since)
                else:
                    await self.pause(0.5, 1.0)

    async def sliding_loop(self, user: User) -> None:
        body = {"lists": {"all": {"ranges": [[0, 5]], "timeline_limit": 1, "required_state": []}}}
        async with self.client() as c:
            pos = None
            while not self.stop.is_set():
                q = f"?timeout={LONGPOLL_MS}" + (f"&pos={pos}" if pos else "")
                # Safe to repeat (retry.py) only as a long-poll with a `pos`: the first one is not.
                r = await self.call(c, "sliding_sync", "POST", SLIDING + q, pos is not None, user.token, json=body)
                if r is not None and r.status_code == 200:
                    pos = r.json().get("pos", pos)
                else:
                    if r is not None and r.status_code == 400:
                        pos = None  # an unknown pos (M_UNKNOWN_POS) starts afresh, as clients do
                    await self.pause(0.5, 1.0)

    async def send_loop(self, user: User, index: int) -> None:
        async with self.client() as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                txn = f"s{self.soak.run_id}u{index}n{n}"
                path = f"/_matrix/client/v3/rooms/{self.room}/send/m.room.message/{txn}"
                body = {"msgtype": "m.text", "body": f"soak {txn}"}
                r = await self.call(c, "send", "PUT", path, True, user.token, json=body)
                self.soak.sent[txn] = "ok" if r is not None and r.status_code == 200 else "failed"
                await self.pause(0.4, 1.6)

    async def media_loop(self, user: User) -> None:
        async with self.client() as c:
            while not self.stop.is_set():
                size = self.soak.rng.choice([2_000, 60_000, 700_000, 2_500_000])
                data = os.urandom(size)
                r = await self.call(
                    c,
                    "media_upload",
                    "POST",
                    "/_matrix/media/v3/upload?filename=soak.bin",
                    False,
                    user.token,
                    content=data,
                    headers={"Content-Type": "application/octet-stream"},
                )
                if r is not None and r.status_code == 200:
                    uri = r.json()["content_uri"].removeprefix("mxc://")
                    d = await self.call(
                        c, "media_download", "GET", f"/_matrix/client/v1/media/download/{uri}", True, user.token
                    )
                    if d is not None and d.status_code == 200 and d.content != data:
                        self.soak.violate(
                            "media_bytes",
                            f"download of {uri} differs from the upload ({len(d.content)} vs {size} bytes)",
                        )
                await self.pause(1.0, 4.0)

    async def churn_loop(self) -> None:
        u = self.churn
        async with self.client() as c:
            while not self.stop.is_set():
                body = {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": u.localpart},
                    "password": u.password,
                }
                r = await self.call(c, "login", "POST", "/_matrix/client/v3/login", False, json=body)
                if r is not None and r.status_code == 200:
                    token = r.json()["access_token"]
                    await self.call(c, "whoami", "GET", "/_matrix/client/v3/account/whoami", True, token)
                    await self.call(c, "sync", "GET", "/_matrix/client/v3/sync?timeout=0", True, token)
                    await self.call(c, "logout", "POST", "/_matrix/client/v3/logout", False, token, json={})
                await self.pause(1.0, 3.0)

    async def reads_loop(self, user: User) -> None:
        async with self.client() as c:
            while not self.stop.is_set():
                choice = self.soak.rng.randrange(4)
                if choice == 0:
                    await self.call(c, "versions", "GET", "/_matrix/client/versions", True)
                elif choice == 1:
                    await self.call(
                        c,
                        "messages",
                        "GET",
                        f"/_matrix/client/v3/rooms/{self.room}/messages?dir=b&limit=5",
                        True,
                        user.token,
                    )
                elif choice == 2:
                    await self.call(c, "profile", "GET", f"/_matrix/client/v3/profile/{user.user_id}", True, user.token)
                else:
                    await self.call(c, "whoami", "GET", "/_matrix/client/v3/account/whoami", True, user.token)
                await self.pause(0.2, 1.0)

    async def run(self) -> None:
        tasks = []
        for i, user in enumerate(self.users):
            tasks.append(self.sync_loop(user))
            tasks.append(self.send_loop(user, i))
            if i % 2 == 0:
                tasks.append(self.sliding_loop(user))
        tasks.append(self.media_loop(self.users[0]))
        tasks.append(self.media_loop(self.users[1 % len(self.users)]))
        tasks.append(self.churn_loop())
        tasks.append(self.reads_loop(self.users[0]))
        tasks.append(self.reads_loop(self.users[-1]))
        await asyncio.gather(*tasks)


# --- hostile clients ---------------------------------------------------------------------------


def hostile_once(soak: Soak, kind: str, stop: threading.Event) -> None:
    nonce = hostile.new_nonce()
    path = b"/_matrix/client/v3/rooms/!x:test.local/messages"
    try:
        sock = socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=20, source_address=(HOSTILE_SOURCE, 0))
    except OSError as e:
        soak.hostile_outcomes[f"{kind}: connect {type(e).__name__}"] += 1
        return
    data = b""
    with sock:
        try:
            if kind == "slowloris":
                head = hostile.request(b"GET", path, nonce, close=True)
                for i in range(0, min(len(head) - 4, 12)):
                    if stop.is_set():
                        break
                    sock.sendall(head[i : i + 1])
                    time.sleep(0.7)
                soak.hostile_outcomes[kind] += 1
                return
            if kind == "trickled_body":
                head = hostile.request(
                    b"PUT",
                    b"/_matrix/client/v3/rooms/!x:test.local/send/m.room.message/t" + nonce,
                    nonce,
                    [b"Content-Length: 400", b"Content-Type: application/json"],
                )
                sock.sendall(head)
                for _ in range(8):
                    if stop.is_set():
                        break
                    sock.sendall(b"{")
                    time.sleep(0.6)
                soak.hostile_outcomes[kind] += 1
                return
            if kind == "malformed_chunked":
                raw = hostile.request(
                    b"POST",
                    b"/_matrix/client/v3/keys/query",
                    nonce,
                    [b"Transfer-Encoding: chunked"],
                    b"zz\r\nhello\r\n0\r\n\r\n",
                )
            elif kind == "oversized_head":
                raw = hostile.request(b"GET", path, nonce, [b"X-Big: " + b"a" * 100_000])
            else:  # garbage request line
                raw = b"GARBAGE \x00\xff nonsense\r\n\r\n"
            with contextlib.suppress(OSError):
                sock.sendall(raw)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, OSError):
            pass
    replies, _ = hostile.parse_replies(data, eof=True) if data else ([], b"")
    status = replies[0].status if replies else "closed"
    soak.hostile_outcomes[f"{kind}: {status}"] += 1


def hostile_loop(soak: Soak, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    kinds = ["slowloris", "trickled_body", "malformed_chunked", "oversized_head", "garbage"]
    while not stop.is_set():
        try:
            hostile_once(soak, rng.choice(kinds), stop)
        except Exception as e:  # the soak itself must not die of a hostile client
            soak.hostile_outcomes[f"soak error {type(e).__name__}"] += 1
        stop.wait(rng.uniform(0.1, 0.5))


# --- faults ------------------------------------------------------------------------------------


def deploy_pid(soak: Soak, name: str) -> int | None:
    try:
        return int((soak.dep.state_dir / "pids" / f"{name}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def deploy_up(soak: Soak) -> None:
    result = soak.dep.run("up", "--timeout", "300", timeout=400)
    if result.returncode != 0:
        raise RuntimeError(f"synapse_deploy.py up failed:\n{result.stderr[-3000:]}")


class Faults:
    def __init__(
        self,
        soak: Soak,
        launcher: str,
        processes: int,
        get: Callable[[], RouterInstance],
        set_: Callable[[RouterInstance], None],
    ) -> None:
        self.soak = soak
        self.launcher = launcher
        self.processes = processes
        self.get = get
        self.set = set_

    def kinds(self) -> list[str]:
        kinds = ["kill_worker", "stop_worker", "stop_main", "kill_redis", "hup_storm", "kill_main"]
        if self.launcher == "synapse-router":
            kinds.append("replace")
        if self.processes > 1:
            kinds.append("kill_child")
        return kinds

    def run(self, kind: str) -> None:
        self.soak.faults[kind] += 1
        say(f"fault: {kind}")
        getattr(self, kind)()

    def _window(self, name: str, start: float) -> None:
        self.soak.down[name].append([start, now() + SLACK])

    def kill_worker(self) -> None:
        name = self.soak.rng.choice(list(self.soak.dep.workers))
        pid = deploy_pid(self.soak, name)
        start = now()
        if pid:
            os.kill(pid, signal.SIGKILL)
        time.sleep(self.soak.rng.uniform(1, 3))
        result = self.soak.dep.run("start-worker", name, timeout=240)
        if result.returncode != 0:
            raise RuntimeError(f"start-worker {name}: {result.stderr[-2000:]}")
        self._window(name, start)

    def _stop(self, name: str, low: float, high: float) -> None:
        pid = deploy_pid(self.soak, name)
        if not pid:
            return
        start = now()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(self.soak.rng.uniform(low, high))
        finally:
            os.kill(pid, signal.SIGCONT)
        self._window(name, start)

    def stop_worker(self) -> None:
        self._stop(self.soak.rng.choice(list(self.soak.dep.workers)), 2, 5)

    def stop_main(self) -> None:
        self._stop("main", 2, 4)

    def kill_main(self) -> None:
        pid = deploy_pid(self.soak, "main")
        start = now()
        if pid:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        deploy_up(self.soak)
        self._window("main", start)

    def kill_redis(self) -> None:
        pid = deploy_pid(self.soak, "redis")
        start = now()
        if pid:
            os.kill(pid, signal.SIGKILL)
        time.sleep(self.soak.rng.uniform(2, 4))
        deploy_up(self.soak)
        self._window("redis", start)

    def hup_storm(self) -> None:
        soak = self.soak
        inst = self.get()
        pids = inst.pids()
        if not pids:
            return
        parent = inst.proc.pid
        base_listeners = {pid_index: listeners_of(pid) for pid_index, pid in enumerate(pids)}

        def good(variant: str, port: int) -> bytes:
            return yaml.safe_dump(config_for(soak, inst.access_path, port, variant)).encode()

        final_variant = soak.rng.choice(["base", "moved"])
        other = "moved" if inst.variant == "base" else "base"
        steps: list[tuple[bytes, float]] = [
            (good(other, METRICS_PORT), 0.3),
            (b"workers: [unclosed\n  sync: {{\n", 0.3),  # invalid YAML
            ("# caf\u00e9 ".encode("latin-1") + good(other, METRICS_PORT), 0.3),  # not UTF-8
            (good(final_variant, METRICS_ALT[0]), 0.0),  # the metrics address A -> B -> C
            (good(final_variant, METRICS_ALT[1]), 2.0),  # in one turn (two SIGHUPs at once)
        ]
        soak.storming = True
        start = now()
        for content, pause in steps:
            write_atomically(inst.config_path, content)
            os.kill(parent, signal.SIGHUP)
            if pause:
                time.sleep(pause)
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{METRICS_ALT[0]}/metrics", timeout=2)
            soak.violate("listeners", f"{inst.name}: metrics moved A -> B -> C in one turn, and B still answers")
        try:
            httpx.get(f"http://127.0.0.1:{METRICS_ALT[1]}/metrics", timeout=2).raise_for_status()
        except httpx.HTTPError as e:
            soak.violate(
                "listeners", f"{inst.name}: metrics moved A -> B -> C in one turn, and C does not answer: {e!r}"
            )
        write_atomically(inst.config_path, good(final_variant, METRICS_PORT))  # back to A
        os.kill(parent, signal.SIGHUP)
        inst.variant = final_variant
        inst.touched |= pool_pairs(config_for(soak, inst.access_path, METRICS_PORT, "base")) ^ pool_pairs(
            config_for(soak, inst.access_path, METRICS_PORT, "moved")
        )
        soak.storm_pairs |= inst.touched
        time.sleep(3)
        soak.metrics_moved.append([start, now()])
        soak.storming = False
        # The last file wins: metrics back on METRICS_PORT, nothing left on the other address.
        for port in METRICS_ALT:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                soak.violate("listeners", f"{inst.name}: after a SIGHUP storm the metrics address {port} still answers")
        after = {i: listeners_of(pid) for i, pid in enumerate(inst.pids())}
        if sorted(map(sorted, after.values())) != sorted(map(sorted, base_listeners.values())):
            soak.violate(
                "listeners", f"{inst.name}: listening ports before the storm {base_listeners}, after it {after}"
            )

    def replace(self) -> None:
        self.soak.replacing = True
        try:
            self._replace()
        finally:
            self.soak.replacing = False

    def _replace(self) -> None:
        old = self.get()
        start = now()
        new = start_router(self.soak, old.launcher, old.processes, replace=old)
        self.set(new)
        try:
            # The new router sends SIGTERM once all its processes serve: its start-up took 95 s at
            # load average 28 on this 2-core machine; the old one then drains (grace 35 s).
            code = old.proc.wait(REPLACE_WAIT)
        except subprocess.TimeoutExpired:
            self.soak.violate(
                "graceful_exit", f"{old.name} still running {REPLACE_WAIT}s after --replace started {new.name}"
            )
            old.proc.kill()
            return
        if code != 0:
            self.soak.violate("graceful_exit", f"{old.name} exited {code} when replaced:\n{old.log()[-1500:]}")
        self.soak.stops += stop_times(old)
        wait_serving(self.soak, new)
        say(f"replaced {old.name} by {new.name} in {now() - start:.1f}s")

    def kill_child(self) -> None:
        inst = self.get()
        kids = children_of(inst.proc.pid)
        if not kids:
            return
        start = now()
        os.kill(self.soak.rng.choice(kids), signal.SIGKILL)
        inst.children_killed += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(children_of(inst.proc.pid)) < inst.processes:
            time.sleep(0.2)
        time.sleep(1.5)
        self.soak.router_down.append([start, now() + 1])


# --- monitors ----------------------------------------------------------------------------------


def sample_procs(soak: Soak, inst: RouterInstance) -> None:
    for i, pid in enumerate(inst.pids()):
        key = f"{inst.name}/{'parent' if i == 0 and inst.processes > 1 else 'process'}{'' if i == 0 else i}"
        rss, fds = rss_kib(pid), fd_count(pid)
        st = soak.proc_stats.get(key)
        if st is None:
            st = soak.proc_stats[key] = ProcStats(rss, rss, rss, fds, fds, fds)
        st.peak_rss, st.peak_fd = max(st.peak_rss, rss), max(st.peak_fd, fds)
        st.end_rss, st.end_fd = rss, fds


def watch_counters(soak: Soak, inst: RouterInstance, text: str, last: dict[tuple[str, ...], float]) -> None:
    """A requests_total series that disappears or goes down between two scrapes of one router
    instance lost counts: by design only for a (pool, worker) a reload removed (inst.touched)."""
    seen: dict[tuple[str, ...], float] = {}
    for name, labels, value in parse_metrics(text):
        if name == "synapse_router_requests_total":
            seen[(inst.name, *sorted(labels.items()))] = value  # type: ignore[arg-type]
    for key, before in list(last.items()):
        if key[0] != inst.name:
            del last[key]
            continue
        after = seen.get(key)
        if after is None or after < before:
            labels = dict(key[1:])  # type: ignore[arg-type]
            pair = (labels.get("pool", ""), labels.get("worker", ""))
            what = f"{inst.name}: requests_total{labels} went from {before:.0f} to {after} at {clock(now())}"
            if pair in soak.storm_pairs or labels.get("process"):
                soak.counter_drops.append(what)  # a removed pair, or a restarted --processes child
            else:
                soak.violate("counted_once", what + " (a series no reload removed)")
    for key in [k for k in last if k[0] == inst.name]:
        del last[key]
    last.update(seen)


async def monitor(soak: Soak, get: Callable[[], RouterInstance], stop: asyncio.Event) -> None:
    last: dict[tuple[str, ...], float] = {}
    async with httpx.AsyncClient(timeout=5) as c:
        while not stop.is_set():
            for path in ("/metrics", "/health"):
                soak.probes += 1
                t = now()
                try:
                    r = await c.get(f"http://127.0.0.1:{METRICS_PORT}{path}")
                    if r.status_code != 200:
                        soak.probe_failures.append((t, path, f"status {r.status_code}"))
                    elif soak.storming or soak.replacing or overlaps(soak.metrics_moved, t - 5, t):
                        # A storm moves the address; during --replace two routers share the
                        # port (SO_REUSEPORT) and either may answer: no instance to compare.
                        last.clear()
                    elif path == "/metrics":
                        watch_counters(soak, get(), r.text, last)
                except httpx.HTTPError as e:
                    soak.probe_failures.append((t, path, type(e).__name__))
            sample_procs(soak, get())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


# --- judging -----------------------------------------------------------------------------------


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}"


def overlaps(windows: list[list[float]], t0: float, t1: float) -> bool:
    return any(s <= t1 and t0 <= e for s, e in windows)


def write_atomically(path: Path, content: bytes) -> None:
    """Replace the file as configuration tools do (a new file renamed over it): a router reading
    it on a SIGHUP sees the old bytes or the new ones, never a file cut short. (Writing it in
    place let the router read it empty between two SIGHUPs; an empty file is refused since.)"""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content)
    os.replace(fresh, path)


def judge_records(soak: Soak) -> dict[str, Any]:
    # the debug header names a worker by URL, main as "main"
    url_name = {url: name for name, url in soak.dep.workers.items()}
    url_name |= {soak.dep.main.rstrip("/"): "main", "main": "main"}
    figures: Counter[str] = Counter()
    for r in soak.records:
        figures[f"{r.kind} {r.status if r.status is not None else r.error}{' cut ' + r.cut if r.cut else ''}"] += 1
        if r.cut:
            # A streamed answer (media) whose worker died mid-body: its head was passed on, so
            # the router can neither resend it nor answer otherwise (README: known limit).
            target = url_name.get(r.worker.rstrip("/"), "")
            if target and overlaps(soak.down[target], r.t0 - SLACK, r.t1):
                figures[f"known limit: {r.kind} answer cut mid-body while {target} was down"] += 1
            elif r.safe:
                soak.violate(
                    "safe_requests",
                    f"{r.phase}: {r.method} {r.kind} answer {r.status} cut mid-body ({r.cut}) at {clock(r.t1)}, "
                    f"its worker {target or r.worker or '?'} up",
                )
            else:
                figures[f"unsafe request cut mid-body: {r.kind} {r.cut}"] += 1
            continue
        if r.status is not None and (200 <= r.status < 300 or r.synapse):
            continue
        if r.status is None:
            at_stop = [t for t in soak.stops if r.t0 - 1.0 <= t <= r.t1 + 0.1 and r.t1 - t < 1.0]
            if overlaps(soak.router_down, r.t0, r.t1):
                figures["excused: transport error while a router process was killed"] += 1
            elif at_stop and r.t1 - r.t0 < 1.5:
                # README "Operations", known limit: an idle keep-alive connection is closed at the
                # stop, so a request sent on it at that moment sees the connection closed.
                figures[f"known limit: {r.kind} {r.error} on a keep-alive connection closed at a --replace stop"] += 1
                soak.notes.append(
                    f"{r.phase}: {r.method} {r.kind} {r.error} {r.t1 - r.t0:.2f}s, "
                    f"sent {r.t0 - at_stop[0]:+.2f}s from a replaced router's stop (README: known limit)"
                )
            elif r.safe:
                soak.violate(
                    "safe_requests",
                    f"{r.phase}: {r.method} {r.kind} got no answer ({r.error}) after {r.t1 - r.t0:.1f}s "
                    f"at {clock(r.t1)}, no router process down",
                )
            else:
                figures[f"unsafe request without answer: {r.kind} {r.error}"] += 1
            continue
        target = url_name.get(r.worker.rstrip("/"), "")
        if target:
            target_down = overlaps(soak.down[target], r.t0 - SLACK, r.t1)
        else:  # the router's own errors carry no debug headers: any Synapse process down
            downs = [n for n, w in soak.down.items() if n != "redis" and overlaps(w, r.t0 - SLACK, r.t1)]
            target_down, target = bool(downs), "unnamed (" + ",".join(downs) + " down)"
        if r.status in (502, 503, 504) and target_down:
            figures[f"excused: router {r.status} while {target} was down"] += 1
        elif r.status == 504 and overlaps(soak.down["main"], r.t0 - SLACK, r.t1):
            # The worker was up but waited on main (replication, a writer call), which died or
            # stopped meanwhile: the worker never answered, and the router's read_timeout did.
            figures[f"excused: router 504 ({target} up, waiting on main, which was down)"] += 1
        elif overlaps(soak.router_down, r.t0, r.t1) and r.status in (502, 503):
            figures["excused: router error while a router process was killed"] += 1
        elif r.safe:
            soak.violate(
                "safe_requests",
                f"{r.phase}: {r.method} {r.kind} got a router-made {r.status} (target {target or '?'} up) "
                f"at {clock(r.t1)}: {r.body}",
            )
        else:
            figures[
                f"router-made {r.status} on unsafe {r.kind} (target {target or '?'} {'down' if target_down else 'up'})"
            ] += 1
    return dict(figures)


def access_lines(path: Path) -> list[dict[str, str]]:
    from synapse_router.observability.accesslog import parse_logfmt  # noqa: PLC0415

    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                fields = parse_logfmt(line.split(": ", 1)[-1] if not line.startswith("time=") else line)
                if "method" in fields:
                    out.append(fields)
    return out


def check_quiet_instance(soak: Soak, inst: RouterInstance, baseline: dict[str, Any]) -> None:
    """After traffic stopped: in-flight gauges, descriptors, listeners, upstream connections,
    requests counted once, removed series."""
    deadline = time.monotonic() + 40
    in_flight: list[tuple[dict[str, str], float]] = []
    while time.monotonic() < deadline:
        samples = scrape()
        in_flight = [(labels, v) for name, labels, v in samples if name == "synapse_router_worker_in_flight" and v != 0]
        if not in_flight:
            break
        time.sleep(1)
    if in_flight:
        soak.violate("in_flight_zero", f"{inst.name}: after traffic stopped: {in_flight}")
    # Descriptors and sockets, waiting (up to 20 s) for the clients' connections to be closed.
    deadline = time.monotonic() + 20
    end: dict[str, Any] = {}
    while True:
        end = process_view(soak, inst)
        settled = all(
            v["clients"] == 0 and v["other_fds"] <= baseline[k]["other_fds"] for k, v in end.items() if k in baseline
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(1)
    # Idle upstream connections are kept (upstream_client.MAX_IDLE_PER_WORKER): at most as many as
    # requests were ever in flight at once: the traffic clients, the hostile ones, whoami calls
    # (max_in_flight 16) and the health checks (one per process).
    bound = soak.peak_concurrency + HOSTILE_THREADS + 16 + len(soak.dep.workers) + 1
    # Compared as a multiset over the processes: a restarted `--processes` child has a new pid,
    # so the order of the pids (the keys) says nothing about which slot (and ports) each has.
    started_with = sorted(sorted(b["listeners"]) for b in baseline.values())
    ended_with = sorted(sorted(v["listeners"]) for v in end.values())
    if started_with != ended_with:
        soak.violate("listeners", f"{inst.name}: listening ports {started_with} at start, {ended_with} after traffic")
    for k, v in end.items():
        b = baseline.get(k)
        if b is None:
            soak.notes.append(f"{inst.name} {k}: a restarted process, no baseline; now {v}")
            continue
        if v["clients"] != 0:
            soak.violate(
                "descriptors",
                f"{inst.name} {k}: {v['clients']} client connections still open after every client closed",
            )
        if v["other_fds"] > b["other_fds"]:
            soak.violate(
                "descriptors",
                f"{inst.name} {k}: {v['other_fds']} descriptors that are not TCP connections after traffic, "
                f"{b['other_fds']} at start",
            )
        if v["upstream"] > max(b["upstream"], bound) or v["redis"] > max(b["redis"], 16):
            soak.violate(
                "upstream_connections",
                f"{inst.name} {k}: {v['upstream']} Synapse and {v['redis']} Redis connections after traffic, "
                f"above the clients' peak concurrency bound {bound} (Redis: 16)",
            )
    soak.notes.append(f"{inst.name} sockets and descriptors: start {baseline} end {end}")
    # Requests counted once: metrics vs this instance's access log.
    samples = scrape()
    by_pair_metrics: Counter[tuple[str, str]] = Counter()
    for name, labels, v in samples:
        if name == "synapse_router_requests_total":
            by_pair_metrics[(labels.get("pool", ""), labels.get("worker", ""))] += int(v)
    lines = access_lines(inst.access_path)
    by_pair_lines = Counter((f.get("pool", ""), f.get("worker", "")) for f in lines)
    pairs = (set(by_pair_metrics) | set(by_pair_lines)) - inst.touched
    m_total = sum(by_pair_metrics[p] for p in pairs)
    l_total = sum(by_pair_lines[p] for p in pairs)
    differ = {p: (by_pair_metrics[p], by_pair_lines[p]) for p in pairs if by_pair_metrics[p] != by_pair_lines[p]}
    left_out = f" ({len(inst.touched)} (pool, worker) pairs a reload removed left out)" if inst.touched else ""
    if inst.children_killed:
        soak.notes.append(
            f"{inst.name}: requests_total {m_total} vs {l_total} access-log lines{left_out}: not judged "
            f"({inst.children_killed} process(es) SIGKILLed: their counts died with them)"
        )
    elif differ:
        soak.violate(
            "counted_once",
            f"{inst.name}: requests_total {m_total} but {l_total} access-log lines{left_out}; "
            f"(pool, worker): (metrics, lines) differ for {differ}",
        )
    else:
        soak.notes.append(f"{inst.name}: requests_total {m_total} == {l_total} access-log lines{left_out}")
    # No series of a removed (pool, worker).
    config = yaml.safe_load(inst.config_path.read_bytes())
    pairs = pool_pairs(config)
    known = {w for _, w in pairs} | {soak.dep.main, soak.dep.main.rstrip("/")}
    for name, labels, _ in samples:
        worker = labels.get("worker")
        if worker is None or worker in (soak.dep.main, soak.dep.main.rstrip("/"), "main"):
            continue
        pool = labels.get("pool")
        if worker not in known or (pool is not None and pool != "main" and (pool, worker) not in pairs):
            soak.violate(
                "removed_series",
                f"{inst.name}: {name}{labels} for a (pool, worker) the configuration ({inst.variant}) does not have",
            )
            break


def process_view(soak: Soak, inst: RouterInstance) -> dict[str, Any]:
    """Per router process: descriptors, and its TCP sockets by kind (listeners, client
    connections, connections to Synapse, to Redis, to the metrics listener, CLOSE-WAIT)."""
    upstream_ports = {int(u.rsplit(":", 1)[1]) for u in [*soak.dep.workers.values(), soak.dep.main]}
    redis_port = int(soak.dep.info["redis"]["port"])
    view: dict[str, Any] = {}
    for i, pid in enumerate(inst.pids()):
        socks = sockets_of(pid)
        fds = fd_count(pid)
        view[f"pid{i}"] = {
            "fds": fds,
            "other_fds": fds - len(socks),  # files, pipes, eventfds, unix sockets
            "other": dict(Counter(other_fds(pid))),
            "listeners": sorted(lp for lp, _, st in socks if st == "0A"),
            "clients": sum(1 for lp, _, st in socks if st != "0A" and lp == PROXY_PORT),
            "upstream": sum(1 for _, rp, _ in socks if rp in upstream_ports),
            "redis": sum(1 for _, rp, _ in socks if rp == redis_port),
            "close_wait_upstream": sum(1 for _, rp, st in socks if st == "08" and rp in upstream_ports),
            "close_wait_redis": sum(1 for _, rp, st in socks if st == "08" and rp == redis_port),
        }
    return view


def check_logs(soak: Soak, instances: list[RouterInstance]) -> None:
    for inst in instances:
        text = inst.log()
        if "Traceback" in text:
            i = text.index("Traceback")
            soak.violate("tracebacks", f"{inst.name} ({inst.log_path}):\n{text[max(0, i - 600) : i + 1500]}")


def check_counts(soak: Soak, phase: str, instances: list[RouterInstance]) -> None:
    """Access-log lines with a status from the traffic clients (127.0.0.1) against the responses
    they got. A line marked `upload=cut` (README "Access log": the answer was written while the
    client still sent its body) may have reached the client as a reset instead."""
    responses = sum(1 for r in soak.records if r.phase == phase and r.status is not None)
    lines = [
        f
        for inst in instances
        for f in access_lines(inst.access_path)
        if f.get("client_ip") == "127.0.0.1" and f.get("status")
    ]
    cut = sum(1 for f in lines if f.get("upload") == "cut")
    killed = sum(inst.children_killed for inst in instances)
    text = (
        f"{phase}: {responses} responses to the traffic clients, {len(lines)} access-log lines with a status "
        f"from them ({cut} upload=cut)"
    )
    if killed:
        soak.notes.append(text + f" (not judged: {killed} router process(es) SIGKILLed)")
    elif not len(lines) - cut <= responses <= len(lines):
        soak.violate("counted_once", text)
    else:
        soak.notes.append(text)


def check_sends(soak: Soak, token: str, room: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    url = f"{soak.dep.main}/_matrix/client/v3/rooms/{room}/messages"
    params: dict[str, Any] = {"dir": "b", "limit": 1000}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
        while True:
            r = c.get(url, params=params)
            r.raise_for_status()
            body = r.json()
            for ev in body.get("chunk", []):
                text = ev.get("content", {}).get("body", "")
                if ev.get("type") == "m.room.message" and text.startswith("soak "):
                    counts[text.removeprefix("soak ")] += 1
            if not body.get("chunk") or "end" not in body:
                break
            params["from"] = body["end"]
    twice = {t: n for t, n in counts.items() if n > 1}
    missing = [t for t, s in soak.sent.items() if s == "ok" and counts[t] != 1]
    if twice:
        soak.violate(
            "sends_exactly_once",
            f"{len(twice)} txnIds in the timeline more than once: {dict(list(twice.items())[:10])}",
        )
    if missing:
        soak.violate(
            "sends_exactly_once",
            f"{len(missing)} sends answered 200 but not exactly once in the timeline: {missing[:10]}",
        )
    failed = sum(1 for s in soak.sent.values() if s != "ok")
    return {
        "sent": len(soak.sent),
        "answered_200": len(soak.sent) - failed,
        "failed": failed,
        "failed_but_in_timeline": sum(1 for t, s in soak.sent.items() if s != "ok" and counts[t] == 1),
    }


# --- phases ------------------------------------------------------------------------------------


def phases_for(launcher: str) -> list[tuple[str, str, int, float]]:
    """(name, launcher, processes, share of the duration)."""
    lean = [("lean", "synapse-router", 1, 0.35), ("lean-p2", "synapse-router", 2, 0.3)]
    dump = [("mitmdump", "mitmdump", 1, 0.35)]
    chosen = {"both": lean + dump, "synapse-router": lean, "mitmdump": dump}[launcher]
    total = sum(p[3] for p in chosen)
    return [(name, which, procs, share / total) for name, which, procs, share in chosen]


async def run_phase(
    soak: Soak,
    name: str,
    launcher: str,
    processes: int,
    seconds: float,
    users: list[User],
    churn: User,
    room: str,
    instances: list[RouterInstance],
) -> None:
    soak.phase = name
    say(f"phase {name}: {launcher} processes={processes} for {seconds:.0f}s")
    current = [start_router(soak, launcher, processes)]
    first = current[0]
    instances.append(first)
    await asyncio.to_thread(wait_serving, soak, current[0])
    await asyncio.sleep(1.5)
    baseline = process_view(soak, current[0])

    def get() -> RouterInstance:
        return current[0]

    def set_(inst: RouterInstance) -> None:
        current[0] = inst
        instances.append(inst)

    faults = Faults(soak, launcher, processes, get, set_)
    traffic = Traffic(soak, users, churn, room)
    stop_monitor = asyncio.Event()
    mon = asyncio.create_task(monitor(soak, get, stop_monitor))
    stop_hostile = threading.Event()
    hostile_threads = [
        threading.Thread(target=hostile_loop, args=(soak, stop_hostile, soak.rng.random()), daemon=True)
        for _ in range(HOSTILE_THREADS)
    ]
    for t in hostile_threads:
        t.start()
    run = asyncio.create_task(traffic.run())
    end = time.monotonic() + seconds
    applicable = set(faults.kinds())
    await asyncio.sleep(min(5, seconds / 6))
    while time.monotonic() < end - 8:
        # One seeded cycle over every kind, carried across phases (a short run still meets most
        # kinds); the kinds this phase cannot have (--replace under mitmdump) are passed over.
        kind = soak.next_fault(applicable)
        try:
            await asyncio.to_thread(faults.run, kind)
        except Exception as e:
            soak.violate("fault_schedule", f"{kind} failed: {e}")
        await asyncio.sleep(soak.rng.uniform(2, 5))
    while time.monotonic() < end:
        await asyncio.sleep(0.5)
    say(f"phase {name}: stopping traffic")
    traffic.stop.set()
    stop_hostile.set()
    await run
    for t in hostile_threads:
        await asyncio.to_thread(t.join, 30)
    await asyncio.sleep(1)
    inst = current[0]
    if inst is not first:
        # A router that replaced the first one is judged against the first one's baseline
        # (same launcher, configuration and process count).
        soak.notes.append(
            f"{inst.name}: replaced {first.name} during the phase; judged against {first.name}'s baseline"
        )
    stop_monitor.set()
    await mon
    await asyncio.to_thread(check_quiet_instance, soak, inst, baseline)
    await asyncio.to_thread(stop_router, soak, inst)


def judge_probes(soak: Soak) -> int:
    bad = 0
    for t, path, what in soak.probe_failures:
        if overlaps(soak.router_down, t, t) or overlaps(soak.metrics_moved, t, t):
            continue
        bad += 1
        if bad <= 5:
            soak.violate("metrics_health", f"{path} failed at {time.strftime('%H:%M:%S', time.localtime(t))}: {what}")
    return bad


def setup_users(soak: Soak, count: int) -> tuple[list[User], User, str]:
    users = []
    for i in range(count + 1):
        localpart = f"soak{soak.run_id}u{i}"
        password = uuid.uuid4().hex
        info = register_user(soak.dep.main, soak.dep.secret, localpart, password)
        users.append(User(localpart, info["user_id"], password, info["access_token"]))
    main = soak.dep.main
    with httpx.Client(timeout=60) as c:
        r = c.post(
            f"{main}/_matrix/client/v3/createRoom",
            headers={"Authorization": f"Bearer {users[0].token}"},
            json={"preset": "public_chat", "name": f"soak {soak.run_id}"},
        )
        r.raise_for_status()
        room = r.json()["room_id"]
        for u in users[1:count]:
            c.post(
                f"{main}/_matrix/client/v3/join/{room}", headers={"Authorization": f"Bearer {u.token}"}, json={}
            ).raise_for_status()
    return users[:count], users[count], room


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=180, help="seconds of traffic and faults (all phases)")
    ap.add_argument("--launcher", choices=["both", "synapse-router", "mitmdump"], default="both")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--max-rss-mib", type=float, default=400)
    ap.add_argument("--work", type=Path, default=None, help="where logs go (default: a new directory under /tmp)")
    ap.add_argument("--keep-deployment", action="store_true")
    args = ap.parse_args(argv)
    work = args.work or Path(f"/tmp/soak-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    for port in (PROXY_PORT, METRICS_PORT, METRICS_PORT + 1, METRICS_PORT + 2, *METRICS_ALT):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                print(f"soak: port {port} is in use: another soak running?", file=sys.stderr)
                return 2
    say(
        f"work directory {work}; bringing up Synapse in {STATE_DIR} "
        f"(base port {os.environ['SYNAPSE_DEPLOY_BASE_PORT']})"
    )
    dep = bring_up(STATE_DIR, "default")
    soak = Soak(args, dep, work, random.Random(args.seed), f"{time.strftime('%H%M%S')}{os.urandom(2).hex()}")
    instances: list[RouterInstance] = []
    started = time.monotonic()
    figures: dict[str, Any] = {}
    sends: dict[str, int] = {}
    bad_probes = 0
    try:
        users, churn, room = setup_users(soak, args.users)
        probe = httpx.post(
            f"{dep.main}{SLIDING}?timeout=0",
            headers={"Authorization": f"Bearer {users[0].token}"},
            json={"lists": {}},
            timeout=30,
        )
        soak.notes.append(f"sliding sync on Synapse {dep.info.get('synapse_version')}: {probe.status_code}")
        for name, launcher, processes, share in phases_for(args.launcher):
            asyncio.run(
                run_phase(soak, name, launcher, processes, args.duration * share, users, churn, room, instances)
            )
        check_logs(soak, instances)
        for name, *_ in phases_for(args.launcher):
            check_counts(soak, name, [i for i in instances if PHASE_OF.get(i.name) == name])
        sends = check_sends(soak, users[0].token, room)
        figures = judge_records(soak)
        bad_probes = judge_probes(soak)
        for key, st in soak.proc_stats.items():
            if st.peak_rss > args.max_rss_mib * 1024:
                soak.violate("rss", f"{key}: peak RSS {st.peak_rss / 1024:.0f} MiB > {args.max_rss_mib} MiB")
    except Exception:
        import traceback  # noqa: PLC0415

        soak.violate("soak_error", f"the soak itself failed:\n{traceback.format_exc()}")
    finally:
        for inst in instances:
            if inst.proc.poll() is None:
                inst.proc.kill()
                inst.proc.wait()
        if dep.started_here and not args.keep_deployment:
            dep.run("down", timeout=300)
    print_summary(soak, instances, figures, sends, bad_probes, time.monotonic() - started)
    return 1 if soak.violations else 0


def print_summary(
    soak: Soak,
    instances: list[RouterInstance],
    figures: dict[str, Any],
    sends: dict[str, int],
    bad_probes: int,
    elapsed: float,
) -> None:
    by_kind: Counter[str] = Counter(r.kind for r in soak.records)
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    for r in soak.records:
        statuses[r.kind][str(r.status) if r.status is not None else r.error] += 1
    print(
        f"=== soak summary: seed {soak.args.seed}, launcher {soak.args.launcher}, "
        f"duration {soak.args.duration:.0f}s, {elapsed:.0f}s wall ==="
    )
    print(
        f"requests by kind ({len(soak.records)}): "
        + ", ".join(f"{k} {n} {dict(statuses[k])}" for k, n in sorted(by_kind.items()))
    )
    print(f"sends: {sends}")
    print(f"faults injected ({sum(soak.faults.values())}): {dict(sorted(soak.faults.items()))}")
    print(f"hostile clients ({sum(soak.hostile_outcomes.values())}): {dict(sorted(soak.hostile_outcomes.items()))}")
    print(
        "router instances: "
        + ", ".join(f"{i.name} ({i.launcher} x{i.processes}, {PHASE_OF.get(i.name)})" for i in instances)
    )
    print(
        f"/metrics and /health probes: {soak.probes}, failed {len(soak.probe_failures)} "
        f"(outside router-down and metrics-move windows: {bad_probes})"
    )
    print(
        "judged answers: "
        + ", ".join(
            f"{k}: {v}" for k, v in sorted(figures.items()) if k.startswith(("excused", "router-made", "unsafe"))
        )
    )
    print("RSS MiB / fds (start, peak, end):")
    for key, st in soak.proc_stats.items():
        print(
            f"  {key}: rss {st.start_rss / 1024:.0f} / {st.peak_rss / 1024:.0f} / {st.end_rss / 1024:.0f}"
            f"  fds {st.start_fd} / {st.peak_fd} / {st.end_fd}"
        )
    print(f"peak client concurrency: {soak.peak_concurrency}")
    for drop in soak.counter_drops[:10]:
        print(f"note: by design (a reload removed the pair, or a process restarted): {drop}")
    for note in soak.notes:
        print(f"note: {note}")
    invariants = [
        "safe_requests",
        "sends_exactly_once",
        "in_flight_zero",
        "descriptors",
        "listeners",
        "upstream_connections",
        "rss",
        "metrics_health",
        "counted_once",
        "removed_series",
        "tracebacks",
        "graceful_exit",
        "media_bytes",
        "fault_schedule",
        "soak_error",
    ]
    broken = Counter(v.invariant for v in soak.violations)
    print(
        "invariants: "
        + ", ".join(f"{name} {'VIOLATED x' + str(broken[name]) if broken[name] else 'ok'}" for name in invariants)
    )
    print(f"work directory: {soak.work}")
    if soak.violations:
        print(f"FAILED: {len(soak.violations)} violation(s) of {', '.join(sorted(broken))}")
    else:
        print("PASSED: no invariant violated")


if __name__ == "__main__":
    sys.exit(main())
