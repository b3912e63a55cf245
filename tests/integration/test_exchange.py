"""Each exchange has one owner (routing/exchange.py): however a request ends (answered, failed,
its client gone, a hook raising), its in-flight count on `/metrics` goes back to zero, and it is
counted once.

Real routers (either launcher) in front of real loopback servers (tests/standin.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, Fleet, Router, RouterStarter, free_port, wait_for_port

pytestmark = pytest.mark.integration

TOKEN = "syt_alice_exchange_SECRET"
# checks rarely, so that only the requests themselves judge the workers during a test
HEALTH = {"interval": 30, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.5}


def _families(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def in_flight(port: int) -> dict[str, float]:
    return {labels["worker"]: value for labels, value in _families(port).get("synapse_router_worker_in_flight", [])}


def requests_counted(port: int) -> float:
    return sum(value for _, value in _families(port).get("synapse_router_requests_total", []))


def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what()
        time.sleep(0.1)


def raw_request(port: int, path: str, leave_after: float | None = None) -> bytes:
    """Send a GET with the test token on a plain socket; with `leave_after`, close the
    connection that many seconds later without reading (a client that leaves)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: matrix.test\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    if leave_after is not None:
        time.sleep(leave_after)
        sock.close()
        return b""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    finally:
        sock.close()
    return data


