"""The lean launcher (`synapse-router`, synapse_router/launcher/main.py) as real processes on loopback:
it routes like mitmdump with the addon, keeps tokens out of its output, refuses a bad
configuration, routes deterministically across separate instances, and `--processes 2` serves
one port from two processes and stops them all on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Fleet, Router, RouterStarter, free_port, router_command, wait_for_port

from .conftest import served

pytestmark = pytest.mark.integration

LAUNCHER = "synapse-router"
POOLS = ["sync", "client_reader", "room", "media", "federation_reader", "typing"]
ROUTES = [
    ("GET", "/_matrix/client/v3/sync?since=s1&timeout=0", "sync"),
    ("GET", "/_matrix/client/versions", "client_reader"),
    ("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1", "room"),
    ("GET", "/_matrix/media/v3/download/x/y", "media"),
    ("PUT", "/_matrix/federation/v1/send/1", "federation_reader"),
    ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@a:x", "typing"),
    ("POST", "/_matrix/client/v3/logout", "main"),
]
WHOAMI = {"timeout": 10}  # a loaded test machine must not turn users into token-keyed requests


StartFn = Callable[..., Router]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartFn]:
    """Start a router with `launcher` ("synapse-router" or "mitmdump"); stopped at the end."""
    starter = RouterStarter(tmp_path)

    def run(
        main_url: str,
        config: dict | str,
        extra: list[str] | None = None,
        launcher: str = LAUNCHER,
        wait: bool = True,
    ) -> Router:
        return starter(main_url, config, extra, launcher=launcher, wait=wait, wait_timeout=60)

    try:
        yield run
    finally:
        starter.stop_all()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _both_serving(router: Router) -> list[int]:
    """Wait for the parent's "2 processes serving" line; the children's pids."""
    _wait_for(lambda: "2 processes serving" in router.log() or router.proc.poll() is not None, 60, "start-up")
    assert router.proc.poll() is None, router.log()
    children = _children(router.proc.pid)
    assert len(children) == 2
    return children


def _ports_below_ephemeral_range(count: int) -> int:
    """P with P .. P + count - 1 free and outside the kernel's ephemeral range, which the
    loopback clients and upstream connections of these tests keep drawing from (with
    `--processes N` the parent serves metrics on P, process i on P + i)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in range(max(1024, low - 12000), low - count - 1, 7):
        try:
            with contextlib.ExitStack() as stack:
                for i in range(count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} free ports in a row")


