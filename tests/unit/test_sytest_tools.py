"""scripts/sytest's pieces that need no SyTest run: the TAP it parses, the comparison it prints, and
the HAProxy stand-in reading a haproxy.conf and Synapse files as SyTest writes them (the stand-in
runs the real `synapse-router config from-synapse`). The runs themselves: tests/e2e/test_sytest.py."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


def _load(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


sytest_run = _load("sytest_run", ROOT / "scripts" / "sytest_run.py")
standin = _load("sytest_haproxy_standin", ROOT / "scripts" / "sytest_haproxy_standin")

TAP = """\
# Started: 2026-12-07 01:14:00.000
ok 1 Can register
ok 2 (expected fail) Flaky thing # TODO passed but expected fail
not ok 3 Can generate a openid access_token
# Ended: 2026-12-07 01:14:01.000
  ok 1 first step (Multi)
  not ok 2 second step (Multi)
not ok 4 Multi
not ok 5 (expected fail) Known bug # TODO expected fail
ok 6 Needs a CAS server # skip no CAS
ok 7 Federation works (3 subtests)
ok 8 Same name
not ok 9 Same name
1..9
"""


def test_tap_outcomes_by_name() -> None:
    r = sytest_run.parse_tap(TAP)
    assert r.planned == 9
    assert r.passed == {"Can register", "Flaky thing", "Federation works", "Same name"}
    assert r.failed == {"Can generate a openid access_token", "Multi", "Known bug", "Same name #2"}
    assert r.skipped == {"Needs a CAS server"}


def test_router_only_failures_include_tests_the_router_run_never_reached() -> None:
    haproxy = sytest_run.parse_tap("ok 1 A\nok 2 B\nok 3 C\nnot ok 4 D\nok 5 E # skip x\n")
    router = sytest_run.parse_tap("ok 1 A\nnot ok 2 B\nok 3 D\n")  # stopped before C
    assert sytest_run.router_only_failures(haproxy, router) == ["B", "C"]
    text = sytest_run.comparison({"haproxy": haproxy, "router": router})
    assert "passes through HAProxy, fails through the router: 2\n  - B\n  - C" in text
    assert "passes through the router, fails through HAProxy: 1\n  - D" in text


def haproxy_conf(hs: Path) -> str:
    """Shaped as SyTest's Synapse.pm (generate_haproxy_config) writes it."""
    return f"""global
    tune.ssl.default-dh-param 2048
    maxconn 2000

defaults
    mode http
    option forwardfor

frontend http-in
    bind 127.0.0.1:27039 ssl crt {hs}/combined.pem
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    use_backend %[path,map_reg({hs}/path_map_file,synapse)]

backend synapse
    server synapse 127.0.0.1:27038

backend synchrotron
    server synchrotron 127.0.0.1:27004

backend federation_reader
    server federation_reader 127.0.0.1:27007

backend stream_writer
    server stream_writer 127.0.0.1:27035

"""


def write_worker(hs: Path, name: str, app: str, port: int, resources: list[str]) -> None:
    listeners = [
        {"bind_address": "127.0.0.1", "port": port, "resources": [{"names": resources}], "type": "http"},
        {"bind_address": "127.0.0.1", "port": port + 1, "type": "manhole"},
        {"bind_address": "127.0.0.1", "port": port + 2, "resources": [{"names": ["metrics"]}], "type": "http"},
    ]
    data = {"worker_app": app, "worker_listeners": listeners, "worker_name": name}
    (hs / f"{name}.yaml").write_text("---\n" + yaml.safe_dump(data))


def sytest_homeserver(hs: Path) -> None:
    streams = ["to_device", "account_data", "receipts", "presence", "push_rules", "typing"]
    config = {
        "server_name": "127.0.0.1:27039",
        "instance_map": {"main": {"host": "127.0.0.1", "port": 27038}},
        "stream_writers": {"events": ["event_persister1"], **{s: ["stream_writer"] for s in streams}},
    }
    (hs / "config.yaml").write_text("---\n" + yaml.safe_dump(config))
    (hs / "database.yaml").write_text("name: psycopg2\nargs: {dbname: x}\n")
    write_worker(hs, "synchrotron", "synapse.app.synchrotron", 27004, ["client"])
    write_worker(hs, "federation_reader", "synapse.app.federation_reader", 27007, ["federation"])
    write_worker(hs, "stream_writer", "synapse.app.generic_worker", 27035, ["client", "replication"])
    write_worker(hs, "event_persister1", "synapse.app.generic_worker", 27029, ["client", "replication"])
    (hs / "pusher.yaml").write_text(yaml.safe_dump({"worker_app": "synapse.app.pusher", "worker_name": "pusher"}))


