"""Two router instances sharing one identity cache in a real Redis, and the claim that makes
processes missing the same token at the same instant share one whoami call."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis
from synapse_router.identity.sharedcache import LOCK_PREFIX, PREFIX, REJECTED, Claim, SharedCache
from synapse_router.identity.tokens import token_key

from .conftest import Fleet, served

pytestmark = pytest.mark.integration

TOKENS = {f"tok{i}": f"@user{i}:test.local" for i in range(20)}


def _wait_for_shared_entries(url: str, count: int, timeout: float = 30.0) -> None:
    """Until Redis holds `count` identity entries (a fixed sleep lost the race on a busy machine)."""
    direct = redis.Redis.from_url(url, decode_responses=True)
    try:
        deadline = time.monotonic() + timeout
        while len(direct.keys(PREFIX + "*")) < count:
            assert time.monotonic() < deadline, f"Redis holds {len(direct.keys(PREFIX + '*'))} of {count} entries"
            time.sleep(0.05)
    finally:
        direct.close()


def _sync_fleet(fleet: Fleet, redis_url: str, whoami_delay: float = 0.0) -> dict:
    """Main (whoami for TOKENS) and three sync workers; the router configuration for them."""
    fleet.add("main", whoami=TOKENS, whoami_delay=whoami_delay)
    for name in ("sync1", "sync2", "sync3"):
        fleet.add(name)
    return {
        "workers": {"sync": [fleet[n].url for n in ("sync1", "sync2", "sync3")]},
        "whoami": {"redis": redis_url, "timeout": 10},
    }


def test_two_routers_one_whoami_call_per_token_and_redis_down_keeps_routing(
    fleet: Fleet, start_router, redis_url
) -> None:
    url, redis_proc = redis_url
    config = _sync_fleet(fleet, url)
    a, b = start_router(fleet["main"].url, config), start_router(fleet["main"].url, config)

    def where(router) -> dict[str, str]:
        with httpx.Client(base_url=router.url, timeout=10) as client:
            return {
                t: served(client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": f"Bearer {t}"}))[
                    "server"
                ]
                for t in TOKENS
            }

    on_a = where(a)
    _wait_for_shared_entries(url, len(TOKENS))  # a writes each answer to Redis just after it routes
    on_b = where(b)
    assert on_a == on_b  # deterministic: both instances send each user to the same worker
    assert fleet["main"].stats()["whoami_calls"] == len(TOKENS)  # not 2 x

    redis_proc.kill()
    redis_proc.wait()
    fresh = {"Authorization": "Bearer tok0"}
    with httpx.Client(base_url=b.url, timeout=10) as client:
        assert served(client.get("/_matrix/client/v3/sync?since=2", headers=fresh))["server"] == on_a["tok0"]
    c = start_router(fleet["main"].url, config)  # a new process: nothing cached, Redis gone
    with httpx.Client(base_url=c.url, timeout=10) as client:
        assert served(client.get("/_matrix/client/v3/sync?since=1", headers=fresh))["server"] == on_a["tok0"]
    time.sleep(0.3)
    assert "shared identity cache" in c.log() and "unavailable" in c.log()


async def test_claim_wait_publish_against_real_redis(redis_url) -> None:
    url, _ = redis_url
    a, b = SharedCache(url), SharedCache(url)  # two processes' connections
    key, other = token_key("tok-claim"), token_key("tok-other")
    direct = redis.Redis.from_url(url, decode_responses=True)
    try:
        assert await a.claim(key, 3.0) is Claim.OURS
        assert 0 < direct.pttl(LOCK_PREFIX + key.hex()) <= 3000  # the lock expires by itself
        assert await b.claim(key, 3.0) is Claim.THEIRS
        waiting = asyncio.create_task(b.wait(key, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await a.publish(key, "@alice:test.local", 60)
        assert await asyncio.wait_for(waiting, 1) == "@alice:test.local"
        assert direct.exists(LOCK_PREFIX + key.hex()) == 0
        assert 0 < direct.pttl(PREFIX + key.hex()) <= 60_000
        # a claim made after the answer was stored reads it in the same round trip, keeps no lock
        assert await b.claim(key, 3.0) == "@alice:test.local"
        assert direct.exists(LOCK_PREFIX + key.hex()) == 0

        # a holder that fails drops its lock without a value: the waiter stops at once
        assert await a.claim(other, 3.0) is Claim.OURS
        waiting = asyncio.create_task(b.wait(other, 5.0))
        await asyncio.sleep(0.05)
        await a.publish(other, None, 0)
        assert await asyncio.wait_for(waiting, 1) is None
        # a rejection is shared like a user
        assert await a.claim(other, 3.0) is Claim.OURS
        await a.publish(other, REJECTED, 10)
        assert await b.get(other) == REJECTED

        # a lock nobody releases: the wait ends after its timeout, not the lock's
        direct.set(LOCK_PREFIX + key.hex(), "1", px=60_000)
        direct.delete(PREFIX + key.hex())
        started = time.monotonic()
        assert await b.wait(key, 0.3) is None
        assert 0.3 <= time.monotonic() - started < 2.0
    finally:
        direct.close()
        await a.close()
        await b.close()


def _first_requests_at_once(urls: list[str], tokens: list[str], per_router: int) -> dict[str, list[httpx.Response]]:
    """Each token's first requests sent at the same moment, `per_router` to each router, each on
    its own connection; one token after another. (Many new tokens at once on freshly started
    routers would also test how fast a saturated event loop opens its Redis connections: a
    connect that times out sends that request to whoami, by design.)"""

    async def run() -> dict[str, list[httpx.Response]]:
        limits = httpx.Limits(max_keepalive_connections=0)
        clients = [httpx.AsyncClient(base_url=u, timeout=30, limits=limits) for u in urls]
        try:
            answers = {}
            for t in tokens:
                headers = {"Authorization": f"Bearer {t}"}
                answers[t] = await asyncio.gather(
                    *(
                        c.get("/_matrix/client/v3/sync?since=1", headers=headers)
                        for c in clients
                        for _ in range(per_router)
                    )
                )
            return answers
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(run())


def test_two_routers_missing_a_token_at_once_make_one_whoami_call(fleet: Fleet, start_router, redis_url) -> None:
    url, _ = redis_url
    config = _sync_fleet(fleet, url, whoami_delay=0.3)  # both routers miss while the call is out
    a, b = start_router(fleet["main"].url, config), start_router(fleet["main"].url, config)
    tokens = list(TOKENS)[:10]
    answers = _first_requests_at_once([a.url, b.url], tokens, per_router=3)
    assert "unavailable" not in a.log() + b.log()  # Redis answered throughout
    assert fleet["main"].stats()["whoami_calls"] == len(tokens)  # one per token, not one per router
    for responses in answers.values():
        assert [r.status_code for r in responses] == [200] * 6
        assert len({served(r)["server"] for r in responses}) == 1  # a user's syncs on one worker


def test_a_claim_never_answered_delays_only_about_the_whoami_timeout(fleet: Fleet, start_router, redis_url) -> None:
    url, _ = redis_url
    fleet.add("main", whoami=TOKENS)
    fleet.add("sync1")
    router = start_router(
        fleet["main"].url, {"workers": {"sync": [fleet["sync1"].url]}, "whoami": {"redis": url, "timeout": 2}}
    )
    with redis.Redis.from_url(url) as direct:  # a process that died holding the claim on tok3
        direct.set(LOCK_PREFIX + token_key("tok3").hex(), "1", px=120_000)
    started = time.monotonic()
    with httpx.Client(base_url=router.url, timeout=60) as client:
        response = client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": "Bearer tok3"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert served(response)["server"] == "sync1"
    assert fleet["main"].stats()["whoami_calls"] == 1  # after waiting, the router asked itself
    # it waited for the claim (half the whoami timeout of 2 s), then asked; not the lock's 120 s
    assert 0.9 < elapsed < 30
    with httpx.Client(base_url=router.url, timeout=10) as client:  # and the answer is now cached
        client.get("/_matrix/client/v3/sync?since=2", headers={"Authorization": "Bearer tok3"})
    assert fleet["main"].stats()["whoami_calls"] == 1
