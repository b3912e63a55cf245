"""A real mitmdump with the addon in front of real HTTP servers on loopback."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import Fleet, free_port, router_command, served

pytestmark = pytest.mark.integration

POOLS = ["sync", "initial_sync", "client_reader", "room", "media", "federation_reader", "typing"]


@pytest.fixture
def deployment(fleet: Fleet, start_router):
    fleet.add("main")
    for pool in POOLS:
        fleet.add(pool)
    config = {"workers": {pool: [fleet[pool].url] for pool in POOLS}}
    router = start_router(fleet["main"].url, config)
    with httpx.Client(base_url=router.url, timeout=30) as client:
        yield fleet, router, client


@pytest.mark.parametrize(
    ("method", "path", "server"),
    [
        ("GET", "/_matrix/client/v3/sync?since=s1&timeout=0", "sync"),
        ("GET", "/_matrix/client/v3/sync", "initial_sync"),
        ("GET", "/_matrix/client/v3/rooms/!r:x/initialSync", "initial_sync"),
        ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=1", "sync"),
        ("GET", "/_matrix/client/versions", "client_reader"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1", "room"),
        ("GET", "/_matrix/media/v3/download/x/y", "media"),
        ("PUT", "/_matrix/federation/v1/send/1", "federation_reader"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@a:x", "typing"),
        ("POST", "/_matrix/client/v3/logout", "main"),
        ("POST", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous", "main"),
    ],
)
def test_routing_per_pool(deployment, method: str, path: str, server: str) -> None:
    _, _, client = deployment
    body = served(client.request(method, path, content=b"{}" if method != "GET" else None))
    assert body["server"] == server
    assert body["method"] == method
    assert body["path"] == path


def test_forwarding_headers_and_host(deployment) -> None:
    _, router, client = deployment
    body = served(
        client.get(
            "/_matrix/client/v3/sync?since=1",
            headers={
                "Host": "matrix.example.org",
                "X-Forwarded-For": "6.6.6.6",
                "X-Real-IP": "6.6.6.6",
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=6.6.6.6",
                "X-User-Identifier": "@admin:example.org",
                "X-Synapse-Router-Worker": "http://evil",
            },
        )
    )
    headers = body["headers"]
    assert headers["host"] == "matrix.example.org"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    for spoof in ("x-real-ip", "forwarded", "x-user-identifier", "x-synapse-router-worker"):
        assert spoof not in headers


def test_trusted_proxy_address_believed(fleet: Fleet, start_router) -> None:
    fleet.add("main")
    fleet.add("sync")
    router = start_router(
        fleet["main"].url, {"workers": {"sync": [fleet["sync"].url]}, "trusted_proxies": ["127.0.0.0/8"]}
    )
    body = served(
        httpx.get(
            f"{router.url}/_matrix/client/v3/sync?since=1",
            headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7", "X-Forwarded-Proto": "https"},
        )
    )
    assert body["headers"]["x-forwarded-for"] == "198.51.100.7"
    assert body["headers"]["x-forwarded-proto"] == "https"


RENDEZVOUS_PATHS = [
    ("POST", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous"),
    ("PUT", "/_synapse/client/rendezvous/abc123"),
    ("GET", "/_synapse/client/rendezvous/abc123"),
    ("DELETE", "/_synapse/client/rendezvous/abc123"),
    ("POST", "/_matrix/client/unstable/io.element.msc4388/rendezvous"),
    ("PUT", "/_matrix/client/unstable/io.element.msc4388/rendezvous/abc123"),
]


@pytest.mark.parametrize(("method", "path"), RENDEZVOUS_PATHS)
def test_rendezvous_strips_accept_encoding_keeps_etag(deployment, method: str, path: str) -> None:
    _, _, client = deployment
    sent = b'{"data":"x"}' if method in ("POST", "PUT") else None
    response = client.request(
        method,
        path,
        content=sent,
        headers={
            "Accept-Encoding": "gzip, br",
            "If-Match": '"etag-1"',
            "If-None-Match": '"etag-0"',
            "Content-Type": "application/json",
        },
    )
    body = served(response)
    assert body["server"] == "main"
    assert "accept-encoding" not in body["headers"]
    assert body["headers"]["if-match"] == '"etag-1"'
    assert body["headers"]["if-none-match"] == '"etag-0"'
    if sent is not None:
        assert body["headers"]["content-length"] == str(len(sent))
        assert body["body_sha256"] == hashlib.sha256(sent).hexdigest()
    # the strong ETag and cache headers come back exactly as the server sent them
    assert response.headers["etag"] == '"standin-etag-1"'
    assert response.headers["cache-control"] == "no-store, no-transform"
    assert "content-encoding" not in response.headers


def test_accept_encoding_passes_elsewhere(deployment) -> None:
    _, _, client = deployment
    for path in ("/_matrix/client/v3/sync?since=1", "/_matrix/client/versions", "/_matrix/client/v3/logout"):
        body = served(client.post(path) if "logout" in path else client.get(path, headers={"Accept-Encoding": "gzip"}))
        if "logout" not in path:
            assert body["headers"]["accept-encoding"] == "gzip"


def test_query_token_forwarded_as_sent_and_never_printed(deployment) -> None:
    # Issue 22: the router forwards credentials as the client sent them (validated, never
    # rewritten); the flow, printed by mitmdump for every request, shows a label instead.
    _, router, client = deployment
    secret = "syt_c2VjcmV0_integrationTOKEN_0abcd"
    body = served(client.get(f"/_matrix/client/v3/sync?since=1&access_token={secret}"))
    assert body["path"] == f"/_matrix/client/v3/sync?since=1&access_token={secret}"
    assert "authorization" not in body["headers"]
    time.sleep(0.3)
    assert "/_matrix/client/v3/sync?since=1" in router.log()
    assert secret not in router.log()


def test_openid_userinfo_reaches_main_with_its_query_token(fleet: Fleet, start_router) -> None:
    # Issue 22: Synapse reads the OpenID token of federation's userinfo from the query only; a
    # token moved into Authorization was answered 401 M_MISSING_TOKEN.
    fleet.add("main")
    fleet.add("federation_reader")
    # -v: mitmdump prints every flow's whole URL and headers (redacted once it is answered)
    router = start_router(
        fleet["main"].url, {"workers": {"federation_reader": [fleet["federation_reader"].url]}}, ["-v"]
    )
    secret = "openid_c2VjcmV0_TOKEN_0abcd"
    path = f"/_matrix/federation/v1/openid/userinfo?access_token={secret}"
    with httpx.Client(base_url=router.url, timeout=30) as client:
        body = served(client.get(path))
    assert (body["server"], body["path"]) == ("main", path)
    assert "authorization" not in body["headers"]
    router.stop()
    log = router.log()
    assert "/_matrix/federation/v1/openid/userinfo?access_token=<redacted:" in log
    assert secret not in log


@pytest.mark.parametrize(
    "path",
    [
        "/_synapse/admin/v2/users?from=0&limit=10&user_id=ali",  # List Accounts: a substring filter
        "/_synapse/admin/v1/event_reports?user_id=ali",
        "/_synapse/admin/v1/event_reports?user_id=ali&user_id=bob",
    ],
)
def test_admin_user_id_filter_reaches_main(deployment, path: str) -> None:
    # Issue 22: `?user_id=` is an appservice acting as a user only on the client-server API;
    # the router answered these 400 M_INVALID_PARAM "Invalid user_id parameter." itself.
    _, _, client = deployment
    response = client.get(path, headers={"Authorization": "Bearer syt_admin_token"})
    assert response.status_code == 200, response.text
    body = served(response)
    assert (body["server"], body["path"]) == ("main", path)
    assert body["headers"]["authorization"] == "Bearer syt_admin_token"


def test_mixed_token_forms_are_answered_by_the_router(deployment) -> None:
    # Synapse refuses such a request too; the router does it without passing either token on.
    fleet, router, client = deployment
    calls = fleet["main"].stats()["whoami_calls"]
    response = client.get(
        "/_matrix/client/v3/sync?since=1&access_token=qtok123", headers={"Authorization": "Bearer htok123"}
    )
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM" and "server" not in response.json()
    assert fleet["main"].stats()["whoami_calls"] == calls
    time.sleep(0.3)
    assert "qtok123" not in router.log() and "htok123" not in router.log()


def _chunks(total: int, size: int = 1024 * 1024) -> Iterator[bytes]:
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block[:n]
        sent += n


def test_streamed_upload_and_download_bounded_memory(deployment) -> None:
    _, router, client = deployment
    size = 200 * 1024 * 1024
    baseline = router.rss_peak_kib()
    expected = hashlib.sha256()
    for chunk in _chunks(size):
        expected.update(chunk)
    body = served(
        client.post(
            "/_matrix/media/v3/upload?filename=big.bin",
            content=_chunks(size),
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
    )
    assert body["server"] == "media"
    assert body["body_bytes"] == size
    assert body["body_sha256"] == expected.hexdigest()

    received = 0
    digest = hashlib.sha256()
    with client.stream("GET", f"/_matrix/media/v3/download/x/big?standin_bytes={size}", timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += len(chunk)
            digest.update(chunk)
    assert received == size
    growth_mib = (router.rss_peak_kib() - baseline) / 1024
    assert growth_mib < 64, f"proxy peak memory grew {growth_mib:.0f} MiB while moving 2 x 200 MiB"


def test_long_poll_not_cut(deployment) -> None:
    _, _, client = deployment
    started = time.monotonic()
    body = served(client.get("/_matrix/client/v3/sync?since=1&timeout=30000&standin_delay=35", timeout=60))
    assert body["server"] == "sync"
    assert time.monotonic() - started >= 35


def test_main_down_worker_routes_still_answer(fleet: Fleet, start_router) -> None:
    fleet.add("sync")
    dead_main = f"http://127.0.0.1:{free_port()}"
    router = start_router(dead_main, {"workers": {"sync": [fleet["sync"].url]}})
    with httpx.Client(base_url=router.url, timeout=10) as client:
        for _ in range(3):
            assert served(client.get("/_matrix/client/v3/sync?since=1"))["server"] == "sync"
        versions = client.get("/_matrix/client/versions")  # main's own route: no process left for it
    assert versions.status_code == 503 and versions.json()["errcode"] == "M_UNKNOWN"
    assert versions.headers["content-type"] == "application/json" and int(versions.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("workers:\n  sync:\n    - http://127.0.0.1:1\n    - htp://x:1\n", "workers.sync[1] (line 4)"),
        (
            "workers: {sync: [http://127.0.0.1:1]}\nroutes:\n  - {name: a, paths: ['^/x'], pool: nope}\n",
            "routes[0].pool (line 3): unknown pool 'nope'",
        ),
        ("wrokers: {}\n", "wrokers (line 1): unknown key"),
        ("workers: [\n", "invalid YAML"),
    ],
)
def test_bad_config_stops_startup(tmp_path, config: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    result = subprocess.run(
        router_command("http://127.0.0.1:1", free_port(), path, []),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert words in result.stdout + result.stderr
