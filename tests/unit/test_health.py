"""Worker health states: why a worker is down decides whether its requests are cut."""

from __future__ import annotations

from synapse_router.routing.availability import HealthConfig, WorkerStates

URL = "http://127.0.0.1:8083"


def states() -> WorkerStates:
    workers = WorkerStates(HealthConfig(fall=2, rise=2))
    workers.track([URL])
    return workers


def test_timed_out_checks_take_a_worker_down_but_not_as_unreachable() -> None:
    workers = states()
    assert not workers.record_check(URL, False, "health check timed out")
    assert workers.record_check(URL, False, "health check timed out")
    health = workers.workers[URL]
    assert not health.up and not health.unreachable


def test_failed_connections_take_it_down_as_unreachable_and_recovery_clears_it() -> None:
    workers = states()
    workers.record_check(URL, False, "health check failed: ConnectError", unreachable=True)
    assert workers.record_check(URL, False, "health check failed: ConnectError", unreachable=True)
    assert workers.workers[URL].unreachable
    workers.record_check(URL, True)
    assert workers.record_check(URL, True)
    assert workers.workers[URL].up and not workers.workers[URL].unreachable


def test_a_refused_connection_marks_it_down_unreachable_at_once() -> None:
    workers = states()
    assert workers.mark_down(URL, "connect failed: refused")
    assert workers.workers[URL].unreachable
