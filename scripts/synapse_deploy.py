#!/usr/bin/env python3.12
"""A real Synapse deployment on loopback (main + 3 generic workers, PostgreSQL, Redis).

For the end-to-end tests, the demo and the benchmarks. Standard library only.

    python3.12 scripts/synapse_deploy.py up            [--topology T] [--state-dir DIR] [--venv DIR] [--timeout S]
    python3.12 scripts/synapse_deploy.py status        [--state-dir DIR]
    python3.12 scripts/synapse_deploy.py down          [--state-dir DIR]
    python3.12 scripts/synapse_deploy.py stop-worker  generic2 [--state-dir DIR]
    python3.12 scripts/synapse_deploy.py start-worker generic2 [--state-dir DIR] [--timeout S]

`up` installs what is missing (Debian's postgresql, redis-server and prometheus through apt-get,
without letting the packages start their default instances; a virtualenv STATE/venv with Synapse and
psycopg2-binary from PyPI), creates a private PostgreSQL cluster and a private Redis, writes the
Synapse configuration, starts everything that is not already running, waits until every listener
answers `GET /health` with 200, and prints ONE line of JSON on stdout (progress goes to stderr):

    {"server_name": "test.local", "main": "http://127.0.0.1:18008",
     "replication": "http://127.0.0.1:18093",
     "workers": {"generic1": "http://127.0.0.1:18081", "generic2": ..., "generic3": ...},
     "registration_shared_secret": "...",
     "postgres": {"host", "port", "database", "user", "password", "dsn", "data_dir", "log"},
     "redis": {"host", "port", "log"},
     "logs": {"main": ".../logs/main.log", "generic1": ..., ...},   # Synapse processes only
     "pids": {"main": 123, "generic1": ..., "postgres": ..., "redis": ...},
     "synapse_version": "1.163.2", "python": ".../venv/bin/python", "state_dir": "..."}

Topologies (`--topology`; a state directory remembers its own in STATE/topology, so later
commands need only `--state-dir`, or nothing for the topology's default directory):

    default  main + generic1..3 (any endpoint a generic worker serves); state .synapse-deploy/
    full     every kind of process the router's route table names, as docs/workers.md sets
             them up; state .synapse-deploy-full/, ports shifted by 100 (both can run at once):
             writer1      stream writer of typing, to_device, account_data, receipts, presence,
                          push_rules, device_lists, thread_subscriptions (client + replication)
             persister1   event persister (`stream_writers.events`; replication listener only)
             media1       media repository (synapse.app.media_repository, `media` resource;
                          `enable_media_repo: false` and `media_instance_running_background_jobs`
                          in the shared config) and quarantined_media_changes writer
             initial_sync1, sync1 (client), client_reader1 (client and federation: it is also the
                          `generic` pool, where federation routes fall back), federation_reader1 (federation)
    mas      Synapse in MAS mode, for QR login (MSC4108 and MSC4388 need it in Synapse 1.163):
             main + generic1..3 as in default, `matrix_authentication_service` enabled and
             pointing at scripts/mas_standin.py (a stand-in for the Matrix Authentication
             Service: token introspection, and users/devices provisioned through Synapse's
             `/_synapse/mas/` calls; MAS itself is packaged nowhere this project installs from),
             which runs as the process "mas" on base + 440 (18440); `experimental_features:
             {msc4108_enabled: true, msc4388_mode: open}`; `compress: true` on every listener
             resource (Synapse gzips only main's client resource); `password_config.enabled:
             false` (MAS mode refuses it). State .synapse-deploy-mas/, ports shifted by 400.
             Users and tokens come from the stand-in, not from /login or the shared-secret
             registration: `POST <mas.sessions> {"localpart": "alice"}` with `Authorization:
             Bearer <mas.secret>` answers 201 {"access_token", "device_id", "user_id",
             "expires_in"}, a new MAS session and device each call (the JSON's "mas" object:
             {"url", "secret", "sessions", "log"}; scripts/mas_standin.py's docstring has the rest).
    The JSON also has "worker_replication", "roles", "resources" and "stream_writers". `--venv DIR`
    uses (or creates) a Synapse virtualenv elsewhere, e.g. the default deployment's, so a
    second topology costs no second install (remembered in STATE/venv_path). The full topology
    enables `experimental_features.msc4306_enabled` (thread subscriptions have endpoints).

The JSON's "rss_kib" is the resident set of every process in KiB and their sum ("total";
PostgreSQL's entry sums the postmaster and its backends, shared buffers counted in each);
"pss_kib" the same as proportional set sizes (shared pages shared out: no double counting).

`up` is idempotent (a second `up` only re-checks and re-prints the JSON). `status` prints the
same JSON and exits 0 when every process is running and healthy, else exits 1 and says on
stderr what is down. `down` stops exactly the processes whose pid files are in STATE/pids
(SIGTERM, wait, SIGKILL; PostgreSQL with `pg_ctl stop -m fast`), never anything by name. A pid
counts as ours only while its process is alive and its working directory is inside STATE (Synapse
runs in STATE, PostgreSQL in its data dir, Redis in STATE/redis), so a recycled pid is never
signalled. Every process runs in its own session, detached from the caller.
`stop-worker NAME` stops one worker; `start-worker NAME` starts it again, waits for its
/health and prints the JSON. `router-config` prints a synapse-router configuration (YAML) whose
pools are the deployment's processes (the JSON's "router_pools": for the default topology the
generic workers as `sync`, `client_reader`, `room` and `generic`; for the full one a pool for every kind of
process, stream writers included).

Ports (loopback only) derive from SYNAPSE_DEPLOY_BASE_PORT (default 18000):

    main client+federation  base + 8     18008
    main replication        base + 93    18093
    generic1..3             base + 81..83  18081..18083
    PostgreSQL              base - 2568  15432
    Redis                   base - 1621  16379
    full topology: every port above + 100; worker i (1-based)
    listens on base + 180 + i (order of "Topologies"), a stream writer's replication listener on base + 160 + i
    mas topology: every port above + 400 (main 18408, generic1..3 18481..18483, PostgreSQL
    15832, Redis 16779), and the MAS stand-in on base + 440 (18440)

The ports of a running deployment are kept in STATE/ports.json, so `status`, `down` and the
worker commands work whatever the environment says; a change of base takes effect at the next
`up` after `down`.

State directory (default `.synapse-deploy/` at the repository root):

    secrets.json ports.json homeserver.yaml workers/<name>.yaml log_config/<name>.yaml
    mas_secret (mas topology: `matrix_authentication_service.secret_path`; logs/mas.stdout is
    the stand-in's log: method, path and status of each request)
    keys/ media_store/ venv/ pg/data (owned by the `postgres` user when run as root)
    pgsock/ redis/ pids/<name>.pid logs/<name>.log (Synapse's own log, incl. access lines)
    logs/<name>.stdout (stdout/stderr) logs/postgres.log logs/redis.log

Synapse's access log lines (logger `synapse.access.http.<port>`, INFO) name the user:
`... - {@alice:test.local} Processed request: ... 200 "GET /_matrix/client/v3/sync?... HTTP/1.1" ...`

Each start appends a `==== synapse_deploy ... starting NAME` line to the process's log and stdout
file; a start-up failure report shows the tail of both since that line.

Environment: SYNAPSE_DEPLOY_BASE_PORT, SYNAPSE_DEPLOY_SYNAPSE_SPEC (pip requirement for Synapse,
default `matrix-synapse[redis]>=1.163`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVER_NAME = "test.local"
HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 18000
DEFAULT_TIMEOUT = 120.0
DEFAULT_SYNAPSE_SPEC = "matrix-synapse[redis]>=1.163"
# psycopg2-binary instead of Synapse's `postgres` extra: that extra pulls the source package
# psycopg2, which compiles against libpq-dev. Synapse only imports the `psycopg2` module.
EXTRA_PACKAGES = ("psycopg2-binary",)
PG_DB = "synapse"
PG_USER = "synapse"
PG_OS_USER = "postgres"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
SOCKET_PATH_MAX = 107


class DeployError(Exception):
    """A failure with a message meant for the person running the script."""


# --------------------------------------------------------------------------- topologies


@dataclass(frozen=True)
class Worker:
    name: str
    role: str  # what the process is for, as the JSON's "roles" tells it
    resources: tuple[str, ...] = ("client", "federation")  # of its HTTP listener; () for none
    replication: bool = False  # a stream writer: a replication listener and an instance_map entry
    app: str = "synapse.app.generic_worker"
    config: tuple[tuple[str, Any], ...] = ()  # extra keys of its worker configuration


@dataclass(frozen=True)
class Topology:
    """The Synapse processes of a deployment. `offset` shifts every port (PostgreSQL and Redis
    included) so that two topologies on one base port can run side by side."""

    name: str
    workers: tuple[Worker, ...]
    offset: int
    state_dir: str  # default state directory, relative to the repository
    stream_writers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    shared: tuple[tuple[str, Any], ...] = ()  # extra keys of homeserver.yaml
    # The router's pools for this deployment (pool -> worker names); every stream writer's
    # stream is a pool of its own as well (`router_pools`).
    pools: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Authentication delegated to MAS: the stand-in (scripts/mas_standin.py) runs as the
    # process "mas" and Synapse's `matrix_authentication_service` points at it.
    mas: bool = False
    # `compress` of every HTTP listener resource (Synapse gzips only main's client resource).
    compress: bool = False

    def router_pools(self) -> dict[str, list[str]]:
        pools = {pool: list(names) for pool, names in self.pools}
        pools.update((stream, list(names)) for stream, names in self.stream_writers if stream != "events")
        return pools

    @property
    def worker_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.workers)

    @property
    def synapse_names(self) -> tuple[str, ...]:
        return ("main", *self.worker_names)

    @property
    def helper_names(self) -> tuple[str, ...]:
        """The processes besides Synapse's: PostgreSQL, Redis and, in MAS mode, the stand-in."""
        return ("postgres", "redis", *(("mas",) if self.mas else ()))

    def worker(self, name: str) -> Worker:
        for w in self.workers:
            if w.name == name:
                return w
        raise DeployError(f"no worker {name!r} in the {self.name} topology (it has {', '.join(self.worker_names)})")


