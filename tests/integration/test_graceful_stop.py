"""Graceful stop and rolling restart (issue 15), against real router processes (either launcher,
SYNAPSE_ROUTER_LAUNCHER): SIGTERM lets every request in flight finish, long-polls included,
while the port is closed at once; a second router started on the same port takes every new
connection while the first drains; past `shutdown.grace` the rest are closed and the router
exits; a second signal stops at once."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from synapse_router.addons.graceful_stop import IDLE_WAIT

from tests.harness import DEFAULT_LAUNCHER, Fleet, Router, RouterStarter, free_port, read_response

pytestmark = pytest.mark.integration

DEADLINE = 60.0  # generous: for what must happen, never a measure of how fast
SYNC = "/_matrix/client/v3/sync?since=s1&timeout=30000&standin_delay={delay}"  # sent by the router itself
INITIAL_SYNC = "/_matrix/client/v3/sync?standin_delay={delay}"  # forwarded by mitmproxy
TOKENS = {f"tok{i}": f"@u{i}:example.org" for i in range(40)}


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _fleet_config(fleet: Fleet, grace: float | None = None) -> dict:
    fleet.add("main", whoami=TOKENS)
    fleet.add("sync")
    fleet.add("initial")
    config: dict = {
        "workers": {"sync": [fleet["sync"].url], "initial_sync": [fleet["initial"].url]},
        "whoami": {"timeout": 10},
        "health": {"interval": 3600},  # no health-check connection in the stand-ins' counts
    }
    if grace is not None:
        config["shutdown"] = {"grace": grace}
    return config


def _send(port: int, path: str, token: str) -> socket.socket:
    """A new connection with one request sent on it (so it is in flight from now on)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: matrix.example.org\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the router sends until it closes the connection."""
    received = b""
    with sock:
        sock.settimeout(DEADLINE)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def _status(received: bytes) -> int | None:
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received.split(b" ", 2)[1])


def _upstream_open(fleet: Fleet) -> int:
    return fleet["sync"].stats()["open_connections"] + fleet["initial"].stats()["open_connections"]


def _in_flight(fleet: Fleet, router: Router, sync: int, initial: int, delay: float) -> list[socket.socket]:
    """`sync` long-polls and `initial` initial syncs sent, each on its own connection, and
    waiting at the stand-ins (which answer after `delay` seconds, or once `_release`d)."""
    socks = [_send(router.port, SYNC.format(delay=delay), f"tok{i}") for i in range(sync)]
    socks += [_send(router.port, INITIAL_SYNC.format(delay=delay), f"tok{sync + i}") for i in range(initial)]
    _wait_for(lambda: _upstream_open(fleet) >= sync + initial, "requests at the stand-ins")
    return socks


def _release(fleet: Fleet) -> None:
    """Let the stand-ins answer the long-polls they hold."""
    fleet["sync"].release()
    fleet["initial"].release()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _assert_clean_log(router: Router) -> None:
    log = router.log()
    assert "Traceback" not in log, log
    assert "Addon error" not in log, log
    assert "Unhandled" not in log, log


def test_sigterm_answers_every_request_in_flight(fleet: Fleet, start_router: RouterStarter) -> None:
    """40 requests in flight (30 sync long-polls sent by the router, 10 initial syncs forwarded
    by mitmproxy) at SIGTERM, the stand-ins answering 6 s later: all 40 answered 200, each with
    `Connection: close`; the port refuses connections as soon as the stop is logged; exit 0."""
    config = _fleet_config(fleet)
    router = start_router(fleet["main"].url, config)
    idle = socket.create_connection(("127.0.0.1", router.port), timeout=DEADLINE)  # an idle keep-alive one
    idle.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.example.org\r\n\r\n")
    assert read_response(idle, DEADLINE)[0] == 200
    time.sleep(IDLE_WAIT + 0.2)  # idle for over IDLE_WAIT at the stop: closed at once
    socks = _in_flight(fleet, router, sync=30, initial=10, delay=30)  # held until released below

    router.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "synapse-router: stopping" in router.log(), "the stop logged")
    assert _refused(router.port)  # no new connection once stopping
    assert _until_closed(idle) == b""  # the idle keep-alive connection is closed, unanswered
    _release(fleet)

    answers = [_until_closed(sock) for sock in socks]
    statuses = Counter(_status(a) for a in answers)
    print(f"in flight at SIGTERM: {len(socks)}, answered: {dict(statuses)}")
    assert statuses == Counter({200: 40}), answers
    for answer in answers:
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert b"\r\nconnection: close" in head
    servers = Counter(json.loads(a.partition(b"\r\n\r\n")[2])["server"] for a in answers)
    assert servers == Counter({"sync": 30, "initial": 10})
    assert router.proc.wait(DEADLINE) == 0
    log = router.log()
    assert "1 idle connection(s) closed; waiting up to 35s for 40 request(s) in flight on 40 connection(s)" in log, log
    assert "stopped gracefully" in log
    _assert_clean_log(router)


def _statuses(socks: list[socket.socket]) -> Counter[int | None]:
    return Counter(_status(_until_closed(sock)) for sock in socks)


def test_a_keep_alive_connection_in_use_gets_its_next_answer_with_connection_close(
    fleet: Fleet, start_router: RouterStarter
) -> None:
    """A client that keeps sending on one keep-alive connection (every 50 ms; an outer proxy's
    pooled connection) is not cut while the router drains: its next request is answered, with
    `Connection: close`, and the connection closes after it; no request goes unanswered."""
    config = _fleet_config(fleet)
    router = start_router(fleet["main"].url, config)
    long_poll = _in_flight(fleet, router, sync=1, initial=0, delay=30)  # keeps the drain going
    busy = socket.create_connection(("127.0.0.1", router.port), timeout=DEADLINE)
    request = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.example.org\r\n\r\n"
    answers: list[tuple[int, str]] = []
    stopped = threading.Event()

    def keep_sending() -> None:
        while True:
            busy.sendall(request)
            status, headers, _ = read_response(busy, DEADLINE)
            answers.append((status, headers.get("connection", "")))
            if headers.get("connection", "").lower() == "close":
                return
            if stopped.is_set() and len(answers) > 200:
                return  # never told to close: the assertion below says so
            time.sleep(0.05)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    _wait_for(lambda: len(answers) >= 3, "answers before the stop")
    router.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "synapse-router: stopping" in router.log(), "the stop logged")
    stopped.set()
    sender.join(DEADLINE)
    assert answers[-1] == (200, "close"), answers[-3:]
    assert all(status == 200 for status, _ in answers)
    assert _until_closed(busy) == b""
    _release(fleet)
    assert _statuses(long_poll) == Counter({200: 1})
    assert router.proc.wait(DEADLINE) == 0
    _assert_clean_log(router)


def test_grace_over_closes_the_rest_and_exits(fleet: Fleet, start_router: RouterStarter) -> None:
    """`shutdown.grace: 2` and requests the stand-ins answer after 30 s: past the grace they are
    closed (unanswered), counted in the log, and the router exits 0."""
    config = _fleet_config(fleet, grace=2)
    router = start_router(fleet["main"].url, config)
    socks = _in_flight(fleet, router, sync=3, initial=2, delay=30)
    router.proc.send_signal(signal.SIGTERM)
    assert router.proc.wait(DEADLINE) == 0
    assert _statuses(socks) == Counter({None: 5})  # closed without an answer
    log = router.log()
    assert "grace of 2s over: closing 5 request(s) still in flight on 5 connection(s)" in log, log
    _assert_clean_log(router)


def test_a_connection_that_sent_nothing_does_not_hold_the_drain(fleet: Fleet, start_router: RouterStarter) -> None:
    """A connection open with nothing sent on it (a browser's preconnect, a load balancer's warm
    connection) is closed while the router drains, unanswered: the router stops gracefully once
    its requests in flight are answered, not at the end of the grace (35 s)."""
    config = _fleet_config(fleet)
    router = start_router(fleet["main"].url, config)
    assert httpx.get(f"{router.url}/_matrix/client/versions", timeout=DEADLINE).status_code == 200  # serving
    silent = socket.create_connection(("127.0.0.1", router.port), timeout=DEADLINE)
    socks = _in_flight(fleet, router, sync=1, initial=1, delay=30)  # held until released below
    router.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "synapse-router: stopping" in router.log(), "the stop logged")
    _release(fleet)
    assert _statuses(socks) == Counter({200: 2})
    assert _until_closed(silent) == b""
    assert router.proc.wait(DEADLINE) == 0
    log = router.log()
    assert "stopped gracefully: every request in flight answered" in log, log
    assert "grace of" not in log, log
    _assert_clean_log(router)


def test_a_head_begun_is_not_silent_its_connection_waits_for_the_grace(
    fleet: Fleet, start_router: RouterStarter
) -> None:
    """A connection that has sent part of a request head is not closed as silent: the client may
    be slow, its header_timeout stands; the grace (2 s here) bounds it."""
    config = _fleet_config(fleet, grace=2)
    router = start_router(fleet["main"].url, config)
    assert httpx.get(f"{router.url}/_matrix/client/versions", timeout=DEADLINE).status_code == 200  # serving
    partial = socket.create_connection(("127.0.0.1", router.port), timeout=DEADLINE)
    partial.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.example.org\r\n")
    # The grace (2 s) outlasts the second a silent connection gets: kept for having sent something.
    router.proc.send_signal(signal.SIGTERM)
    assert router.proc.wait(DEADLINE) == 0
    assert _until_closed(partial) == b""
    log = router.log()
    assert "grace of 2s over: closing 0 request(s) still in flight on 1 connection(s)" in log, log
    _assert_clean_log(router)


def test_requests_waiting_for_their_turn_are_told_to_retry_not_held_to_it(
    fleet: Fleet, start_router: RouterStarter, tmp_path: Path
) -> None:
    """Paced requests waiting for their address's turn (10 s and more away here) are answered
    429 with the rest of their wait at the stop, while a long-poll still holds the drain: the
    router taking over serves their retry; each is logged once, none reaches a worker."""
    config = _fleet_config(fleet)
    access = tmp_path / "access.log"
    config["limits"] = {"request_rate_per_address": 0.1, "request_burst_per_address": 1, "request_delay_max": 60}
    config["access_log"] = {"enabled": True, "format": "json", "path": str(access)}
    metrics_port = free_port()
    config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    router = start_router(fleet["main"].url, config)
    socks = _in_flight(fleet, router, sync=1, initial=0, delay=30)  # the burst; held until released
    waiting = [_send(router.port, "/_matrix/client/versions", "tok30") for _ in range(2)]
    upload = socket.create_connection(("127.0.0.1", router.port), timeout=DEADLINE)
    body = b"x" * 300_000  # its connection is not read while it waits: most of it stays with the client
    upload.sendall(
        f"POST /_matrix/client/v3/rooms/!r:x/send/m.room.message HTTP/1.1\r\nHost: m\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    upload.setblocking(False)
    try:
        upload.send(body)
    except BlockingIOError:
        pass
    upload.setblocking(True)
    delayed = 'synapse_router_paced_requests_total{outcome="delayed"} 3.0'
    _wait_for(lambda: delayed in httpx.get(metrics, timeout=DEADLINE).text, "three requests waiting their turn")
    sent_on = fleet["main"].stats()["requests"]
    router.proc.send_signal(signal.SIGTERM)
    for sock in [*waiting, upload]:
        status, headers, answer = read_response(sock, timeout=DEADLINE)
        assert status == 429 and headers.get("connection") == "close", (status, headers, answer)
        assert json.loads(answer)["errcode"] == "M_LIMIT_EXCEEDED" and int(headers["retry-after"]) >= 1
        sock.close()
    assert router.proc.poll() is None  # the long-poll still holds the drain: not held to their turns
    _release(fleet)
    assert _statuses(socks) == Counter({200: 1})
    assert router.proc.wait(DEADLINE) == 0
    log = router.log()
    assert "3 paced request(s) ended (told to retry, or gone)" in log, log
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    paced = [line for line in lines if "paced_ms" in line]
    assert len(paced) == 3 and all(line["status"] == 429 and line["worker"] == "router" for line in paced), lines
    assert fleet["main"].stats()["requests"] == sent_on, "nothing of theirs sent on"
    _assert_clean_log(router)


def test_second_signal_stops_at_once(fleet: Fleet, start_router: RouterStarter) -> None:
    config = _fleet_config(fleet)
    router = start_router(fleet["main"].url, config)
    socks = _in_flight(fleet, router, sync=2, initial=1, delay=30)
    router.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "synapse-router: stopping" in router.log(), "the stop logged")
    router.proc.send_signal(signal.SIGINT)
    assert router.proc.wait(DEADLINE) == 0
    assert _statuses(socks) == Counter({None: 3})
    log = router.log()
    assert "second stop signal: stopping now, closing 3 request(s) still in flight" in log, log
    _assert_clean_log(router)


@pytest.mark.skipif(
    DEFAULT_LAUNCHER == "mitmdump",
    reason="mitmdump binds its listening socket without SO_REUSEPORT (asyncio.start_server(handle_stream, "
    "host, port)) and offers no way to set it: a second mitmdump cannot bind the port the first one holds",
)
def test_rolling_restart_refuses_nothing(fleet: Fleet, start_router: RouterStarter) -> None:
    """Router A serves; requests on new connections run in a loop; 20 long-polls wait on A. Router
    B starts on the same port with `--replace A`: once it serves, A drains (its 20 long-polls
    answered 200) and B takes every new connection: 0 refused, 0 failed."""
    config = _fleet_config(fleet)
    old = start_router(fleet["main"].url, config)
    long_polls = _in_flight(fleet, old, sync=15, initial=5, delay=30)  # held until B serves (released below)
    outcomes: Counter[str] = Counter()
    done = threading.Event()

    def clients() -> None:
        while not done.is_set():
            try:
                with httpx.Client(timeout=DEADLINE) as client:  # a new connection each time
                    response = client.get(f"{old.url}/_matrix/client/versions")
                outcomes[str(response.status_code)] += 1
            except httpx.ConnectError:
                outcomes["refused"] += 1
            except httpx.HTTPError as e:
                outcomes[type(e).__name__] += 1

    loop = threading.Thread(target=clients)
    loop.start()
    try:
        new = start_router(fleet["main"].url, config, ["--replace", str(old.proc.pid)], port=old.port, wait=False)
        _wait_for(lambda: "synapse-router: stopping" in old.log() or old.proc.poll() is not None, "A stopping")
        after: Counter[int] = Counter()
        for _ in range(20):  # arriving after A's SIGTERM: B serves them
            with httpx.Client(timeout=DEADLINE) as client:
                after[client.get(f"{old.url}/_matrix/client/versions").status_code] += 1
        assert after == Counter({200: 20})
        _release(fleet)
        assert _statuses(long_polls) == Counter({200: 20})
        assert old.proc.wait(DEADLINE) == 0
    finally:
        done.set()
        loop.join()
    print(f"rolling restart: requests during the hand-over {dict(outcomes)}; after A's SIGTERM {dict(after)}")
    assert set(outcomes) == {"200"} and outcomes["200"] > 0, outcomes
    assert new.proc.poll() is None
    assert "SIGTERM sent to pid" in new.log()
    assert f"port {old.port} is already served by another process" in new.log()
    _assert_clean_log(old)
    _assert_clean_log(new)


@pytest.mark.skipif(
    DEFAULT_LAUNCHER == "mitmdump",
    reason="mitmdump binds its listening socket without SO_REUSEPORT: a second one cannot share the port",
)
@pytest.mark.parametrize("processes", [1, 2])
def test_a_replaced_router_leaves_health_and_ready_to_the_new_one(
    fleet: Fleet, start_router: RouterStarter, processes: int
) -> None:
    """Router B replaces A (`--replace`) on the same proxy and metrics ports. While A drains its
    long-polls, every `/ready` probe is answered 200 by B: A stops listening on the shared
    metrics port as its stop begins (it answered `503 not ready: stopping` to the probes the
    kernel gave it, about half of them, which takes a ready node out of a load balancer). With
    `--processes 2` B's parent listens there only once both its processes serve."""
    config = _fleet_config(fleet)
    config["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    ready = f"http://{config['metrics']['listen']}/ready"
    extra = ["--processes", "2"] if processes == 2 else []
    old = start_router(fleet["main"].url, config, extra)
    # Held at the stand-ins until the probes are done (released below), well within A's grace
    # (35 s): however slowly a loaded machine starts B and runs the probes, A drains meanwhile.
    long_polls = _in_flight(fleet, old, sync=3, initial=1, delay=30)
    new = start_router(fleet["main"].url, config, [*extra, "--replace", str(old.proc.pid)], port=old.port, wait=False)
    _wait_for(lambda: "synapse-router: stopping" in old.log(), "A stopping")
    answers: Counter[str] = Counter()
    for _ in range(60):
        with httpx.Client(timeout=DEADLINE) as client:  # a new connection each time, as probes do
            response = client.get(ready)
        answers[f"{response.status_code} {response.text.strip()}"] += 1
        time.sleep(0.02)
    assert old.proc.poll() is None, "A must still be draining while the probes ran"
    _release(fleet)
    assert answers == Counter({"200 OK": 60}), answers
    assert "/health, /ready and /metrics left to the router sharing" in old.log(), old.log()
    assert _statuses(long_polls) == Counter({200: 4})
    assert old.proc.wait(DEADLINE) == 0
    assert new.proc.poll() is None
    _assert_clean_log(old)
    _assert_clean_log(new)
