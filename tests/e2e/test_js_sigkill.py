"""SIGKILL of the Synapse worker serving matrix-js-sdk clients, under both launchers: no client
sees a non-2xx that Synapse did not send itself (issue 13's "done when").

tests/e2e/js/sigkill.mjs runs three devices of one user through the router: the SDK's own /sync
loop (startClient), a sender looping on `sendMessage` (PUT .../send/m.room.message/{txnId}) and
a simplified-sliding-sync long-poller (`client.slidingSync`, POST with `pos` and `timeout`).
The user's sync worker is found from Synapse's access logs, and a room whose sends go to that
same worker (rooms are balanced by room id); the worker is SIGKILLed while its long-polls and
sends are in flight, and the clients go on for a few seconds. Then:

- every response any client saw was 2xx; a non-2xx is allowed only if a Synapse process logged
  that very answer (method, path, status) in its access log: what the router made is never
  in Synapse's logs, so it cannot pass;
- no fetch failed and the SDK's sync loop never reported ERROR;
- every message sent is in the room exactly once (a resent txnId made no second event);
- the sliding-sync poller's `pos` kept advancing after the kill;
- the victim served the user's /sync, sliding sync and sends before the kill, other workers
  after it, and the router logged resends (`no_response` failovers): the kill did hit
  requests in flight, so the test fails if the router stops resending them.

The killed worker is restarted in a `finally`.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from tests.harness import Router

from .clients import only_process
from .conftest import Names, router_config, wait_until_routing
from .deployment import Deployment
from .matrix_helpers import access_log_entries, entries_of, register_user, served_by
from .test_js_client import JS, _node

pytestmark = pytest.mark.e2e

SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
SEND = "/send/m.room.message/"
BUSY_BEFORE_KILL = 2.0  # seconds of traffic on the victim before the kill
AFTER_KILL = 4.0  # seconds the clients go on after it
STEP_TIMEOUT = 240.0  # for the script's setup (16 rooms on a busy 2-core machine) and its end


class Script:
    """sigkill.mjs as a child process: JSON lines out (read by a thread), JSON lines in."""

    def __init__(self, node: str, config: Path, stderr: IO[str]) -> None:
        self.proc = subprocess.Popen(
            [node, str(JS / "sigkill.mjs"), str(config)],
            cwd=JS,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, event: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"sigkill.mjs: no {event!r} within {timeout:.0f}s") from None
            if line is None:
                raise AssertionError(f"sigkill.mjs exited ({self.proc.wait()}) before {event!r}")
            message: dict[str, Any] = json.loads(line)
            if message.get("event") == event:
                return message

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait_for(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 15.0) -> Any:
    """Synapse writes an access line as its response finishes: poll the logs a moment."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.parametrize("launcher", ["mitmdump", "synapse-router"])
def test_js_sdk_clients_see_no_error_when_their_worker_is_sigkilled(
    deployment: Deployment,
    start_router: Callable[..., Router],
    names: Names,
    tmp_path: Path,
    launcher: str,
) -> None:
    node = _node()
    urls = list(deployment.workers.values())
    config = router_config(deployment, workers={"sync": urls, "room": urls}, debug_headers=True)
    router = start_router(deployment.main, config, launcher=launcher)
    (localpart,) = names(launcher[0], 1)
    password = os.urandom(12).hex()
    register_user(deployment.main, deployment.secret, localpart, password)
    summary_path = tmp_path / "summary.json"
    script_config = tmp_path / "sigkill.json"
    script_config.write_text(
        json.dumps({"base_url": router.url, "user": localpart, "password": password, "summary_path": str(summary_path)})
    )
    victim: str | None = None
    stderr_path = tmp_path / "sigkill.stderr"
    with open(stderr_path, "w") as stderr:
        script = None
        try:
            wait_until_routing(router)
            script = Script(node, script_config, stderr)
            ready = script.expect("ready")
            user = ready["user_id"]
            logs = deployment.logs
            home = _wait_for(lambda: served_by(logs, user, "/sync"), lambda c: only_process(c) is not None)
            victim = only_process(home)
            assert victim in deployment.workers, f"the user's syncs were not on one worker: {home}"
            room = _room_on(deployment, user, ready["rooms"], victim)
            script.send({"room": room})
            script.expect("running")
            time.sleep(BUSY_BEFORE_KILL)
            before = _served(deployment, user)
            killed_at = time.time()
            deployment.kill_worker(victim)
            time.sleep(AFTER_KILL)
            script.send({"stop": True, "killed_at": killed_at * 1000})
            script.expect("summary")
            assert script.proc.wait(timeout=30) == 0
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- sigkill.mjs stderr ---\n{_tail(stderr_path)}") from None
        finally:
            if script is not None:
                script.stop()
            router.stop()
            if victim is not None and victim in deployment.stopped_workers:
                deployment.start_worker(victim)
    after = _served(deployment, user)
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    _judge(summary, deployment, router, victim, killed_at, before, after, launcher)