DEFAULT_TOPOLOGY = Topology(
    name="default",
    workers=tuple(Worker(f"generic{i}", "generic") for i in (1, 2, 3)),
    offset=0,
    state_dir=".synapse-deploy",
    pools=tuple((pool, ("generic1", "generic2", "generic3")) for pool in ("sync", "client_reader", "room", "generic")),
)

# Every kind of process the router's route table names, configured as docs/workers.md
# prescribes: stream writers (several streams share one process to save memory; each is in
# `instance_map` with a replication listener), an event persister, a media repository worker
# (`enable_media_repo: false` in the shared configuration), an initial-sync/sync pair, a client
# reader and a federation reader.
WRITER_STREAMS = (
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
)
FULL_TOPOLOGY = Topology(
    name="full",
    workers=(
        Worker("writer1", "stream writer: " + ", ".join(WRITER_STREAMS), ("client",), replication=True),
        Worker("persister1", "event persister (events stream)", (), replication=True),
        Worker(
            "media1",
            "media repository, quarantined_media_changes writer",
            ("media",),
            replication=True,
            app="synapse.app.media_repository",
        ),
        Worker("initial_sync1", "initial sync", ("client",)),
        Worker("sync1", "sync", ("client",)),
        Worker("client_reader1", "client reader", ("client", "federation")),  # also the `generic` pool
        Worker("federation_reader1", "federation reader", ("federation",)),
    ),
    offset=100,
    state_dir=".synapse-deploy-full",
    stream_writers=(
        *((stream, ("writer1",)) for stream in WRITER_STREAMS),
        ("events", ("persister1",)),
        ("quarantined_media_changes", ("media1",)),
    ),
    shared=(
        ("enable_media_repo", False),
        ("media_instance_running_background_jobs", "media1"),
        # Thread subscriptions (MSC4306/MSC4308) have a stream writer but no endpoint without it.
        ("experimental_features", {"msc4306_enabled": True}),
    ),
    pools=(
        ("sync", ("sync1",)),
        ("initial_sync", ("initial_sync1",)),
        ("client_reader", ("client_reader1",)),
        ("generic", ("client_reader1",)),
        ("room", ("client_reader1",)),
        ("user_dir", ("client_reader1",)),
        ("federation_reader", ("federation_reader1",)),
        ("media", ("media1",)),
    ),
)
# Synapse in MAS mode (authentication delegated to the Matrix Authentication Service, here its
# stand-in), QR login on (MSC4108 and MSC4388, which Synapse 1.163 allows only with MAS) and
# `compress: true` on every listener resource, as an operator following the QR-login docs runs it.
MAS_TOPOLOGY = Topology(
    name="mas",
    workers=tuple(Worker(f"generic{i}", "generic") for i in (1, 2, 3)),
    offset=400,
    state_dir=".synapse-deploy-mas",
    shared=(
        ("experimental_features", {"msc4108_enabled": True, "msc4388_mode": "open"}),
        # MAS mode refuses Synapse's own password login (ConfigError otherwise).
        ("password_config", {"enabled": False}),
    ),
    pools=DEFAULT_TOPOLOGY.pools,
    mas=True,
    compress=True,
)
TOPOLOGIES = {t.name: t for t in (DEFAULT_TOPOLOGY, FULL_TOPOLOGY, MAS_TOPOLOGY)}


