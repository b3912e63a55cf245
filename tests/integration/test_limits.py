"""Resource limits on client connections (`limits`), against a real router process: timeouts
on half-sent and idle connections, long-polls never cut, oversized heads, the connection cap,
and a router out of file descriptors that does not flood its log."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import Fleet, Router, free_port, read_response, router_command, wait_for_port

pytestmark = pytest.mark.integration

SHORT = {"header_timeout": 1, "keepalive_timeout": 1}
GRACE = 5.0  # generous: a limit closes a connection within its timeout + GRACE seconds


def _router(fleet: Fleet, start_router, limits: dict, **extra: object) -> Router:
    fleet.add("main")
    fleet.add("sync")
    config = {"workers": {"sync": [fleet["sync"].url]}, "limits": limits, **extra}
    return start_router(fleet["main"].url, config)


def _connect(router: Router) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", router.port), timeout=30)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Read until the router closes the connection; fail if it is still open after `seconds`.
    Returns everything read."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"connection still open after {seconds}s; received {received[:200]!r}")
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def _request(path: str, extra_headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: matrix.example.org\r\n{extra_headers}\r\n".encode()


def _metric(router_metrics_port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{router_metrics_port}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics:\n{text}"
    return float(match.group(1))


def _wait_metric(router_metrics_port: int, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _metric(router_metrics_port, name)) != value:
        assert time.monotonic() < deadline, f"{name} is {seen}, not {value}"
        time.sleep(0.1)


def test_connection_without_request_closed_after_header_timeout(fleet: Fleet, start_router) -> None:
    router = _router(fleet, start_router, SHORT)
    with _connect(router) as sock:
        assert _closed_within(sock, 1 + GRACE) == b""


def test_half_sent_head_closed_after_header_timeout(fleet: Fleet, start_router) -> None:
    router = _router(fleet, start_router, {"header_timeout": 2, "keepalive_timeout": 30})
    with _connect(router) as sock:
        sock.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(sock, 2 + GRACE) == b""


def test_trickled_head_closed_after_header_timeout(fleet: Fleet, start_router) -> None:
    """The timeout is a total for the head: a byte every 0.2 s does not keep it open."""
    router = _router(fleet, start_router, {"header_timeout": 2, "keepalive_timeout": 30})
    with _connect(router) as sock:
        started = time.monotonic()
        closed = False
        for byte in b"GET /_matrix/client/versions HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > 2 + GRACE:
                break
        if not closed:
            assert _closed_within(sock, 0.5) == b""
        assert time.monotonic() - started < 2 + GRACE + 1


def test_idle_keepalive_connection_closed_after_keepalive_timeout(fleet: Fleet, start_router) -> None:
    router = _router(fleet, start_router, {"header_timeout": 30, "keepalive_timeout": 2})
    with _connect(router) as sock:
        for _ in range(2):  # keep-alive works: two requests on one connection
            sock.sendall(_request("/_matrix/client/versions"))
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body)["server"] == "main"
        assert _closed_within(sock, 2 + GRACE) == b""


@pytest.mark.parametrize(
    ("path", "server"),
    [
        # a sync long-poll, which the router sends itself
        ("/_matrix/client/v3/sync?since=s1&timeout=30000&standin_delay=4", "sync"),
        # a slow request on mitmproxy's path
        ("/_matrix/client/versions?standin_delay=4", "main"),
    ],
)
def test_long_poll_never_cut_by_either_timer(fleet: Fleet, start_router, path: str, server: str) -> None:
    """The upstream answers after 4 s, longer than both timeouts (1 s); then the idle timer runs."""
    router = _router(fleet, start_router, SHORT)
    with _connect(router) as sock:
        sock.sendall(_request(path, "Authorization: Bearer tok\r\n"))
        status, _, body = read_response(sock)
        assert status == 200, body
        assert json.loads(body)["server"] == server
        sock.sendall(_request("/_matrix/client/versions?standin_delay=2.5"))  # again, on the same connection
        status, _, body = read_response(sock)
        assert status == 200, body
        assert _closed_within(sock, 1 + GRACE) == b""


def test_oversized_head_answered_431(fleet: Fleet, start_router) -> None:
    router = _router(fleet, start_router, {"max_header_bytes": 8192})
    with _connect(router) as sock:
        sock.sendall(_request("/_matrix/client/versions", f"X-Big: {'a' * 9000}\r\n"))
        status, headers, body = read_response(sock)
        assert status == 431
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["errcode"] == "M_TOO_LARGE"
        assert headers["access-control-allow-origin"] == "*"
        assert _closed_within(sock, GRACE) == b""
    # A head within the limit is served.
    with httpx.Client(base_url=router.url, timeout=30) as client:
        response = client.get("/_matrix/client/versions", headers={"X-Big": "a" * 7000})
        assert response.status_code == 200 and response.json()["server"] == "main"


def test_endless_head_answered_431_and_closed(fleet: Fleet, start_router) -> None:
    """A head that never ends is cut once it exceeds max_header_bytes, not buffered forever."""
    router = _router(fleet, start_router, {"max_header_bytes": 8192, "header_timeout": 60})
    with _connect(router) as sock:
        sock.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nX-Endless: ")
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # the router closed the connection: the write fails
            pass
        assert sent < 64 * 1024 * 1024, "the router took 64 MiB of one head"
        received = b""
        try:
            received = _closed_within(sock, GRACE)
        except OSError:
            pass
    if received:  # the 431 may be lost to the reset that unread data causes
        assert received.startswith(b"HTTP/1.1 431 ")
        assert b"M_TOO_LARGE" in received and b"access-control-allow-origin: *" in received.lower()
    assert "X-Endless" not in router.log() and "aaaaaaaa" not in router.log()


def test_max_connections_refuses_with_one_log_line_and_metrics(fleet: Fleet, start_router) -> None:
    metrics_port = free_port()
    router = _router(
        fleet,
        start_router,
        {"max_connections": 5, "header_timeout": 60},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    wait_for_port(metrics_port, router.proc)
    _wait_metric(metrics_port, "synapse_router_client_connections", 0)  # the harness's probe has gone
    held = [_connect(router) for _ in range(5)]
    try:
        _wait_metric(metrics_port, "synapse_router_client_connections", 5)
        for _ in range(40):
            with _connect(router) as sock:
                sock.sendall(_request("/_matrix/client/versions"))
                assert _closed_within(sock, GRACE) == b""  # closed at once, unanswered
        assert _metric(metrics_port, "synapse_router_client_connections_refused_total") == 40
        assert _metric(metrics_port, "synapse_router_client_connections") == 5
        # A held connection is still served.
        held[0].sendall(_request("/_matrix/client/versions"))
        assert read_response(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(1)
    with httpx.Client(base_url=router.url, timeout=30) as client:  # room again once they closed
        assert client.get("/_matrix/client/versions").status_code == 200
    lines = [line for line in router.log().splitlines() if "refused" in line]
    assert len(lines) == 1, lines  # the next one would come 10 s later at the earliest
    assert "refused 1 client connection" in lines[0]
    assert "limits.max_connections=5" in lines[0]


def _start_with_fd_limit(tmp_path: Path, fleet: Fleet, nofile: int, limits: dict) -> Router:
    """A router whose soft and hard open-files limits are both `nofile` (prlimit)."""
    fleet.add("main")
    fleet.add("sync")
    config_path = tmp_path / "router-fd.yaml"
    config_path.write_text(json.dumps({"workers": {"sync": [fleet["sync"].url]}, "limits": limits}))
    port = free_port()
    output = tmp_path / "router-fd.log"
    command = ["prlimit", f"--nofile={nofile}:{nofile}", *router_command(fleet["main"].url, port, config_path, [])]
    with output.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    router = Router(proc, port, output, config_path)
    wait_for_port(port, proc)
    return router


def _hold_connections(router: Router, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", router.port), timeout=2))
        except OSError:
            break
    return socks


def test_out_of_file_descriptors_does_not_flood_the_log(tmp_path: Path, fleet: Fleet) -> None:
    """With more connections than descriptors the accept errors make a few lines, not
    thousands of tracebacks; the fd budget warning comes once; the router recovers."""
    # an explicit max_connections that does not fit (the default is derived to fit: no warning)
    router = _start_with_fd_limit(tmp_path, fleet, 200, {"header_timeout": 60, "max_connections": 10000})
    try:
        socks = _hold_connections(router, 400)
        time.sleep(5)
        for sock in socks:
            sock.close()
        time.sleep(1.5)  # accept is retried after 1 s
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert client.get("/_matrix/client/versions").status_code == 200
    finally:
        router.stop()
    log = router.log()
    assert len(socks) > 200  # the limit was reached
    assert log.count("Traceback") == 0, log[:3000]
    assert log.count("Too many open files") <= 2, log[:3000]
    assert 1 <= log.count("out of file descriptors") <= 2
    assert log.count("needs about 20256 file descriptors") == 1
    # Besides mitmproxy's per-connection lines ("[time][client] client connect"), a few lines.
    other = [line for line in log.splitlines() if not re.match(r"^\[[0-9:.]+\]\[[^\]]*\] ", line)]
    assert len(other) < 30, "\n".join(other[:100])


def test_default_max_connections_fits_the_open_files_limit(tmp_path: Path, fleet: Fleet) -> None:
    """limits.max_connections not set, open-files limit 20000 (this machine's): no warning at
    start, one info line saying the derived value and how to raise it."""
    router = _start_with_fd_limit(tmp_path, fleet, 20000, {"header_timeout": 60})
    try:
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert client.get("/_matrix/client/versions").status_code == 200
    finally:
        router.stop()
    log = router.log()
    assert "needs about" not in log
    assert log.count("limits.max_connections not set: 9872 client connections per process") == 1, log[-3000:]
    assert "ulimit -n" in log


def test_default_max_connections_is_enforced_as_derived(tmp_path: Path, fleet: Fleet) -> None:
    """Open-files limit 400, max_connections not set: the router holds (400 - 256) // 2 = 72,
    at least a quarter of the limit = 100 client connections, refuses the next ones, and never
    runs out of descriptors."""
    router = _start_with_fd_limit(tmp_path, fleet, 400, {"header_timeout": 60})
    try:
        socks = _hold_connections(router, 150)
        time.sleep(2)
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert client.get("/_matrix/client/versions").status_code == 200
    finally:
        router.stop()
    log = router.log()
    assert "limits.max_connections not set: 100 client connections per process" in log
    refused = [line for line in log.splitlines() if "refused" in line]
    assert refused and all("limits.max_connections=100 connections open" in line for line in refused), refused
    assert "out of file descriptors" not in log
    assert "needs about" not in log


def test_max_connections_within_fd_limit_keeps_descriptors(tmp_path: Path, fleet: Fleet) -> None:
    """max_connections below the descriptor limit: excess clients are refused, accept never fails."""
    router = _start_with_fd_limit(tmp_path, fleet, 400, {"header_timeout": 60, "max_connections": 50})
    try:
        socks = _hold_connections(router, 600)
        time.sleep(2)
        with httpx.Client(base_url=router.url, timeout=30) as client:
            for sock in socks[:5]:
                sock.close()
            time.sleep(0.5)
            assert client.get("/_matrix/client/versions").status_code == 200
        for sock in socks:
            sock.close()
    finally:
        router.stop()
    log = router.log()
    assert "out of file descriptors" not in log and "Too many open files" not in log, log[:3000]
    assert "file descriptors" not in log  # 2 * 50 + 256 fit in 400: no budget warning
    assert 1 <= len([line for line in log.splitlines() if "refused" in line]) <= 2


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def _listen_backlog(port: int) -> int:
    """The accept-queue size of the socket listening on `port` (`ss` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_listen_backlog_is_raised_and_follows_reloads(fleet: Fleet, start_router) -> None:
    # asyncio listens with a backlog of 100: a reconnect storm overflows it (clients then wait
    # in SYN back-off). The router raises it on mitmproxy's sockets, under both launchers.
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    fleet.add("main")
    router = start_router(fleet["main"].url, {"workers": {}})
    _wait(lambda: _listen_backlog(router.port) == min(4096, somaxconn), 10, "default backlog 4096")
    router.config_path.write_text("workers: {}\nlimits: {listen_backlog: 1000}\n")
    router.proc.send_signal(signal.SIGHUP)
    _wait(lambda: _listen_backlog(router.port) == min(1000, somaxconn), 10, "backlog after reload")


# --- per-address bounds (issue 20: one address churning or hoarding connections) ---------------

FLOODER = "127.0.0.2"  # loopback has all of 127/8: the hostile client's own address


def _connect_from(router: Router, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", router.port))
    return sock


def _exchange_from(router: Router, source: str, request: bytes, *, linger: bool = False) -> bytes:
    """Open a connection from `source`, send `request`, and return what came back before the
    router closed it or answered (b"": closed or reset unanswered, at connect included)."""
    try:
        with _connect_from(router, source) as sock:
            sock.sendall(request)
            if linger:
                return _closed_within(sock, GRACE)
            sock.settimeout(30)
            return sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def _labelled(router_metrics_port: int, reason: str) -> float:
    return _metric(router_metrics_port, f'synapse_router_client_connections_closed_total{{reason="{reason}"}}')


def _client_connects_from(router: Router, source: str) -> int:
    """How many connections from `source` mitmproxy made a connection handler for (its
    `client connect` line: a connection refused at accept never gets one)."""
    return len(re.findall(rf"\[{re.escape(source)}:\d+\] client connect", router.log()))


def test_connections_beyond_the_per_address_bound_are_refused_at_accept(fleet: Fleet, start_router) -> None:
    metrics_port = free_port()
    router = _router(
        fleet,
        start_router,
        {"max_connections_per_address": 5, "header_timeout": 60},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    wait_for_port(metrics_port, router.proc)
    _wait_metric(metrics_port, "synapse_router_client_connections", 0)
    held = [_connect_from(router, FLOODER) for _ in range(5)]
    try:
        _wait_metric(metrics_port, "synapse_router_client_connections", 5)
        for _ in range(30):
            secret = _request("/_matrix/client/versions?access_token=syt_SECRET_refused")
            assert _exchange_from(router, FLOODER, secret, linger=True) == b""  # closed at once, unanswered
            # Another address is served all along.
            with _connect_from(router, "127.0.0.1") as other:
                other.sendall(_request("/_matrix/client/versions"))
                assert read_response(other)[0] == 200
        assert _labelled(metrics_port, "address_connections") == 30
        assert _metric(metrics_port, "synapse_router_client_connections_refused_total") == 0  # not max_connections
        held[0].sendall(_request("/_matrix/client/versions"))  # a held connection is still served
        assert read_response(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(1)
    with _connect_from(router, FLOODER) as sock:  # room again once they closed
        sock.sendall(_request("/_matrix/client/versions"))
        assert read_response(sock)[0] == 200
    # Refused at accept: mitmproxy never made a connection for them (5 held + the last one).
    assert _client_connects_from(router, FLOODER) == 6
    log = router.log()
    lines = [line for line in log.splitlines() if "per-address limits" in line]
    assert len(lines) == 1, lines  # the next one would come 10 s later at the earliest
    assert "refused 1 client connection" in lines[0] and f"last from {FLOODER}" in lines[0]
    assert "SECRET" not in log


def test_a_churning_address_is_held_to_its_connection_rate(fleet: Fleet, start_router) -> None:
    metrics_port = free_port()
    router = _router(
        fleet,
        start_router,
        {"connection_rate_per_address": 1, "connection_burst_per_address": 10},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    wait_for_port(metrics_port, router.proc)
    started = time.monotonic()
    answered = refused = 0
    for i in range(60):  # open, ask, close: as fast as the router answers or refuses
        received = _exchange_from(router, FLOODER, _request("/_matrix/client/versions"))
        if received.startswith(b"HTTP/1.1 200"):
            answered += 1
        else:
            assert received == b"", received[:200]
            refused += 1
        if i % 10 == 0:
            with httpx.Client(base_url=router.url, timeout=30) as client:  # from 127.0.0.1
                assert client.get("/_matrix/client/versions").status_code == 200
    elapsed = time.monotonic() - started
    assert answered <= 10 + elapsed * 1 + 1, (answered, elapsed)  # the burst, then 1 a second
    assert answered >= 10  # the burst is admitted
    assert _labelled(metrics_port, "address_rate") == refused == 60 - answered


def test_a_trusted_proxy_is_not_bounded_as_one_client(fleet: Fleet, start_router) -> None:
    router = _router(
        fleet,
        start_router,
        {"max_connections_per_address": 2, "connection_rate_per_address": 1, "connection_burst_per_address": 2},
        trusted_proxies=[f"{FLOODER}/32"],
    )
    held = [_connect_from(router, FLOODER) for _ in range(8)]
    try:
        for sock in held:
            sock.sendall(_request("/_matrix/client/versions"))
            assert read_response(sock)[0] == 200
    finally:
        for sock in held:
            sock.close()
    # An untrusted address with the same bounds is held to them.
    held = [_connect_from(router, "127.0.0.3") for _ in range(2)]
    try:
        assert _exchange_from(router, "127.0.0.3", _request("/_matrix/client/versions"), linger=True) == b""
    finally:
        for sock in held:
            sock.close()
