"""Two router instances sharing one identity cache in a real Redis."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import Fleet, served

pytestmark = pytest.mark.integration

TOKENS = {f"tok{i}": f"@user{i}:test.local" for i in range(20)}


def test_two_routers_one_whoami_call_per_token_and_redis_down_keeps_routing(
    fleet: Fleet, start_router, redis_url
) -> None:
    url, redis_proc = redis_url
    fleet.add("main", whoami=TOKENS)
    for name in ("sync1", "sync2", "sync3"):
        fleet.add(name)
    config = {
        "workers": {"sync": [fleet[n].url for n in ("sync1", "sync2", "sync3")]},
        "whoami": {"redis": url, "timeout": 10},
    }
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
    time.sleep(0.3)  # writes to the shared cache happen just after each answer
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
