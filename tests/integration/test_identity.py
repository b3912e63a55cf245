"""User-sticky sync through a real mitmdump, with a stand-in whoami on the main process."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter

import httpx
import pytest

from .conftest import Fleet, served

pytestmark = pytest.mark.integration

SYNC_WORKERS = ["sync1", "sync2", "sync3"]

SYNC_REQUESTS = [
    ("GET", "/_matrix/client/v3/sync?since=s1&timeout=0"),
    ("GET", "/_matrix/client/v3/sync"),
    ("GET", "/_matrix/client/r0/sync?since=s9&full_state=true"),
    ("GET", "/_matrix/client/v3/events?from=s1"),
    ("GET", "/_matrix/client/v3/initialSync"),
    ("GET", "/_matrix/client/v3/rooms/!room:test.local/initialSync"),
    ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=4"),
    ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"),
]


def _users(n: int) -> dict[str, str]:
    """n users with three tokens each (three devices, or refreshed MAS tokens)."""
    return {f"tok_{i}_{d}": f"@user{i}:test.local" for i in range(n) for d in range(3)}


@pytest.fixture
def sticky(fleet: Fleet, start_router):
    users = _users(300)
    fleet.add("main", whoami=users)
    for name in SYNC_WORKERS:
        fleet.add(name)
    router = start_router(
        fleet["main"].url, {"workers": {"sync": [fleet[n].url for n in SYNC_WORKERS]}, "whoami": {"timeout": 10}}
    )
    return fleet, router, users


def test_three_tokens_one_user_one_worker_for_every_sync_endpoint(sticky) -> None:
    fleet, router, _ = sticky
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for user in (0, 1, 2, 3):
            servers = set()
            for device in range(3):
                token = f"tok_{user}_{device}"
                for method, path in SYNC_REQUESTS:
                    # half by header, half by query parameter
                    if device % 2:
                        response = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
                    else:
                        sep = "&" if "?" in path else "?"
                        response = client.request(method, f"{path}{sep}access_token={token}")
                    servers.add(served(response)["server"])
            assert len(servers) == 1, f"user{user} was served by {servers}"
    # one whoami call per token, however many requests it made
    assert fleet["main"].stats()["whoami_calls"] == 4 * 3


def test_300_users_spread_over_3_workers(sticky) -> None:
    fleet, router, _ = sticky

    async def run() -> Counter[str]:
        per_worker: Counter[str] = Counter()
        async with httpx.AsyncClient(base_url=router.url, timeout=20) as client:
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> str:
                async with sem:
                    r = await client.get(
                        "/_matrix/client/v3/sync?since=s1", headers={"Authorization": f"Bearer tok_{i}_0"}
                    )
                    return served(r)["server"]

            for server in await asyncio.gather(*(one(i) for i in range(300))):
                per_worker[server] += 1
        return per_worker

    per_worker = asyncio.run(run())
    assert set(per_worker) == set(SYNC_WORKERS)
    assert sum(per_worker.values()) == 300
    assert min(per_worker.values()) >= 70, per_worker  # 100 each in expectation


def test_whoami_down_requests_still_answered(fleet: Fleet, start_router) -> None:
    fleet.add("main", whoami={"tok": "@a:test.local"})
    for name in SYNC_WORKERS:
        fleet.add(name)
    fleet["main"].kill()  # main (and its whoami) is down
    router = start_router(fleet["main"].url, {"workers": {"sync": [fleet[n].url for n in SYNC_WORKERS]}})
    with httpx.Client(base_url=router.url, timeout=10) as client:
        servers = set()
        started = time.monotonic()
        for _ in range(10):
            r = client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": "Bearer tok"})
            servers.add(served(r)["server"])
        assert len(servers) == 1  # device-sticky by the token's hash meanwhile
        assert time.monotonic() - started < 5


def test_unknown_token_still_routed_and_synapse_answers(sticky) -> None:
    fleet, router, _ = sticky
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for _ in range(3):
            r = client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": "Bearer nope"})
            assert served(r)["server"] in SYNC_WORKERS
    assert fleet["main"].stats()["whoami_calls"] == 1  # negative answer cached


def test_logout_evicts_token(sticky) -> None:
    fleet, router, _ = sticky
    auth = {"Authorization": "Bearer tok_7_0"}
    with httpx.Client(base_url=router.url, timeout=10) as client:
        served(client.get("/_matrix/client/v3/sync?since=1", headers=auth))
        served(client.get("/_matrix/client/v3/sync?since=1", headers=auth))
        assert fleet["main"].stats()["whoami_calls"] == 1
        assert served(client.post("/_matrix/client/v3/logout", headers=auth))["server"] == "main"
        served(client.get("/_matrix/client/v3/sync?since=1", headers=auth))
        assert fleet["main"].stats()["whoami_calls"] == 2


@pytest.mark.parametrize("path", ["/_matrix/client/v3/sync?since=1", "/_matrix/client/v3/sync?since=1&timeout=1000"])
def test_a_workers_unknown_token_answer_evicts_the_token(sticky, path: str) -> None:
    """A token Synapse no longer knows (revoked, a MAS session ended) is forgotten on the
    worker's 401 M_UNKNOWN_TOKEN, not routed as its user until cache_ttl: the next request asks
    whoami again."""
    fleet, router, _ = sticky
    auth = {"Authorization": "Bearer tok_9_0"}
    with httpx.Client(base_url=router.url, timeout=10) as client:
        served(client.get(path, headers=auth))
        served(client.get(path, headers=auth))
        assert fleet["main"].stats()["whoami_calls"] == 1
        refused = client.get(f"{path}&standin_status=401&standin_errcode=M_UNKNOWN_TOKEN", headers=auth)
        assert refused.status_code == 401 and refused.json()["errcode"] == "M_UNKNOWN_TOKEN"
        served(client.get(path, headers=auth))
        assert fleet["main"].stats()["whoami_calls"] == 2
        assert "tok_9_0" not in router.log()


def test_no_token_in_output(sticky) -> None:
    _, router, users = sticky
    tokens = list(users)[:6]
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for i, token in enumerate(tokens):
            if i % 2:
                client.get(f"/_matrix/client/v3/sync?since=1&access_token={token}")
            else:
                client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": f"Bearer {token}"})
            client.get(f"/_matrix/client/v3/account/whoami?access_token={token}")
    time.sleep(0.3)
    log = router.log()
    assert "sync?since=1" in log
    for token in tokens:
        assert token not in log


def test_whoami_wait_is_bounded_by_the_timeout_even_when_main_keeps_sending(
    fleet: Fleet, start_router, tmp_path
) -> None:
    """Issue 20: httpx's timeout bounds each read, not the call; a main that sends its whoami
    answer a byte at a time (each byte well within the timeout, the whole over 4 s) must not
    hold a request past `whoami.timeout` (1 s): the router gives up and routes it by its
    token's hash (identity source `unresolved`), as its access log records."""
    fleet.add("main", whoami={"slowtok": "@slow:test.local"}, whoami_trickle=4.0)
    for name in SYNC_WORKERS:
        fleet.add(name)
    log = tmp_path / "access.log"
    config = {
        "workers": {"sync": [fleet[n].url for n in SYNC_WORKERS]},
        "whoami": {"timeout": 1},
        "access_log": {"enabled": True, "format": "json", "path": str(log)},
    }
    router = start_router(fleet["main"].url, config)
    with httpx.Client(base_url=router.url, timeout=30) as client:
        r = client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": "Bearer slowtok"})
        assert served(r)["server"] in SYNC_WORKERS
    assert fleet["main"].stats()["whoami_calls"] == 1
    deadline = time.monotonic() + 10
    while not log.exists() or not log.read_text().strip():
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
    (line,) = [json.loads(raw) for raw in log.read_text().splitlines()]
    assert (line["route"], line["identity"], line["key_kind"]) == ("sync", "unresolved", "token")