def say(message: str) -> None:
    print(f"[synapse-deploy] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- layout and ports


@dataclass(frozen=True)
class Ports:
    main: int
    replication: int
    workers: tuple[tuple[str, int], ...]  # HTTP listener (client/federation/media resources)
    worker_replication: tuple[tuple[str, int], ...]  # stream writers' replication listeners
    postgres: int
    redis: int
    mas: int | None = None  # the MAS stand-in (mas topology only)

    @classmethod
    def from_base(cls, base: int, topology: Topology) -> Ports:
        base += topology.offset
        ports = cls(
            main=base + 8,
            replication=base + 93,
            workers=tuple((w.name, base + 81 + i) for i, w in enumerate(topology.workers) if w.resources),
            worker_replication=tuple((w.name, base + 61 + i) for i, w in enumerate(topology.workers) if w.replication),
            postgres=base - 2568,
            redis=base - 1621,
            mas=base + 40 if topology.mas else None,
        )
        for port in ports.all():
            if not 1024 <= port <= 65535:
                raise DeployError(f"SYNAPSE_DEPLOY_BASE_PORT={base} gives port {port}, outside 1024..65535")
        return ports

    def worker(self, name: str) -> int:
        return dict(self.workers)[name]

    def listeners(self, name: str) -> list[int]:
        """The ports a Synapse process (or the MAS stand-in) listens on."""
        if name == "mas":
            return [] if self.mas is None else [self.mas]
        if name == "main":
            return [self.main, self.replication]
        return [p for n, p in (*self.workers, *self.worker_replication) if n == name]

    def all(self) -> list[int]:
        workers = [p for _, p in (*self.workers, *self.worker_replication)]
        mas = [] if self.mas is None else [self.mas]
        return [self.main, self.replication, *workers, self.postgres, self.redis, *mas]

    def to_json(self) -> dict[str, Any]:
        return {
            "main": self.main,
            "replication": self.replication,
            "workers": dict(self.workers),
            "worker_replication": dict(self.worker_replication),
            "postgres": self.postgres,
            "redis": self.redis,
            "mas": self.mas,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Ports:
        return cls(
            main=int(data["main"]),
            replication=int(data["replication"]),
            workers=tuple((str(n), int(p)) for n, p in data["workers"].items()),
            worker_replication=tuple((str(n), int(p)) for n, p in data.get("worker_replication", {}).items()),
            postgres=int(data["postgres"]),
            redis=int(data["redis"]),
            mas=None if data.get("mas") is None else int(data["mas"]),
        )


@dataclass(frozen=True)
class Layout:
    state: Path
    topology: Topology = DEFAULT_TOPOLOGY
    shared_venv: Path | None = None  # --venv: another deployment's Synapse install

    @property
    def venv(self) -> Path:
        return self.shared_venv or self.state / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def homeserver_yaml(self) -> Path:
        return self.state / "homeserver.yaml"

    def worker_yaml(self, name: str) -> Path:
        return self.state / "workers" / f"{name}.yaml"

    def log_config(self, name: str) -> Path:
        return self.state / "log_config" / f"{name}.yaml"

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def stdout(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.stdout"

    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    @property
    def pg_root(self) -> Path:
        return self.state / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_root / "data"

    @property
    def pg_sock(self) -> Path:
        return self.state / "pgsock"

    @property
    def redis_dir(self) -> Path:
        return self.state / "redis"

    @property
    def media(self) -> Path:
        return self.state / "media_store"

    @property
    def signing_key(self) -> Path:
        return self.state / "keys" / f"{SERVER_NAME}.signing.key"

    @property
    def secrets_file(self) -> Path:
        return self.state / "secrets.json"

    @property
    def ports_file(self) -> Path:
        return self.state / "ports.json"

    @property
    def version_file(self) -> Path:
        return self.state / "synapse_version"

    @property
    def topology_file(self) -> Path:
        return self.state / "topology"

    @property
    def mas_secret_file(self) -> Path:
        return self.state / "mas_secret"


@dataclass(frozen=True)
class Secrets:
    registration_shared_secret: str
    macaroon_secret_key: str
    form_secret: str
    pg_password: str
    pg_superuser_password: str
    mas_secret: str = ""  # matrix_authentication_service.secret (mas topology; load_secrets makes one)


def load_secrets(layout: Layout) -> Secrets:
    path = layout.secrets_file
    fields = list(Secrets.__dataclass_fields__)
    data: dict[str, str] = {}
    if path.exists():
        data = json.loads(path.read_text())
    if not all(isinstance(data.get(k), str) and data[k] for k in fields):
        data = {k: data.get(k) or secrets.token_urlsafe(32) for k in fields}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
    return Secrets(**{k: data[k] for k in fields})


def base_port_from_env() -> int:
    raw = os.environ.get("SYNAPSE_DEPLOY_BASE_PORT", "").strip()
    if not raw:
        return DEFAULT_BASE_PORT
    try:
        return int(raw)
    except ValueError:
        raise DeployError(f"SYNAPSE_DEPLOY_BASE_PORT={raw!r} is not an integer") from None


def saved_ports(layout: Layout) -> Ports | None:
    try:
        return Ports.from_json(json.loads(layout.ports_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_ports(layout: Layout, ports: Ports) -> None:
    layout.ports_file.write_text(json.dumps(ports.to_json(), indent=2) + "\n")


@contextlib.contextmanager
def state_lock(layout: Layout) -> Iterator[None]:
    """Serialise concurrent invocations on one state directory (e.g. parallel test sessions)."""
    layout.state.mkdir(parents=True, exist_ok=True)
    with open(layout.state / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another synapse_deploy.py works on {layout.state}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- processes


def is_root() -> bool:
    return os.geteuid() == 0


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def pid_is_ours(pid: int, layout: Layout) -> bool:
    """Every process we start runs with its working directory inside the state directory
    (Synapse: STATE, PostgreSQL: its data dir, Redis: STATE/redis). A pid reused by any other
    process fails this test, so we never signal a stranger."""
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    state = layout.state.resolve()
    return cwd == state or state in cwd.parents


def read_pid(layout: Layout, name: str) -> int | None:
    try:
        return int(layout.pid_file(name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def running_pid(layout: Layout, name: str) -> int | None:
    pid = read_pid(layout, name)
    if pid is not None and pid_alive(pid) and pid_is_ours(pid, layout):
        return pid
    return None


def write_pid(layout: Layout, name: str, pid: int) -> None:
    layout.pid_file(name).write_text(f"{pid}\n")


def signal_and_wait(targets: Sequence[tuple[str, int]], timeout: float = 30.0) -> None:
    """SIGTERM every target, wait up to `timeout` for all, then SIGKILL the rest."""
    for name, pid in targets:
        say(f"stopping {name} (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    remaining = list(targets)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.1)
        remaining = [(n, p) for n, p in remaining if pid_alive(p)]
    for name, pid in remaining:
        say(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for _, p in remaining) and time.monotonic() < deadline:
        time.sleep(0.1)


START_MARKER = "==== synapse_deploy "


def spawn(layout: Layout, name: str, argv: Sequence[str], cwd: Path, log: Path | None = None) -> int:
    """Start a detached process (own session), stdout+stderr to logs/<name>.stdout.

    A marker line goes into the stdout file and the process's own log first, so that a failure
    report shows only what this start wrote."""
    marker = f"{START_MARKER}{time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {shlex.join(argv)}\n"
    log = log or layout.log(name)
    with open(log, "a") as f:
        f.write(marker)
    with open(layout.stdout(name), "a") as out:
        out.write(marker)
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    write_pid(layout, name, proc.pid)
    return proc.pid


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines written since the last start marker."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    starts = [i for i, line in enumerate(text) if line.startswith(START_MARKER)]
    if starts:
        text = text[starts[-1] + 1 :]
    return "\n".join(text[-lines:]) or "(nothing)"


def failure_report(layout: Layout, name: str, log: Path | None = None) -> str:
    parts = []
    for path in (log or layout.log(name), layout.stdout(name)):
        if path.exists():
            parts.append(f"---- {path} (this start, last lines):\n{tail(path)}")
    return "\n".join(parts)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def wait_healthy(layout: Layout, targets: Mapping[str, Sequence[str]], deadline: float) -> None:
    """Wait until every URL of every process answers 200; fail fast if a process dies."""
    pending = {name: list(urls) for name, urls in targets.items()}
    while pending:
        for name in list(pending):
            pid = read_pid(layout, name)
            if pid is None or not pid_alive(pid):
                raise DeployError(f"{name} exited during start-up\n{failure_report(layout, name)}")
            pending[name] = [u for u in pending[name] if not http_ok(u, timeout=1.0)]
            if not pending[name]:
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            name = next(iter(pending))
            raise DeployError(
                f"{name} did not answer {pending[name][0]} with 200 in time\n{failure_report(layout, name)}"
            )
        time.sleep(0.25)


# --------------------------------------------------------------------------- system packages


def pg_bindir() -> Path | None:
    candidates = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def redis_server_bin() -> Path | None:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    return Path(found) if found else None


def prometheus_bin() -> Path | None:
    """Debian's Prometheus server (the e2e tests start their own instance; promtool comes with it)."""
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    return Path(found) if found else None


RECIPE_TOOLS = (
    ("systemd-analyze", "systemd"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    ("prlimit", "util-linux"),
    ("ip", "iproute2"),
)


def missing_debian_packages(packages: Sequence[str]) -> list[str]:
    """Those of `packages` dpkg does not have installed."""
    missing = []
    for package in packages:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True).stdout
        if not status.endswith("installed") or "not-installed" in status:
            missing.append(package)
    return missing


def apt_get_install(packages: Sequence[str], who: str) -> None:
    """`apt-get install` them (as root; DeployError else), their default services kept from
    starting by a policy-rc.d (`who` wrote it) while it runs; waits up to 600 s for the dpkg lock."""
    if not packages:
        return
    if not is_root():
        raise DeployError(f"missing Debian packages {list(packages)}; install them (as root) and retry")
    say(f"apt-get install {' '.join(packages)} (their default services are kept from starting)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    created_policy = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text(f"#!/bin/sh\n# written by {who} during apt-get install\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        created_policy = True
    try:
        subprocess.run(["apt-get", *lock, "update", "-q"], check=True, env=env, stdout=sys.stderr)
        subprocess.run(
            ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages],
            check=True,
            env=env,
            stdout=sys.stderr,
        )
    except subprocess.CalledProcessError as e:
        raise DeployError(f"apt-get failed: {e}") from None
    finally:
        if created_policy:
            POLICY_RC_D.unlink(missing_ok=True)


def ensure_system_packages(extra: Sequence[str] = ()) -> tuple[Path, Path]:
    """PostgreSQL, Redis, Prometheus, the recipes' tools and `extra` Debian packages (one
    apt-get run for what is missing); the PostgreSQL bin directory and redis-server."""
    missing = missing_debian_packages(extra)
    bindir = pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        missing.append("postgresql")
    if redis_server_bin() is None:
        missing.append("redis-server")
    if prometheus_bin() is None:
        missing.append("prometheus")
    # What tests/recipes/ runs the deployment recipes with (usually part of Debian already).
    for tool, package in RECIPE_TOOLS:
        if shutil.which(tool) is None and package not in missing:
            missing.append(package)
    apt_get_install(missing, "synapse_deploy.py")
    bindir, redis = pg_bindir(), redis_server_bin()
    if bindir is None or redis is None or prometheus_bin() is None:
        raise DeployError("postgresql, redis-server or prometheus still missing after apt-get install")
    return bindir, redis


# --------------------------------------------------------------------------- PostgreSQL


def pg_os_user() -> pwd.struct_passwd | None:
    """initdb refuses root: as root, the cluster belongs to the `postgres` OS user."""
    if not is_root():
        return None
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise DeployError(
            f"running as root needs the OS user {PG_OS_USER!r} (created by Debian's postgresql)"
        ) from None


def run_as_pg(argv: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    user = pg_os_user()
    extra: dict[str, Any] = {}
    if user is not None:
        extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        kwargs.setdefault("env", {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name})
    kwargs.setdefault("cwd", "/")
    result = subprocess.run(list(argv), text=True, capture_output=True, **extra, **kwargs)
    if check and result.returncode != 0:
        raise DeployError(f"{shlex.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def chown_to_pg(path: Path) -> None:
    user = pg_os_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


def let_pg_traverse(path: Path) -> None:
    """PostgreSQL runs as its own OS user, which must be able to reach the state directory: add
    search (x, not read) permission for others on ancestors that lack it, e.g. a mode-700
    temporary directory the checkout lives in."""
    if pg_os_user() is None:
        return
    for ancestor in [path, *path.parents]:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            say(f"chmod o+x {ancestor} (so the postgres user can reach {path})")
            ancestor.chmod(mode | stat.S_IXOTH)


def ensure_pg_cluster(layout: Layout, bindir: Path, sec: Secrets) -> None:
    if (layout.pg_data / "PG_VERSION").exists():
        return
    say(f"initdb {layout.pg_data}")
    let_pg_traverse(layout.state)
    layout.pg_root.mkdir(mode=0o700, exist_ok=True)
    chown_to_pg(layout.pg_root)
    if layout.pg_data.exists():  # a half-made cluster from an interrupted run
        shutil.rmtree(layout.pg_data)
    pwfile = layout.pg_root / "pwfile"
    pwfile.write_text(sec.pg_superuser_password + "\n")
    pwfile.chmod(0o600)
    chown_to_pg(pwfile)
    try:
        run_as_pg(
            [
                str(bindir / "initdb"),
                "-D",
                str(layout.pg_data),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--locale=C",
                "--encoding=UTF8",
            ]
        )
    finally:
        pwfile.unlink(missing_ok=True)


def pg_socket_dir(layout: Layout, port: int) -> str:
    """The unix socket lives in STATE/pgsock unless that path is too long for a socket."""
    if len(f"{layout.pg_sock}/.s.PGSQL.{port}") > SOCKET_PATH_MAX:
        return ""
    return str(layout.pg_sock)


def start_postgres(layout: Layout, bindir: Path, ports: Ports) -> None:
    if running_pid(layout, "postgres"):
        return
    if port_in_use(ports.postgres):
        raise DeployError(f"port {ports.postgres} (PostgreSQL) is already taken by a process we did not start")
    layout.pg_sock.mkdir(exist_ok=True)
    chown_to_pg(layout.pg_sock)
    log = layout.state / "logs" / "postgres.log"
    log.touch()
    chown_to_pg(log)
    stale = layout.pg_data / "postmaster.pid"
    if stale.exists():
        with contextlib.suppress(OSError, ValueError, IndexError):
            old = int(stale.read_text().split()[0])
            if not (pid_alive(old) and pid_is_ours(old, layout)):
                stale.unlink()
    say(f"starting PostgreSQL on {HOST}:{ports.postgres}")
    pg_ctl_start(
        bindir,
        layout.pg_data,
        log,
        layout.pg_root,
        {"port": str(ports.postgres), "unix_socket_directories": pg_socket_dir(layout, ports.postgres)},
    )
    try:
        pid = int((layout.pg_data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise DeployError(f"PostgreSQL started but wrote no postmaster.pid\n{tail(log)}") from None
    write_pid(layout, "postgres", pid)


def pg_ctl_start(bindir: Path, data: Path, log: Path, cwd: Path, settings: Mapping[str, str]) -> None:
    """`pg_ctl start` the cluster in `data` as a throwaway test database (durability off,
    listening on HOST, 200 connections unless `settings` say otherwise), waiting up to 60 s."""
    settings = {
        "listen_addresses": HOST,
        "max_connections": "200",
        # A throwaway test database: durability buys nothing here.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        **settings,
    }
    options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())
    run_as_pg(
        [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"],
        cwd=str(cwd),
    )


def pg_ctl_stop(bindir: Path, data: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`pg_ctl stop -m fast`, waiting up to 60 s; its result (not checked)."""
    return run_as_pg(
        [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], check=False, cwd=str(cwd)
    )


def psql(bindir: Path, ports: Ports, sec: Secrets, sql: str) -> str:
    env = {**os.environ, "PGPASSWORD": sec.pg_superuser_password, "PGCONNECT_TIMEOUT": "5"}
    argv = [str(bindir / "psql"), "-h", HOST, "-p", str(ports.postgres), "-U", "postgres", "-d", "postgres"]
    argv += ["-v", "ON_ERROR_STOP=1", "-tAc", sql]
    result = subprocess.run(argv, env=env, text=True, capture_output=True, cwd="/")
    if result.returncode != 0:
        raise DeployError(f"psql failed on {sql!r}: {result.stderr.strip()}")
    return result.stdout.strip()


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def ensure_pg_database(bindir: Path, ports: Ports, sec: Secrets) -> None:
    if psql(bindir, ports, sec, f"SELECT 1 FROM pg_roles WHERE rolname = {sql_literal(PG_USER)}") != "1":
        say(f"creating PostgreSQL role {PG_USER}")
        psql(bindir, ports, sec, f"CREATE ROLE {PG_USER} LOGIN PASSWORD {sql_literal(sec.pg_password)}")
    if psql(bindir, ports, sec, f"SELECT 1 FROM pg_database WHERE datname = {sql_literal(PG_DB)}") != "1":
        say(f"creating database {PG_DB} (UTF8, C collation)")
        psql(
            bindir,
            ports,
            sec,
            f"CREATE DATABASE {PG_DB} OWNER {PG_USER} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )


def stop_postgres(layout: Layout, bindir: Path | None) -> None:
    pid = running_pid(layout, "postgres")
    if pid is not None and bindir is not None:
        say(f"stopping PostgreSQL (pid {pid}): pg_ctl stop -m fast")
        result = pg_ctl_stop(bindir, layout.pg_data, layout.pg_root)
        if result.returncode != 0:
            say(f"pg_ctl stop failed: {result.stderr.strip()}")
    if pid is not None and pid_alive(pid):
        signal_and_wait([("postgres", pid)])
    layout.pid_file("postgres").unlink(missing_ok=True)


# --------------------------------------------------------------------------- Redis


def redis_ping(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(layout: Layout, redis: Path, ports: Ports, deadline: float) -> None:
    if running_pid(layout, "redis"):
        return
    if port_in_use(ports.redis):
        raise DeployError(f"port {ports.redis} (Redis) is already taken by a process we did not start")
    layout.redis_dir.mkdir(exist_ok=True)
    say(f"starting Redis on {HOST}:{ports.redis}")
    redis_log = layout.state / "logs" / "redis.log"
    spawn(
        layout, "redis", redis_argv(redis, HOST, ports.redis, layout.redis_dir, redis_log), layout.redis_dir, redis_log
    )

    def alive() -> bool:
        pid = read_pid(layout, "redis")
        return pid is not None and pid_alive(pid)

    if not wait_until(lambda: redis_ping(ports.redis), alive, deadline):
        raise DeployError(f"Redis did not start\n{failure_report(layout, 'redis', redis_log)}")


def redis_argv(redis: Path, host: str, port: int, directory: Path, log: Path) -> list[str]:
    """redis-server in the foreground on host:port, persisting nothing, its log in `log`."""
    argv = [str(redis), "--bind", host, "--port", str(port), "--protected-mode", "yes"]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(directory)]
    return [*argv, "--logfile", str(log)]


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], deadline: float, step: float = 0.1) -> bool:
    """Poll `ready` until it holds (True), the process dies or the monotonic `deadline` passes
    (False)."""
    while not ready():
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# --------------------------------------------------------------------------- Synapse


def find_python312() -> str:
    """The interpreter for STATE/venv: this one if it is >= 3.12, else the first python3.12 found."""
    candidates = [sys.executable, shutil.which("python3.12"), shutil.which("python3.13")]
    candidates += sorted(glob.glob("/root/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9]"))
    probe = "import sys; sys.exit(sys.version_info < (3, 12))"
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", probe], capture_output=True).returncode == 0:
            return candidate
    raise DeployError("Python >= 3.12 not found for the Synapse virtualenv")


def venv_has_synapse(layout: Layout) -> bool:
    if not layout.python.exists():
        return False
    probe = "import synapse.app.homeserver, psycopg2, txredisapi, hiredis"
    return subprocess.run([str(layout.python), "-c", probe], capture_output=True).returncode == 0


def ensure_venv(layout: Layout) -> str:
    # A venv may be shared by deployments (--venv): one installs it, the others wait.
    layout.venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{layout.venv}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another deployment is installing Synapse into {layout.venv}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_venv(layout)


def _ensure_venv(layout: Layout) -> str:
    if not venv_has_synapse(layout):
        if not layout.python.exists():
            say(f"creating virtualenv {layout.venv}")
            subprocess.run([find_python312(), "-m", "venv", str(layout.venv)], check=True, stdout=sys.stderr)
        spec = os.environ.get("SYNAPSE_DEPLOY_SYNAPSE_SPEC", DEFAULT_SYNAPSE_SPEC)
        say(f"pip install {spec} {' '.join(EXTRA_PACKAGES)} (about a minute)")
        try:
            subprocess.run(
                [str(layout.python), "-m", "pip", "install", "-q", spec, *EXTRA_PACKAGES],
                check=True,
                stdout=sys.stderr,
            )
        except subprocess.CalledProcessError as e:
            raise DeployError(f"pip install failed: {e}") from None
        layout.version_file.unlink(missing_ok=True)
        if not venv_has_synapse(layout):
            raise DeployError(f"{layout.venv} still cannot import Synapse after pip install")
    if not layout.version_file.exists():
        layout.version_file.write_text(synapse_version(layout.python) + "\n")
    return layout.version_file.read_text().strip()


def synapse_version(python: Path) -> str:
    """The version of matrix-synapse installed for `python`."""
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def ratelimit(per_second: float = 10000, burst_count: int = 100000) -> dict[str, float]:
    return {"per_second": per_second, "burst_count": burst_count}


def http_listener(port: int, resources: list[str], compress: bool = False) -> dict[str, Any]:
    return {
        "type": "http",
        "port": port,
        "bind_addresses": [HOST],
        "tls": False,
        "x_forwarded": True,
        "resources": [{"names": resources, "compress": compress}],
    }


def homeserver_config(layout: Layout, ports: Ports, sec: Secrets) -> dict[str, Any]:
    topology = layout.topology
    instance_map = {"main": {"host": HOST, "port": ports.replication}}
    instance_map |= {name: {"host": HOST, "port": port} for name, port in ports.worker_replication}
    extra: dict[str, Any] = dict(topology.shared)
    if topology.stream_writers:
        extra["stream_writers"] = {stream: list(names) for stream, names in topology.stream_writers}
    if topology.mas:
        extra["matrix_authentication_service"] = {
            "enabled": True,
            "endpoint": f"http://{HOST}:{ports.mas}/",
            "secret_path": str(layout.mas_secret_file),
        }
    return extra | {
        "server_name": SERVER_NAME,
        "public_baseurl": f"http://{HOST}:{ports.main}/",
        "report_stats": False,
        "signing_key_path": str(layout.signing_key),
        "suppress_key_server_warning": True,
        "trusted_key_servers": [],
        "media_store_path": str(layout.media),
        "max_upload_size": "300M",
        "enable_registration": False,
        # Test accounts only: cheap password hashing keeps register/login at a few ms, not ~0.3 s.
        "bcrypt_rounds": 4,
        "registration_shared_secret": sec.registration_shared_secret,
        "macaroon_secret_key": sec.macaroon_secret_key,
        "form_secret": sec.form_secret,
        "log_config": str(layout.log_config("main")),
        "enable_metrics": False,
        "url_preview_enabled": False,
        "listeners": [
            http_listener(ports.main, ["client", "federation"], compress=topology.compress),
            http_listener(ports.replication, ["replication"]),
        ],
        "database": {
            "name": "psycopg2",
            "args": {
                "user": PG_USER,
                "password": sec.pg_password,
                "dbname": PG_DB,
                "host": HOST,
                "port": ports.postgres,
                "cp_min": 1,
                "cp_max": 10,
            },
        },
        "redis": {"enabled": True, "host": HOST, "port": ports.redis},
        "instance_map": instance_map,
        # Tests make dozens of users and hundreds of requests: no 429s.
        "rc_message": ratelimit(),
        "rc_registration": ratelimit(),
        "rc_registration_token_validity": ratelimit(),
        "rc_login": {"address": ratelimit(), "account": ratelimit(), "failed_attempts": ratelimit()},
        "rc_joins": {"local": ratelimit(), "remote": ratelimit()},
        "rc_joins_per_room": ratelimit(),
        "rc_invites": {"per_room": ratelimit(), "per_user": ratelimit(), "per_issuer": ratelimit()},
        "rc_third_party_invite": ratelimit(),
        "rc_3pid_validation": ratelimit(),
        "rc_admin_redaction": ratelimit(),
        "rc_room_creation": ratelimit(),
        "rc_presence": {"per_user": ratelimit()},
        "rc_delayed_event_mgmt": ratelimit(),
        "rc_media_create": ratelimit(),
        "rc_key_requests": ratelimit(),
        "rc_reports": ratelimit(),
        "rc_user_directory": ratelimit(),
        "rc_profile": ratelimit(),
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 10000,
            "sleep_delay": 0,
            "reject_limit": 100000,
            "concurrent": 1000,
        },
    }


def worker_config(layout: Layout, ports: Ports, name: str) -> dict[str, Any]:
    worker = layout.topology.worker(name)
    listeners = []
    if worker.resources:
        listeners.append(http_listener(ports.worker(name), list(worker.resources), compress=layout.topology.compress))
    if worker.replication:
        listeners.append(http_listener(dict(ports.worker_replication)[name], ["replication"]))
    return dict(worker.config) | {
        "worker_app": worker.app,
        "worker_name": name,
        "worker_listeners": listeners,
        "worker_log_config": str(layout.log_config(name)),
    }


def log_config(layout: Layout, name: str) -> dict[str, Any]:
    # A plain FileHandler (no buffering), so an access line is on disk when the response is.
    return {
        "version": 1,
        "formatters": {
            "precise": {"format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"}
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(layout.log(name)),
                "encoding": "utf8",
            }
        },
        "loggers": {
            "synapse": {"level": "INFO"},
            "synapse.access.http": {"level": "INFO"},
            "synapse.storage.SQL": {"level": "WARNING"},
            "twisted": {"level": "WARNING"},
        },
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def write_json_yaml(path: Path, data: Mapping[str, Any], mode: int = 0o644) -> None:
    """YAML is a superset of JSON: the configuration files are written as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write("# Written by scripts/synapse_deploy.py on every `up`; edits are overwritten.\n")
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(path, mode)


def write_synapse_configs(layout: Layout, ports: Ports, sec: Secrets) -> None:
    write_json_yaml(layout.homeserver_yaml, homeserver_config(layout, ports, sec), mode=0o600)
    for name in layout.topology.worker_names:
        write_json_yaml(layout.worker_yaml(name), worker_config(layout, ports, name))
    for name in layout.topology.synapse_names:
        write_json_yaml(layout.log_config(name), log_config(layout, name))
    if layout.topology.mas:
        fd = os.open(layout.mas_secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(sec.mas_secret + "\n")


def ensure_signing_key(layout: Layout) -> None:
    if layout.signing_key.exists():
        return
    say("generating the signing key")
    layout.signing_key.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(layout.python), "-m", "synapse.app.homeserver", "-c", str(layout.homeserver_yaml), "--generate-keys"],
        cwd=layout.state,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not layout.signing_key.exists():
        raise DeployError(f"generating the signing key failed:\n{result.stdout}{result.stderr}")


def synapse_argv(layout: Layout, name: str) -> list[str]:
    if name == "main":
        return [str(layout.python), "-m", "synapse.app.homeserver", "-c", str(layout.homeserver_yaml)]
    return [
        str(layout.python),
        "-m",
        layout.topology.worker(name).app,
        "-c",
        str(layout.homeserver_yaml),
        "-c",
        str(layout.worker_yaml(name)),
    ]


MAS_STANDIN = ROOT / "scripts" / "mas_standin.py"


def start_mas(layout: Layout, ports: Ports, deadline: float) -> None:
    """The MAS stand-in (scripts/mas_standin.py), run by the Synapse virtualenv's Python."""
    if running_pid(layout, "mas") or ports.mas is None:
        return
    if port_in_use(ports.mas):
        raise DeployError(f"port {ports.mas} (MAS stand-in) is already taken by a process we did not start")
    argv = [str(layout.python), str(MAS_STANDIN), "--listen", f"{HOST}:{ports.mas}"]
    argv += ["--synapse", f"http://{HOST}:{ports.main}", "--server-name", SERVER_NAME]
    argv += ["--secret-file", str(layout.mas_secret_file)]
    pid = spawn(layout, "mas", argv, cwd=layout.state)
    say(f"started the MAS stand-in (pid {pid}) on {HOST}:{ports.mas}")
    wait_healthy(layout, {"mas": health_urls(ports, "mas")}, deadline)


def health_urls(ports: Ports, name: str) -> list[str]:
    return [f"http://{HOST}:{port}/health" for port in ports.listeners(name)]


def start_synapse(layout: Layout, ports: Ports, names: Sequence[str], deadline: float) -> None:
    started = []
    for name in names:
        if running_pid(layout, name):
            continue
        for port in ports.listeners(name):
            if port_in_use(port):
                raise DeployError(f"port {port} ({name}) is already taken by a process we did not start")
        pid = spawn(layout, name, synapse_argv(layout, name), cwd=layout.state)
        say(f"started {name} (pid {pid})")
        started.append(name)
    wait_healthy(layout, {name: health_urls(ports, name) for name in names}, deadline)
    if started:
        say(f"healthy: {', '.join(started)}")


# --------------------------------------------------------------------------- commands


def memory_kib(pid: int | None, field: str) -> int:
    """`field` (VmRSS from /proc/PID/status, Pss from smaps_rollup) of `pid` in KiB; 0 when gone."""
    if pid is None:
        return 0
    source = "status" if field.startswith("Vm") else "smaps_rollup"
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def deployment_memory(layout: Layout, field: str) -> dict[str, int]:
    """`field` in KiB of every process of the deployment and the total; PostgreSQL's entry is
    its postmaster plus every backend (with VmRSS, their shared buffers count once per backend;
    Pss shares them out)."""
    names = (*layout.topology.synapse_names, *(n for n in layout.topology.helper_names if n != "postgres"))
    mem = {name: memory_kib(running_pid(layout, name), field) for name in names}
    postmaster = running_pid(layout, "postgres")
    pids = [] if postmaster is None else [postmaster]
    if postmaster is not None:
        with contextlib.suppress(OSError):
            pids += [int(c) for c in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]
    mem["postgres"] = sum(memory_kib(pid, field) for pid in pids)
    mem["total"] = sum(mem.values())
    return mem


def deployment_json(layout: Layout, ports: Ports, sec: Secrets) -> dict[str, Any]:
    version = layout.version_file.read_text().strip() if layout.version_file.exists() else None
    topology = layout.topology
    return {
        "topology": topology.name,
        "server_name": SERVER_NAME,
        "main": f"http://{HOST}:{ports.main}",
        "replication": f"http://{HOST}:{ports.replication}",
        "workers": {name: f"http://{HOST}:{port}" for name, port in ports.workers},
        "worker_replication": {name: f"http://{HOST}:{port}" for name, port in ports.worker_replication},
        "roles": {w.name: w.role for w in topology.workers},
        "resources": {w.name: list(w.resources) for w in topology.workers},
        "stream_writers": {stream: list(names) for stream, names in topology.stream_writers},
        "router_pools": {
            pool: [f"http://{HOST}:{ports.worker(name)}" for name in names]
            for pool, names in topology.router_pools().items()
        },
        "registration_shared_secret": sec.registration_shared_secret,
        "postgres": {
            "host": HOST,
            "port": ports.postgres,
            "database": PG_DB,
            "user": PG_USER,
            "password": sec.pg_password,
            "dsn": f"postgresql://{PG_USER}:{sec.pg_password}@{HOST}:{ports.postgres}/{PG_DB}",
            "data_dir": str(layout.pg_data),
            "log": str(layout.state / "logs" / "postgres.log"),
        },
        "redis": {"host": HOST, "port": ports.redis, "log": str(layout.state / "logs" / "redis.log")},
        "logs": {name: str(layout.log(name)) for name in topology.synapse_names},
        "pids": {name: running_pid(layout, name) for name in (*topology.synapse_names, *topology.helper_names)},
        "rss_kib": deployment_memory(layout, "VmRSS"),
        "pss_kib": deployment_memory(layout, "Pss"),
        **({"mas": mas_json(layout, ports, sec)} if topology.mas else {}),
        "synapse_version": version,
        "python": str(layout.python),
        "state_dir": str(layout.state),
    }


def mas_json(layout: Layout, ports: Ports, sec: Secrets) -> dict[str, Any]:
    return {
        "url": f"http://{HOST}:{ports.mas}",
        "secret": sec.mas_secret,
        "sessions": f"http://{HOST}:{ports.mas}/_standin/sessions",
        "log": str(layout.stdout("mas")),
    }


def emit(data: Mapping[str, Any]) -> None:
    print(json.dumps(data, separators=(",", ":")), flush=True)


def problems(layout: Layout, ports: Ports) -> list[str]:
    found = []
    for name in (*layout.topology.helper_names, *layout.topology.synapse_names):
        if running_pid(layout, name) is None:
            found.append(f"{name} is not running")
    if running_pid(layout, "redis") and not redis_ping(ports.redis):
        found.append(f"redis does not answer PING on {ports.redis}")
    if running_pid(layout, "postgres") and not port_in_use(ports.postgres):
        found.append(f"postgres does not accept connections on {ports.postgres}")
    for name in (*layout.topology.synapse_names, *(("mas",) if layout.topology.mas else ())):
        if running_pid(layout, name):
            found += [f"{name}: {url} is not 200" for url in health_urls(ports, name) if not http_ok(url)]
    return found


def anything_running(layout: Layout) -> bool:
    return any(running_pid(layout, name) for name in (*layout.topology.helper_names, *layout.topology.synapse_names))


def cmd_up(layout: Layout, timeout: float) -> int:
    started_at = time.monotonic()
    for sub in ("logs", "pids", "workers", "log_config", "keys"):
        (layout.state / sub).mkdir(parents=True, exist_ok=True)
    layout.media.mkdir(exist_ok=True)
    previous = saved_ports(layout)
    wanted = Ports.from_base(base_port_from_env(), layout.topology)
    if anything_running(layout) and previous is not None:
        ports = previous
        if ports != wanted:
            say("a deployment with other ports is running: keeping its ports (run `down` first to change)")
    else:
        ports = wanted
    save_ports(layout, ports)
    sec = load_secrets(layout)
    if not problems(layout, ports):
        emit(deployment_json(layout, ports, sec))
        return 0
    bindir, redis = ensure_system_packages()
    ensure_venv(layout)
    # The timeout is for starting the processes: installing (apt-get, pip) takes what it takes.
    deadline = time.monotonic() + timeout
    write_synapse_configs(layout, ports, sec)
    ensure_signing_key(layout)
    ensure_pg_cluster(layout, bindir, sec)
    start_postgres(layout, bindir, ports)
    ensure_pg_database(bindir, ports, sec)
    start_redis(layout, redis, ports, deadline)
    start_mas(layout, ports, deadline)
    start_synapse(layout, ports, ["main"], deadline)
    start_synapse(layout, ports, layout.topology.worker_names, deadline)
    say(f"up in {time.monotonic() - started_at:.1f}s")
    emit(deployment_json(layout, ports, sec))
    return 0


def cmd_status(layout: Layout) -> int:
    ports = saved_ports(layout)
    if ports is None or not layout.secrets_file.exists():
        say(f"no deployment in {layout.state}")
        return 1
    found = problems(layout, ports)
    if found:
        for problem in found:
            say(problem)
        return 1
    emit(deployment_json(layout, ports, load_secrets(layout)))
    return 0


def cmd_down(layout: Layout) -> int:
    if not layout.state.exists():
        say(f"nothing to stop: {layout.state} does not exist")
        return 0
    for group in (layout.topology.worker_names, ("main",), ("mas",), ("redis",)):
        targets = [(name, pid) for name in group if (pid := running_pid(layout, name)) is not None]
        if targets:
            signal_and_wait(targets)
        for name in group:
            layout.pid_file(name).unlink(missing_ok=True)
    stop_postgres(layout, pg_bindir())
    say("down")
    return 0


def router_config_yaml(info: Mapping[str, Any]) -> str:
    """A router configuration for the deployment described by `info` (its JSON)."""
    lines = [
        f"# synapse-router configuration for the {info['topology']} synapse_deploy topology.",
        f"# Reverse-mode target (the main process): --mode reverse:{info['main']}@PORT",
        "workers:",
    ]
    for pool, urls in info["router_pools"].items():
        lines.append(f"  {pool}:")
        lines += [f"    - {url}" for url in urls]
    return "\n".join(lines) + "\n"


def cmd_router_config(layout: Layout) -> int:
    ports = saved_ports(layout)
    if ports is None:
        raise DeployError(f"no deployment in {layout.state}: run `up` first")
    print(router_config_yaml(deployment_json(layout, ports, load_secrets(layout))), end="")
    return 0


def cmd_stop_worker(layout: Layout, name: str) -> int:
    pid = running_pid(layout, name)
    if pid is None:
        say(f"{name} is not running")
    else:
        signal_and_wait([(name, pid)])
    layout.pid_file(name).unlink(missing_ok=True)
    return 0


def cmd_start_worker(layout: Layout, name: str, timeout: float) -> int:
    ports = saved_ports(layout)
    if ports is None or running_pid(layout, "main") is None or not http_ok(health_urls(ports, "main")[0]):
        raise DeployError("the main process is not running: run `up` first")
    start_synapse(layout, ports, [name], time.monotonic() + timeout)
    emit(deployment_json(layout, ports, load_secrets(layout)))
    return 0


def resolve_topology(state: Path, asked: str | None) -> Topology:
    """The topology a state directory was brought up with (STATE/topology), else the one asked
    for, else the default; asking for another one than the directory holds is an error."""
    try:
        saved: str | None = (state / "topology").read_text().strip()
    except OSError:
        saved = None
    if saved is not None and saved not in TOPOLOGIES:
        raise DeployError(f"{state / 'topology'} names an unknown topology {saved!r}")
    if saved is not None and asked is not None and saved != asked:
        raise DeployError(f"{state} holds the {saved} topology, not {asked}: use another --state-dir")
    return TOPOLOGIES[saved or asked or DEFAULT_TOPOLOGY.name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Ports, layout and JSON: see the module docstring.",
    )
    parser.add_argument(
        "command", choices=["install", "up", "down", "status", "stop-worker", "start-worker", "router-config"]
    )
    parser.add_argument("worker", nargs="?", help="for stop-worker / start-worker")
    parser.add_argument(
        "--topology",
        choices=sorted(TOPOLOGIES),
        help="default: the state directory's, else default (main + 3 generic workers)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help=", ".join(f"{t.name}: ROOT/{t.state_dir}" for t in TOPOLOGIES.values()) + " (default per topology)",
    )
    parser.add_argument("--venv", type=Path, help="Synapse virtualenv to use (and create); default STATE/venv")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="start-up deadline in seconds")
    args = parser.parse_args(argv)
    if args.command in ("stop-worker", "start-worker") and not args.worker:
        parser.error(f"{args.command} needs a worker name")
    if args.command == "install":  # only the Debian packages (PostgreSQL, Redis, Prometheus); starts nothing
        try:
            ensure_system_packages()
        except DeployError as e:
            say(f"error: {e}")
            return 1
        return 0
    state = args.state_dir or ROOT / TOPOLOGIES[args.topology or DEFAULT_TOPOLOGY.name].state_dir
    state = state.expanduser().resolve()
    try:
        topology = resolve_topology(state, args.topology)
        venv_file = state / "venv_path"  # --venv given to `up`, remembered for the other commands
        venv = args.venv.expanduser().resolve() if args.venv else None
        if venv is None and venv_file.exists():
            venv = Path(venv_file.read_text().strip())
        layout = Layout(state, topology, venv)
        if args.worker:
            topology.worker(args.worker)  # an unknown name is an error
        with state_lock(layout):
            if args.command == "up":
                layout.topology_file.write_text(topology.name + "\n")
                if venv is not None:
                    venv_file.write_text(f"{venv}\n")
                return cmd_up(layout, args.timeout)
            if args.command == "status":
                return cmd_status(layout)
            if args.command == "down":
                return cmd_down(layout)
            if args.command == "stop-worker":
                return cmd_stop_worker(layout, args.worker)
            if args.command == "router-config":
                return cmd_router_config(layout)
            return cmd_start_worker(layout, args.worker, args.timeout)
    except DeployError as e:
        say(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
