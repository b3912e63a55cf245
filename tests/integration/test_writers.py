"""A stream writer's writes when its configured writer pool has no usable worker: the router
answers 503 M_UNKNOWN with Retry-After itself instead of passing them to main, which is not the
writer then and would fail them. Main stays the fallback where main is the writer (no writer
pool configured), and reads go on to the pools that may serve them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from .conftest import Fleet, free_port, served

pytestmark = pytest.mark.integration

TOKEN = "syt_alice_writers_SECRET"
HEALTH = {"interval": 0.3, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _requests_seen(fleet: Fleet, name: str) -> int:
    return sum(fleet[name].stats()["requests"].values())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@alice:x", b'{"typing": true}'),  # the router sends it
        ("POST", "/_matrix/client/v3/keys/upload", b"x" * (2 * 1024 * 1024)),  # streamed: mitmproxy's path
    ],
    ids=["router-sent", "streamed"],
)
def test_a_write_whose_writer_is_down_is_answered_503_not_sent_to_main(
    fleet: Fleet, start_router, tmp_path: Path, method: str, path: str, body: bytes
) -> None:
    fleet.add("main", whoami={TOKEN: "@alice:x"})
    fleet.add("reader1")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every connection refused
    config = {
        "workers": {"typing": [dead], "device_lists": [dead], "client_reader": [fleet["reader1"].url]},
        "health": HEALTH,
        "whoami": {"timeout": 10},
        "access_log": {"enabled": True, "format": "json", "path": str(tmp_path / "access.log")},
    }
    router = start_router(fleet["main"].url, config)
    before = _requests_seen(fleet, "main")
    for _ in range(2):  # the first finds the writer refusing, the second knows it is down
        response = httpx.request(method, router.url + path, content=body, headers=AUTH, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["errcode"] == "M_UNKNOWN"
        assert int(response.headers["retry-after"]) >= 1
    assert _requests_seen(fleet, "main") == before  # main, not the writer, never saw a write
    # the second 503 was made without asking any process: its access-log line has no upstream time
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    made = [line for line in lines if line["path"] == path.split("?")[0]][-1]
    assert made["status"] == 503 and made["worker"] == "router"
    assert made.get("upstream_ms") is None, made
    # reads of a writer's stream still have somewhere to go
    assert served(httpx.get(router.url + "/_matrix/client/v3/devices", headers=AUTH, timeout=30))["server"] in (
        "reader1",
        "main",
    )


def test_main_takes_the_writes_when_no_writer_pool_is_configured(fleet: Fleet, start_router) -> None:
    fleet.add("main", whoami={TOKEN: "@alice:x"})
    router = start_router(fleet["main"].url, {"workers": {}, "whoami": {"timeout": 10}})
    response = httpx.put(
        router.url + "/_matrix/client/v3/rooms/!r:x/typing/@alice:x", content=b"{}", headers=AUTH, timeout=30
    )
    assert served(response)["server"] == "main"
