"""The owner of an exchange (routing/exchange.py) and the one failover policy (routing/failover.py),
pure: every order of the ends, a double close, a release that raises."""

from __future__ import annotations

import itertools

import pytest
from synapse_router.routing.exchange import Exchange, FailureKind, Ledger
from synapse_router.routing.failover import Answer, Step, after_failure

W1, W2 = "http://w1:8083", "http://w2:8083"


class Flow:
    pass


def opened(ledger: Ledger[Flow], client: str = "c1", key: str = "f1") -> Exchange[Flow]:
    exchange = ledger.open_exchange(Flow(), client, key)
    exchange.count_on(W1)
    exchange.await_connection()
    exchange.in_upstream = True
    return exchange


def released(ledger: Ledger[Flow], abandoned: list[str]) -> bool:
    return ledger.in_flight.get(W1, 0) == 0 and not ledger.open and not ledger.connecting and abandoned == ["f1"]


# the three hooks that may end an exchange, and how each ends it
ENDS = {
    "response": None,
    "error": FailureKind.NO_RESPONSE,
    "client_disconnected": FailureKind.CLIENT_GONE,
}


@pytest.mark.parametrize("order", list(itertools.permutations(ENDS)))
def test_whichever_end_comes_first_closes_it_once(order: tuple[str, ...]) -> None:
    abandoned: list[str] = []
    ledger: Ledger[Flow] = Ledger(abandoned.append)
    exchange = opened(ledger)
    other = ledger.open_exchange(Flow(), "c1", "f2")  # another exchange of the same client
    other.count_on(W1)
    assert ledger.in_flight[W1] == 2
    results = [exchange.close(ENDS[end]) for end in order]
    assert results == [True, False, False]
    assert exchange.failure is ENDS[order[0]]  # the first end says how it ended
    assert ledger.in_flight[W1] == 1  # released once: the other exchange's count is untouched
    assert ledger.open == {"c1": {"f2": other}} and not ledger.connecting and abandoned == ["f1"]
    assert ledger.find("c1", "f1") is None and ledger.find("c1", "f2") is other


def test_a_closed_exchange_counts_nothing_more() -> None:
    """A failover decided after the end (a probe returning once the client left) moves no count."""
    ledger: Ledger[Flow] = Ledger()
    exchange = opened(ledger)
    exchange.close(FailureKind.CLIENT_GONE)
    assert exchange.count_on(W2) is False
    exchange.await_connection()
    exchange.note(FailureKind.CONNECT_TIMEOUT)
    assert ledger.in_flight == {W1: 0} and not ledger.connecting
    assert exchange.failure is FailureKind.CLIENT_GONE


def test_a_failover_moves_the_count() -> None:
    ledger: Ledger[Flow] = Ledger()
    exchange = opened(ledger)
    assert exchange.failed_on(W1) == {W1}
    exchange.count_on(W2)
    assert ledger.in_flight == {W1: 0, W2: 1}
    exchange.close()
    assert ledger.in_flight == {W1: 0, W2: 0}


def test_a_noted_failure_outlives_the_hook_that_ends_it() -> None:
    """The router killed the flow because its client had left: `error` says only "killed"."""
    ledger: Ledger[Flow] = Ledger()
    exchange = opened(ledger)
    exchange.note(FailureKind.CLIENT_GONE)
    exchange.close(FailureKind.KILLED)
    assert exchange.failure is FailureKind.CLIENT_GONE


def test_a_release_that_raises_does_not_keep_the_others_from_running() -> None:
    def broken(owner: str) -> None:
        raise RuntimeError("upstream client broken")

    ledger: Ledger[Flow] = Ledger(broken)
    exchange = opened(ledger)
    ledger.in_flight = _Exploding(ledger.in_flight)  # the first release raises too
    with pytest.raises(KeyError):  # the first exception, after every release was tried
        exchange.close(FailureKind.NO_RESPONSE)
    assert exchange.closed and not ledger.open and not ledger.connecting and exchange.in_upstream is False
    assert exchange.close() is False  # and never again