def test_standin_reads_sytests_haproxy_conf(tmp_path: Path) -> None:
    host, port, pem, backends = standin.parse_haproxy_conf(haproxy_conf(tmp_path))
    assert (host, port, pem) == ("127.0.0.1", 27039, f"{tmp_path}/combined.pem")
    assert backends == {
        "synapse": ["127.0.0.1:27038"],
        "synchrotron": ["127.0.0.1:27004"],
        "federation_reader": ["127.0.0.1:27007"],
        "stream_writer": ["127.0.0.1:27035"],
    }
    with pytest.raises(standin.StandinError, match="ssl crt"):
        standin.parse_haproxy_conf("frontend x\n    bind 127.0.0.1:1\n")


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "command"])
def test_standin_pools_mirror_every_haproxy_backend(tmp_path: Path, in_process: bool) -> None:
    sytest_homeserver(tmp_path)
    _, _, _, backends = standin.parse_haproxy_conf(haproxy_conf(tmp_path))
    text = standin.router_yaml(tmp_path, VENV, backends, in_process)
    config = yaml.safe_load(text)
    workers = config["workers"]
    assert workers["sync"] == ["http://127.0.0.1:27004"]
    assert workers["federation_reader"] == ["http://127.0.0.1:27007"]
    for stream in ("to_device", "account_data", "receipts", "presence", "push_rules", "typing"):
        assert workers[stream] == ["http://127.0.0.1:27035"]
    assert workers["generic"] == ["http://127.0.0.1:27029"]  # the event persister's client listener
    assert config["shutdown"] == {"grace": 1}
    assert config["limits"] == {"max_connections": 2000}
    assert config["access_log"]["path"] == str(tmp_path / "synapse-router-access.log")


def test_standin_refuses_a_backend_no_pool_has(tmp_path: Path) -> None:
    sytest_homeserver(tmp_path)
    (tmp_path / "synchrotron.yaml").unlink()
    _, _, _, backends = standin.parse_haproxy_conf(haproxy_conf(tmp_path))
    with pytest.raises(standin.StandinError, match=r"synchrotron \(127.0.0.1:27004\)"):
        standin.router_yaml(tmp_path, VENV, backends)


def test_standin_command_lines_for_both_launchers(tmp_path: Path) -> None:
    config = tmp_path / "r.yaml"
    lean = standin.router_argv(VENV, "synapse-router", "127.0.0.1:27038", "127.0.0.1", 27039, "/p.pem", config)
    assert lean[0] == str(VENV / "bin" / "synapse-router")
    options = ["--mode", "reverse:http://127.0.0.1:27038@27039", "--set", "listen_host=127.0.0.1"]
    options += ["--set", f"router_config={config}", "--set", "certs=*=/p.pem"]
    assert lean[1:] == options
    dump = standin.router_argv(VENV, "mitmdump", "127.0.0.1:27038", "127.0.0.1", 27039, "/p.pem", config)
    assert dump == [str(VENV / "bin" / "mitmdump"), "-s", str(ROOT / "addons" / "router.py"), *options]
    with pytest.raises(standin.StandinError, match="SYTEST_ROUTER_LAUNCHER"):
        standin.router_argv(VENV, "nginx", "a:1", "h", 1, "p", config)


def test_results_survive_the_json_that_compare_reads(tmp_path: Path) -> None:
    r = sytest_run.parse_tap(TAP)
    assert sytest_run.Results.from_json(r.to_json()) == r
    for proxy, tap in (("haproxy", "ok 1 A\nok 2 B\n"), ("router", "ok 1 A\nnot ok 2 B\n")):
        report = {"results": {proxy: sytest_run.parse_tap(tap).to_json()}}
        (tmp_path / f"{proxy}.json").write_text(sytest_run.json.dumps(report))
    out = tmp_path / "both.json"
    status = sytest_run.main(
        ["--compare", str(tmp_path / "haproxy.json"), str(tmp_path / "router.json"), "--json", str(out)]
    )
    assert status == 1
    assert sytest_run.json.loads(out.read_text())["router_only_failures"] == ["B"]