def _samples(metrics_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(metrics_url, timeout=5).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def _requests_total(metrics_url: str) -> float:
    return sum(value for _, value in _samples(metrics_url, "synapse_router_requests_total"))


def test_lean_launcher_routes_per_pool_like_mitmdump(fleet: Fleet, start: StartFn) -> None:
    fleet.add("main")
    for pool in POOLS:
        fleet.add(pool)
    config = {"workers": {pool: [fleet[pool].url] for pool in POOLS}}
    lean = start(fleet["main"].url, config)
    mitmdump = start(fleet["main"].url, config, launcher="mitmdump")
    for router in (lean, mitmdump):
        with httpx.Client(base_url=router.url, timeout=30) as client:
            for method, path, server in ROUTES:
                body = served(client.request(method, path, content=b"{}" if method != "GET" else None))
                assert (body["server"], body["method"], body["path"]) == (server, method, path), router.log()
                assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
    log = lean.log()
    # the router's own start-up lines, and a flow line per request as mitmdump prints them
    assert "synapse-router: loaded" in log
    assert "synapse-router: setting connection_strategy=lazy" in log
    assert "GET http://" in log and "/_matrix/client/versions" in log and "<< 200 OK" in log


def test_lean_launcher_keeps_tokens_out_of_its_output(fleet: Fleet, start: StartFn) -> None:
    header_token, query_token = "syt_header_SECRET_1", "syt_query_SECRET_2"
    fleet.add("main", whoami={header_token: "@a:test.local", query_token: "@b:test.local"})
    fleet.add("sync")
    # -v: flow_detail 2 prints every header of every flow
    router = start(fleet["main"].url, {"workers": {"sync": [fleet["sync"].url]}, "whoami": WHOAMI}, ["-v"])
    with httpx.Client(base_url=router.url, timeout=30) as client:
        r = client.get("/_matrix/client/v3/sync?since=s1", headers={"Authorization": f"Bearer {header_token}"})
        assert served(r)["server"] == "sync"
        r = client.get(f"/_matrix/client/v3/sync?since=s1&access_token={query_token}")
        assert served(r)["server"] == "sync"
        r = client.get("/_matrix/client/versions", headers={"Authorization": f"Bearer {header_token}"})
        assert served(r)["server"] == "main"
    router.stop()
    log = router.log()
    assert "Authorization: Bearer <redacted:" in log  # the headers were printed, redacted
    assert "SECRET" not in log


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("workers:\n  sync:\n    - http://127.0.0.1:1\n    - htp://x:1\n", "workers.sync[1] (line 4)"),
        ("wrokers: {}\n", "wrokers (line 1): unknown key"),
    ],
)
def test_lean_launcher_rejects_a_bad_config(tmp_path: Path, config: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    result = subprocess.run(
        router_command("http://127.0.0.1:1", free_port(), path, [], launcher=LAUNCHER),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"router_config {path}: {words}" in result.stderr


def test_lean_launcher_rejects_an_option_it_does_not_have(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("workers: {}\n")
    command = router_command("http://127.0.0.1:1", free_port(), path, ["--set", "map_local=|x|y"], launcher=LAUNCHER)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Unknown option(s): map_local" in result.stderr


def test_lean_launcher_runs_on_uvloop_when_asked(fleet: Fleet, start: StartFn, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    fleet.add("main")
    for pool in POOLS:
        fleet.add(pool)
    config = {"workers": {pool: [fleet[pool].url] for pool in POOLS}}
    by_flag = start(fleet["main"].url, config, ["--event-loop", "uvloop"])
    monkeypatch.setenv("SYNAPSE_ROUTER_EVENT_LOOP", "uvloop")
    by_environment = start(fleet["main"].url, config)
    for router in (by_flag, by_environment):
        with httpx.Client(base_url=router.url, timeout=30) as client:
            for method, path, server in ROUTES:
                body = served(client.request(method, path, content=b"{}" if method != "GET" else None))
                assert (body["server"], body["method"], body["path"]) == (server, method, path), router.log()
        assert "synapse-router: on uvloop's event loop" in router.log()


def test_lean_launcher_refuses_an_unknown_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("workers: {}\n")
    command = router_command("http://127.0.0.1:1", free_port(), path, ["--event-loop", "tokio"], launcher=LAUNCHER)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--event-loop: expected one of asyncio, uvloop, got 'tokio'" in result.stderr
    monkeypatch.setenv("SYNAPSE_ROUTER_EVENT_LOOP", "libuv")
    result = subprocess.run(
        router_command("http://127.0.0.1:1", free_port(), path, [], launcher=LAUNCHER),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SYNAPSE_ROUTER_EVENT_LOOP: expected one of asyncio, uvloop, got 'libuv'" in result.stderr


def test_two_instances_send_each_user_to_the_same_worker(fleet: Fleet, start: StartFn) -> None:
    users = {f"syt_user{i}_tok": f"@user{i}:test.local" for i in range(50)}
    fleet.add("main", whoami=users)
    workers = ["sync1", "sync2", "sync3"]
    for name in workers:
        fleet.add(name)
    config = {"workers": {"sync": [fleet[n].url for n in workers]}, "whoami": WHOAMI}
    routers = [start(fleet["main"].url, config), start(fleet["main"].url, config)]
    chosen: list[dict[str, str]] = []
    for router in routers:
        seen = {}
        with httpx.Client(base_url=router.url, timeout=30) as client:
            for token, user in users.items():
                r = client.get("/_matrix/client/v3/sync?since=s1", headers={"Authorization": f"Bearer {token}"})
                seen[user] = served(r)["server"]
        chosen.append(seen)
    assert chosen[0] == chosen[1]
    assert set(chosen[0].values()) == set(workers)  # spread, not everyone on one worker
    assert fleet["main"].stats()["whoami_calls"] == 2 * len(users)  # each instance resolved every user


def test_processes_share_one_port_reload_and_stop_together(fleet: Fleet, start: StartFn) -> None:
    fleet.add("main")
    fleet.add("reader")
    fleet.add("reader2")
    metrics = _ports_below_ephemeral_range(6)  # P .. P + 2, then P + 3 .. P + 5 after the reload
    config = {"workers": {"client_reader": [fleet["reader"].url]}, "metrics": {"listen": f"127.0.0.1:{metrics}"}}
    router = start(fleet["main"].url, config, ["--processes", "2"], wait=False)
    children = _both_serving(router)
    for port in (metrics, metrics + 1, metrics + 2):  # merged on P, process i's own on P + i
        wait_for_port(port, router.proc, timeout=30)

    requests = 60
    for _ in range(requests):  # a new connection each, so the kernel spreads them over both
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert served(client.get("/_matrix/client/versions"))["server"] == "reader"
    counts = [_requests_total(f"http://127.0.0.1:{port}/metrics") for port in (metrics + 1, metrics + 2)]
    assert sum(counts) == requests
    assert all(count > 0 for count in counts), counts  # both processes served
    merged = f"http://127.0.0.1:{metrics}/metrics"
    by_process: dict[str, float] = {}
    for labels, value in _samples(merged, "synapse_router_requests_total"):
        by_process[labels["process"]] = by_process.get(labels["process"], 0.0) + value
    assert by_process == {"1": counts[0], "2": counts[1]}
    up = {labels["process"]: value for labels, value in _samples(merged, "synapse_router_process_up")}
    assert up == {"1": 1.0, "2": 1.0}

    # SIGHUP to the parent reloads the configuration in every process, and in the parent
    config["workers"] = {"client_reader": [fleet["reader2"].url]}
    config["metrics"] = {"listen": f"127.0.0.1:{metrics + 3}"}
    router.config_path.write_text(yaml.safe_dump(config))
    router.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: router.log().count("synapse-router: loaded") == 4, 30, "both processes reloaded")
    for _ in range(20):
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert served(client.get("/_matrix/client/versions"))["server"] == "reader2"
    for port in (metrics + 3, metrics + 4, metrics + 5):
        wait_for_port(port, router.proc, timeout=30)
    up = {
        labels["process"]: value
        for labels, value in _samples(f"http://127.0.0.1:{metrics + 3}/metrics", "synapse_router_process_up")
    }
    assert up == {"1": 1.0, "2": 1.0}
    assert sum(_requests_total(f"http://127.0.0.1:{port}/metrics") for port in (metrics + 4, metrics + 5)) > 0

    router.proc.send_signal(signal.SIGTERM)
    assert router.proc.wait(30) == 0
    _wait_for(lambda: not any(_alive(pid) for pid in children), 10, "children still running")


def test_processes_leave_no_orphan_when_the_parent_is_killed(fleet: Fleet, start: StartFn) -> None:
    fleet.add("main")
    router = start(fleet["main"].url, {"workers": {}}, ["--processes", "2"], wait=False)
    children = _both_serving(router)
    router.proc.kill()
    router.proc.wait(10)
    _wait_for(lambda: not any(_alive(pid) for pid in children), 20, "orphaned children still running")


def test_processes_bad_config_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("workers:\n  sync:\n    - htp://x:1\n")
    command = router_command("http://127.0.0.1:1", free_port(), path, ["--processes", "3"], launcher=LAUNCHER)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("workers.sync[0] (line 3)") == 1


def test_processes_restart_a_child_that_died_and_drain_on_sigterm(fleet: Fleet, start: StartFn) -> None:
    """SIGKILL one of two children: the parent logs it and starts a replacement in its slot,
    which serves; the merged metrics count the restart. Then SIGTERM to the parent drains both
    children: every long-poll in flight is answered 200 and the parent exits 0."""
    fleet.add("main")
    fleet.add("reader")
    metrics = _ports_below_ephemeral_range(3)
    config = {"workers": {"client_reader": [fleet["reader"].url]}, "metrics": {"listen": f"127.0.0.1:{metrics}"}}
    router = start(fleet["main"].url, config, ["--processes", "2"], wait=False)
    before = _both_serving(router)
    killed = before[1]
    killed_at = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    # Until the replacement serves, the merged `/ready` names the slot at once (it does not ask
    # a process that is starting, which would hold the probe until it serves or times out).
    meanwhile: list[str] = []
    while "restarted (pid" not in router.log():
        answer = httpx.get(f"http://127.0.0.1:{metrics}/ready", timeout=30)
        meanwhile.append(f"{answer.status_code} {answer.text.strip()}")
        assert time.monotonic() - killed_at < 60, "the replacement serving"
        time.sleep(0.05)
    restart_latency = time.monotonic() - killed_at
    slot_down = [line for line in meanwhile if "is not serving (starting, or exited)" in line]
    assert slot_down and all(line.startswith("503 ") for line in slot_down), meanwhile
    after = _children(router.proc.pid)
    assert len(after) == 2 and before[0] in after and killed not in after, (before, after)
    replacement = next(pid for pid in after if pid != before[0])
    log = router.log()
    assert f"(pid {killed}) exited (signal SIGKILL)" in log and "restarting it at once" in log, log
    assert f"restarted (pid {replacement}) and serving; restarts of this process: 1" in log, log
    restarts = {
        labels["process"]: value
        for labels, value in _samples(f"http://127.0.0.1:{metrics}/metrics", "synapse_router_process_restarts_total")
    }
    assert sorted(restarts.values()) == [0.0, 1.0], restarts
    slot = next(process for process, value in restarts.items() if value == 1.0)
    wait_for_port(metrics + int(slot), router.proc, timeout=30)  # the replacement's own metrics
    for _ in range(40):  # new connections, spread over both processes by the kernel
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert served(client.get("/_matrix/client/versions"))["server"] == "reader"
    assert _requests_total(f"http://127.0.0.1:{metrics + int(slot)}/metrics") > 0  # the replacement served
    print(f"child killed -> replacement serving after {restart_latency:.2f}s (log seen by the test)")

    results: list[int] = []

    def long_poll() -> None:
        with httpx.Client(base_url=router.url, timeout=60) as client:
            results.append(client.get("/_matrix/client/versions?standin_delay=4").status_code)

    threads = [threading.Thread(target=long_poll) for _ in range(10)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: fleet["reader"].stats()["open_connections"] >= 10, 60, "long-polls at the stand-in")
    router.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(90)
    assert results == [200] * 10
    assert router.proc.wait(60) == 0
    assert router.log().count("restarting it") == 1  # nothing restarted while stopping
    _wait_for(lambda: not any(_alive(pid) for pid in after), 10, "children still running")
    assert "Traceback" not in router.log()


@pytest.mark.parametrize("processes", [1, 2])
def test_systemd_readiness_once_serving(
    fleet: Fleet, start: StartFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    """Under a `Type=notify` unit ($NOTIFY_SOCKET), READY=1 is sent once (by the parent with
    `--processes`) when the port serves."""
    fleet.add("main")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(tmp_path / "notify"))
        notify_socket.settimeout(60)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        router = start(fleet["main"].url, {"workers": {}}, ["--processes", str(processes)], wait=False)
        assert notify_socket.recv(64) == b"READY=1"
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert served(client.get("/_matrix/client/versions"))["server"] == "main"
        notify_socket.settimeout(2)
        with pytest.raises(TimeoutError):
            notify_socket.recv(64)  # once, not once per process


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"# caf\xe9: a Latin-1 comment\nworkers: {}\n", "is not UTF-8 text (byte 0xe9)"),
        (b"workers: {\n  sync: [\n", "invalid YAML"),  # a YAML typo
    ],
    ids=["not-utf8", "yaml-typo"],
)
def test_processes_reload_of_a_bad_file_keeps_everything_serving(
    fleet: Fleet, start: StartFn, content: bytes, said: str
) -> None:
    """SIGHUP with a file that cannot be read as a configuration: the parent and every child
    keep running on the last good one, and the merged /metrics and /health answer throughout
    (the parent used to stop them on a YAML error, and die on a non-UTF-8 byte, taking its
    children down with it). A good file after it is applied."""
    fleet.add("main")
    fleet.add("reader")
    metrics = _ports_below_ephemeral_range(6)
    config = {"workers": {"client_reader": [fleet["reader"].url]}, "metrics": {"listen": f"127.0.0.1:{metrics}"}}
    router = start(fleet["main"].url, config, ["--processes", "2"], wait=False)
    children = _both_serving(router)
    _wait_for(lambda: _answers(f"http://127.0.0.1:{metrics}/health"), 30, "merged /health served")

    loaded = router.log().count("synapse-router: loaded")
    router.config_path.write_bytes(content)
    router.proc.send_signal(signal.SIGHUP)
    # The parent, the one reader of the file, refuses it; the children are not asked to reload.
    _wait_for(
        lambda: "keeping the running configuration (of the parent and its 2 processes)" in router.log(), 30, "refused"
    )
    assert said in router.log()
    time.sleep(1)  # the parent acts on its own thread: give it the time to do something wrong
    assert router.proc.poll() is None, router.log()
    assert all(_alive(pid) for pid in children)
    assert _answers(f"http://127.0.0.1:{metrics}/health")
    assert _answers(f"http://127.0.0.1:{metrics}/metrics")
    with httpx.Client(base_url=router.url, timeout=30) as client:
        assert served(client.get("/_matrix/client/versions"))["server"] == "reader"
    assert router.log().count("synapse-router: loaded") == loaded  # no process reloaded anything

    config["metrics"] = {"listen": f"127.0.0.1:{metrics + 3}"}
    router.config_path.write_text(yaml.safe_dump(config))
    router.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: _answers(f"http://127.0.0.1:{metrics + 3}/metrics"), 30, "moved by the good file")
    _wait_for(lambda: not _answers(f"http://127.0.0.1:{metrics}/metrics"), 10, "the old address let go")


