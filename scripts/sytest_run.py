#!/usr/bin/env python3.12
"""SyTest, Synapse's own integration suite, through HAProxy and through synapse-router.

    scripts/sytest [--proxy router|haproxy|both] [--subset ci|full] [--launcher synapse-router|mitmdump]
                   [--work-dir DIR] [--json FILE] [--timeout S] [SYTEST_FILE ...]

Runs SyTest in worker mode as Synapse's CI does (`-I Synapse::ViaHaproxy --workers`: per
homeserver main plus 13 workers, two federating homeservers, PostgreSQL, Redis) once per proxy,
one after the other: `haproxy` is Debian's /usr/sbin/haproxy with the configuration SyTest writes,
`router` is scripts/sytest_haproxy_standin in its place (synapse-router on the same port, TLS with
the same certificate, pools from the same Synapse configuration). It parses each run's TAP and
prints how many tests passed through each proxy and every test that passes through HAProxy and
fails through the router; with `--proxy both` it exits 1 when there is one such test.

What it installs (as root; each only when missing): SyTest's Perl modules from Debian and
haproxy (apt-get), PostgreSQL and Redis (scripts/synapse_deploy.py's `install`), Synapse with the
`url-preview` extra in synapse_deploy's virtualenv (.synapse-deploy/venv, the e2e tests' Synapse).
SyTest (pinned, unmodified) and two Perl shims come from ../shared/third_party/ beside the
checkout (SYTEST_THIRD_PARTY overrides) and are unpacked into the work directory (default
/var/tmp/synapse-router-sytest, SYTEST_WORK_DIR or --work-dir), never into the repository.

Ports: SyTest's own 27000-27999; a private PostgreSQL cluster (WORK/pg, run as the `postgres`
user) on 127.0.0.1:25432 (SYTEST_PG_PORT); a private Redis on port 6379 (SyTest's Redis port is
fixed) of the first loopback address among 127.0.0.1, 127.0.0.27, 127.0.0.28 where that port is
free (`--redis-host`). Only one run at a time per work directory (a lock).

Subsets: `ci` is CI_FILES below (a few minutes per proxy); `full` is every test file. Files given
on the command line replace the subset. Each run's TAP, SyTest's log and every homeserver's
directory (Synapse logs, haproxy.conf, synapse-router.yaml/.log) stay in WORK/run-PROXY/.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import synapse_deploy as deploy  # noqa: E402

SYTEST_TARBALL = "sytest-404d274c.tar.gz"
SHIMS_TARBALL = "sytest-perl5-shims.tar.gz"
STANDIN = ROOT / "scripts" / "sytest_haproxy_standin"
HAPROXY = Path("/usr/sbin/haproxy")
PERL_PACKAGES = (
    "libclass-method-modifiers-perl libdata-dump-perl libdbi-perl libdbd-pg-perl libdigest-hmac-perl "
    "libemail-address-xs-perl libemail-mime-perl libfile-slurper-perl libfuture-perl libio-async-perl "
    "libio-async-ssl-perl libio-socket-ip-perl libio-socket-ssl-perl libjson-perl libjson-pp-perl "
    "libjson-xs-perl liblist-utilsby-perl libmodule-pluggable-perl libnet-async-http-perl libnet-ssleay-perl "
    "libstruct-dumb-perl liburi-perl libyaml-libyaml-perl libhttp-message-perl libmetrics-any-perl "
    "libcryptx-perl haproxy"
).split()
# The CI subset: the route table's families (sync, rooms, federation, media, login, openid, the
# admin API, end-to-end keys, typing, receipts, presence, to-device, account data, user directory).
CI_FILES = (
    "tests/10apidoc/02login.pl",
    "tests/10apidoc/12device_management.pl",
    "tests/10apidoc/35room-typing.pl",
    "tests/10apidoc/37room-receipts.pl",
    "tests/10apidoc/44account_data.pl",
    "tests/30rooms/04messages.pl",
    "tests/30rooms/06invite.pl",
    "tests/31sync/04timeline.pl",
    "tests/31sync/11typing.pl",
    "tests/31sync/12receipts.pl",
    "tests/40presence.pl",
    "tests/41end-to-end-keys/01-upload-key.pl",
    "tests/41end-to-end-keys/06-device-lists.pl",
    "tests/45openid.pl",
    "tests/46direct/01directmessage.pl",
    "tests/48admin.pl",
    "tests/50federation/30room-join.pl",
    "tests/50federation/31room-send.pl",
    "tests/51media/48admin-quarantine.pl",
    "tests/52user-directory/01public.pl",
)
PROXIES = ("haproxy", "router")
SESSION_PYTHON = """\
#!{python}
# SyTest's --python (written by scripts/sytest): each Synapse process in a session of its own, as
# scripts/synapse_deploy.py starts them, so that with the kernel's autogroup scheduling SyTest's
# 2 x 15 processes are not one scheduling group squeezed into SyTest's 60 s start-up limit.
import contextlib, os, sys
with contextlib.suppress(PermissionError):
    os.setsid()
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
PG_PORT = 25432
TEMPLATE = "sytest_template"
REDIS_HOSTS = ("127.0.0.1", "127.0.0.27", "127.0.0.28")
REDIS_PORT = 6379
SYTEST_PORTS = "27000:27999"
START_FAILED = "WARN: Error starting server-"  # SyTest's tests/05homeserver.pl: 60 s, fixed
LOG_FILE = re.compile(r"^(tests/\S+\.pl):$")
LOG_TEST = re.compile(r"^\s+Test (\d+) ")
TAP_LINE = re.compile(r"^(?P<not>not )?ok (?P<num>\d+) (?P<rest>.*)$")