@pytest.fixture
def full_backlog() -> Iterator[str]:
    """A listening socket whose accept queue is full and never drained: a connection to it
    neither opens nor is refused (a worker too busy to accept)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fillers.append(sock)
    time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in fillers:
            sock.close()
        server.close()


def _start(
    tmp_path: Path, fleet: Fleet, workers: dict[str, list[str]], extra: list[str] | None = None
) -> tuple[RouterStarter, Router, int, Path]:
    metrics_port = free_port()
    access = tmp_path / "access.log"
    config = {
        "workers": workers,
        "health": HEALTH,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "access_log": {"enabled": True, "format": "logfmt", "path": str(access)},
    }
    starter = RouterStarter(tmp_path)
    router = starter(fleet["main"].url, config, extra)
    wait_for_port(metrics_port, router.proc)
    return starter, router, metrics_port, access


def _lines(access: Path) -> list[str]:
    return [line for line in access.read_text().splitlines() if "route=" in line]


def test_a_client_that_leaves_during_connect_failover_leaves_no_count(
    fleet: Fleet, tmp_path: Path, full_backlog: str
) -> None:
    """A media download (mitmproxy's path) whose first worker does not accept: the router probes
    it for the connect timeout; the client leaves meanwhile. Its exchange is over: the probe's
    failure must not move a count onto the next worker (on main it did, for good)."""
    fleet.add("main", whoami={TOKEN: "@alice:test"})
    fleet.add("media2")
    workers = {"media": [full_backlog, fleet["media2"].url]}
    starter, router, metrics_port, access = _start(tmp_path, fleet, workers)
    try:
        assert in_flight(metrics_port) == {full_backlog: 0.0, fleet["media2"].url: 0.0}
        raw_request(router.port, "/_matrix/media/v3/download/x/y", leave_after=0.5)
        time.sleep(HEALTH["connect_timeout"] + 1.0)  # the probe has failed by now
        wait_until(lambda: len(_lines(access)) >= 1, 10, access.read_text)
        # the count of an exchange that is over is not moved anywhere
        wait_until(
            lambda: in_flight(metrics_port) == {full_backlog: 0.0, fleet["media2"].url: 0.0},
            5,
            lambda: in_flight(metrics_port),
        )
        # and the router still serves that route, counting each request once
        answer = raw_request(router.port, "/_matrix/media/v3/download/x/z")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        wait_until(lambda: len(_lines(access)) == 2, 10, access.read_text)
        time.sleep(0.5)
        assert len(_lines(access)) == 2, access.read_text()
        assert in_flight(metrics_port) == {full_backlog: 0.0, fleet["media2"].url: 0.0}
        assert requests_counted(metrics_port) == 2
    finally:
        starter.stop_all()


@pytest.mark.parametrize(
    "path",
    [
        "/_matrix/client/v3/sync?since=s1&timeout=5000&standin_delay=5",  # router-sent long-poll
        "/_matrix/media/v3/download/x/y?standin_delay=5",  # mitmproxy's path
    ],
)
def test_a_client_that_leaves_mid_request(fleet: Fleet, tmp_path: Path, path: str) -> None:
    fleet.add("main", whoami={TOKEN: "@alice:test"})
    fleet.add("sync1")
    fleet.add("media1")
    workers = {"sync": [fleet["sync1"].url], "media": [fleet["media1"].url]}
    starter, router, metrics_port, access = _start(tmp_path, fleet, workers)
    zero = {fleet["sync1"].url: 0.0, fleet["media1"].url: 0.0}
    try:
        raw_request(router.port, "/_matrix/client/v3/sync?since=s0")  # the token is known from now on
        leaving = threading.Thread(target=raw_request, args=(router.port, path, 1.0))
        leaving.start()
        wait_until(lambda: in_flight(metrics_port) != zero, 5, lambda: in_flight(metrics_port))
        leaving.join()
        wait_until(lambda: in_flight(metrics_port) == zero, 5, lambda: in_flight(metrics_port))
        wait_until(lambda: len(_lines(access)) == 2, 10, access.read_text)
        time.sleep(5)  # the worker's late answer changes nothing
        assert in_flight(metrics_port) == zero
        lines = _lines(access)
        assert len(lines) == 2, access.read_text()
        assert "failure=client_gone" in lines[1] and "status=" not in lines[1], lines[1]
        assert requests_counted(metrics_port) == 2
    finally:
        starter.stop_all()


def test_a_client_that_leaves_while_its_user_is_resolved(fleet: Fleet, tmp_path: Path) -> None:
    """The client leaves while the router waits for whoami (a new token): the exchange it
    would have started is not counted on any worker."""
    fleet.add("main", whoami={TOKEN: "@alice:test"}, whoami_delay=1.5)
    fleet.add("sync1")
    starter, router, metrics_port, access = _start(tmp_path, fleet, {"sync": [fleet["sync1"].url]})
    try:
        raw_request(router.port, "/_matrix/client/v3/sync?since=s1&timeout=3000&standin_delay=3", leave_after=0.3)
        time.sleep(2.0)  # whoami has answered
        wait_until(lambda: in_flight(metrics_port) == {fleet["sync1"].url: 0.0}, 8, lambda: in_flight(metrics_port))
        time.sleep(4)
        assert in_flight(metrics_port) == {fleet["sync1"].url: 0.0}
        assert len(_lines(access)) <= 1, access.read_text()
        assert requests_counted(metrics_port) <= 1
    finally:
        starter.stop_all()


@pytest.mark.parametrize(
    "path",
    [
        # router-sent, too long to hold: relayed, the worker dies after 600 kB
        "/_matrix/client/v3/rooms/!r:x/messages?standin_bytes=2000000&standin_cut_on=reader1&standin_cut_after=600000",
        # mitmproxy's path (media), the worker dies after 100 KiB
        "/_matrix/media/v3/download/x/y?standin_bytes=2000000&standin_cut_on=media1&standin_cut_after=100000",
    ],
)
def test_a_worker_that_dies_mid_answer(fleet: Fleet, tmp_path: Path, path: str) -> None:
    fleet.add("main", whoami={TOKEN: "@alice:test"})
    fleet.add("reader1")
    fleet.add("media1")
    workers = {"client_reader": [fleet["reader1"].url], "media": [fleet["media1"].url]}
    starter, router, metrics_port, access = _start(tmp_path, fleet, workers)
    zero = {fleet["reader1"].url: 0.0, fleet["media1"].url: 0.0}
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.get(router.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).read()
        wait_until(lambda: len(_lines(access)) == 1, 10, access.read_text)
        wait_until(lambda: in_flight(metrics_port) == zero, 5, lambda: in_flight(metrics_port))
        assert requests_counted(metrics_port) == 1
        assert "failure=no_response" in _lines(access)[0], access.read_text()
    finally:
        starter.stop_all()


def test_a_request_refused_and_a_router_made_error(fleet: Fleet, tmp_path: Path) -> None:
    """Refused in requestheaders (TRACE, which the router does not pass on), and answered by the
    router because no process takes it (its only worker refuses, then main): nothing stays
    counted, each is counted once."""
    fleet.add("main", whoami={TOKEN: "@alice:test"})
    dead = f"http://127.0.0.1:{free_port()}"
    starter, router, metrics_port, access = _start(tmp_path, fleet, {"client_reader": [dead]})
    try:
        with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
            sock.sendall(b"TRACE /_matrix/client/v3/rooms/!r:x/messages HTTP/1.1\r\nHost: m\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 405")
        fleet["main"].kill()
        answer = httpx.get(router.url + "/_matrix/client/v3/rooms/!r:x/messages", timeout=10)
        assert answer.status_code == 503 and answer.json()["errcode"] == "M_UNKNOWN"
        wait_until(lambda: len(_lines(access)) == 2, 10, access.read_text)
        assert in_flight(metrics_port) == {dead: 0.0}
        assert requests_counted(metrics_port) == 2
    finally:
        starter.stop_all()


# "Observation.observe": the part that observes an exchange once it is over (the owner calls it);
# before the owner, Observation's `response` hook did that and released the counts too.
@pytest.mark.parametrize("fault", ["Observation.observe|Observation.response", "ConnectionLimits.response"])
def test_a_hook_that_raises_before_its_work_leaves_no_count(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A part raising at the start of its hook (tests/faults/sitecustomize.py, "before"): the
    exchange is still closed and its count released while the client stays connected."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("SYNAPSE_ROUTER_TEST_FAULT", fault)
    monkeypatch.setenv("SYNAPSE_ROUTER_TEST_FAULT_WHEN", "before")
    fleet.add("main", whoami={TOKEN: "@alice:test"})
    fleet.add("reader1")
    starter, router, metrics_port, _ = _start(tmp_path, fleet, {"client_reader": [fleet["reader1"].url]})
    try:
        with httpx.Client(base_url=router.url, timeout=10) as client:  # one connection, kept open
            for i in range(3):
                response = client.get(
                    f"/_matrix/client/v3/rooms/!r:x/messages?n={i}", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                assert response.status_code == 200
            wait_until(
                lambda: in_flight(metrics_port) == {fleet["reader1"].url: 0.0}, 5, lambda: in_flight(metrics_port)
            )
        log = router.log()
        assert "failed with RuntimeError" in log, log[-3000:]
        assert "SECRET" not in log
    finally:
        starter.stop_all()