def test_processes_reload_to_a_busy_port_keeps_the_merged_endpoint(fleet: Fleet, start: StartFn) -> None:
    """A reload that names a port another program holds: the parent's merged /metrics and
    /health stay where they were (it used to stop the old listener first, leaving none), and it
    scrapes the processes where they moved (P' + i), so /ready and the merged series stay right
    (an outside trial saw /ready 503 'process 1 does not answer' for good)."""
    fleet.add("main")
    metrics = _ports_below_ephemeral_range(6)
    config = {"workers": {}, "metrics": {"listen": f"127.0.0.1:{metrics}"}}
    router = start(fleet["main"].url, config, ["--processes", "2"], wait=False)
    _both_serving(router)
    _wait_for(lambda: _answers(f"http://127.0.0.1:{metrics}/metrics"), 30, "merged metrics served")
    with socket.socket() as squatter:  # another program on P', without SO_REUSEPORT
        squatter.bind(("127.0.0.1", metrics + 3))
        squatter.listen()
        moved = {"workers": {}, "metrics": {"listen": f"127.0.0.1:{metrics + 3}"}}
        router.config_path.write_text(yaml.safe_dump(moved))
        router.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "merged metrics of the processes" in router.log(), 30, "the failed bind reported")
        for port in (metrics + 4, metrics + 5):  # the processes moved
            wait_for_port(port, router.proc, timeout=30)
        assert _answers(f"http://127.0.0.1:{metrics}/metrics")
        assert _answers(f"http://127.0.0.1:{metrics}/health")
        _wait_for(
            lambda: _answers(f"http://127.0.0.1:{metrics}/ready"), 10, "ready: the processes found where they are"
        )
        up = {
            labels["process"]: value
            for labels, value in _samples(f"http://127.0.0.1:{metrics}/metrics", "synapse_router_process_up")
        }
        assert up == {"1": 1.0, "2": 1.0}