@pytest.mark.parametrize(
    "change",
    [
        {"debug_headers": True},  # an unrelated key
        {"whoami": {"timeout": 9}},
        {"whoami": {"timeout": 9, "url": "MAIN", "max_in_flight": 8, "new_tokens": {"rate": 50}}},
    ],
    ids=["unrelated-key", "whoami-timeout", "whoami-url-and-limits"],
)
def test_a_reload_keeps_the_identity_cache(fleet: Fleet, start_router, change: dict) -> None:
    """A reload that changes other keys, or whoami's URL, timeout and limits, keeps every cached
    token -> user answer (Synapse's answer about a token does not depend on how it was asked):
    the next request of a known token makes no whoami call and reaches the same sync worker
    (the whole cache used to be dropped on a whoami change)."""
    fleet.add("main", whoami=_users(4))
    for name in SYNC_WORKERS:
        fleet.add(name)
    config: dict = {"workers": {"sync": [fleet[n].url for n in SYNC_WORKERS]}, "whoami": {"timeout": 10}}
    router = start_router(fleet["main"].url, config)
    tokens = [f"tok_{user}_0" for user in range(4)]
    with httpx.Client(base_url=router.url, timeout=10) as client:
        before = {
            token: served(client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": f"Bearer {token}"}))[
                "server"
            ]
            for token in tokens
        }
        assert fleet["main"].stats()["whoami_calls"] == len(tokens)
        changed = json.loads(json.dumps(change).replace('"MAIN"', json.dumps(fleet["main"].url)))
        config = {**config, **changed}
        router.config_path.write_text(json.dumps(config))
        loaded = router.log().count("synapse-router: loaded")
        router.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while router.log().count("synapse-router: loaded") == loaded:
            assert time.monotonic() < deadline, router.log()
            time.sleep(0.05)
        for token in tokens:
            auth = {"Authorization": f"Bearer {token}"}
            assert served(client.get("/_matrix/client/v3/sync?since=2", headers=auth))["server"] == before[token]
        assert fleet["main"].stats()["whoami_calls"] == len(tokens)
        unknown = served(client.get("/_matrix/client/v3/sync?since=1", headers={"Authorization": "Bearer tok_0_1"}))
        assert unknown["server"] == before["tok_0_0"]  # a new token of a known user: asked, same worker
        assert fleet["main"].stats()["whoami_calls"] == len(tokens) + 1
