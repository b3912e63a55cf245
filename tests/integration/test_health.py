"""Worker failure and recovery through a real mitmdump: no client sees a dead worker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
import yaml

from .conftest import Fleet, served

pytestmark = pytest.mark.integration

WORKERS = ["sync1", "sync2", "sync3"]
# Fast checks, but not so tight that a loaded 2-core test machine produces false DOWNs.
HEALTH = {"interval": 0.3, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}
WHOAMI = {"timeout": 10}  # a loaded test machine must not turn users into token-keyed requests
USERS = 60


def _tokens() -> dict[str, str]:
    return {f"tok{i}": f"@user{i}:test.local" for i in range(USERS)}


@pytest.fixture
def pool(fleet: Fleet, start_router):
    fleet.add("main", whoami=_tokens())
    for name in WORKERS:
        fleet.add(name)
    router = start_router(
        fleet["main"].url, {"workers": {"sync": [fleet[n].url for n in WORKERS]}, "health": HEALTH, "whoami": WHOAMI}
    )
    return fleet, router


async def _where(
    client: httpx.AsyncClient, path: str = "/_matrix/client/v3/sync?since=s1&timeout=30000"
) -> dict[int, str]:
    async def one(i: int) -> tuple[int, str]:
        r = await client.get(path, headers={"Authorization": f"Bearer tok{i}"})
        return i, served(r)["server"]

    return dict(await asyncio.gather(*(one(i) for i in range(USERS))))


def _client(router) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=router.url, timeout=30, limits=httpx.Limits(max_connections=200))


def test_kill_worker_under_load_no_failed_request_only_its_users_move(pool) -> None:
    fleet, router = pool

    async def run() -> tuple[dict[int, str], dict[int, str], Counter[str], int]:
        async with _client(router) as client:
            before = await _where(client)
            outcomes: Counter[str] = Counter()
            sent = 0
            stop = time.monotonic() + 4.0

            async def user_loop(i: int) -> None:
                nonlocal sent
                while time.monotonic() < stop:
                    sent += 1
                    try:
                        r = await client.get(
                            "/_matrix/client/v3/sync?since=s1&timeout=30000&standin_delay=0.4",
                            headers={"Authorization": f"Bearer tok{i}"},
                        )
                        outcomes["ok" if r.status_code == 200 else f"http {r.status_code}"] += 1
                    except httpx.HTTPError as e:
                        outcomes[type(e).__name__] += 1

            async def killer() -> None:
                await asyncio.sleep(1.5)  # long-polls are in flight on every worker now
                fleet["sync2"].kill()

            await asyncio.gather(killer(), *(user_loop(i) for i in range(USERS)))
            after = await _where(client)
            return before, after, outcomes, sent

    before, after, outcomes, sent = asyncio.run(run())
    print(f"requests sent {sent}, outcomes {dict(outcomes)}")
    assert outcomes["ok"] == sent, outcomes  # zero failed requests
    victims = [u for u, w in before.items() if w == "sync2"]
    assert victims, "some users must have been on the killed worker"
    for user, worker in before.items():
        if worker == "sync2":
            assert after[user] in ("sync1", "sync3")
        else:
            assert after[user] == worker, f"user{user} moved from {worker} to {after[user]}"
    moved_to = Counter(after[u] for u in victims)
    print(f"{len(victims)} users moved: {dict(moved_to)}")


def test_recovery_moves_users_back(pool) -> None:
    fleet, router = pool

    async def run() -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
        async with _client(router) as client:
            before = await _where(client)
            fleet["sync2"].kill()
            during = await _where(client)
            fleet["sync2"].start()
            deadline = time.monotonic() + 15
            while f"worker {fleet['sync2'].url} is UP" not in router.log() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            after = await _where(client)
            return before, during, after

    before, during, after = asyncio.run(run())
    assert "sync2" in before.values() and "sync2" not in during.values()
    states = [line for line in router.log().splitlines() if " is UP" in line or " is DOWN" in line]
    assert after == before, states
    assert "is UP" in router.log() and "is DOWN" in router.log()


def test_wedged_worker_requests_served_by_others(pool) -> None:
    fleet, router = pool
    proc = fleet["sync3"].proc
    assert proc is not None

    async def run() -> tuple[dict[int, str], dict[int, str], float]:
        async with _client(router) as client:
            before = await _where(client)
            os.kill(proc.pid, signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
            try:
                started = time.monotonic()
                after = await _where(client)
                return before, after, time.monotonic() - started
            finally:
                os.kill(proc.pid, signal.SIGCONT)

    before, after, elapsed = asyncio.run(run())
    assert "sync3" in before.values()
    assert "sync3" not in after.values()
    # fall x interval + timeout: the health checks notice, waiting requests move on
    assert elapsed < 8, f"took {elapsed:.1f}s"
    for user, worker in before.items():
        if worker != "sync3":
            assert after[user] == worker


def test_refused_worker_first_request_already_fails_over(fleet: Fleet, start_router) -> None:
    # Health checks far apart: only the request itself discovers the dead worker.
    fleet.add("main", whoami=_tokens())
    for name in WORKERS:
        fleet.add(name)
    slow_checks = {**HEALTH, "interval": 3600}
    router = start_router(
        fleet["main"].url,
        {"workers": {"sync": [fleet[n].url for n in WORKERS]}, "health": slow_checks, "whoami": WHOAMI},
    )

    async def run() -> tuple[dict[int, str], dict[int, str]]:
        async with _client(router) as client:
            before = await _where(client)
            fleet["sync1"].kill()
            return before, await _where(client)

    before, after = asyncio.run(run())
    assert "sync1" in before.values() and "sync1" not in after.values()


def test_whole_pool_down_main_answers(pool) -> None:
    fleet, router = pool
    for name in WORKERS:
        fleet[name].kill()

    async def run() -> dict[int, str]:
        async with _client(router) as client:
            return await _where(client)

    assert set(asyncio.run(run()).values()) == {"main"}


def test_mitmproxy_forwarded_requests_fail_over_on_connect(fleet: Fleet, start_router) -> None:
    # Non-sync routes are forwarded by mitmproxy; a refused worker is replaced before connecting.
    fleet.add("main")
    fleet.add("reader1")
    fleet.add("reader2")
    slow_checks = {**HEALTH, "interval": 3600}
    router = start_router(
        fleet["main"].url,
        {"workers": {"client_reader": [fleet["reader1"].url, fleet["reader2"].url]}, "health": slow_checks},
    )
    fleet["reader1"].kill()
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for _ in range(6):
            r = client.post("/_matrix/client/v3/keys/query", content=b"{}")
            assert served(r)["server"] == "reader2"


def test_drain_by_config_reload_on_sighup(pool) -> None:
    fleet, router = pool

    async def where() -> dict[int, str]:
        async with _client(router) as client:
            return await _where(client)

    before = asyncio.run(where())
    config = {
        "workers": {"sync": [fleet["sync1"].url, {"url": fleet["sync2"].url, "drained": True}, fleet["sync3"].url]},
        "health": HEALTH,
        "whoami": WHOAMI,
    }

    router.config_path.write_text(yaml.safe_dump(config))
    router.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "loaded" not in router.log().split("is UP")[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    during = asyncio.run(where())
    assert "sync2" in before.values() and "sync2" not in during.values()
    moved = {u: (w, during[u]) for u, w in before.items() if w != "sync2" and during[u] != w}
    assert not moved, (moved, [line for line in router.log().splitlines() if "synapse-router" in line])
    assert router.proc.poll() is None  # reloaded, not restarted


SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


def test_sliding_sync_long_poll_is_resent_with_its_body_when_its_worker_dies(pool) -> None:
    # Element X's long-poll: POST with a JSON body and `pos`. A repeat with the same pos is
    # answered the same, so the router keeps the body and resends it to the user's next worker.
    fleet, router = pool
    body = b'{"lists": {"all": {"ranges": [[0, 20]], "required_state": [["m.room.name", ""]]}}}'
    headers = {"Authorization": "Bearer tok7", "Content-Type": "application/json"}
    with httpx.Client(base_url=router.url, timeout=30) as client:
        probe = served(client.post(f"{SLIDING_SYNC}?pos=p1&timeout=1000", content=body, headers=headers))
        victim = probe["server"]

        def kill_soon() -> None:
            time.sleep(0.8)  # the long-poll below is on the victim now
            fleet[victim].kill()

        killer = threading.Thread(target=kill_soon)
        killer.start()
        response = client.post(f"{SLIDING_SYNC}?pos=p1&timeout=30000&standin_delay=3", content=body, headers=headers)
        killer.join()
    assert response.status_code == 200, response.text
    answered = served(response)
    assert answered["server"] != victim and answered["method"] == "POST"
    assert answered["body_bytes"] == len(body) and answered["body_sha256"] == probe["body_sha256"]
    assert answered["path"] == f"{SLIDING_SYNC}?pos=p1&timeout=30000&standin_delay=3"
