"""compat/addonmanager.py run against the installed mitmproxy (12.3): the hook functions of a
chain in mitmproxy's order (sub-addons after their parent), swapping a Master's addon manager
(option changes reach the addons through the new one only, the addons kept), and dropping the
legacy `add_log` hook (a log record no longer reaches an addon's `add_log`)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

from mitmproxy import addonmanager, hooks, master, options
from mitmproxy.utils import asyncio_utils
from synapse_router.compat.addonmanager import drop_legacy_log_events, hook_functions, swap_addon_manager


class Sub:
    def __init__(self) -> None:
        self.configured: list[set[str]] = []

    def running(self) -> None:
        pass

    def configure(self, updated: set[str]) -> None:
        self.configured.append(updated)


class Parent:
    def __init__(self) -> None:
        self.sub = Sub()
        self.addons = [self.sub]

    def running(self) -> None:
        pass


class Other:
    def running(self) -> None:
        pass

    def add_log(self, entry: Any) -> None:
        if "a record" in entry.msg:
            self.logged = getattr(self, "logged", 0) + 1


async def test_hook_functions_in_mitmproxy_order_with_sub_addons() -> None:
    owner = master.Master(options.Options())
    try:
        parent, other = Parent(), Other()
        owner.addons.add(parent, other)  # type: ignore[no-untyped-call]
        found = hook_functions(owner.addons, hooks.RunningHook())
        assert found[-3:] == [parent.running, parent.sub.running, other.running]
        assert hook_functions(owner.addons, hooks.ConfigureHook(set()))[-1] == parent.sub.configure
    finally:
        await owner.done()


async def test_a_swapped_manager_alone_hears_option_changes_and_keeps_the_addons() -> None:
    owner = master.Master(options.Options(), with_termlog=True)
    try:
        old = owner.addons
        kept = list(old.chain)
        new = addonmanager.AddonManager(owner)  # type: ignore[no-untyped-call]
        swap_addon_manager(owner, new)
        assert owner.addons is new and new.chain == kept and new.lookup is old.lookup
        parent = Parent()
        new.add(parent)  # type: ignore[no-untyped-call]
        parent.sub.configured.clear()
        owner.options.update(listen_port=8123)  # type: ignore[no-untyped-call]
        assert parent.sub.configured == [{"listen_port"}]  # once: the old manager no longer relays
    finally:
        await owner.done()


async def test_dropped_legacy_log_events_reach_no_add_log_hook() -> None:
    async def logged_after(drop: bool) -> int:
        owner = master.Master(options.Options())
        try:
            other = Other()
            owner.addons.add(other)  # type: ignore[no-untyped-call]
            if drop:
                drop_legacy_log_events(owner)
            logging.getLogger("test").warning("a record")
            for _ in range(20):
                await asyncio.sleep(0.01)
            return getattr(other, "logged", 0)
        finally:
            await owner.done()

    assert await logged_after(drop=False) >= 1  # what the legacy hook does, so dropping it matters
    assert await logged_after(drop=True) == 0


async def test_create_task_with_keep_ref_survives_garbage_collection() -> None:
    # GracefulStop hands connections accepted at stop to tasks nobody else references.
    done = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        done.set()

    asyncio_utils.create_task(work(), name="kept", keep_ref=True)
    gc.collect()
    await asyncio.wait_for(done.wait(), 5)
