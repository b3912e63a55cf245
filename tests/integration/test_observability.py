"""Metrics, access log and debug headers of a real mitmdump after known traffic."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import wait_for_port

from .conftest import Fleet, free_port, served

pytestmark = pytest.mark.integration

TOKENS = {"syt_alice_device1_SECRET1": "@alice:test.local", "syt_alice_device2_SECRET2": "@alice:test.local"}


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_access_log_and_debug_headers_after_known_traffic(fleet: Fleet, start_router, tmp_path) -> None:
    fleet.add("main", whoami=TOKENS)
    fleet.add("sync1")
    fleet.add("reader1")
    metrics_port = free_port()
    access_path = tmp_path / "access.log"
    config = {
        "workers": {"sync": [fleet["sync1"].url], "client_reader": [fleet["reader1"].url]},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "access_log": {"enabled": True, "format": "json", "path": str(access_path)},
        "debug_headers": True,
    }
    router = start_router(fleet["main"].url, config)
    sync1, reader1 = fleet["sync1"].url, fleet["reader1"].url
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for i in range(5):
            token = list(TOKENS)[i % 2]
            r = client.get(f"/_matrix/client/v3/sync?since=s{i}&access_token={token}")
            assert served(r)["server"] == "sync1"
            assert r.headers["x-synapse-router-route"] == "sync"
            assert r.headers["x-synapse-router-worker"] == sync1
        for _ in range(3):
            assert served(client.get("/_matrix/client/versions"))["server"] == "reader1"
        for _ in range(2):
            r = client.post("/_matrix/client/unstable/org.matrix.msc4108/rendezvous", content=b"{}")
            assert r.headers["x-synapse-router-pool"] == "main"
        assert client.get("/_matrix/client/versions?standin_status=503").status_code == 503

    deadline = time.monotonic() + 10
    while True:  # the server starts when mitmdump runs; give it a moment on a loaded machine
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            break
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    samples = _samples(text)
    requests = "synapse_router_requests_total"
    sync = {"route": "sync", "pool": "sync", "worker": sync1, "method": "GET"}
    client_route = {"route": "client", "pool": "client_reader", "worker": reader1, "method": "GET"}
    assert _value(samples, requests, **sync, status_class="2xx") == 5
    assert _value(samples, requests, **client_route, status_class="2xx") == 3
    assert _value(samples, requests, **client_route, status_class="5xx") == 1
    rendezvous = {"route": "rendezvous", "pool": "main", "worker": "main", "method": "POST"}
    assert _value(samples, requests, **rendezvous, status_class="2xx") == 2
    # two tokens of one user: two whoami calls, then cache hits
    assert _value(samples, "synapse_router_whoami_calls_total", outcome="user") == 2
    assert _value(samples, "synapse_router_identity_lookups_total", source="whoami") == 2
    assert _value(samples, "synapse_router_identity_lookups_total", source="cache") == 3
    assert _value(samples, "synapse_router_identity_cache_entries") == 2
    assert _value(samples, "synapse_router_worker_up", pool="sync", worker=sync1) == 1
    assert _value(samples, "synapse_router_upstream_seconds_count", pool="sync", worker=sync1) == 5
    # bounded labels: no user, token, path or client address anywhere
    for secret in (*TOKENS, "@alice", "/_matrix"):
        assert secret not in text
    label_values = {value for (_, labels) in samples for _, value in labels}
    assert "127.0.0.1" not in label_values  # the client's address is never a label

    lines = [json.loads(line) for line in access_path.read_text().splitlines()]
    assert len(lines) == 11
    syncs = [entry for entry in lines if entry.get("route") == "sync"]
    assert len(syncs) == 5
    assert {e["worker"] for e in syncs} == {sync1}
    assert [e["identity"] for e in syncs] == ["whoami", "whoami", "cache", "cache", "cache"]
    assert all(e["status"] == 200 and e["client_ip"] == "127.0.0.1" and len(e["token_hash"]) == 8 for e in syncs)
    assert all("user_id" not in e for e in lines)  # only when the operator enables it
    assert {e["path"] for e in syncs} == {"/_matrix/client/v3/sync"}
    everything = access_path.read_text() + router.log() + text
    for token in TOKENS:
        assert token not in everything


def test_access_log_user_id_only_when_enabled(fleet: Fleet, start_router, tmp_path) -> None:
    fleet.add("main", whoami=TOKENS)
    fleet.add("sync1")
    access_path = tmp_path / "access.log"
    config = {
        "workers": {"sync": [fleet["sync1"].url]},
        "access_log": {"enabled": True, "format": "logfmt", "include_user": True, "path": str(access_path)},
    }
    router = start_router(fleet["main"].url, config)
    token = list(TOKENS)[0]
    httpx.get(f"{router.url}/_matrix/client/v3/sync?since=1", headers={"Authorization": f"Bearer {token}"})
    line = access_path.read_text().strip()
    assert "user_id=@alice:test.local" in line
    assert "route=sync" in line and token not in line


def test_metrics_endpoint_moves_on_reload_only_once_the_new_address_listens(fleet: Fleet, start_router) -> None:
    fleet.add("main")
    first, second = free_port(), free_port()
    router = start_router(fleet["main"].url, {"workers": {}, "metrics": {"listen": f"127.0.0.1:{first}"}})

    def scrape(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def eventually(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    eventually(lambda: scrape(first), "metrics served at start")
    busy = fleet["main"].port  # an address already taken
    router.config_path.write_text(f"workers: {{}}\nmetrics: {{listen: '127.0.0.1:{busy}'}}\n")
    router.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "cannot serve metrics" in router.log(), "the failed bind is reported")
    assert scrape(first)  # still where it was
    router.config_path.write_text(f"workers: {{}}\nmetrics: {{listen: '127.0.0.1:{second}'}}\n")
    router.proc.send_signal(signal.SIGHUP)
    eventually(lambda: scrape(second) and not scrape(first), "moved to the new address")


@pytest.mark.parametrize(
    ("path", "worker"),
    [
        ("/_matrix/client/v3/rooms/!r:x/messages?standin_chunked=1", "reader1"),  # mitmproxy streams it
        ("/_matrix/client/v3/sync?since=s1&timeout=1000&standin_chunked=1", "sync1"),  # the router sends it
        ("/_matrix/client/v3/sync?standin_chunked=1", "sync1"),  # initial sync: streamed
    ],
)
def test_debug_headers_on_chunked_responses_as_synapse_sends_them(
    fleet: Fleet, start_router, path: str, worker: str
) -> None:
    fleet.add("main", whoami={"tok-alice-1": "@alice:test"})
    fleet.add("sync1")
    fleet.add("reader1")
    config = {
        "workers": {"sync": [fleet["sync1"].url], "client_reader": [fleet["reader1"].url]},
        "debug_headers": True,
    }
    router = start_router(fleet["main"].url, config)
    response = httpx.get(router.url + path, headers={"Authorization": "Bearer tok-alice-1"}, timeout=10)
    assert response.status_code == 200
    assert response.json()["server"] == worker
    assert response.headers["x-synapse-router-worker"] == fleet[worker].url
    assert response.headers["x-synapse-router-route"]


def test_requests_in_flight_per_worker_on_metrics(fleet: Fleet, start_router) -> None:
    """`synapse_router_worker_in_flight{worker}` counts the requests held on each worker (both
    sending paths: a router-sent long-poll and a streamed media download), back to 0 after."""
    fleet.add("main", whoami=TOKENS)
    fleet.add("sync1")
    fleet.add("media1")
    metrics_port = free_port()
    config = {
        "workers": {"sync": [fleet["sync1"].url], "media": [fleet["media1"].url]},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    router = start_router(fleet["main"].url, config)
    sync1, media1 = fleet["sync1"].url, fleet["media1"].url
    token = list(TOKENS)[0]

    def in_flight() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        return {
            labels["worker"]: value
            for (name, labels_set), value in _samples(text).items()
            if name == "synapse_router_worker_in_flight"
            for labels in [dict(labels_set)]
        }

    def request(path: str) -> None:
        httpx.get(router.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    wait_for_port(metrics_port, router.proc)
    assert in_flight() == {sync1: 0.0, media1: 0.0}
    held = [
        threading.Thread(target=request, args=(f"/_matrix/client/v3/sync?since=s{i}&timeout=3000&standin_delay=3",))
        for i in range(3)
    ]
    held.append(threading.Thread(target=request, args=("/_matrix/media/v3/download/x/y?standin_delay=3",)))
    for thread in held:
        thread.start()
    deadline = time.monotonic() + 10
    while in_flight() != {sync1: 3.0, media1: 1.0}:
        assert time.monotonic() < deadline, in_flight()
        time.sleep(0.1)
    for thread in held:
        thread.join()
    assert in_flight() == {sync1: 0.0, media1: 0.0}
