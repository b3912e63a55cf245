"""`/ready` beside `/health` on the metrics listener: 503 from the moment a graceful stop
begins (while `/health`, liveness, stays 200 until the router exits) and while main fails its
health checks; 200 otherwise. With `--processes` the parent's merged endpoint answers for all."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.harness import DEFAULT_LAUNCHER, wait_for_port

from .conftest import Fleet, free_port
from .test_launcher import _ports_below_ephemeral_range

pytestmark = pytest.mark.integration

HEALTH = {"interval": 0.3, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError as e:
        return 0, type(e).__name__
    return response.status_code, response.text


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("processes", [None, 2], ids=["one-process", "processes-2"])
def test_ready_goes_503_when_a_stop_begins_while_health_stays_200(
    fleet: Fleet, start_router, processes: int | None
) -> None:
    if processes is not None and DEFAULT_LAUNCHER != "synapse-router":
        pytest.skip("--processes is the lean launcher's")
    fleet.add("main")
    fleet.add("reader1")
    metrics = _ports_below_ephemeral_range(3) if processes else free_port()
    config = {
        "workers": {"client_reader": [fleet["reader1"].url]},
        "metrics": {"listen": f"127.0.0.1:{metrics}"},
        "health": HEALTH,
    }
    extra = ["--processes", str(processes)] if processes else []  # the parent serves P, process i P + i
    router = start_router(fleet["main"].url, config, extra, wait=not processes)
    wait_for_port(metrics, router.proc, timeout=30)
    _wait_for(lambda: _get(metrics, "/ready") == (200, "OK\n"), "ready once serving")

    held = threading.Thread(
        target=lambda: httpx.get(router.url + "/_matrix/client/v3/rooms/!r:x/messages?standin_delay=4", timeout=30)
    )
    held.start()
    time.sleep(0.5)
    router.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: _get(metrics, "/ready")[0] == 503, "not ready once the stop began", timeout=10)
    status, text = _get(metrics, "/ready")
    assert "stopping" in text, text
    assert _get(metrics, "/health") == (200, "OK\n")  # alive: it still finishes its requests
    held.join()
    assert router.proc.wait(30) == 0


def test_ready_goes_503_while_main_is_unreachable_and_back(fleet: Fleet, start_router) -> None:
    fleet.add("main")
    metrics = free_port()
    config = {"workers": {}, "metrics": {"listen": f"127.0.0.1:{metrics}"}, "health": HEALTH}
    router = start_router(fleet["main"].url, config)
    wait_for_port(metrics, router.proc)
    _wait_for(lambda: _get(metrics, "/ready") == (200, "OK\n"), "ready")
    fleet["main"].kill()
    _wait_for(lambda: _get(metrics, "/ready") == (503, "not ready: main unreachable\n"), "main's failure seen")
    assert _get(metrics, "/health") == (200, "OK\n")
    fleet["main"].start()
    _wait_for(lambda: _get(metrics, "/ready") == (200, "OK\n"), "main back: ready again")
    assert "main is unreachable" in router.log() and "main is reachable again" in router.log()
