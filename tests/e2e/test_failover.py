"""A worker process stopped while its users are syncing: the clients never see a failed sync,
their syncs move to the other workers, and come back once the worker is up again. Where each
sync was served comes from the workers' own access logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.harness import Router

from .clients import Device, close_all, login_device, only_process, register_users, wait_for_logs
from .conftest import Names, router_config
from .deployment import Deployment
from .matrix_helpers import served_by

pytestmark = pytest.mark.e2e

LONG_POLL_MS = 1500  # long enough that syncs are in flight when the worker goes


async def test_worker_stopped_during_syncing_clients_move_and_come_back(
    deployment: Deployment, router: Router, names: Names
) -> None:
    users = register_users(deployment.main, deployment.secret, names("u", 6))
    devices = await asyncio.gather(*(login_device(router.url, u) for u in users))
    # A second device of the first user: both devices must move together.
    devices = [*devices, await login_device(router.url, users[0])]
    stop = asyncio.Event()
    errors: list[str] = []
    try:
        await asyncio.gather(*(d.sync() for d in devices))
        home = await wait_for_logs(
            lambda: served_by(deployment.logs, users[0], "/sync"), lambda c: sum(c.values()) >= 2
        )
        victim = only_process(home)
        assert victim is not None and victim in deployment.workers, home
        victim_url = deployment.workers[victim]

        async def keep_syncing(device: Device) -> None:
            while not stop.is_set():
                try:
                    await device.sync(timeout_ms=LONG_POLL_MS)
                except AssertionError as e:
                    errors.append(str(e))
                    await asyncio.sleep(0.2)

        loops = [asyncio.ensure_future(keep_syncing(d)) for d in devices]
        await asyncio.sleep(2.0)  # long-polls in flight on every worker

        stop_started = time.monotonic()
        await asyncio.to_thread(deployment.stop_worker, victim)
        stopped_after = time.monotonic() - stop_started
        during_start = served_by(deployment.logs, users[0], "/sync")
        await asyncio.sleep(4.0)  # syncing with the worker gone
        during_end = served_by(deployment.logs, users[0], "/sync")

        start_started = time.monotonic()
        await asyncio.to_thread(deployment.start_worker, victim)
        started_after = time.monotonic() - start_started
        # The router's health checks (interval 0.5 s, rise 2) bring the worker back.
        back = await wait_for_logs(
            lambda: served_by(deployment.logs, users[0], "/sync"),
            lambda c: c[victim] > during_end[victim] + 4,
            timeout=20,
        )
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), timeout=LONG_POLL_MS / 1000 + 10)
        final = await wait_for_logs(
            lambda: served_by(deployment.logs, users[0], "/sync"),
            lambda c: sum(c.values()) >= sum(d.syncs for d in devices if d.user_id == users[0]),
        )
    finally:
        stop.set()
        await close_all(devices)

    print(
        f"user on {victim} ({victim_url}); stop-worker took {stopped_after:.1f}s, start-worker {started_after:.1f}s; "
        f"syncs sent {sum(d.syncs for d in devices)}; served: before {home}, while down {during_start} -> "
        f"{during_end}, back {back}, final {final}"
    )
    assert not errors, f"clients saw {len(errors)} failed syncs, e.g. {errors[:3]}"
    moved_to = {w: during_end[w] - during_start[w] for w in deployment.workers if w != victim}
    assert sum(moved_to.values()) >= 4, f"no syncs served elsewhere while {victim} was down: {moved_to}"
    assert during_end[victim] == during_start[victim], f"{victim} served syncs while stopped?"
    assert during_end["main"] == 0, "syncs fell back to the main process although workers were up"
    assert back[victim] > during_end[victim] + 4, f"the user's syncs did not come back to {victim}: {back}"
    # Once back, they stay back: every later sync was on the original worker.
    others = [w for w in deployment.workers if w != victim]
    assert {w: final[w] for w in others} == {w: back[w] for w in others}, (back, final)
    assert final[victim] >= back[victim]


SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
# A sync that no message of the test wakes: it stays in flight until its timeout.
QUIET_FILTER = json.dumps(
    {"room": {"rooms": []}, "presence": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}}
)


async def test_sigkill_under_sync_sliding_sync_and_sends_no_client_error_and_one_event_per_txn(
    deployment: Deployment, start_router: Callable[..., Router], names: Names
) -> None:
    """SIGKILL of the worker serving a user while a GET /sync long-poll, a sliding-sync POST
    long-poll and a loop of PUT sends are in flight: every one answered 2xx (resent to the
    next worker), and each send's txnId made exactly one event."""
    urls = list(deployment.workers.values())
    router = start_router(deployment.main, router_config(deployment, workers={"sync": urls, "room": urls}))
    await asyncio.to_thread(_wait_until_up, router)
    (user,) = register_users(deployment.main, deployment.secret, names("k", 1))
    device = await login_device(router.url, user)
    headers = {"Authorization": f"Bearer {device.token}"}
    async with httpx.AsyncClient(base_url=router.url, headers=headers, timeout=60) as http:
        first = (await http.get("/_matrix/client/v3/sync", params={"timeout": 0, "filter": QUIET_FILTER})).json()
        home = await wait_for_logs(lambda: served_by(deployment.logs, user, "/sync"), lambda c: sum(c.values()) >= 1)
        victim = only_process(home)
        assert victim in deployment.workers, home
        # A room whose sends go to the same worker (rooms are balanced by room id).
        room = ""
        for attempt in range(12):
            created = await http.post("/_matrix/client/v3/createRoom", json={"name": f"k{attempt}"})
            room = created.json()["room_id"]
            put = await http.put(
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/probe{attempt}",
                json={"msgtype": "m.text", "body": "probe"},
            )
            assert put.status_code == 200, put.text
            probe = f"/send/m.room.message/probe{attempt}"
            sends = await wait_for_logs(
                lambda probe=probe: served_by(deployment.logs, user, probe), lambda c: sum(c.values()) >= 1
            )
            if sends[victim]:
                break
        else:
            pytest.fail(f"no room of 12 hashed to {victim}")
        # Caught up after the setup (device lists, joins), so the long-polls below wait.
        caught_up = await http.get(
            "/_matrix/client/v3/sync", params={"since": first["next_batch"], "timeout": 0, "filter": QUIET_FILTER}
        )
        first = caught_up.json()
        ss_first = await http.post(SLIDING_SYNC, json={"lists": {}})
        assert ss_first.status_code == 200, ss_first.text
        pos = ss_first.json()["pos"]

        stop = asyncio.Event()
        results: list[tuple[str, int, str]] = []
        txns: list[str] = []

        async def sender() -> None:
            i = 0
            while not stop.is_set():
                txn = f"t{i}-{names('x', 1)[0]}"
                txns.append(txn)
                r = await http.put(
                    f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}",
                    json={"msgtype": "m.text", "body": txn},
                )
                results.append(("PUT send", r.status_code, r.text[:200]))
                i += 1

        async def long_poll_sync() -> None:
            r = await http.get(
                "/_matrix/client/v3/sync",
                params={"since": first["next_batch"], "timeout": 6000, "filter": QUIET_FILTER},
            )
            results.append(("GET /sync", r.status_code, r.text[:200]))

        async def long_poll_sliding() -> None:
            r = await http.post(SLIDING_SYNC, params={"pos": pos, "timeout": 6000}, json={"lists": {}})
            results.append(("POST sliding sync", r.status_code, r.text[:200]))

        polls = [asyncio.ensure_future(long_poll_sync()), asyncio.ensure_future(long_poll_sliding())]
        send_loop = asyncio.ensure_future(sender())
        await asyncio.sleep(1.5)  # both long-polls waiting on the victim, sends flowing
        assert not any(p.done() for p in polls), results
        os.kill(_pid_of(deployment, victim), signal.SIGKILL)
        deployment.stopped_workers.add(victim)  # the fixture's safety net restarts it
        await asyncio.sleep(1.5)  # sends go on, on the next worker
        stop.set()
        await asyncio.wait_for(asyncio.gather(*polls, send_loop), timeout=60)
        # Every event of the room as the next worker sees it.
        bodies: list[str] = []
        token = None
        while True:
            params = {"dir": "b", "limit": 500, **({"from": token} if token else {})}
            page = (await http.get(f"/_matrix/client/v3/rooms/{room}/messages", params=params)).json()
            bodies += [e["content"].get("body", "") for e in page["chunk"] if e["type"] == "m.room.message"]
            token = page.get("end")
            if not page["chunk"] or token is None:
                break
    await device.close()
    await asyncio.to_thread(deployment.start_worker, victim)
    failovers = [line for line in router.log().splitlines() if "failover" in line]
    print(
        f"victim {victim}; {len(txns)} sends; answers {Counter((k, s) for k, s, _ in results)}; "
        f"failovers: {failovers[:6]}"
    )
    bad = [r for r in results if not 200 <= r[1] < 300]
    assert not bad, bad
    kinds = {k for k, _, _ in results}
    assert kinds == {"PUT send", "GET /sync", "POST sliding sync"}, kinds
    counts = Counter(bodies)
    assert {txn: counts[txn] for txn in txns if counts[txn] != 1} == {}, "a txnId made no event or several"


def _pid_of(deployment: Deployment, name: str) -> int:
    return int((deployment.state_dir / "pids" / f"{name}.pid").read_text().split()[0])


def _wait_until_up(router: Router) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{router.url}/_matrix/client/versions", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"router did not come up:\n{router.log()[-3000:]}")