def test_test_files_come_from_sytests_progress_log() -> None:
    log = (
        "tests/10apidoc/02login.pl:\n    Test 1 GET /login yields a set of flows... OK\n"
        "[synapse-0-master]: noise\ntests/45openid.pl:\n    Test 2 Can generate a openid access_token... FAIL\n"
    )
    r = sytest_run.parse_tap(
        "ok 1 GET /login yields a set of flows\nnot ok 2 Can generate a openid access_token\n", log
    )
    assert r.files == {
        "GET /login yields a set of flows": "tests/10apidoc/02login.pl",
        "Can generate a openid access_token": "tests/45openid.pl",
    }


def test_a_failure_the_router_passes_on_a_recheck_is_not_a_router_only_failure() -> None:
    haproxy = sytest_run.parse_tap("ok 1 A\nok 2 B\n")
    router = sytest_run.parse_tap("not ok 1 A\nnot ok 2 B\n")
    router.cleared.add("A")
    assert sytest_run.router_only_failures(haproxy, router) == ["B"]
    assert "passed through it on a recheck run: 1\n  - A" in sytest_run.comparison(
        {"haproxy": haproxy, "router": router}
    )


def test_a_recheck_whose_homeservers_never_start_keeps_the_runs_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded machine a recheck run may fail to start a homeserver: what it passed before
    that still clears, the rest stay router-only failures, and the comparison is still made
    (it used to raise, and the whole run's results were lost)."""
    haproxy = sytest_run.parse_tap("ok 1 A\nok 2 B\nok 3 C\n")
    router = sytest_run.parse_tap("not ok 1 A\nnot ok 2 B\nok 3 C\n")
    router.files.update({"A": "tests/a.pl", "B": "tests/b.pl"})
    runs = iter([(sytest_run.parse_tap("ok 1 A\n"), False), (sytest_run.parse_tap(""), False)])
    monkeypatch.setattr(sytest_run, "_run_once", lambda *args: next(runs))
    setup = sytest_run.Setup(*[None] * 8, attempts=2, ports="27000:27999")  # type: ignore[arg-type]
    results = {"haproxy": haproxy, "router": router}
    sytest_run.recheck(setup, results, rounds=1)
    assert router.cleared == {"A"}
    assert sytest_run.router_only_failures(haproxy, router) == ["B"]


def test_the_comparison_lists_the_tests_that_fail_through_both() -> None:
    haproxy = sytest_run.parse_tap("ok 1 A\nnot ok 2 B\nnot ok 3 C\n")
    router = sytest_run.parse_tap("ok 1 A\nnot ok 2 B\nok 3 C\n")
    text = sytest_run.comparison({"haproxy": haproxy, "router": router})
    assert "fails through both: 1\n  - B" in text
    assert "passes through the router, fails through HAProxy: 1\n  - C" in text


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")
def test_shared_redis_helpers_start_and_wait_for_a_real_redis(tmp_path: Path) -> None:
    """The helpers scripts/sytest_run.py takes from scripts/synapse_deploy.py (one copy of the
    redis-server command line, its ping and the bounded wait) run a real redis-server."""
    deploy = sytest_run.deploy
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = deploy.redis_argv(Path(str(shutil.which("redis-server"))), "127.0.0.1", port, tmp_path, tmp_path / "r.log")
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        assert deploy.wait_until(lambda: deploy.redis_ping(port, "127.0.0.1"), alive, time.monotonic() + 30)
    finally:
        proc.terminate()
        proc.wait(10)
    assert not deploy.redis_ping(port, "127.0.0.1")
    assert not deploy.wait_until(lambda: False, lambda: False, time.monotonic() + 600)  # a dead process: no wait


def test_a_deployment_waiting_for_another_ones_synapse_install_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run sharing the Synapse venv used to wait minutes in silence for the first's
    pip install; now it says whom it waits for, then goes on once the lock is free."""
    import fcntl
    import threading

    layout = sytest_run.deploy.Layout(tmp_path / "state", shared_venv=tmp_path / "venv")
    monkeypatch.setattr(sytest_run.deploy, "_ensure_venv", lambda _layout: "installed")
    (tmp_path / "venv").parent.mkdir(parents=True, exist_ok=True)
    result: list[str] = []
    with open(f"{layout.venv}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(sytest_run.deploy.ensure_venv(layout)))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not result  # waits for the holder
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(10)
    assert result == ["installed"]
    assert f"another deployment is installing Synapse into {layout.venv}; waiting for it" in capsys.readouterr().err
