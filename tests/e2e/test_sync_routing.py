"""Sync routing through the router to a real Synapse with three generic workers, checked by
the workers' own access logs (not by anything the router says)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.harness import Router

from .clients import Device, close_all, login_device, only_process, register_users, wait_for_logs
from .conftest import Names
from .deployment import Deployment
from .matrix_helpers import entries_of, served_by, served_by_uri

pytestmark = pytest.mark.e2e


async def test_one_user_three_devices_syncing_concurrently_all_on_one_worker(
    deployment: Deployment, router: Router, names: Names
) -> None:
    [user] = register_users(deployment.main, deployment.secret, names("u", 1))
    devices = [await login_device(router.url, user) for _ in range(3)]
    try:
        assert len({d.device_id for d in devices}) == 3

        async def keep_syncing(device: Device) -> None:
            await device.sync()  # initial sync
            for _ in range(5):
                await device.sync(timeout_ms=300)  # a short long-poll: the three overlap

        await asyncio.gather(*(keep_syncing(d) for d in devices))
        total = await wait_for_logs(
            lambda: served_by(deployment.logs, user, "/sync"), lambda counts: sum(counts.values()) >= 18
        )
        per_device = {d.device_id: served_by_uri(deployment.logs, user, "/sync", d.marker) for d in devices}
    finally:
        await close_all(devices)

    serving = {device: only_process(counts) for device, counts in per_device.items()}
    assert None not in serving.values(), f"a device's syncs were served by several processes (or none): {per_device}"
    assert len(set(serving.values())) == 1, f"the devices' syncs went to different processes: {per_device}"
    worker = next(iter(serving.values()))
    assert worker is not None and worker in deployment.workers, f"syncs were served by {worker}, not by a sync worker"
    for d in devices:
        assert per_device[d.device_id][worker] == d.syncs == 6, per_device
    assert total == {name: (18 if name == worker else 0) for name in deployment.logs}, total


async def test_many_users_spread_over_all_workers_each_on_one(
    deployment: Deployment, router: Router, names: Names
) -> None:
    # With rendezvous hashing over 3 equal workers, the chance that 24 users leave one worker
    # empty is 3 * (2/3)**24 ~ 2e-4.
    users = register_users(deployment.main, deployment.secret, names("u", 24))
    devices = await asyncio.gather(*(login_device(router.url, u) for u in users))
    try:

        async def three_syncs(device: Device) -> None:
            await device.sync()
            await device.sync()
            await device.sync(timeout_ms=200)

        await asyncio.gather(*(three_syncs(d) for d in devices))

        def placement_of_all() -> dict[str, dict[str, int]]:
            """user -> {process: syncs}, from one pass over the logs."""
            found = entries_of(deployment.logs, None, "/sync")
            return {u: {name: sum(1 for e in es if e.user == u) for name, es in found.items()} for u in users}

        placement = await wait_for_logs(
            placement_of_all, lambda found: all(sum(c.values()) >= 3 for c in found.values())
        )
    finally:
        await close_all(list(devices))

    where = {user: only_process(counts) for user, counts in placement.items()}
    split = {user: counts for user, counts in placement.items() if where[user] is None}
    assert not split, f"users whose syncs were served by several processes: {split}"
    assert all(placement[u][where[u]] == 3 for u in users), placement  # type: ignore[index]
    on_main = [u for u, w in where.items() if w not in deployment.workers]
    assert not on_main, f"users synced on {set(where[u] for u in on_main)} instead of a worker: {on_main}"
    users_per_worker = {w: sorted(u for u in users if where[u] == w) for w in deployment.workers}
    counts = {w: len(us) for w, us in users_per_worker.items()}
    print(f"users per worker: {counts}")
    assert all(counts.values()), f"a worker served no user's syncs: {counts}"


async def test_message_wakes_another_users_long_poll(deployment: Deployment, router: Router, names: Names) -> None:
    alice_id, bob_id = register_users(deployment.main, deployment.secret, names("u", 2))
    alice = await login_device(router.url, alice_id)
    bob = await login_device(router.url, bob_id, quiet=True)
    try:
        await alice.sync()
        await bob.sync()
        created = await alice.client.room_create(name="e2e wake", invite=[bob_id])
        room_id = getattr(created, "room_id", None)
        assert room_id, f"room_create failed: {created}"
        joined = await bob.client.join(room_id)
        assert getattr(joined, "room_id", None) == room_id, f"join failed: {joined}"
        await alice.sync()
        await bob.sync()

        body = f"wake up {names('m', 1)[0]}"
        for _attempt in range(5):
            started = time.monotonic()
            poll = asyncio.ensure_future(bob.sync(timeout_ms=30000))
            await asyncio.sleep(1.5)
            if not poll.done():
                break
            # Something else woke it (e.g. the tail of the join): long-poll again from there.
            poll.result()
        else:
            pytest.fail("bob's 30 s long-poll never stayed open for 1.5 s")
        sent_at = time.monotonic()
        sent = await alice.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        event_id = getattr(sent, "event_id", None)
        assert event_id, f"room_send failed: {sent}"
        response = await asyncio.wait_for(poll, timeout=25)
        returned_at = time.monotonic()
    finally:
        await close_all([alice, bob])

    room = response.rooms.join.get(room_id)
    assert room is not None, f"bob's sync came back without the room: {response}"
    events = {e.event_id: getattr(e, "body", None) for e in room.timeline.events}
    assert events.get(event_id) == body, f"bob's long-poll returned without alice's message: {events}"
    waited, woke_after = returned_at - started, returned_at - sent_at
    print(f"bob's long-poll was open {waited:.2f}s, returned {woke_after:.3f}s after alice sent")
    assert waited >= 1.5
    assert woke_after < 5.0, f"the long-poll returned {woke_after:.1f}s after the message (timeout is 30 s)"
    # The long-poll was served by a sync worker, as Synapse itself logged it.
    long_polls = await wait_for_logs(
        lambda: {
            name: len([e for e in found if "timeout=30000" in e.uri and e.code == "200"])
            for name, found in entries_of(deployment.logs, bob_id, "/sync", bob.marker).items()
        },
        lambda counts: sum(counts.values()) >= 1,
    )
    assert only_process(long_polls) in deployment.workers, long_polls


async def test_logout_one_device_gets_401_others_keep_syncing_on_same_worker(
    deployment: Deployment, router: Router, names: Names
) -> None:
    [user] = register_users(deployment.main, deployment.secret, names("u", 1))
    devices = [await login_device(router.url, user) for _ in range(3)]
    try:
        await asyncio.gather(*(d.sync() for d in devices))
        await asyncio.gather(*(d.sync(timeout_ms=100) for d in devices))
        before = await wait_for_logs(
            lambda: served_by(deployment.logs, user, "/sync"), lambda counts: sum(counts.values()) >= 6
        )
        worker = only_process(before)
        assert worker in deployment.workers, before

        gone, *kept = devices
        old_token, gone_device = gone.token, gone.device_id
        logout = await gone.client.logout()
        assert type(logout).__name__ == "LogoutResponse", f"logout failed: {logout}"
        # nio forgets a token once logged out; a client that kept it sends it again.
        gone.client.restore_login(user, gone_device, old_token)
        rejected = await gone.client.sync(timeout=0, sync_filter=gone.sync_filter())
        assert type(rejected).__name__ == "SyncError", f"a logged-out token could still sync: {rejected}"
        assert rejected.transport_response.status == 401
        assert rejected.status_code == "M_UNKNOWN_TOKEN", rejected

        async def keep_syncing(device: Device) -> None:
            for _ in range(3):
                await device.sync(timeout_ms=200)

        await asyncio.gather(*(keep_syncing(d) for d in kept))
        after = await wait_for_logs(
            lambda: served_by(deployment.logs, user, "/sync"), lambda counts: sum(counts.values()) >= 12
        )
        rejected_lines = await wait_for_logs(
            lambda: {
                name: len([e for e in found if e.code.startswith("401")])
                for name, found in entries_of(deployment.logs, None, "/sync", gone.marker).items()
            },
            lambda counts: sum(counts.values()) >= 1,
        )
    finally:
        await close_all(devices)

    # The 401 is Synapse's own (it logged the rejected request), not the router's.
    assert sum(rejected_lines.values()) == 1, rejected_lines
    assert after == {name: (12 if name == worker else 0) for name in deployment.logs}, (before, after)