class SytestError(Exception):
    pass


def say(message: str) -> None:
    print(f"sytest: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- TAP


@dataclass
class Results:
    """One run's outcome per test name (a repeated name gets ` #2`, ` #3`, ...)."""

    passed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # expected fails (# TODO) included
    skipped: set[str] = field(default_factory=set)
    planned: int | None = None
    files: dict[str, str] = field(default_factory=dict, compare=False)  # name -> test file, from SyTest's log
    cleared: set[str] = field(default_factory=set)  # failed, then passed on a recheck run (router only)

    @property
    def ran(self) -> set[str]:
        return self.passed | self.failed

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Results:
        def names(key: str) -> set[str]:
            value = data.get(key)
            return {str(n) for n in value} if isinstance(value, list) else set()

        planned = data.get("planned")
        planned_or_none = planned if isinstance(planned, int) else None
        return cls(names("passed"), names("failed"), names("skipped"), planned_or_none, {}, names("cleared_by_recheck"))

    def to_json(self) -> dict[str, object]:
        return {
            "passed": sorted(self.passed),
            "failed": sorted(self.failed),
            "skipped": sorted(self.skipped),
            "planned": self.planned,
            "cleared_by_recheck": sorted(self.cleared),
        }


def test_files(log: str) -> dict[int, str]:
    """Test number -> file, from SyTest's progress on stderr (`tests/x.pl:` then `    Test N ...`)."""
    files: dict[int, str] = {}
    current = ""
    for line in log.splitlines():
        if m := LOG_FILE.match(line):
            current = m[1]
        elif current and (m := LOG_TEST.match(line)):
            files[int(m[1])] = current
    return files


def parse_tap(text: str, log: str = "") -> Results:
    results = Results()
    numbers = test_files(log)
    seen: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("1..") and line[3:].isdigit():
            results.planned = int(line[3:])
            continue
        m = TAP_LINE.match(line)  # subtests are indented: only top-level lines match
        if m is None:
            continue
        rest, directive = m["rest"], ""
        if " # " in rest:
            rest, directive = rest.rsplit(" # ", 1)
        name = re.sub(r" \(\d+ subtests\)$", "", rest.removeprefix("(expected fail) ")).strip()
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} #{seen[name]}"
        if int(m["num"]) in numbers:
            results.files[name] = numbers[int(m["num"])]
        if directive.lower().startswith("skip"):
            results.skipped.add(name)
        elif m["not"]:
            results.failed.add(name)
        else:
            results.passed.add(name)
    return results


def router_only_failures(haproxy: Results, router: Results) -> list[str]:
    """Tests that pass through HAProxy and do not pass through the router (failed, or never
    reported because the run stopped)."""
    return sorted(haproxy.passed - router.passed - router.skipped - router.cleared)


