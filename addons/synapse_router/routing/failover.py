"""The failover policy: after a worker failed an exchange, may it go to the next worker?

One function for both sending paths: the router's own upstream client (addons/router_sent.py,
any failure) and connect failover for what mitmproxy forwards (addons/connect_failover.py, a
probe that could not connect). Which worker is next is the engine's (`Engine.failover`: the
same route and key without the workers the exchange already tried, `Exchange.failed_on`).

- The exchange is over (its client has gone): give up, nothing is answered.
- A read timeout: answer 504, never resent (the worker may only be slow).
- A refused connection on a worker takes it down at once (`mark_down`); a connect timeout or
  a broken exchange only moves this request: the health checks judge the worker.
- No response after the request was written: the worker may have acted on it. Resent once, to
  the next worker, only if the request is safe to repeat (retry.py); else answer 502.
- On main (the end of every chain): answer.
- Otherwise the next worker: `reason` is the metric label (`connect` or `no_response`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .exchange import FailureKind


class Step(Enum):
    NEXT = "next"  # go to the next worker (Engine.failover)
    ANSWER = "answer"  # answer the client with an error: `Verdict.answer`
    GIVE_UP = "give_up"  # the client has gone: nothing to answer


class Answer(Enum):
    GATEWAY_TIMEOUT = "gateway_timeout"  # 504: the worker sent nothing for the read timeout
    NO_RESPONSE = "no_response"  # 502: the worker gave no response and may have acted
    UNAVAILABLE = "unavailable"  # no process could take it: by the failure, with Retry-After


@dataclass(frozen=True, slots=True)
class Verdict:
    step: Step
    mark_down: bool = False  # the worker refused a connection: down at once
    resend: bool = False  # the request was written: going on is a resend (counted as a retry)
    reason: str = ""  # the failover's metric label, with Step.NEXT
    answer: Answer | None = None  # with Step.ANSWER


CONNECT_FAILURES = frozenset({FailureKind.CONNECT_ERROR, FailureKind.CONNECT_TIMEOUT})


def after_failure(
    failure: FailureKind,
    *,
    refused: bool,
    over: bool,
    on_worker: bool,
    resendable: bool,
    resent: bool,
) -> Verdict:
    """What to do after `failure`. `refused`: a connection to the worker was refused on the way;
    `over`: the exchange was closed (its client gone); `on_worker`: it failed on a worker, not on
    main; `resendable`: the request is safe to send twice (retry.Sending.RESEND); `resent`: it
    already was."""
    if over:
        return _GIVE_UP
    if failure is FailureKind.READ_TIMEOUT:
        return _GATEWAY_TIMEOUT
    mark_down = refused and on_worker
    resend = False
    if failure not in CONNECT_FAILURES:  # written: the worker may have acted on it
        if not resendable or resent:
            return Verdict(Step.ANSWER, mark_down, answer=Answer.NO_RESPONSE)
        resend = True
    if not on_worker:
        return Verdict(Step.ANSWER, mark_down, resend, answer=Answer.UNAVAILABLE)
    return Verdict(Step.NEXT, mark_down, resend, "no_response" if resend else "connect")


_GIVE_UP = Verdict(Step.GIVE_UP)
_GATEWAY_TIMEOUT = Verdict(Step.ANSWER, answer=Answer.GATEWAY_TIMEOUT)