def _room_on(deployment: Deployment, user: str, rooms: list[dict[str, str]], victim: str) -> str:
    """The first room whose probe send Synapse logged on `victim`."""

    def where() -> dict[str, str | None]:
        return {r["room_id"]: only_process(_count(entries_of(deployment.logs, user, SEND + r["txn"]))) for r in rooms}

    found = _wait_for(where, lambda w: all(v is not None for v in w.values()))
    on_victim = [room for room, worker in found.items() if worker == victim]
    assert on_victim, f"no room of {len(rooms)} had its sends on {victim}: {found}"
    return on_victim[0]


def _count(entries: dict[str, list[Any]]) -> dict[str, int]:
    return {name: len(found) for name, found in entries.items()}


def _served(deployment: Deployment, user: str) -> dict[str, dict[str, int]]:
    """Per kind of request, which process served how many of the user's (Synapse's logs)."""
    return {
        "sync": served_by(deployment.logs, user, "/v3/sync"),
        "sliding": served_by(deployment.logs, user, SLIDING_SYNC),
        "send": served_by(deployment.logs, user, SEND + "k"),
    }


def _judge(
    summary: dict[str, Any],
    deployment: Deployment,
    router: Router,
    victim: str | None,
    killed_at: float,
    before: dict[str, dict[str, int]],
    after: dict[str, dict[str, int]],
    launcher: str,
) -> None:
    assert victim is not None
    requests: list[dict[str, Any]] = summary["requests"]
    kill_ms = killed_at * 1000
    user = summary["user_id"]
    failovers = [line for line in router.log().splitlines() if ": failover " in line]
    statuses = Counter((r["method"], r["template"], r["status"]) for r in requests)
    across = Counter((r["method"], r["template"], r["status"]) for r in requests if r["started"] < kill_ms < r["at"])
    busy, quiet = summary["polls"]["busy"], summary["polls"]["quiet"]
    print(
        f"{launcher}: victim {victim}; {len(requests)} responses {dict(statuses)}; in flight across the "
        f"kill {dict(across)}; {len(summary['sent'])} sends, sliding-sync polls {len(busy)} busy, "
        f"{len(quiet)} quiet; served before the kill {before}, at the end {after}; router failovers "
        f"{len(failovers)}: {failovers[:6]}"
    )
    context = json.dumps({k: v for k, v in summary.items() if k != "requests"}, indent=1)[-6000:]

    assert summary["errors"] == [], context
    # A non-2xx passes only if Synapse itself logged that answer (same method, path and status).
    not_2xx = [r for r in requests if not 200 <= r["status"] < 300]
    logged = Counter(
        (e.method, e.path, int(e.code.rstrip("!")))
        for path in deployment.logs.values()
        for e in access_log_entries(path)
        if e.user == user
    )
    unexplained = Counter((r["method"], r["path"], r["status"]) for r in not_2xx) - logged
    assert not unexplained, f"non-2xx answers no Synapse process sent: {not_2xx}"

    # Every message sent is in the room exactly once (a resent txnId made no second event); one
    # that failed (with an error Synapse sent, see above) at most once.
    sent = summary["sent"]
    timeline = summary["timeline"]
    assert sent and any(s["status"] == "ok" for s in sent), sent[-5:]
    wrong = {s["txn"]: timeline.get(s["txn"], 0) for s in sent if timeline.get(s["txn"], 0) != 1}
    assert {txn: n for txn, n in wrong.items() if n > 1 or _ok(sent, txn)} == {}, "a txnId made no event or several"

    # The sliding-sync poller's pos kept advancing after the kill.
    later = [p for p in busy if p["started"] > kill_ms]
    assert later and all(p["pos_out"] for p in later), busy[-10:]
    assert sum(p["pos_out"] != p["pos_in"] for p in later) >= 2, busy[-10:]

    # The kill hit what these clients were doing: the victim served each kind before it, other
    # workers after it, and a request of each kind was in flight when it died (so without the
    # router's resend, that request would have failed).
    for kind in ("sync", "sliding", "send"):
        assert before[kind][victim] > 0, (kind, before)
        moved = {w: after[kind][w] - before[kind][w] for w in deployment.workers if w != victim}
        assert sum(moved.values()) > 0, (kind, before, after)
        assert after[kind]["main"] == before[kind]["main"], (kind, "fell back to main", before, after)
    for method, template in (
        ("PUT", "/_matrix/client/v3/rooms/{roomId}/send/m.room.message/{txnId}"),
        ("GET", "/_matrix/client/v3/sync"),
        ("POST", SLIDING_SYNC),
    ):
        assert any(m == method and t == template for m, t, _ in across), (method, template, dict(across))


def _ok(sent: list[dict[str, Any]], txn: str) -> bool:
    return any(s["txn"] == txn and s["status"] == "ok" for s in sent)


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-6000:]
    except OSError:
        return ""
