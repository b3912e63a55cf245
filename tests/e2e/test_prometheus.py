"""A real Prometheus scrapes the router while real traffic goes through it to real Synapse, and
every query of the Grafana dashboard (config/grafana-dashboard.json) returns series from it:
a misspelt metric, label or label value cannot pass. `promtool check metrics` (from the same
Debian package) finds nothing wrong with the router's exposition.

The traffic gives every panel something to show: syncs and long-polls (whoami resolution,
cache hits, a rejected token), reads on a one-worker client_reader pool, a worker stopped under
in-flight long-polls and started again (health transitions, failovers, a retry, fallbacks to
main), real 5xx from Synapse, clients that leave before their answer, and the connection limits
(a silent connection, an oversized head, more connections than allowed).

It runs twice: under `mitmdump -s addons/router.py`, and under `synapse-router --processes 2`,
whose parent serves the merged metrics of both processes, each series labelled `process`
(what a multi-process deployment's Prometheus scrapes). A few panels' values are checked
where they are known exactly at the end (every worker up and usable, the shared cache up),
so a query that counts a worker once per process cannot pass either."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, Router, RouterStarter

from .conftest import HEALTH, WHOAMI, Names
from .deployment import Deployment
from .matrix_helpers import register_user
from .prometheus import (
    RATE_INTERVAL,
    SCRAPE_INTERVAL,
    Prometheus,
    binary,
    dashboard_queries,
    grouping_labels,
    legend_labels,
    metric_names,
    parse_label_values,
    start_prometheus,
    substitute,
)

pytestmark = pytest.mark.e2e

DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
PASSWORD = "e2e-password-1"
# Request pacing low enough that _paced_burst (from 127.0.0.2) is paced however slowly a loaded
# machine answers it (a CI run at 50 a second paced nothing), with no refusal; the test's own
# traffic comes from 127.0.0.1, a trusted proxy's own address (TRUSTED), never paced.
LIMITS = {
    "header_timeout": 3,
    "max_connections": 48,
    "request_rate_per_address": 20,
    "request_burst_per_address": 20,
    "request_delay_max": 30,
}
TRUSTED = ["127.0.0.1/32"]
PACED_BURST = (30, 8)  # connections from 127.0.0.2, requests on each: past the burst in any process
LONG_POLL_MS = 2000
VICTIM_LONG_POLLS = 3  # concurrent long-polls of each user of the stopped worker: one is in flight when it stops
# Synapse answers a read receipt with 500 on a worker that is not the `receipts` stream writer
# (`AssertionError: self._can_write_to_receipts`): a custom route sending receipts to the
# client_reader pool is a real misconfiguration that gives real 5xx from Synapse.
MISROUTED = {
    "name": "misrouted_receipts",
    "paths": ["^/_matrix/client/v3/rooms/[^/]+/receipt/"],
    "pool": "client_reader",
}
QUIET_FILTER = json.dumps(
    {
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {"ephemeral": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}},
    }
)


# A long-poll that nothing in this test wakes: no rooms, presence or account data.
IDLE_FILTER = json.dumps(
    {"presence": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}, "room": {"rooms": []}}
)


@dataclass
class User:
    user_id: str
    token: str
    worker: str = ""  # the sync worker the router chose (X-Synapse-Router-Worker)
    since: str = ""
    room: str = ""
    event: str = ""
    statuses: list[int] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def stop_at_end() -> Iterator[list[Router | Prometheus]]:
    """What the test started, stopped when it ends (the routers too: the session's later
    tests need no extra router holding connections to the workers)."""
    started: list[Router | Prometheus] = []
    yield started
    for process in reversed(started):
        process.stop()


def _wait_routing(router: Router) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{router.url}/_matrix/client/versions", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if router.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"router did not come up:\n{router.log()[-4000:]}")
        time.sleep(0.2)


def _wait_worker_up(metrics_port: int, url: str) -> None:
    """Until the router counts `url` up: a worker restarted by an earlier test (test_failover
    kills and restarts one) may still be starting, and a router that found it refusing keeps
    it down for `rise` checks, so no user would be routed to it (a CI failure)."""
    deadline = time.monotonic() + 60
    wanted = f'worker="{url}"'
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        lines = [line for line in text.splitlines() if line.startswith("synapse_router_worker_up{") and wanted in line]
        if lines and all(line.endswith(" 1.0") for line in lines):
            return
        time.sleep(0.5)
    pytest.fail(f"the router never counted {url} up")


async def _sync(client: httpx.AsyncClient, user: User, timeout_ms: int = 0) -> httpx.Response:
    params = {"timeout": str(timeout_ms), "filter": QUIET_FILTER}
    if user.since:
        params["since"] = user.since
    response = await client.get("/_matrix/client/v3/sync", params=params, headers=user.auth)
    user.statuses.append(response.status_code)
    if response.status_code == 200:
        user.since = response.json()["next_batch"]
        user.worker = response.headers.get("x-synapse-router-worker", "")
    return response


async def _new_device(client: httpx.AsyncClient, user: User) -> None:
    """A second login of the user and one request with its token: a whoami call, now. Spread
    over the traffic, so that every process's whoami histogram grows between scrapes (a rate
    needs two samples; calls all made before a process's first scrape give none)."""
    login = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id}}
    response = await client.post("/_matrix/client/v3/login", json={**login, "password": PASSWORD})
    assert response.status_code == 200, response.text
    device = User(user.user_id, response.json()["access_token"])
    assert (await _sync(client, device)).status_code == 200, device.statuses  # routed by user


