"""A worker process stopped while its users are syncing: the clients never see a failed sync,
their syncs move to the other workers, and come back once the worker is up again. Where each
sync was served comes from the workers' own access logs."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.harness import Router

from .clients import Device, close_all, login_device, only_process, register_users, wait_for_logs
from .conftest import Names
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
