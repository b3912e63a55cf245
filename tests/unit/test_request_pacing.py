"""Per-address request pacing: the schedule (edge/request_pacing.py), its configuration, and
what the routing addon does with it (a delayed request waits without being routed, a refused
one gets Synapse's 429, a trusted proxy's own address is not paced)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.test import taddons
from synapse_router.addon import METADATA_KEY, SynapseRouter
from synapse_router.addons import flowdata
from synapse_router.addons.responses import cors_preflight, too_many_requests
from synapse_router.config import parse_config
from synapse_router.edge import request_pacing
from synapse_router.edge.limits import LimitsConfig, LimitsConfigError, parse_limits
from synapse_router.edge.request_pacing import RequestPacing

from .test_addon import hook, make_flow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the schedule ---


def test_a_burst_starts_at_once_then_requests_wait_their_turn_at_the_rate() -> None:
    clock = Clock()
    pacing = RequestPacing(rate=10, burst=3, delay_max=1.0, clock=clock)
    assert [pacing.admit("a").delay for _ in range(3)] == [0.0, 0.0, 0.0]
    delays = [pacing.admit("a").delay for _ in range(4)]
    assert delays == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert pacing.admit("b").delay == 0.0  # another address has its own schedule
    clock.now += 0.45  # the four delayed ones have started: the next waits one interval
    assert pacing.admit("a").delay == pytest.approx(0.05 + 0.0)  # due at +0.5 = 0.05 from now
    clock.now += 10  # idle for longer than burst / rate: the whole burst again
    assert [pacing.admit("a").delay for _ in range(3)] == [0.0, 0.0, 0.0]


def test_a_turn_beyond_the_bound_is_refused_with_the_wait_to_a_turn_within_it() -> None:
    clock = Clock()
    pacing = RequestPacing(rate=10, burst=1, delay_max=0.25, clock=clock)
    assert pacing.admit("a").delay == 0.0
    assert pacing.admit("a").delay == pytest.approx(0.1)
    assert pacing.admit("a").delay == pytest.approx(0.2)
    refused = pacing.admit("a")  # would start 0.3 s from now
    assert refused.refused and refused.retry_after == pytest.approx(0.05)
    assert pacing.admit("a").refused  # a refused request takes no turn: the schedule is unchanged
    clock.now += 0.1
    assert pacing.admit("a") == request_pacing.Admission(delay=pytest.approx(0.2))


def test_rate_zero_paces_nothing_and_a_new_rate_starts_afresh() -> None:
    clock = Clock()
    pacing = RequestPacing(clock=clock)
    pacing.use(0.0, 1, 1.0)
    assert all(pacing.admit("a") is request_pacing.NOW for _ in range(1000))
    assert pacing.tracked() == 0
    pacing.use(1.0, 1, 5.0)
    assert pacing.admit("a").delay == 0.0 and pacing.admit("a").delay == pytest.approx(1.0)
    pacing.use(1.0, 1, 9.0)  # same rate and burst: the schedule is kept
    assert pacing.admit("a").delay == pytest.approx(2.0)
    pacing.use(2.0, 1, 9.0)
    assert pacing.admit("a").delay == 0.0


def test_the_429_is_synapses_with_the_wait_in_milliseconds_and_whole_seconds() -> None:
    response = too_many_requests(0.0301)  # at least a second: a client would only loop on reconnects
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.json() == {
        "errcode": "M_LIMIT_EXCEEDED",
        "error": "Too many requests from this address.",
        "retry_after_ms": 1000,
    }
    assert response.headers["Access-Control-Allow-Origin"] == "*"  # a web client can read it
    longer = too_many_requests(2.5)
    assert longer.headers["Retry-After"] == "3" and longer.json()["retry_after_ms"] == 2500
    assert too_many_requests(1e300).json()["retry_after_ms"] == 3_600_000  # bounded, never an overflow


def test_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_pacing, "MAX_TRACKED", 100)
    pacing = RequestPacing(rate=1, burst=1, delay_max=10, clock=Clock())
    for i in range(1000):
        pacing.admit(f"10.0.{i // 256}.{i % 256}")
    assert pacing.tracked() == 100


# --- configuration ---


def test_defaults_and_values() -> None:
    config = LimitsConfig()
    assert (config.request_rate_per_address, config.request_burst_per_address, config.request_delay_max) == (
        200.0,
        400,
        10.0,
    )
    parsed = parse_limits({"request_rate_per_address": 0, "request_burst_per_address": 5, "request_delay_max": 2})
    assert (parsed.request_rate_per_address, parsed.request_burst_per_address, parsed.request_delay_max) == (
        0.0,
        5,
        2.0,
    )


@pytest.mark.parametrize(
    ("key", "bad", "words"),
    [
        ("request_rate_per_address", -1, "must be 0 (not paced) or a number >= 0.01 (requests per second)"),
        ("request_rate_per_address", 1e-308, "must be 0 (not paced) or a number >= 0.01"),
        ("request_rate_per_address", "1e12", "(text, not a number: write it unquoted, as 1000 or 1.0e+3)"),
        ("request_delay_max", 3601, "must be a number between 0.001 and 3600 (seconds), got 3601"),
        ("request_delay_max", 1e-9, "must be a number between 0.001 and 3600 (seconds), got 1e-09"),
        ("request_burst_per_address", 10**30, "must be an integer <= 1000000"),
        ("request_rate_per_address", math.inf, "must be 0 (not paced) or a number"),
        ("request_rate_per_address", True, "must be 0 (not paced) or a number"),
        ("request_burst_per_address", 0, "must be an integer >= 1"),
        ("request_delay_max", 0, "must be a number between 0.001 and 3600 (seconds), got 0"),
        ("request_delay_max", -1, "must be a number between 0.001 and 3600 (seconds), got -1"),
    ],
)
def test_bad_values_name_the_key(key: str, bad: object, words: str) -> None:
    with pytest.raises(LimitsConfigError) as info:
        parse_limits({key: bad})
    assert info.value.key == key and words in info.value.reason
    with pytest.raises(ValueError, match=rf"limits\.{key}"):
        parse_config(f"workers: {{}}\nlimits:\n  {key}: {bad!r}\n".replace("True", "true"))


# --- the routing addon ---

CONFIG = """
workers:
  sync: [http://10.0.0.1:8083]
trusted_proxies: [10.9.0.0/16]
limits: {request_rate_per_address: 20, request_burst_per_address: 2, request_delay_max: 0.12}
"""


@pytest.fixture
def paced(tmp_path: Path):
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG)
    addon = SynapseRouter()
    addon.state.pacing = RequestPacing(clock=Clock())  # the schedule's clock stands still
    with taddons.context(addon) as tctx:
        tctx.configure(addon, router_config=str(path), mode=["reverse:http://10.0.0.100:8008"])
        yield addon


def _from(address: str, path: str = "/_matrix/client/versions", **headers: str) -> http.HTTPFlow:
    flow = make_flow(path, headers)
    flow.client_conn.peername = (address, 40000)
    return flow


async def test_requests_over_the_rate_wait_unrouted_then_go_and_past_the_bound_get_429(paced) -> None:
    addon = paced
    first, second = _from("10.1.0.1"), _from("10.1.0.1")
    assert hook(addon, "requestheaders", first) is None and hook(addon, "requestheaders", second) is None
    assert METADATA_KEY in first.metadata and METADATA_KEY in second.metadata  # the burst: routed at once
    third, fourth = _from("10.1.0.1"), _from("10.1.0.1")
    waits = [hook(addon, "requestheaders", third), hook(addon, "requestheaders", fourth)]
    assert all(asyncio.iscoroutine(w) for w in waits)
    assert METADATA_KEY not in third.metadata  # no decision, no whoami call, no worker yet
    fifth = _from("10.1.0.1")  # due 0.15 s from now, beyond request_delay_max
    assert hook(addon, "requestheaders", fifth) is None
    # answered 429 on the client's connection, which is closed (tests/integration/test_pacing.py;
    # this test context has no connection, so the flow is only killed)
    assert fifth.error is not None and fifth.metadata[METADATA_KEY].refused == "M_LIMIT_EXCEEDED"
    other = _from("10.1.0.2")  # another client is not held back
    assert hook(addon, "requestheaders", other) is None and METADATA_KEY in other.metadata
    assert [flowdata.paced(third), flowdata.paced(fourth)] == pytest.approx([0.05, 0.1])  # the waits asked for
    await asyncio.gather(*waits)  # type: ignore[arg-type]
    assert METADATA_KEY in third.metadata and METADATA_KEY in fourth.metadata
    assert (third.request.host, third.request.port) == ("10.0.0.100", 8008)  # main: /versions
    text = addon.metrics.render().decode()
    assert 'synapse_router_paced_requests_total{outcome="delayed"} 2.0' in text
    assert 'synapse_router_paced_requests_total{outcome="refused"} 1.0' in text


async def test_a_client_that_left_while_waiting_is_not_routed(paced) -> None:
    addon = paced
    for _ in range(2):
        hook(addon, "requestheaders", _from("10.1.0.3"))
    waiting = _from("10.1.0.3")
    wait = hook(addon, "requestheaders", waiting)
    assert asyncio.iscoroutine(wait)
    waiting.kill()  # type: ignore[no-untyped-call]
    await wait
    assert METADATA_KEY not in waiting.metadata


async def test_a_stop_answers_the_waiting_requests_429_at_once_and_paces_none_after_it(paced) -> None:
    """A graceful stop ends every wait (the router that takes over starts the address afresh):
    each waiting request gets the 429 with the rest of its wait, not routed, unless its client
    has left; a request beyond the burst during the stop gets it too instead of waiting."""
    addon = paced
    for _ in range(2):
        hook(addon, "requestheaders", _from("10.1.0.4"))
    waiting, left = _from("10.1.0.4"), _from("10.1.0.4")
    left.client_conn.state = ConnectionState.CAN_WRITE  # its client has stopped sending (left)
    waits = [asyncio.ensure_future(hook(addon, "requestheaders", flow)) for flow in (waiting, left)]  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert len(addon.state.turns) == 2
    addon.state.stopping = True
    assert addon.state.turns.end_all() == 2
    await asyncio.wait_for(asyncio.gather(*waits), 0.04)  # their turns were 0.05 s and more away
    assert waiting.metadata[METADATA_KEY].refused == "M_LIMIT_EXCEEDED" and waiting.error is not None
    assert 0.0 < flowdata.paced(waiting) < 0.05
    # The one whose client left goes its way as at its turn (mitmproxy then ends it, client_gone).
    assert not left.metadata[METADATA_KEY].refused and left.error is None
    during = _from("10.1.0.4")
    assert hook(addon, "requestheaders", during) is None  # not a wait: answered at once
    assert during.metadata[METADATA_KEY].refused == "M_LIMIT_EXCEEDED"
    assert len(addon.state.turns) == 0


async def test_a_wait_ends_at_its_turn_or_when_ended() -> None:
    turns = request_pacing.Turns()
    at_turn = asyncio.ensure_future(turns.wait("a", 0.01))
    ended = asyncio.ensure_future(turns.wait("b", 60))
    await asyncio.sleep(0.05)
    assert at_turn.done() and at_turn.result() is True and len(turns) == 1
    assert turns.end_all() == 1 and turns.end_all() == 0
    assert await asyncio.wait_for(ended, 1) is False and len(turns) == 0
    cancelled = asyncio.ensure_future(turns.wait("c", 60))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert len(turns) == 0


async def test_the_forwarded_client_is_paced_and_a_trusted_proxys_own_address_is_not(paced) -> None:
    addon = paced
    for _ in range(5):  # the proxy's own requests (no X-Forwarded-For): never paced
        flow = _from("10.9.0.1")
        assert hook(addon, "requestheaders", flow) is None and METADATA_KEY in flow.metadata
    for _ in range(2):
        assert hook(addon, "requestheaders", _from("10.9.0.1", **{"X-Forwarded-For": "192.0.2.7"})) is None
    third = _from("10.9.0.2", **{"X-Forwarded-For": "192.0.2.7"})  # another proxy, the same client
    wait = hook(addon, "requestheaders", third)
    assert asyncio.iscoroutine(wait)
    await wait
    assert METADATA_KEY in third.metadata


def _exhaust(addon: SynapseRouter, address: str, **headers: str) -> None:
    """Take the address's burst (2) and fill its schedule to the bound (2 more waiting)."""
    for _ in range(4):
        wait = hook(addon, "requestheaders", _from(address, **headers))
        if asyncio.iscoroutine(wait):
            wait.close()


async def test_requests_the_router_would_refuse_are_paced_too(paced) -> None:
    """A flood of malformed requests (refused 400 by the router's own checks, which keep the
    connection open) costs its address turns like any other: an outside trial got 790/s of
    them through a 200/s pace."""
    addon = paced
    _exhaust(addon, "10.1.0.5")
    bad = _from("10.1.0.5", Authorization="Bearer a")
    bad.request.headers.add("Authorization", "Bearer b")  # two tokens: refused 400 when checked
    assert hook(addon, "requestheaders", bad) is None
    assert bad.metadata[METADATA_KEY].refused == "M_LIMIT_EXCEEDED"  # paced first: 429, not 400
    waiting = _from("10.1.0.6", Authorization="Bearer a")
    waiting.request.headers.add("Authorization", "Bearer b")
    for _ in range(2):
        hook(addon, "requestheaders", _from("10.1.0.6"))
    wait = hook(addon, "requestheaders", waiting)
    assert asyncio.iscoroutine(wait) and METADATA_KEY not in waiting.metadata  # not checked yet
    await wait
    assert waiting.response is not None and waiting.response.status_code == 400  # checked on its turn


async def test_a_cors_preflight_over_the_bound_gets_synapses_200_not_a_429(paced) -> None:
    addon = paced
    _exhaust(addon, "10.1.0.7")
    preflight = _from("10.1.0.7", Origin="https://app.element.io", **{"Access-Control-Request-Method": "GET"})
    preflight.request.method = "OPTIONS"
    assert hook(addon, "requestheaders", preflight) is None
    # answered on the connection, which is then closed (this context has none: only killed)
    assert preflight.error is not None and preflight.metadata[METADATA_KEY].refused == "M_LIMIT_EXCEEDED"
    answer = cors_preflight()
    assert answer.status_code == 200 and answer.content == b"{}"
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in answer.headers["Access-Control-Allow-Headers"]


async def test_a_trusted_proxy_naming_no_readable_client_is_paced_as_itself(paced) -> None:
    """X-Forwarded-For that does not parse: the proxy's address stands for its unknown clients
    (paced), unlike the proxy's own requests without the header (not paced)."""
    addon = paced
    for _ in range(2):
        assert hook(addon, "requestheaders", _from("10.9.0.9", **{"X-Forwarded-For": "unknown1"})) is None
    wait = hook(addon, "requestheaders", _from("10.9.0.9", **{"X-Forwarded-For": "unknown2"}))
    assert asyncio.iscoroutine(wait)
    wait.close()
    own = _from("10.9.0.9")
    assert hook(addon, "requestheaders", own) is None and METADATA_KEY in own.metadata
