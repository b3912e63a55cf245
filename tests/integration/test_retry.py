"""Which requests are resent when their worker dies before answering, which are never resent,
and the Matrix errors the router itself answers with (retry.py), through a real router (both
launchers) and stand-in workers that count what they receive."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from .conftest import Fleet

pytestmark = pytest.mark.integration

WORKERS = ["w1", "w2", "w3"]
HEALTH = {"interval": 0.3, "timeout": 1.0, "fall": 2, "rise": 2, "connect_timeout": 1.0}
ROOM = "!room:test.local"
SS = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
JSON = b'{"msgtype": "m.text", "body": "hello"}'


@pytest.fixture
def rooms(fleet: Fleet, start_router, tmp_path):
    """Three room workers (also the to_device writer and the media pool) and main."""
    fleet.add("main")
    for name in WORKERS:
        fleet.add(name)
    urls = [fleet[n].url for n in WORKERS]
    access = tmp_path / "access.log"
    router = start_router(
        fleet["main"].url,
        {
            "workers": {"room": urls, "to_device": urls, "media": urls},
            "health": HEALTH,
            "access_log": {"enabled": True, "format": "json", "path": str(access)},
        },
    )
    return fleet, router, access


def _worker_of_room(client: httpx.Client) -> str:
    r = client.get(f"/_matrix/client/v3/rooms/{ROOM}/messages")
    assert r.status_code == 200, r.text
    return r.headers["x-standin"]


def _kill_during(fleet: Fleet, victim: str, method: str) -> threading.Thread:
    """SIGKILL `victim` as soon as it has received one more `method` request than now (the
    request the test sends next, which it holds with standin_delay)."""
    seen = fleet[victim].stats()["requests"].get(method, 0)

    def kill() -> None:
        deadline = time.monotonic() + 20
        while fleet[victim].stats()["requests"].get(method, 0) <= seen and time.monotonic() < deadline:
            time.sleep(0.05)
        fleet[victim].kill()

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def _received(fleet: Fleet, method: str) -> dict[str, int]:
    return {n: fleet[n].stats()["requests"].get(method, 0) for n in WORKERS if fleet[n].proc is not None}


RESENT = [
    ("GET", f"/_matrix/client/v3/rooms/{ROOM}/messages?dir=b", b""),
    ("HEAD", f"/_matrix/client/v3/rooms/{ROOM}/messages?dir=b", b""),
    ("OPTIONS", f"/_matrix/client/v3/rooms/{ROOM}/messages?dir=b", b""),
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/txn1", JSON),
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/redact/$ev/txn2", b"{}"),
]


@pytest.mark.parametrize(("method", "path", "body"), RESENT, ids=[f"{m} {p.split('/')[-2]}" for m, p, _ in RESENT])
def test_safe_request_is_resent_to_the_next_worker_when_its_worker_dies(rooms, method, path, body) -> None:
    fleet, router, _ = rooms
    with httpx.Client(base_url=router.url, timeout=30) as client:
        victim = _worker_of_room(client)
        before = _received(fleet, method)
        killer = _kill_during(fleet, victim, method)
        r = client.request(
            method, f"{path}&standin_delay=3" if "?" in path else f"{path}?standin_delay=3", content=body
        )
        killer.join()
    assert r.status_code == 200, r.text
    assert r.headers["x-standin"] != victim
    after = _received(fleet, method)
    # Exactly one more request of this method reached the survivors: the resend.
    assert sum(after.values()) - sum(v for n, v in before.items() if n in after) == 1, (before, after)
    if method not in ("HEAD",):
        seen = r.json()
        assert seen["method"] == method and seen["body_bytes"] == len(body)


NEVER_RESENT = [
    ("POST", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message", JSON),  # no txnId
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.room.topic/", b'{"topic": "x"}'),
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/txn3?user_id=%40b%3Atest.local", JSON),
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/txn4?org.matrix.msc4140.delay=9000", JSON),
]


@pytest.mark.parametrize(("method", "path", "body"), NEVER_RESENT, ids=["post-send", "put-state", "as-user", "delayed"])
def test_unsafe_request_is_never_resent_and_gets_a_matrix_error(rooms, method, path, body) -> None:
    fleet, router, access = rooms
    with httpx.Client(base_url=router.url, timeout=30) as client:
        victim = _worker_of_room(client)
        before = _received(fleet, method)
        killer = _kill_during(fleet, victim, method)
        sep = "&" if "?" in path else "?"
        r = client.request(method, f"{path}{sep}standin_delay=3", content=body)
        killer.join()
        time.sleep(0.5)  # a resend, if the router made one, would have arrived
    assert r.status_code == 502, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["errcode"] == "M_UNKNOWN" and r.json()["error"]
    after = _received(fleet, method)
    assert after == {n: v for n, v in before.items() if n in after}, f"resent: {before} -> {after}"
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert any(line["method"] == method and line["status"] == 502 for line in lines), lines[-3:]


def test_send_to_device_is_never_resent(fleet: Fleet, start_router) -> None:
    # Deduplicated only in the memory of the process that received it: never resent.
    fleet.add("main")
    fleet.add("td1")
    router = start_router(fleet["main"].url, {"workers": {"to_device": [fleet["td1"].url]}, "health": HEALTH})
    path = "/_matrix/client/v3/sendToDevice/m.room_key_request/txn9?standin_delay=3"
    with httpx.Client(base_url=router.url, timeout=30) as client:
        killer = _kill_during(fleet, "td1", "PUT")
        r = client.put(path, content=b'{"messages": {}}')
        killer.join()
        time.sleep(0.5)
    assert r.status_code == 502 and r.json()["errcode"] == "M_UNKNOWN", r.text
    assert fleet["main"].stats()["requests"].get("PUT", 0) == 0  # not resent to main either


def test_media_upload_is_never_resent(fleet: Fleet, start_router, tmp_path) -> None:
    # Media bodies are streamed by mitmproxy, never held by the router: never resent. The worker
    # dies after the whole body was sent: a Matrix 502 (not mitmproxy's page), in the access log,
    # with the debug headers every router answer carries.
    fleet.add("main")
    fleet.add("m1")
    access = tmp_path / "media-access.log"
    router = start_router(
        fleet["main"].url,
        {
            "workers": {"media": [fleet["m1"].url]},
            "health": HEALTH,
            "access_log": {"enabled": True, "format": "json", "path": str(access)},
            "debug_headers": True,
        },
    )
    with httpx.Client(base_url=router.url, timeout=30) as client:
        killer = _kill_during(fleet, "m1", "POST")
        r = client.post("/_matrix/media/v3/upload?standin_delay=3", content=b"x" * 2048)
        killer.join()
        time.sleep(0.5)
    assert r.status_code == 502
    assert r.headers["content-type"] == "application/json", r.text
    assert r.json()["errcode"] == "M_UNKNOWN", r.text
    assert r.headers.get("x-synapse-router-route") == "media", r.headers
    assert r.headers.get("x-synapse-router-pool") == "media", r.headers
    assert r.headers.get("x-synapse-router-worker") == fleet["m1"].url, r.headers
    assert fleet["main"].stats()["requests"].get("POST", 0) == 0  # not resent to main
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    posts = [line for line in lines if line["method"] == "POST"]
    assert [(line["status"], "upload" in line) for line in posts] == [(502, False)], lines[-3:]


def test_chunked_upload_whose_worker_dies_mid_upload_gets_a_matrix_error(fleet: Fleet, start_router, tmp_path) -> None:
    """A chunked request (streamed by mitmproxy, never held) whose worker is killed while the
    client is still sending: the client gets the router's Matrix 502 with CORS headers and
    nothing else (not mitmproxy's HTML page), with the debug headers, and the access log says
    that the upload was cut under the answer."""
    fleet.add("main")
    fleet.add("w1")
    access = tmp_path / "chunked-access.log"
    router = start_router(
        fleet["main"].url,
        {
            "workers": {"room": [fleet["w1"].url]},
            "health": HEALTH,
            "access_log": {"enabled": True, "format": "json", "path": str(access)},
            "debug_headers": True,
        },
    )
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            f"POST /_matrix/client/v3/rooms/{ROOM}/join HTTP/1.1\r\nHost: test.local\r\n"
            'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'.encode()
        )
        deadline = time.monotonic() + 10
        while fleet["w1"].stats()["requests"].get("POST", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        fleet["w1"].kill()  # mid-upload: the chunked body has no end yet
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0] == "HTTP/1.1 502 Bad Gateway", received
    assert headers["content-type"] == "application/json" and headers["access-control-allow-origin"] == "*", headers
    assert len(body) == int(headers["content-length"]), received  # one answer, no page after it
    assert headers.get("x-synapse-router-pool") == "room", headers
    assert headers.get("x-synapse-router-worker") == fleet["w1"].url, headers
    assert headers.get("x-synapse-router-route"), headers
    assert json.loads(body)["errcode"] == "M_UNKNOWN", body
    time.sleep(0.3)
    logged = [json.loads(line) for line in access.read_text().splitlines()]
    assert [(line["method"], line["status"], line.get("upload")) for line in logged] == [("POST", 502, "cut")], logged


def test_sliding_sync_post_and_sync_get_resent_by_user(fleet: Fleet, start_router) -> None:
    fleet.add("main", whoami={"tok": "@u:test.local"})
    for name in WORKERS:
        fleet.add(name)
    router = start_router(fleet["main"].url, {"workers": {"sync": [fleet[n].url for n in WORKERS]}, "health": HEALTH})
    headers = {"Authorization": "Bearer tok"}
    body = b'{"lists": {}}'
    with httpx.Client(base_url=router.url, timeout=30, headers=headers) as client:
        victim = client.get("/_matrix/client/v3/sync?since=s0&timeout=0").headers["x-standin"]
        killer = _kill_during(fleet, victim, "POST")
        post = client.post(f"{SS}?pos=p1&timeout=30000&standin_delay=3", content=body)
        killer.join()
        # A short (timeout=0) GET on a dead worker's user goes to the next worker at once.
        get = client.get("/_matrix/client/v3/sync?since=s1&timeout=0")
    assert post.status_code == 200 and post.headers["x-standin"] != victim
    assert get.status_code == 200 and get.headers["x-standin"] == post.headers["x-standin"]


def test_no_process_left_answers_a_matrix_error_with_retry_after(rooms) -> None:
    fleet, router, access = rooms
    for name in [*WORKERS, "main"]:
        fleet[name].kill()
    with httpx.Client(base_url=router.url, timeout=30) as client:
        r = client.get(f"/_matrix/client/v3/rooms/{ROOM}/messages")
        post = client.post("/_matrix/client/v3/keys/query", content=b"{}")  # main's, never sent
        media = client.post("/_matrix/media/v3/upload", content=b"abc")  # streamed by mitmproxy
    for answer in (r, post, media):
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/json" and answer.headers["retry-after"] == "1"
        assert answer.json()["errcode"] == "M_UNKNOWN"
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert [line["status"] for line in lines[-2:]] == [503, 503], lines[-2:]


class _ScriptedWorker:
    """A worker that answers /health like Synapse and every other request with fixed bytes,
    then closes: a broken or hostile worker."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            if head.startswith(b"GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
            else:
                conn.sendall(self.answer)


BAD_HEADS = {
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nRAW TUNNEL",
    "1xx then 200": b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    "bare CR": b"HTTP/1.1 200 OK\r\nX-A: b\rSet-Cookie: x=y\r\nContent-Length: 2\r\n\r\n{}",
    "bare CR in the reason": b"HTTP/1.1 200 O\rSet-Cookie: x=y\r\nContent-Length: 2\r\n\r\n{}",
    "101 to an upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nRAW TUNNEL",
}


@pytest.mark.parametrize("answer", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
def test_a_worker_head_mitmproxy_would_relay_badly_gets_a_matrix_error(fleet: Fleet, start_router, answer) -> None:
    """On mitmproxy's path (media downloads are streamed): an unasked 101 would turn the
    client's connection into a tunnel past the router, a 1xx would be taken for the final
    answer (the 200 then read as the next request's), a bare CR relayed could be read as a
    line break. Each is answered with a Matrix 502 and the connection closed."""
    fleet.add("main")
    worker = _ScriptedWorker(answer)
    router = start_router(fleet["main"].url, {"workers": {"media": [worker.url]}, "health": HEALTH})
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            b"GET /_matrix/media/v3/download/test.local/abc HTTP/1.1\r\nHost: test.local\r\n"
            b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"  # asked or not, no upgrade passes
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), received
    assert b"Set-Cookie" not in received and b"RAW TUNNEL" not in received, received
    assert json.loads(body)["errcode"] == "M_UNKNOWN", received