@pytest.mark.parametrize(
    ("edit", "content"),
    [
        ("valid", None),  # a good file, not yet reloaded: reader2 instead of reader
        ("not-utf8", b"# caf\xe9: a Latin-1 comment\nworkers: {}\n"),
        ("yaml-typo", b"workers: {\n  sync: [\n"),
    ],
)
def test_a_restarted_process_runs_the_configuration_its_siblings_run(
    fleet: Fleet, start: StartFn, edit: str, content: bytes | None
) -> None:
    """A child restarted after it died loads the configuration the parent applied (at start or
    at the last SIGHUP), not the file as it is on disk: after an edit not yet reloaded it runs
    what its siblings run (it used to run the new file alone), and with a file that does not
    parse it starts (it used to crash-loop). The next SIGHUP applies the file to every process."""
    fleet.add("main")
    fleet.add("reader")
    fleet.add("reader2")
    metrics = _ports_below_ephemeral_range(3)
    config = {"workers": {"client_reader": [fleet["reader"].url]}, "metrics": {"listen": f"127.0.0.1:{metrics}"}}
    router = start(fleet["main"].url, config, ["--processes", "2"], wait=False)
    before = _both_serving(router)
    edited = {"workers": {"client_reader": [fleet["reader2"].url]}, "metrics": config["metrics"]}
    router.config_path.write_bytes(content if content is not None else yaml.safe_dump(edited).encode())
    os.kill(before[1], signal.SIGKILL)
    _wait_for(lambda: "restarted (pid" in router.log() or "in 1s" in router.log(), 60, "the replacement")
    assert "restarted (pid" in router.log(), router.log()
    after = _children(router.proc.pid)
    replacement = next(pid for pid in after if pid != before[0])
    slot = 2 if f"process 2/2 restarted (pid {replacement})" in router.log() else 1
    wait_for_port(metrics + slot, router.proc, timeout=30)
    for _ in range(40):  # new connections, spread over both processes by the kernel
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert served(client.get("/_matrix/client/versions"))["server"] == "reader"
    assert _requests_total(f"http://127.0.0.1:{metrics + slot}/metrics") > 0  # the replacement served them too
    assert router.log().count("restarting it") == 1, router.log()  # no crash loop

    if content is None:  # SIGHUP: now every process runs the edited file
        router.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: router.log().count("synapse-router: loaded") >= 5, 30, "both processes reloaded")
        for _ in range(20):
            with httpx.Client(base_url=router.url, timeout=30) as client:
                assert served(client.get("/_matrix/client/versions"))["server"] == "reader2"
    assert "Traceback" not in router.log()