def comparison(results: dict[str, Results]) -> str:
    lines = []
    for proxy, r in results.items():
        lines.append(
            f"{proxy:8} passed {len(r.passed)}, failed {len(r.failed)}, skipped {len(r.skipped)}"
            f" (of {r.planned if r.planned is not None else '?'} planned)"
        )
    if "haproxy" in results and "router" in results:
        bad = router_only_failures(results["haproxy"], results["router"])
        cleared = sorted(results["router"].cleared)
        lines.append(f"failed through the router, passed through it on a recheck run: {len(cleared)}")
        lines += [f"  - {name}" for name in cleared]
        lines.append(f"passes through HAProxy, fails through the router: {len(bad)}")
        lines += [f"  - {name}" for name in bad]
        better = sorted(results["router"].passed - results["haproxy"].passed)
        lines.append(f"passes through the router, fails through HAProxy: {len(better)}")
        lines += [f"  - {name}" for name in better]
        both = sorted(results["haproxy"].failed & (results["router"].failed - results["router"].cleared))
        lines.append(f"fails through both: {len(both)}")
        lines += [f"  - {name}" for name in both]
    return "\n".join(lines)


# --------------------------------------------------------------------------- installation


def ensure_synapse() -> Path:
    """synapse_deploy's Synapse (its pin, its virtualenv) plus the `url-preview` extra."""
    layout = deploy.Layout(state=Path(os.environ.get("E2E_STATE_DIR", ROOT / ".synapse-deploy")).resolve())
    layout.state.mkdir(parents=True, exist_ok=True)
    version = deploy.ensure_venv(layout)
    python = layout.python
    if subprocess.run([str(python), "-c", "import bs4"], capture_output=True).returncode != 0:
        say(f"pip install matrix-synapse[url-preview]=={version}")
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"matrix-synapse[url-preview,redis]=={version}"],
            check=True,
            stdout=sys.stderr,
        )
    return python


def third_party_dir() -> Path:
    path = Path(os.environ.get("SYTEST_THIRD_PARTY") or ROOT.parent / "shared" / "third_party")
    if not (path / SYTEST_TARBALL).exists():
        raise SytestError(f"{path / SYTEST_TARBALL} not found (set SYTEST_THIRD_PARTY)")
    return path


def unpack(work: Path) -> tuple[Path, Path]:
    """WORK/src/sytest and WORK/src/perl5, unpacked again when a tarball changed."""
    third = third_party_dir()
    src = work / "src"
    digest = hashlib.sha256(b"".join((third / t).read_bytes() for t in (SYTEST_TARBALL, SHIMS_TARBALL))).hexdigest()
    stamp = src / "unpacked-from"
    if not stamp.exists() or stamp.read_text().strip() != digest:
        say(f"unpacking {SYTEST_TARBALL} and {SHIMS_TARBALL} into {src}")
        shutil.rmtree(src, ignore_errors=True)
        (src / "perl5").mkdir(parents=True)
        with tarfile.open(third / SYTEST_TARBALL) as t:
            t.extractall(src, filter="data")
        with tarfile.open(third / SHIMS_TARBALL) as t:
            t.extractall(src / "perl5", filter="data")
        stamp.write_text(digest + "\n")
    if not (src / "sytest" / "run-tests.pl").exists():
        raise SytestError(f"{SYTEST_TARBALL} did not unpack to sytest/run-tests.pl")
    return src / "sytest", src / "perl5"


# --------------------------------------------------------------------------- PostgreSQL, Redis