async def _reads(client: httpx.AsyncClient, user: User) -> list[httpx.Response]:
    """Requests of several routes: room (main here), client_reader, receipts (misrouted)."""
    txn = uuid.uuid4().hex
    sent = await client.put(
        f"/_matrix/client/v3/rooms/{quote(user.room)}/send/m.room.message/{txn}",
        json={"msgtype": "m.text", "body": "for the dashboard"},
        headers=user.auth,
    )
    if sent.status_code == 200:
        user.event = sent.json()["event_id"]
    room = quote(user.room)
    return [
        sent,
        await client.get(f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b"}, headers=user.auth),
        await client.get("/_matrix/client/v3/joined_rooms", headers=user.auth),
        await client.get(f"/_matrix/client/v3/profile/{quote(user.user_id)}", headers=user.auth),
        await client.get("/_matrix/client/v3/pushrules/", headers=user.auth),
        await client.get("/_matrix/client/v3/account/whoami", headers=user.auth),
        await client.post(
            f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{quote(user.event)}", json={}, headers=user.auth
        ),
    ]


async def _leave_long_poll(router: Router, user: User) -> None:
    """A client that sends a sync long-poll and goes away before its answer (no response)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    query = f"timeout=20000&since={quote(user.since)}&filter={quote(IDLE_FILTER)}"
    writer.write(
        f"GET /_matrix/client/v3/sync?{query} HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {user.token}\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(1.5)
    writer.close()


async def _paced_burst(router: Router) -> list[int]:
    """More requests from one other address than its burst allows (limits.request_*_per_address):
    the surplus waits for its turn (synapse_router_paced_requests_total{outcome="delayed"})."""
    connections, each = PACED_BURST
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=router.url, transport=transport, limits=limits, timeout=60) as client:

        async def serial() -> list[int]:
            return [(await client.get("/_matrix/client/versions")).status_code for _ in range(each)]

        return [s for statuses in await asyncio.gather(*(serial() for _ in range(connections))) for s in statuses]


async def _connection_limits(router: Router, processes: int) -> dict[str, Any]:
    """A silent connection (header_timeout), an oversized head (431), and more connections than
    limits.max_connections allows all processes together (the surplus is refused)."""

    async def silent() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        try:
            return await asyncio.wait_for(reader.read(), LIMITS["header_timeout"] + 10)
        finally:
            writer.close()

    async def oversized() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        try:
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 30)
        except ConnectionError:
            return b""
        finally:
            writer.close()

    silent_task = asyncio.ensure_future(silent())
    big = await oversized()
    crowd = []
    for _ in range(int(LIMITS["max_connections"]) * processes + 6):
        crowd.append(await asyncio.open_connection("127.0.0.1", router.port))
    await asyncio.sleep(1.0)
    for _, writer in crowd:
        writer.close()
    return {"silent_closed_after_answer": await silent_task, "oversized_status": big.split(b"\r\n", 1)[0]}


def _metrics_text(url: str) -> str:
    return httpx.get(url, timeout=10).text


def _samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """`name`'s samples in the router's exposition (each process's, with --processes)."""
    families = text_string_to_metric_families(_metrics_text(url))
    return [(s.labels, s.value) for family in families for s in family.samples if s.name == name]


async def _wait_for(url: str, name: str, labels: dict[str, str], value: float | None, timeout: float = 60) -> None:
    """Until the exposition has samples of `name` with `labels`, all of them `value` if given
    (with --processes: the sample of every process that has one)."""

    def seen() -> bool:
        found = [v for sample_labels, v in _samples(url, name) if labels.items() <= sample_labels.items()]
        return bool(found) and (value is None or all(v == value for v in found))

    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(seen):
        assert time.monotonic() < deadline, f"never saw {name}{labels} {value}: {_samples(url, name)}"
        await asyncio.sleep(0.25)


def _free_ports(count: int) -> int:
    """P with P .. P + count - 1 free (with --processes N the router serves metrics on P, process
    i on P + i), below the kernel's ephemeral range so that no client connection takes them."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in range(max(1024, low - 9000), low - count - 1, 11):
        try:
            with contextlib.ExitStack() as stack:
                for i in range(count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} free ports in a row")


def _finite_points(series: list[dict[str, Any]]) -> int:
    return sum(1 for s in series for _, v in s["values"] if math.isfinite(float(v)))


# (launcher, extra arguments, processes)
LAUNCHES = {"mitmdump": ("mitmdump", [], 1), "lean_2_processes": ("synapse-router", ["--processes", "2"], 2)}
# Panel values known exactly once every worker is back: {panel title: {label value: value}}
# (the first label of the expression's grouping, "" for an ungrouped one).
AT_END = {
    "Workers up": {"": 1.0},
    "Shared identity cache (Redis) up": {"": 1.0},
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
async def test_every_dashboard_query_returns_series_from_real_prometheus(
    launch: str,
    deployment: Deployment,
    start_router: RouterStarter,
    names: Names,
    tmp_path: Path,
    stop_at_end: list[Router | Prometheus],
) -> None:
    began = time.monotonic()
    queries, variables = dashboard_queries(DASHBOARD)
    assert queries, "no queries found in the dashboard"
    workers = deployment.workers
    victim = sorted(workers)[0]
    victim_url = workers[victim]
    launcher, extra, processes = LAUNCHES[launch]
    metrics_port = _free_ports(processes + 1)
    redis = deployment.info["redis"]
    config = {
        "workers": {"sync": list(workers.values()), "client_reader": [victim_url]},
        "routes": [MISROUTED],
        "health": HEALTH,
        "whoami": {**WHOAMI, "redis": f"redis://{redis['host']}:{redis['port']}/1"},  # Synapse's is 0
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "debug_headers": True,
        "limits": LIMITS,
        "trusted_proxies": TRUSTED,
    }
    router = start_router(deployment.main, config, extra=extra, launcher=launcher)
    stop_at_end.append(router)
    _wait_routing(router)
    _wait_worker_up(metrics_port, victim_url)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    usable_at_end = {"sync": float(len(workers)), "client_reader": 1.0}
    prom = start_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"])
    stop_at_end.append(prom)
    # The traffic's first whoami calls must come after the first scrape, or the counters'
    # baseline includes them and the whoami latency panel has no rate (a CI failure at load).
    prom.wait_scraped()
    start = time.time()

    # A few users, at least one of them with their syncs on the worker that will be stopped.
    users: list[User] = []
    localparts = iter(names(f"{launcher[0]}{processes}p", 16))
    async with httpx.AsyncClient(base_url=router.url, timeout=60) as client:
        while len(users) < 4 or victim_url not in {u.worker for u in users}:
            name = next(localparts, None)
            assert name is not None, f"no user's syncs went to {victim} ({victim_url}): {[u.worker for u in users]}"
            registered = await asyncio.to_thread(register_user, deployment.main, deployment.secret, name, PASSWORD)
            user = User(registered["user_id"], registered["access_token"])
            assert (await _sync(client, user)).status_code == 200, user.statuses
            created = await client.post("/_matrix/client/v3/createRoom", json={}, headers=user.auth)
            assert created.status_code == 200, created.text
            user.room = created.json()["room_id"]
            users.append(user)
        on_victim = next(u for u in users if u.worker == victim_url)

        # Ordinary traffic for a few scrape intervals; a made-up token twice (rejected, then
        # remembered as unknown).
        bogus = User("@nobody:invalid", "syt_not_a_real_token_" + uuid.uuid4().hex)
        before: list[list[int]] = []
        for _ in range(3):
            for user in users:
                before.append([r.status_code for r in await _reads(client, user)])
                await _sync(client, user)
                await _new_device(client, user)
            assert (await _sync(client, bogus)).status_code == 401
            await asyncio.sleep(SCRAPE_INTERVAL)
        assert all(s[-1] == 500 for s in before), f"a receipt on {victim} did not fail as Synapse does: {before}"

        # Long-polls in flight on every worker when the victim stops: the router resends the
        # victim's to another worker; client_reader reads fall back to main while it is down.
        stop = asyncio.Event()

        async def long_polls(user: User) -> None:
            while not stop.is_set():
                await _sync(client, user, LONG_POLL_MS)

        loops = [
            asyncio.ensure_future(long_polls(u))
            for u in users
            for _ in range(VICTIM_LONG_POLLS if u.worker == victim_url else 1)
        ]
        await asyncio.sleep(1.0)
        # And one long-poll certain to be waiting on the victim when it dies (the 2 s ones may
        # all be between two polls, or answered at once by an event).
        held = asyncio.ensure_future(_sync(client, on_victim, 15000))
        await asyncio.sleep(2.0)
        # SIGKILL, so that the long-polls in flight on it are cut and resent (with a SIGTERM,
        # Synapse may answer them first: then only new requests fail over, no retry is seen).
        deployment.kill_worker(victim)
        try:
            await _wait_for(metrics_url, "synapse_router_worker_up", {"pool": "sync", "worker": victim_url}, 0.0)
            await _wait_for(metrics_url, "synapse_router_retries_total", {"pool": "sync"}, None, timeout=10)
            during: list[list[int]] = []
            for _ in range(3):
                for user in users:
                    during.append([r.status_code for r in await _reads(client, user)])
                await asyncio.sleep(SCRAPE_INTERVAL)
        finally:  # the tests after this one need every worker
            await asyncio.to_thread(deployment.start_worker, victim)
        await _wait_for(metrics_url, "synapse_router_worker_up", {"pool": "sync", "worker": victim_url}, 1.0)
        await _wait_for(metrics_url, "synapse_router_worker_up", {"pool": "client_reader"}, 1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops, held), LONG_POLL_MS / 1000 + 30)

        # Clients that leave their long-polls before the answer (no response), in bursts of
        # four so that a process sees several within one rate window, while reads go on (the
        # ratios' denominators) until the last abandoned one has been counted.
        async def leave() -> None:
            for _ in range(2):
                await asyncio.gather(*(_leave_long_poll(router, on_victim) for _ in range(4)))

        leaving = asyncio.ensure_future(leave())
        rounds = 0
        while not leaving.done() or rounds < 3:
            rounds = rounds + 1 if leaving.done() else 0
            for user in users:
                await _reads(client, user)
            await asyncio.sleep(SCRAPE_INTERVAL)
        await leaving
        limits = await _connection_limits(router, processes)
        paced = await _paced_burst(router)
        await asyncio.sleep(4 * SCRAPE_INTERVAL)  # the last changes scraped
    end = time.time()

    failed_syncs = {u.user_id: [s for s in u.statuses if s != 200] for u in users if any(s != 200 for s in u.statuses)}
    assert not failed_syncs, f"syncs failed: {failed_syncs}"
    assert all(s[-1] == 200 for s in during), f"receipts did not fall back to main while {victim} was down: {during}"
    assert limits["oversized_status"].endswith(b"431 Request Header Fields Too Large"), limits
    assert paced == [200] * (PACED_BURST[0] * PACED_BURST[1]), paced  # delayed, none refused

    # The router's exposition is clean by Prometheus' own linter.
    exposition = await asyncio.to_thread(_metrics_text, metrics_url)
    promtool = binary("promtool")
    assert promtool is not None, "promtool (Debian's prometheus package) is not installed"
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
        f"promtool check metrics: exit {lint.returncode}\n{lint.stdout}{lint.stderr}"
    )

    targets = prom.targets()
    assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")], targets

    # Grafana's variables: each query variable's values, then every panel query.
    values = {"__rate_interval": RATE_INTERVAL}
    report = []
    problems = []
    for var in variables:
        selector, label = parse_label_values(var.query)
        found = prom.label_values(label, selector)
        report.append((f"variable ${var.name}", var.query, len(found), len(found)))
        if not found:
            problems.append(f"variable ${var.name}: {var.query} has no values")
        assert var.all_value is not None, f"variable ${var.name} has no allValue"
        values[var.name] = var.all_value
    pool_values = prom.label_values("pool", "synapse_router_requests_total")
    assert {"sync", "client_reader", "main"} <= set(pool_values), pool_values

    def labels_of(metric: str) -> set[str]:
        found = prom.api("series", [("match[]", metric), ("start", str(start)), ("end", str(end))])
        return {k for series in found for k, v in series.items() if v}

    for q in queries:
        expr = substitute(q.expr, values)
        series = prom.query_range(expr, start, end, step=SCRAPE_INTERVAL)
        points = _finite_points(series)
        report.append((q.where, q.expr, len(series), points))
        if not series or points == 0:
            problems.append(f"{q.where}: {expr} -> {len(series)} series, {points} finite points")
            continue
        returned = {k for s in series for k, v in s["metric"].items() if v}
        on_metrics = {k for name in metric_names(q.expr) for k in labels_of(name)}
        missing = (legend_labels(q.legend) - returned) | (grouping_labels(q.expr) - on_metrics)
        if missing:
            problems.append(f"{q.where}: {expr} -> label(s) {sorted(missing)} on none of its series")
        if any(f"${name}" in q.expr for name in values if name != "__rate_interval"):
            # The "All" value `.*` also matches a label that does not exist; `.+` does not.
            strict = substitute(q.expr, {**values, **{v.name: ".+" for v in variables}})
            if not prom.query_range(strict, start, end, step=SCRAPE_INTERVAL):
                problems.append(f"{q.where}: {strict} -> no series (a variable's label is not on the metric)")

    # Values known exactly now that every worker is back, whatever the number of processes.
    for q in queries:
        title = q.where.rsplit(" ", 1)[0].strip("'")
        expected = usable_at_end if title == "Usable workers by pool" else AT_END.get(title)
        if expected is None:
            continue
        result = prom.api("query", {"query": substitute(q.expr, values), "time": end})["result"]
        grouping = sorted(grouping_labels(q.expr))
        got = {r["metric"].get(grouping[0], "") if grouping else "": float(r["value"][1]) for r in result}
        report.append((f"{q.where} at end", json.dumps(got), len(result), len(result)))
        if got != expected:
            problems.append(f"{q.where}: {q.expr} is {got} at the end, expected {expected}")

    width = max(len(r[0]) for r in report)
    print(f"\n{launch}: dashboard queries over {end - start:.0f}s of traffic (series, finite points):")
    for where, expr, n, points in report:
        print(f"  {where:<{width}}  {n:>3} {points:>5}  {expr}")
    print(f"wall time {time.monotonic() - began:.1f}s")
    assert not problems, "dashboard queries without data:\n" + "\n".join(problems)