def test_processes_log_only_true_metrics_addresses(fleet: Fleet, start: StartFn) -> None:
    """`--processes 2` with metrics.listen on P: every "... on http://ADDRESS/metrics" line
    names an address that serves (the parent's merged endpoint on P; each process's own on
    P + i, said to be its own); no process claims P (an outside trial: both children logged
    "metrics on http://127.0.0.1:P/metrics", the parent's address)."""
    fleet.add("main")
    metrics = _ports_below_ephemeral_range(3)
    config = {"workers": {}, "metrics": {"listen": f"127.0.0.1:{metrics}"}}
    router = start(fleet["main"].url, config, ["--processes", "2"], wait=False)
    _both_serving(router)
    for port in (metrics, metrics + 1, metrics + 2):
        _wait_for(lambda port=port: _answers(f"http://127.0.0.1:{port}/metrics"), 30, f"metrics on {port}")
    _wait_for(lambda: router.log().count("/metrics") >= 3, 10, "the three addresses logged")
    lines = [line for line in router.log().splitlines() if "/metrics" in line]
    claims = [re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line) for line in lines]
    assert all(claims), lines
    merged = [line for line in lines if f"127.0.0.1:{metrics}/metrics" in line]
    assert len(merged) == 1 and "merged metrics of the processes" in merged[0], lines
    for i in (1, 2):
        own = [line for line in lines if f"127.0.0.1:{metrics + i}/metrics" in line]
        assert len(own) == 1 and "of this process" in own[0], lines
    assert len(lines) == 3, lines
