"""The whoami bound under a flood (issue 20): a late event loop is not a slow main, and one
client address cannot hold every whoami call slot. Real router processes, stand-in main and
sync worker on loopback."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from synapse_router.identity.tokens import short_hash, token_key

from .conftest import Fleet, served

pytestmark = pytest.mark.integration

SYNC = "/_matrix/client/v3/sync"


def _lines(log: Path, count: int) -> dict[str, dict[str, Any]]:
    """The access log's JSON lines by token label, once `count` of them are written."""
    deadline = time.monotonic() + 15
    while True:
        lines = [json.loads(raw) for raw in log.read_text().splitlines()] if log.exists() else []
        if len(lines) >= count:
            return {line["token_hash"]: line for line in lines if "token_hash" in line}
        assert time.monotonic() < deadline, f"{len(lines)} access log lines, expected {count}"
        time.sleep(0.05)


def _label(token: str) -> str:
    return short_hash(token_key(token))


def _wait_for_calls(fleet: Fleet, at_least: int) -> None:
    deadline = time.monotonic() + 60  # a generous bound: a busy machine starts calls late
    while fleet["main"].stats()["whoami_calls"] < at_least:
        assert time.monotonic() < deadline, "whoami was not called"
        time.sleep(0.005)


def test_calls_cut_because_the_router_was_late_do_not_pause_whoami(fleet: Fleet, start_router, tmp_path) -> None:
    """Three whoami calls in a row are cut by their deadline because the router's event loop
    could not run (the process stopped with SIGSTOP for longer than the timeout while main's
    answer was on its way, as a flood that saturates the loop does): main answered each in
    1.5 s, within the 2 s timeout, so whoami must not be paused for everybody. A new user's next request is then
    still resolved by a whoami call (before: `unresolved`, whoami paused 5 s)."""
    tokens = {f"late{i}": f"@late{i}:test.local" for i in range(4)}
    fleet.add("main", whoami=tokens, whoami_delay=1.5)
    fleet.add("sync1")
    log = tmp_path / "access.log"
    config = {
        "workers": {"sync": [fleet["sync1"].url]},
        "whoami": {"timeout": 2},
        "access_log": {"enabled": True, "format": "json", "path": str(log)},
    }
    router = start_router(fleet["main"].url, config)
    with httpx.Client(base_url=router.url, timeout=30) as client:
        for i in range(3):
            answers: list[httpx.Response] = []
            token = f"late{i}"

            def ask(token: str = token, answers: list[httpx.Response] = answers) -> None:
                answers.append(client.get(SYNC, headers={"Authorization": f"Bearer {token}"}))

            asking = threading.Thread(target=ask)
            asking.start()
            _wait_for_calls(fleet, i + 1)  # the router's call is in flight: main answers in 1.5 s
            os.kill(router.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(3)  # main answers, and the deadline (2 s) passes, while the loop cannot run
            finally:
                os.kill(router.proc.pid, signal.SIGCONT)
            asking.join(30)
            assert served(answers[0])["server"] == "sync1"
        r = client.get(SYNC, headers={"Authorization": "Bearer late3"})
        assert served(r)["server"] == "sync1"
    lines = _lines(log, 4)
    assert [lines[_label(f"late{i}")]["identity"] for i in range(3)] == ["unresolved"] * 3  # cut all the same
    assert lines[_label("late3")]["identity"] == "whoami"
    assert fleet["main"].stats()["whoami_calls"] == 4


def test_one_address_flooding_new_tokens_leaves_whoami_slots_for_others(fleet: Fleet, start_router, tmp_path) -> None:
    """With the default limits (16 calls at once per process), one address sends 16 requests
    with new tokens at once while whoami takes 3 s; a new user from another address then
    gets a call slot at once and is resolved within `whoami.timeout` (4.5 s). Before, the
    flooding address held all 16 slots, the new user waited for one and its call was cut
    (`unresolved`). Beyond its 4 calls the flooding address's requests wait for one of its own
    and are cut at the deadline (`unresolved`), holding none of the process's slots."""
    flood = {f"flood{i}": f"@flood{i}:test.local" for i in range(16)}
    fleet.add("main", whoami={**flood, "newuser": "@new:test.local"}, whoami_delay=3)
    fleet.add("sync1")
    log = tmp_path / "access.log"
    config = {
        "workers": {"sync": [fleet["sync1"].url]},
        "whoami": {"timeout": 4.5},
        "access_log": {"enabled": True, "format": "json", "path": str(log)},
    }
    router = start_router(fleet["main"].url, config)
    answers: list[httpx.Response] = []

    def ask(token: str) -> None:
        with httpx.Client(base_url=router.url, timeout=30) as client:
            answers.append(client.get(SYNC, headers={"Authorization": f"Bearer {token}"}))

    flooding = [threading.Thread(target=ask, args=(token,)) for token in flood]
    for thread in flooding:
        thread.start()
    _wait_for_calls(fleet, 4)
    time.sleep(0.3)  # the rest of the flood reaches the router
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=router.url, timeout=30, transport=other) as client:
        r = client.get(SYNC, headers={"Authorization": "Bearer newuser"})
        assert served(r)["server"] == "sync1"
    for thread in flooding:
        thread.join(30)
    assert len(answers) == 16 and all(served(a)["server"] == "sync1" for a in answers)
    lines = _lines(log, 17)
    assert lines[_label("newuser")]["identity"] == "whoami"
    assert lines[_label("newuser")]["client_ip"] == "127.0.0.2"
    flooded = sorted(lines[_label(token)]["identity"] for token in flood)
    assert flooded == ["unresolved"] * 12 + ["whoami"] * 4