class _Exploding(dict[str, int]):
    def get(self, key: str, default: int | None = None) -> int:  # type: ignore[override]
        raise KeyError(key)


def test_the_client_sweep_finds_only_open_exchanges() -> None:
    ledger: Ledger[Flow] = Ledger()
    first = opened(ledger, "c1", "f1")
    second = opened(ledger, "c1", "f2")
    opened(ledger, "c2", "f3")
    assert ledger.open_count() == 3
    first.close()
    assert ledger.of_client("c1") == [second]
    assert ledger.take_connecting("c1") is second
    assert ledger.take_connecting("c1") is None
    second.close(FailureKind.CLIENT_GONE)
    assert ledger.of_client("c1") == [] and ledger.open_count() == 1


def test_an_exchange_has_slots_only() -> None:
    exchange = Ledger[Flow]().open_exchange(Flow(), "c", "f")
    assert not hasattr(exchange, "__dict__")


# --- the failover policy ---------------------------------------------------------------------


def policy(failure: FailureKind, **given: bool) -> tuple[Step, bool, bool, str, Answer | None]:
    args = {"refused": False, "over": False, "on_worker": True, "resendable": False, "resent": False, **given}
    verdict = after_failure(failure, **args)
    return verdict.step, verdict.mark_down, verdict.resend, verdict.reason, verdict.answer


@pytest.mark.parametrize(
    ("failure", "given", "expected"),
    [
        # the client has gone: nothing to answer, nothing to try, whatever the failure
        (FailureKind.CONNECT_ERROR, {"over": True, "refused": True}, (Step.GIVE_UP, False, False, "", None)),
        (FailureKind.NO_RESPONSE, {"over": True}, (Step.GIVE_UP, False, False, "", None)),
        # a refused connection: the worker goes down, the request to the next one
        (FailureKind.CONNECT_ERROR, {"refused": True}, (Step.NEXT, True, False, "connect", None)),
        # a connect timeout: only this request moves
        (FailureKind.CONNECT_TIMEOUT, {}, (Step.NEXT, False, False, "connect", None)),
        # a connection failed on main, the end of the chain
        (
            FailureKind.CONNECT_ERROR,
            {"refused": True, "on_worker": False},
            (Step.ANSWER, False, False, "", Answer.UNAVAILABLE),
        ),
        # a read timeout: 504, never resent, the worker not judged
        (FailureKind.READ_TIMEOUT, {"resendable": True}, (Step.ANSWER, False, False, "", Answer.GATEWAY_TIMEOUT)),
        # no response: resent once if safe to repeat, else 502
        (FailureKind.NO_RESPONSE, {"resendable": True}, (Step.NEXT, False, True, "no_response", None)),
        (
            FailureKind.NO_RESPONSE,
            {"resendable": True, "resent": True},
            (Step.ANSWER, False, False, "", Answer.NO_RESPONSE),
        ),
        (FailureKind.NO_RESPONSE, {}, (Step.ANSWER, False, False, "", Answer.NO_RESPONSE)),
        # a reused connection failed, and connecting again was refused: down, and resent if safe
        (FailureKind.NO_RESPONSE, {"refused": True, "resendable": True}, (Step.NEXT, True, True, "no_response", None)),
        (FailureKind.NO_RESPONSE, {"refused": True}, (Step.ANSWER, True, False, "", Answer.NO_RESPONSE)),
        # no response from main: counted as a resend, answered (nowhere left to go)
        (
            FailureKind.NO_RESPONSE,
            {"resendable": True, "on_worker": False},
            (Step.ANSWER, False, True, "", Answer.UNAVAILABLE),
        ),
    ],
)
def test_the_failover_policy(
    failure: FailureKind, given: dict[str, bool], expected: tuple[Step, bool, bool, str, Answer | None]
) -> None:
    assert policy(failure, **given) == expected