@dataclass
class Postgres:
    work: Path
    bindir: Path
    port: int
    password: str = ""

    @property
    def data(self) -> Path:
        return self.work / "pg" / "data"

    def start(self) -> None:
        layout = deploy.Layout(state=self.work)
        secrets = deploy.load_secrets(layout)  # WORK/secrets.json
        self.password = secrets.pg_superuser_password
        deploy.ensure_pg_cluster(layout, self.bindir, secrets)
        if deploy.port_in_use(self.port):
            raise SytestError(f"port {self.port} (PostgreSQL) is taken; set SYTEST_PG_PORT")
        stale = self.data / "postmaster.pid"
        stale.unlink(missing_ok=True)  # the port is free: no postmaster of this cluster runs
        log = self.work / "pg" / "postgres.log"
        log.touch()
        deploy.chown_to_pg(log)
        settings = {
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "500",  # two homeservers of 14 processes each, as Synapse's CI sets it
        }
        say(f"starting PostgreSQL on {deploy.HOST}:{self.port}")
        deploy.pg_ctl_start(self.bindir, self.data, log, self.work / "pg", settings)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            deploy.pg_ctl_stop(self.bindir, self.data, self.work / "pg")

    def psql(self, sql: str) -> None:
        self.query(sql)

    def fresh_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")

    def query(self, sql: str, database: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}
        argv = [str(self.bindir / "psql"), "-h", deploy.HOST, "-p", str(self.port), "-U", "postgres", "-d", database]
        done = subprocess.run([*argv, "-v", "ON_ERROR_STOP=1", "-qtAc", sql], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SytestError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def ensure_template(self, python: Path) -> None:
        """`sytest_template`, which SyTest copies into each homeserver's database when it exists
        (lib/SyTest/Homeserver.pm, _clear_db_pg): Synapse's schema made once per Synapse version
        by Synapse's own `update_synapse_database`, so that a homeserver's main process does not
        build it during SyTest's 60 s start-up window."""
        version = deploy.synapse_version(python)
        exists = self.query(f"SELECT 1 FROM pg_database WHERE datname = '{TEMPLATE}'") == "1"
        if (
            exists
            and self.query(
                f"SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '{TEMPLATE}'"
            )
            == version
        ):
            return
        say(f"making {TEMPLATE}: Synapse {version}'s schema (update_synapse_database)")
        self.fresh_database(TEMPLATE)
        key = self.work / "template.signing.key"  # a config Synapse parses needs one
        make_key = "import sys; from signedjson.key import generate_signing_key as g, write_signing_keys as w; "
        make_key += "w(open(sys.argv[1], 'w'), [g('a')])"
        subprocess.run([str(python), "-c", make_key, str(key)], check=True)
        config = self.work / "template.yaml"
        database = self.database_yaml(TEMPLATE).replace("\n", "\n  ").rstrip()
        config.write_text(f"server_name: sytest.template\nreport_stats: false\nsigning_key_path: {key}\n")
        config.write_text(config.read_text() + f"database:\n  {database}\n")
        argv = [str(python.parent / "update_synapse_database"), "--database-config", str(config)]
        done = subprocess.run([*argv, "--run-background-updates"], capture_output=True, text=True, cwd=self.work)
        if done.returncode != 0:
            raise SytestError(f"update_synapse_database failed:\n{done.stderr[-3000:]}")
        self.query(f"COMMENT ON DATABASE {TEMPLATE} IS '{version}'")

    def database_yaml(self, name: str) -> str:
        return (
            "name: psycopg2\nargs:\n"
            f"  dbname: {name}\n  user: postgres\n  password: {json.dumps(self.password)}\n"
            f"  host: {deploy.HOST}\n  port: {self.port}\n  sslmode: disable\n"
            "  cp_min: 1\n  cp_max: 5\n"
        )


def free_redis_host() -> str:
    for host in REDIS_HOSTS:
        with socket.socket() as s:
            try:
                s.bind((host, REDIS_PORT))
            except OSError:
                continue
            return host
    raise SytestError(f"port {REDIS_PORT} is taken on every one of {', '.join(REDIS_HOSTS)}")


@contextlib.contextmanager
def redis(work: Path, binary: Path) -> Iterator[str]:
    host = free_redis_host()
    run = work / "redis"
    run.mkdir(exist_ok=True)
    argv = deploy.redis_argv(binary, host, REDIS_PORT, run, run / "redis.log")
    proc = subprocess.Popen(argv, cwd=run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = deploy.wait_until(
            lambda: deploy.redis_ping(REDIS_PORT, host), lambda: proc.poll() is None, time.monotonic() + 30
        )
        if not ready:
            raise SytestError(f"Redis did not start on {host}:{REDIS_PORT} (see {run / 'redis.log'})")
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Setup:
    work: Path
    sytest: Path
    perl5: Path
    python: Path
    postgres: Postgres
    redis: Path  # redis-server: a fresh one for every run
    launcher: str
    timeout: float
    attempts: int
    ports: str


def run_sytest(setup: Setup, proxy: str, files: Sequence[str], tag: str = "") -> Results:
    """One SyTest run through `proxy`, again (up to `setup.attempts` times) when a homeserver did
    not start within SyTest's fixed 60 s: on a busy machine 2 x 14 Synapse processes can take
    longer, and a run without both homeservers compares nothing."""
    for attempt in range(1, setup.attempts + 1):
        results, started = _run_once(setup, proxy, files, tag or proxy)
        if started:
            return results
        say(f"a homeserver did not start within SyTest's 60 s (attempt {attempt} of {setup.attempts})")
    raise SytestError(f"SyTest through {proxy}: a homeserver never started; see {setup.work}/run-{proxy}/sytest.log")


def _run_once(setup: Setup, proxy: str, files: Sequence[str], tag: str) -> tuple[Results, bool]:
    run = setup.work / f"run-{tag}"
    shutil.rmtree(run, ignore_errors=True)
    for i in (0, 1):
        database = f"sytest_{tag}_{i}"
        setup.postgres.fresh_database(database)
        (run / f"server-{i}").mkdir(parents=True)
        (run / f"server-{i}" / "database.yaml").write_text(setup.postgres.database_yaml(database))
    env = {
        **os.environ,
        "PERL5LIB": str(setup.perl5),
        "HAPROXY_BIN": str(HAPROXY if proxy == "haproxy" else standin_command(setup.work)),
        "SYTEST_ROUTER_LAUNCHER": setup.launcher,
        "PGPORT": str(setup.postgres.port),  # SyTest's own DBI connections take host only
        "PGPASSWORD": setup.postgres.password,
    }
    argv = ["perl", "run-tests.pl", "-I", "Synapse::ViaHaproxy", "--workers"]
    session_python = setup.work / "bin" / "python"
    session_python.parent.mkdir(exist_ok=True)
    session_python.write_text(SESSION_PYTHON.format(python=setup.python))
    session_python.chmod(0o755)
    argv += ["--python", str(session_python), "-d", str(setup.sytest), "--bind-host", "127.0.0.1"]
    argv += ["-p", setup.ports, "--work-directory", str(run), "-O", "tap", "--all", "--room-version", "11"]
    argv += list(files)
    label = proxy if proxy == "haproxy" else f"router ({setup.launcher})"
    say(f"running SyTest through {label}: {len(files) or 'every'} test files; log {run / 'sytest.log'}")
    started = time.monotonic()
    log_path = run / "sytest.log"
    hs_started = True
    with (
        redis(setup.work, setup.redis) as redis_host,
        open(run / "results.tap", "w") as tap,
        open(log_path, "w") as log,
    ):
        argv.insert(4, f"--redis-host={redis_host}")
        proc = subprocess.Popen(argv, cwd=setup.sytest, env=env, stdout=tap, stderr=log, start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > setup.timeout:
                    say(f"SyTest through {proxy} still running after {setup.timeout:.0f} s: stopping it")
                    break
                if START_FAILED in log_path.read_text(errors="replace"):
                    hs_started = False
                    break
                time.sleep(2)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reap_leftovers(run)
    hs_started = hs_started and START_FAILED not in log_path.read_text(errors="replace")
    results = parse_tap((run / "results.tap").read_text(errors="replace"), log_path.read_text(errors="replace"))
    say(
        f"through {label}: {len(results.passed)} passed, {len(results.failed)} failed, "
        f"{len(results.skipped)} skipped in {time.monotonic() - started:.0f} s (SyTest exit {proc.returncode})"
    )
    if hs_started and not results.ran:
        raise SytestError(f"SyTest through {proxy} ran no test; see {log_path}")
    return results, hs_started


def standin_command(work: Path) -> Path:
    """HAPROXY_BIN for the router: the stand-in run by the router's own interpreter (so it writes
    the router YAML without starting `synapse-router config from-synapse`)."""
    path = work / "bin" / "haproxy-standin"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} "$@"\n')
    path.chmod(0o755)
    return path


def reap_leftovers(run: Path) -> None:
    """Stop what SyTest started for this run and left running (it stops its processes itself,
    unless it was killed): the processes whose command line names a file of this run's directory,
    each by its pid."""
    marker = f"{run}/"
    mine = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                mine.append(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in mine if deploy.pid_alive(pid)]
        if not alive:
            return
        say(f"stopping {len(alive)} process(es) SyTest left running ({sig.name})")
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(deploy.pid_alive(pid) for pid in alive):
            time.sleep(0.2)


@contextlib.contextmanager
def work_lock(work: Path) -> Iterator[None]:
    with open(work / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another scripts/sytest runs in {work}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def recheck(setup: Setup, results: dict[str, Results], rounds: int) -> None:
    """Runs the files of the tests that passed through HAProxy and failed through the router
    through the router again (`rounds` times at most); a test the router passes on such a run is
    taken off the list (`results["router"].cleared`): on a loaded machine SyTest's fixed timeouts
    (60 s for a fixture) fail tests of either proxy now and then."""
    router = results["router"]
    for i in range(1, rounds + 1):
        bad = router_only_failures(results["haproxy"], router)
        files = sorted({router.files.get(n) or results["haproxy"].files.get(n) or "" for n in bad} - {""})
        if not files:
            return
        say(f"recheck {i}: {len(bad)} test(s) passed through HAProxy and failed through the router; again: {files}")
        for attempt in range(1, setup.attempts + 1):
            again, started = _run_once(setup, "router", files, f"router_recheck{i}")
            clear(router, bad, again)  # a pass counts, even in a run whose homeserver later failed to start
            if started:
                break
            say(f"recheck {i}: a homeserver did not start within SyTest's 60 s (attempt {attempt} of {setup.attempts})")
        else:
            left = router_only_failures(results["haproxy"], router)
            say(f"recheck {i}: no run started both homeservers; {len(left)} test(s) stay router-only failures")
            return


def clear(router: Results, bad: Sequence[str], again: Results) -> None:
    """Take off the router-only failures `bad` those the recheck run `again` passed."""
    router.cleared.update(name for name in bad if name in again.passed)


def run_all(
    args: argparse.Namespace, proxies: Sequence[str], files: Sequence[str], work: Path, results: dict[str, Results]
) -> None:
    bindir, redis_bin = deploy.ensure_system_packages(extra=PERL_PACKAGES)
    python = ensure_synapse()
    work.mkdir(parents=True, exist_ok=True)
    deploy.let_pg_traverse(work)
    with work_lock(work):
        sytest, perl5 = unpack(work)
        postgres = Postgres(work, bindir, int(os.environ.get("SYTEST_PG_PORT", PG_PORT)))
        try:
            postgres.start()
            postgres.ensure_template(python)
            for proxy in proxies:
                setup = Setup(
                    work,
                    sytest,
                    perl5,
                    python,
                    postgres,
                    redis_bin,
                    args.launcher,
                    args.timeout,
                    args.attempts,
                    args.ports,
                )
                results[proxy] = run_sytest(setup, proxy, files)
            if len(results) == 2:
                recheck(setup, results, args.recheck)
        finally:
            postgres.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/sytest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=("router", "haproxy", "both"), default="both")
    parser.add_argument("--subset", choices=("ci", "full"), default="ci")
    parser.add_argument(
        "--launcher",
        choices=("synapse-router", "mitmdump"),
        default=os.environ.get("SYNAPSE_ROUTER_LAUNCHER") or "synapse-router",
        help="the router's launcher (default: $SYNAPSE_ROUTER_LAUNCHER, else synapse-router)",
    )
    default_work = Path(os.environ.get("SYTEST_WORK_DIR", "/var/tmp/synapse-router-sytest"))
    parser.add_argument("--work-dir", type=Path, default=default_work)
    parser.add_argument("--json", type=Path, help="write every run's results and the comparison here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per SyTest run (default 3600)")
    parser.add_argument(
        "--attempts", type=int, default=5, help="runs per proxy when a homeserver does not start (default 5)"
    )
    parser.add_argument(
        "--recheck", type=int, default=1, help="router runs of the router-only failures' files again (default 1)"
    )
    parser.add_argument("--ports", default=SYTEST_PORTS, help=f"SyTest's port range (default {SYTEST_PORTS})")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("HAPROXY_JSON", "ROUTER_JSON"),
        help="run nothing: compare the --json files of a --proxy haproxy and a --proxy router run",
    )
    parser.add_argument("files", nargs="*", help="SyTest test files (tests/...pl), instead of the subset")
    args = parser.parse_args(argv)
    proxies = PROXIES if args.proxy == "both" else (args.proxy,)
    files = args.files or (list(CI_FILES) if args.subset == "ci" else [])
    results: dict[str, Results] = {}
    try:
        if args.compare:
            for proxy, path in zip(PROXIES, args.compare, strict=True):
                results[proxy] = Results.from_json(json.loads(path.read_text())["results"][proxy])
        else:
            run_all(args, proxies, files, args.work_dir.resolve(), results)
    except (SytestError, deploy.DeployError, subprocess.CalledProcessError, OSError, KeyError) as e:
        say(str(e))
        return 2
    print(comparison(results))
    bad = router_only_failures(results["haproxy"], results["router"]) if len(results) == 2 else []
    if args.json:
        report = {
            "files": files or "all",
            "launcher": args.launcher,
            "results": {p: r.to_json() for p, r in results.items()},
            "router_only_failures": bad,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
