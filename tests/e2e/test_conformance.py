"""Conformance: every endpoint family of the route table, one real request each through the
router, against the `full` topology (every kind of process the table names).

For each request: (a) no 5xx (each call names the status a correct server gives); (b) the
process that served it, read from Synapse's own access logs (a unique `cf=` marker in the
query string, which Synapse logs with the URI), is the one the router's decision named
(`X-Synapse-Router-Worker`); (c) that process is one Synapse allows for the endpoint. What
Synapse allows is written here per request from docs/workers.md and Synapse's code, not taken
from the route table:

    main            only the main process (servlets registered `if worker_app is None`)
    client          any process with a `client` listener (docs/workers.md, generic_worker)
    federation      any process with a `federation` listener
    media           the media repository workers (`enable_media_repo: false` on main)
    writer:<stream> the stream's configured writers (`stream_writers`; the store asserts
                    `_can_write_to_<stream>` elsewhere), main when none is configured

Every built-in route must be exercised (a new route without a row here fails the test). The
table (route, pool chain, served by, status) is written to test-artifacts/conformance.md and
must equal docs/conformance.md; `CONFORMANCE_UPDATE_DOCS=1` rewrites the latter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from synapse_router.routing.engine import WRITER_DOWN
from synapse_router.routing.routes import MAIN, RouteTable

from tests.harness import ROOT, Router, RouterStarter

from .conftest import HEALTH, WHOAMI, router_config, wait_until_routing
from .deployment import Deployment
from .matrix_helpers import parse_access_line

pytestmark = pytest.mark.e2e

DOC = ROOT / "docs" / "conformance.md"
ARTIFACT = ROOT / "test-artifacts" / "conformance.md"
PASSWORD = "conformance-password-1"
STREAM_POOLS = (
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
    "quarantined_media_changes",
)


def pools_of(dep: Deployment) -> dict[str, list[str]]:
    """Every pool of the route table mapped to the process of the full topology that is it
    (the deployment's own `router_pools`, which `synapse_deploy.py router-config` prints)."""
    pools: dict[str, list[str]] = dep.info["router_pools"]
    assert {*STREAM_POOLS} <= pools.keys()
    return pools


@dataclass
class Row:
    label: str  # METHOD and path template
    route: str
    chain: str
    decided: str
    served: str
    status: int
    allowed: str
    allowed_processes: frozenset[str]


class Conformance:
    """Sends requests through the router and checks each against the logs and the rules."""

    def __init__(self, dep: Deployment, router: Router, run: str) -> None:
        self.dep = dep
        self.router = router
        self.run = run
        self.http = httpx.Client(base_url=router.url, timeout=60)
        self.rows: dict[str, Row] = {}
        self.failures: list[str] = []
        self.table = RouteTable()
        self.process_of_url = {url: name for name, url in dep.workers.items()} | {MAIN: MAIN}
        self.count = 0

    def allowed(self, rule: str) -> frozenset[str]:
        resources: dict[str, list[str]] = self.dep.info["resources"]
        with_media = {name for name, r in resources.items() if "media" in r}
        if rule == "main":
            return frozenset({MAIN})
        if rule in ("client", "federation"):
            return frozenset({MAIN, *(name for name, r in resources.items() if rule in r)})
        if rule == "media":
            return frozenset(with_media) if with_media else frozenset({MAIN})
        if rule.startswith("writer:"):
            return frozenset(self.dep.info["stream_writers"].get(rule.removeprefix("writer:"), [MAIN]))
        raise ValueError(rule)

    def call(
        self,
        label: str,
        method: str,
        path: str,
        allowed: str,
        token: str | None = None,
        expect: int = 200,
        **kwargs: Any,
    ) -> httpx.Response:
        self.count += 1
        marker = f"conformance/{self.run}.{self.count}"
        url = path
        headers = {"User-Agent": marker, **kwargs.pop("headers", {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.http.request(method, url, headers=headers, **kwargs)
        route = response.headers.get("X-Synapse-Router-Route", "(no header)")
        worker = response.headers.get("X-Synapse-Router-Worker", "(no header)")
        decided = self.process_of_url.get(worker, worker)
        served = self._served_by(marker, method, url.split("?", 1)[0])
        match = self.table.match(method, url)
        last = WRITER_DOWN if match.route is not None and match.route.writer else MAIN  # writer pools: configured
        chain = " -> ".join([*(match.route.pools if match.route else ()), last])
        processes = self.allowed(allowed)
        row = Row(label, route, chain, decided, served, response.status_code, allowed, processes)
        problems = []
        if response.status_code >= 500 or response.status_code != expect:
            problems.append(f"status {response.status_code} (expected {expect}): {response.text[:300]}")
        if decided != served:
            problems.append(f"router decided {decided}, Synapse's logs say {served}")
        if served not in processes:
            problems.append(f"served by {served}, Synapse allows only {sorted(processes)} ({allowed})")
        if match.route is not None and route != match.route.name:
            problems.append(f"router says route {route}, the table says {match.route.name}")
        if problems:
            self.failures.append(f"{label}: " + "; ".join(problems))
        self.rows.setdefault(label, row)
        return response

    def _served_by(self, marker: str, method: str, path: str) -> str:
        """The process whose access log has the request, told by its User-Agent and request
        line (the router's whoami call for the token carries the client's User-Agent too).
        Synapse writes the line as the response finishes: wait a little for it."""
        needle = f'" "{marker}" ['
        deadline = time.monotonic() + 15
        while True:
            found = [name for name, log in self.dep.logs.items() if _logged(log, needle, method, path)]
            if found or time.monotonic() > deadline:
                return ",".join(sorted(found)) or "(not in any access log)"
            time.sleep(0.1)


def _logged(log: str, needle: str, method: str, path: str) -> bool:
    """An access line of `log` with `needle` (the user agent, quoted, after the request line)
    for `method` `path`."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if needle in line and (entry := parse_access_line(line)) is not None:
                    if entry.method == method and entry.path == path:
                        return True
    except FileNotFoundError:
        pass
    return False


def register(c: Conformance, username: str, admin: bool) -> dict[str, Any]:
    """Shared-secret registration (`/_synapse/admin/v1/register`, main only), via the router."""
    path = "/_synapse/admin/v1/register"
    nonce = c.call(f"GET {path}", "GET", path, "main").json()["nonce"]
    mac = hmac.new(c.dep.secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), username.encode(), PASSWORD.encode()]))
    mac.update(b"\x00admin" if admin else b"\x00notadmin")
    body = {"nonce": nonce, "username": username, "password": PASSWORD, "admin": admin, "mac": mac.hexdigest()}
    result: dict[str, Any] = c.call(f"POST {path}", "POST", path, "main", json=body).json()
    return result


def scenario(c: Conformance) -> None:
    v3 = "/_matrix/client/v3"
    alice = register(c, f"cfa{c.run}", admin=True)
    bob = register(c, f"cfb{c.run}", admin=False)
    a, b = alice["access_token"], bob["access_token"]
    a_id, b_id = alice["user_id"], bob["user_id"]
    ua, ub = quote(a_id), quote(b_id)
    server = c.dep.server_name

    # --- client-reader family (generic worker endpoints) ---
    c.call("GET /_matrix/client/versions", "GET", "/_matrix/client/versions", "client")
    login = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": a_id}, "password": PASSWORD}
    second = c.call(f"POST {v3}/login", "POST", f"{v3}/login", "client", json=login).json()
    c.call(f"GET {v3}/login", "GET", f"{v3}/login", "client")
    c.call(f"GET {v3}/account/whoami", "GET", f"{v3}/account/whoami", "client", a)
    c.call(f"GET {v3}/capabilities", "GET", f"{v3}/capabilities", "client", a)
    c.call(f"GET {v3}/account/3pid", "GET", f"{v3}/account/3pid", "client", a)
    c.call(f"GET {v3}/password_policy", "GET", f"{v3}/password_policy", "client")
    c.call(
        f"GET {v3}/register/available (registration disabled)",
        "GET",
        f"{v3}/register/available?username=free{c.run}",
        "client",
        expect=403,  # registration is disabled in the test deployment: Synapse says so
    )
    filter_id = c.call(
        f"POST {v3}/user/{{user}}/filter", "POST", f"{v3}/user/{ua}/filter", "client", a, json={"room": {}}
    ).json()["filter_id"]
    c.call(f"GET {v3}/user/{{user}}/filter/{{id}}", "GET", f"{v3}/user/{ua}/filter/{filter_id}", "client", a)
    c.call(f"GET {v3}/profile/{{user}}", "GET", f"{v3}/profile/{ua}", "client", a)
    c.call(
        f"PUT {v3}/profile/{{user}}/displayname",
        "PUT",
        f"{v3}/profile/{ua}/displayname",
        "client",
        a,
        json={"displayname": "Alice"},
    )
    alias = f"#cf{c.run}:{server}"
    room = c.call(
        f"POST {v3}/createRoom",
        "POST",
        f"{v3}/createRoom",
        "client",
        a,
        json={"preset": "public_chat", "room_alias_name": f"cf{c.run}", "name": "conformance"},
    ).json()["room_id"]
    r = quote(room)
    c.call(f"GET {v3}/joined_rooms", "GET", f"{v3}/joined_rooms", "client", a)
    c.call(f"GET {v3}/publicRooms", "GET", f"{v3}/publicRooms", "client", a)
    c.call(f"GET {v3}/directory/room/{{alias}}", "GET", f"{v3}/directory/room/{quote(alias)}", "client", a)
    c.call(
        f"PUT {v3}/directory/room/{{alias}}",
        "PUT",
        f"{v3}/directory/room/{quote(f'#cf2{c.run}:{server}')}",
        "client",
        a,
        json={"room_id": room},
    )
    c.call(
        f"POST {v3}/search",
        "POST",
        f"{v3}/search",
        "client",
        a,
        json={"search_categories": {"room_events": {"search_term": "hello"}}},
    )
    c.call(f"GET {v3}/notifications", "GET", f"{v3}/notifications", "client", a)
    c.call(f"GET {v3}/voip/turnServer", "GET", f"{v3}/voip/turnServer", "client", a)
    c.call(f"POST {v3}/keys/query", "POST", f"{v3}/keys/query", "client", a, json={"device_keys": {b_id: []}})
    c.call(f"POST {v3}/keys/claim", "POST", f"{v3}/keys/claim", "client", a, json={"one_time_keys": {}})
    backup = {"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "cfkey"}}
    c.call(f"POST {v3}/room_keys/version", "POST", f"{v3}/room_keys/version", "client", a, json=backup)
    c.call(f"GET {v3}/room_keys/version", "GET", f"{v3}/room_keys/version", "client", a)
    c.call("GET /_synapse/admin/v1/rooms/{room}", "GET", f"/_synapse/admin/v1/rooms/{r}", "client", a)
    c.call(
        "GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events",
        "GET",
        "/_matrix/client/unstable/org.matrix.msc4140/delayed_events",
        "client",
        a,
    )

    # --- initial sync and sync ---
    initial = c.call(f"GET {v3}/sync (initial)", "GET", f"{v3}/sync?timeout=0", "client", a).json()
    since = initial["next_batch"]
    c.call(f"GET {v3}/sync?since=", "GET", f"{v3}/sync?since={since}&timeout=0", "client", a)
    c.call(f"GET {v3}/events?from=", "GET", f"{v3}/events?from={since}&timeout=0", "client", a)
    c.call(f"GET {v3}/rooms/{{room}}/initialSync", "GET", f"{v3}/rooms/{r}/initialSync", "client", a)
    sliding = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
    request = {"lists": {"all": {"ranges": [[0, 10]], "required_state": [], "timeline_limit": 1}}}
    pos = c.call(f"POST {sliding} (initial)", "POST", sliding, "client", a, json=request).json()["pos"]
    c.call(f"POST {sliding}?pos=", "POST", f"{sliding}?pos={pos}&timeout=0", "client", a, json=request)
    c.call(f"GET {v3}/keys/changes", "GET", f"{v3}/keys/changes?from={since}&to={since}", "client", a)

    # --- room-scoped: events (by room) ---
    c.call(f"POST {v3}/rooms/{{room}}/invite", "POST", f"{v3}/rooms/{r}/invite", "client", a, json={"user_id": b_id})
    c.call(f"POST {v3}/rooms/{{room}}/join", "POST", f"{v3}/rooms/{r}/join", "client", b, json={})
    c.call(f"POST {v3}/join/{{alias}}", "POST", f"{v3}/join/{quote(alias)}", "client", b, json={})
    send = f"{v3}/rooms/{r}/send/m.room.message"
    event = c.call(
        f"PUT {v3}/rooms/{{room}}/send/{{type}}/{{txn}}",
        "PUT",
        f"{send}/t{c.run}",
        "client",
        a,
        json={"msgtype": "m.text", "body": "hello"},
    ).json()["event_id"]
    e = quote(event)
    reply = {"msgtype": "m.text", "body": "in thread", "m.relates_to": {"rel_type": "m.thread", "event_id": event}}
    c.call(f"PUT {v3}/rooms/{{room}}/send/{{type}}/{{txn}}", "PUT", f"{send}/u{c.run}", "client", b, json=reply)
    c.call(
        f"PUT {v3}/rooms/{{room}}/state/{{type}}/",
        "PUT",
        f"{v3}/rooms/{r}/state/m.room.topic/",
        "client",
        a,
        json={"topic": "conformance"},
    )
    c.call(f"GET {v3}/rooms/{{room}}/state", "GET", f"{v3}/rooms/{r}/state", "client", a)
    doomed = c.call(
        f"PUT {v3}/rooms/{{room}}/send/{{type}}/{{txn}}",
        "PUT",
        f"{send}/d{c.run}",
        "client",
        a,
        json={"msgtype": "m.text", "body": "x"},
    ).json()["event_id"]
    c.call(
        f"PUT {v3}/rooms/{{room}}/redact/{{event}}/{{txn}}",
        "PUT",
        f"{v3}/rooms/{r}/redact/{quote(doomed)}/r{c.run}",
        "client",
        a,
        json={"reason": "conformance"},
    )

    # --- room-scoped reads ---
    for label, path in (
        ("messages?dir=b", "messages?dir=b&limit=5"),
        ("members", "members"),
        ("joined_members", "joined_members"),
        ("context/{event}", f"context/{e}?limit=2"),
        ("event/{event}", f"event/{e}"),
        ("aliases", "aliases"),
    ):
        c.call(f"GET {v3}/rooms/{{room}}/{label}", "GET", f"{v3}/rooms/{r}/{path}", "client", a)
    v1 = "/_matrix/client/v1"
    for label, path in (
        ("relations/{event}", f"relations/{e}"),
        ("threads", "threads"),
        ("hierarchy", "hierarchy"),
        ("timestamp_to_event", f"timestamp_to_event?ts={int(time.time() * 1000)}&dir=b"),
    ):
        c.call(f"GET {v1}/rooms/{{room}}/{label}", "GET", f"{v1}/rooms/{r}/{path}", "client", a)

    # --- stream writers: writes to the writer, reads where any worker may serve them ---
    c.call(
        f"PUT {v3}/rooms/{{room}}/typing/{{user}}",
        "PUT",
        f"{v3}/rooms/{r}/typing/{ua}",
        "writer:typing",
        a,
        json={"typing": True, "timeout": 1000},
    )
    c.call(
        f"PUT {v3}/sendToDevice/{{type}}/{{txn}}",
        "PUT",
        f"{v3}/sendToDevice/org.example.cf/t{c.run}",
        "writer:to_device",
        a,
        json={"messages": {b_id: {"*": {"hello": 1}}}},
    )
    data = f"{v3}/user/{ua}/account_data/org.example.cf"
    c.call(f"PUT {v3}/user/{{user}}/account_data/{{type}}", "PUT", data, "writer:account_data", a, json={"a": 1})
    c.call(f"GET {v3}/user/{{user}}/account_data/{{type}}", "GET", data, "client", a)
    room_data = f"{v3}/user/{ua}/rooms/{r}/account_data/org.example.cf"
    c.call(
        f"PUT {v3}/user/{{user}}/rooms/{{room}}/account_data/{{type}}",
        "PUT",
        room_data,
        "writer:account_data",
        a,
        json={"b": 2},
    )
    tag = f"{v3}/user/{ua}/rooms/{r}/tags/m.favourite"
    c.call(f"PUT {v3}/user/{{user}}/rooms/{{room}}/tags/{{tag}}", "PUT", tag, "writer:account_data", a, json={})
    c.call(f"GET {v3}/user/{{user}}/rooms/{{room}}/tags", "GET", f"{v3}/user/{ua}/rooms/{r}/tags", "client", a)
    c.call(f"DELETE {v3}/user/{{user}}/rooms/{{room}}/tags/{{tag}}", "DELETE", tag, "writer:account_data", a)
    c.call(
        f"POST {v3}/rooms/{{room}}/receipt/m.read/{{event}}",
        "POST",
        f"{v3}/rooms/{r}/receipt/m.read/{e}",
        "writer:receipts",
        b,
        json={},
    )
    c.call(
        f"POST {v3}/rooms/{{room}}/read_markers",
        "POST",
        f"{v3}/rooms/{r}/read_markers",
        "writer:receipts",
        b,
        json={"m.fully_read": event, "m.read": event},
    )
    presence = f"{v3}/presence/{ua}/status"
    c.call(f"PUT {v3}/presence/{{user}}/status", "PUT", presence, "writer:presence", a, json={"presence": "online"})
    c.call(f"GET {v3}/presence/{{user}}/status", "GET", presence, "writer:presence", a)
    # Another user's status: only the presence writer can tell (a generic worker answers 500).
    c.call(f"GET {v3}/presence/{{other user}}/status", "GET", f"{v3}/presence/{ub}/status", "writer:presence", a)
    c.call(f"GET {v3}/pushrules/", "GET", f"{v3}/pushrules/", "client", a)
    rule = f"{v3}/pushrules/global/override/cf.rule"
    c.call(
        f"PUT {v3}/pushrules/global/override/{{rule}}",
        "PUT",
        rule,
        "writer:push_rules",
        a,
        json={"actions": ["dont_notify"], "conditions": []},
    )
    c.call(
        f"PUT {v3}/pushrules/global/override/{{rule}}/enabled",
        "PUT",
        f"{rule}/enabled",
        "writer:push_rules",
        a,
        json={"enabled": False},
    )
    c.call(f"DELETE {v3}/pushrules/global/override/{{rule}}", "DELETE", rule, "writer:push_rules", a)
    device = alice["device_id"]
    c.call(f"GET {v3}/devices", "GET", f"{v3}/devices", "client", a)
    c.call(f"GET {v3}/devices/{{device}}", "GET", f"{v3}/devices/{device}", "client", a)
    c.call(
        f"PUT {v3}/devices/{{device}}",
        "PUT",
        f"{v3}/devices/{device}",
        "writer:device_lists",
        a,
        json={"display_name": "conformance"},
    )
    c.call(
        f"POST {v3}/keys/upload",
        "POST",
        f"{v3}/keys/upload",
        "writer:device_lists",
        a,
        json={"one_time_keys": {"curve25519:AAAAAQ": "cfonetimekey"}},
    )
    public = base64.b64encode(os.urandom(32)).decode().rstrip("=")
    master = {"user_id": a_id, "usage": ["master"], "keys": {f"ed25519:{public}": public}}
    c.call(
        f"POST {v3}/keys/device_signing/upload",
        "POST",
        f"{v3}/keys/device_signing/upload",
        "writer:device_lists",
        a,
        json={"master_key": master},
    )
    c.call(
        f"POST {v3}/keys/signatures/upload",
        "POST",
        f"{v3}/keys/signatures/upload",
        "writer:device_lists",
        a,
        json={},
    )
    # Deleting a device takes user-interactive auth: a 401 with a session, then the password.
    body: dict[str, Any] = {"devices": [second["device_id"]]}
    uia = c.call(
        f"POST {v3}/delete_devices (UIA challenge)",
        "POST",
        f"{v3}/delete_devices",
        "writer:device_lists",
        a,
        expect=401,
        json=body,
    ).json()
    body["auth"] = {**login, "session": uia["session"]}
    c.call(f"POST {v3}/delete_devices", "POST", f"{v3}/delete_devices", "writer:device_lists", a, json=body)
    if c.dep.info.get("topology") != "full":  # MSC4306 is enabled in the full topology only
        return _after_thread_subscriptions(c, a, b, r, server)
    c.call(
        "PUT /_matrix/client/unstable/io.element.msc4306/rooms/{room}/thread/{event}/subscription",
        "PUT",
        f"/_matrix/client/unstable/io.element.msc4306/rooms/{r}/thread/{e}/subscription",
        "writer:thread_subscriptions",
        a,
        json={},
    )
    c.call(
        "GET /_matrix/client/unstable/io.element.msc4308/thread_subscriptions",
        "GET",
        "/_matrix/client/unstable/io.element.msc4308/thread_subscriptions?dir=b",
        "writer:thread_subscriptions",
        a,
    )
    _after_thread_subscriptions(c, a, b, r, server)


def _after_thread_subscriptions(c: Conformance, a: str, b: str, r: str, server: str) -> None:
    v3 = "/_matrix/client/v3"
    # --- user directory ---
    c.call(
        f"POST {v3}/user_directory/search",
        "POST",
        f"{v3}/user_directory/search",
        "client",
        a,
        json={"search_term": "cfb"},
    )

    # --- media repository ---
    content = b"conformance media " + uuid.uuid4().bytes
    mxc = c.call(
        "POST /_matrix/media/v3/upload",
        "POST",
        "/_matrix/media/v3/upload?filename=cf.txt",
        "media",
        a,
        content=content,
        headers={"Content-Type": "text/plain"},
    ).json()["content_uri"]
    media_id = mxc.rsplit("/", 1)[1]
    got = c.call(
        "GET /_matrix/client/v1/media/download/{server}/{id}",
        "GET",
        f"/_matrix/client/v1/media/download/{server}/{media_id}",
        "media",
        a,
    )
    if got.content != content:
        c.failures.append("media download: content differs from the upload")
    c.call("GET /_matrix/client/v1/media/config", "GET", "/_matrix/client/v1/media/config", "media", a)
    c.call(
        "GET /_synapse/admin/v1/media/{server}/{id}",
        "GET",
        f"/_synapse/admin/v1/media/{server}/{media_id}",
        "media",
        a,
    )
    c.call(
        "POST /_synapse/admin/v1/media/quarantine/{server}/{id}",
        "POST",
        f"/_synapse/admin/v1/media/quarantine/{server}/{media_id}",
        "writer:quarantined_media_changes",
        a,
        json={},
    )
    c.call(
        "POST /_synapse/admin/v1/media/unquarantine/{server}/{id}",
        "POST",
        f"/_synapse/admin/v1/media/unquarantine/{server}/{media_id}",
        "writer:quarantined_media_changes",
        a,
        json={},
    )

    # --- federation (no signing key of a remote server here: /send/ is refused unsigned) ---
    c.call("GET /_matrix/federation/v1/version", "GET", "/_matrix/federation/v1/version", "federation")
    c.call("POST /_matrix/key/v2/query", "POST", "/_matrix/key/v2/query", "federation", json={"server_keys": {}})
    c.call(
        "PUT /_matrix/federation/v1/send/{txn} (unsigned)",
        "PUT",
        f"/_matrix/federation/v1/send/cf{c.run}",
        "federation",
        expect=401,
        json={"pdus": [], "edus": []},
    )

    # --- main only ---
    c.call(
        f"GET {v3}/directory/list/room/{{room}}",
        "GET",
        f"{v3}/directory/list/room/{r}",
        "main",
        a,
    )
    c.call(
        "POST /_matrix/client/unstable/org.matrix.msc4108/rendezvous (no MAS: unrecognised)",
        "POST",
        "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
        "main",
        expect=404,
        json={},
    )
    c.call(f"POST {v3}/rooms/{{room}}/leave", "POST", f"{v3}/rooms/{r}/leave", "client", b, json={})
    c.call(f"POST {v3}/rooms/{{room}}/forget", "POST", f"{v3}/rooms/{r}/forget", "main", b, json={})
    c.call(f"POST {v3}/logout", "POST", f"{v3}/logout", "main", b, json={})


def render(rows: list[Row]) -> str:
    lines = [
        "# Route conformance against real Synapse workers",
        "",
        "Generated by `tests/e2e/test_conformance.py` (runs in CI under `scripts/test`); do not edit.",
        "Regenerate with `CONFORMANCE_UPDATE_DOCS=1 scripts/test tests/e2e/test_conformance.py`.",
        "",
        "One real request per endpoint family, through the router, against",
        "`scripts/synapse_deploy.py --topology full` (main; writer1: stream writer of typing, to_device,",
        "account_data, receipts, presence, push_rules, device_lists, thread_subscriptions;",
        "persister1: events; media1: media repository and quarantined_media_changes writer;",
        "initial_sync1; sync1; client_reader1, also the `generic`, `room` and `user_dir` pools;",
        "federation_reader1). *Pool chain* is the route's fallback order (main last; a stream writer's",
        "route ends with the router's 503 instead, main not being the writer);",
        "*served by* is the process whose own access log has the request, which the test checks is",
        "the process the router's decision named and one Synapse allows (*Synapse allows*: `client`",
        "= any process with a client listener, `federation` likewise, `media` = media repository",
        "workers, `writer:<stream>` = the stream's configured `stream_writers`, `main` = main only).",
        "",
        "Beyond one request per family, `synapse-router routes audit` checks every servlet Synapse",
        "registers (each kind of process's resources, each servlet's regex, turned into sample paths)",
        "against the route table, no Synapse process started: a path sent to a kind of process that does not",
        "register it for that method, a stream-writer write sent anywhere but its writer pool, or a",
        "servlet no route nor main covers is reported. `tests/e2e/test_audit.py` runs it against the",
        "Synapse `synapse_deploy.py` installs and requires none ([docs/synapse-tools.md](synapse-tools.md)).",
        "",
        "| Request | Route | Pool chain | Served by | Status | Synapse allows |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| `{row.label}` | {row.route} | {row.chain} | {row.served} | {row.status} | {row.allowed} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def full_router(full_deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    starter = RouterStarter(tmp_path_factory.mktemp("conformance-router"))
    config = {
        "workers": pools_of(full_deployment),
        "health": HEALTH,
        "whoami": WHOAMI,
        "debug_headers": True,
    }
    try:
        router = starter(full_deployment.main, config)
        wait_until_routing(router)
        yield router
    finally:
        starter.stop_all()


def run_scenario(dep: Deployment, router: Router) -> Conformance:
    c = Conformance(dep, router, f"{time.strftime('%H%M%S')}{os.urandom(2).hex()}")
    try:
        scenario(c)
    except Exception as e:  # a later step needed what a failed call did not give: report both
        raise AssertionError("\n".join([*c.failures, f"scenario stopped: {e!r}"])) from e
    finally:
        c.http.close()
    return c


def test_without_writer_pools_every_write_reaches_main(deployment: Deployment, start_router: RouterStarter) -> None:
    """The README's deployment (main + generic workers as `sync` and `client_reader` pools, no
    writer pools): main is every stream's writer, so every write must reach it. The route
    table of issue 12 sent receipts, read markers and device-list writes to `client_reader`,
    which answered 500 (`AssertionError: self._can_write_to_receipts`)."""
    router = start_router(deployment.main, {**router_config(deployment), "debug_headers": True})
    wait_until_routing(router)
    c = run_scenario(deployment, router)
    assert not c.failures, "\n".join(c.failures)
    writes = [row for row in c.rows.values() if row.allowed.startswith("writer:")]
    assert len(writes) >= 15 and all(row.served == MAIN for row in writes), writes


def test_every_route_served_where_synapse_allows(full_deployment: Deployment, full_router: Router) -> None:
    c = run_scenario(full_deployment, full_router)
    rows = list(c.rows.values())
    text = render(rows)
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(text)
    print(f"\nconformance table: {ARTIFACT}\n{text}")
    routes = {route.name for route in RouteTable().routes} | {MAIN}
    missing = sorted(routes - {row.route for row in rows})
    assert not missing, f"built-in routes without a conformance request: {missing}"
    assert not c.failures, "\n".join(c.failures)
    if os.environ.get("CONFORMANCE_UPDATE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, (
        f"docs/conformance.md is not the table this run produced ({ARTIFACT}); "
        "regenerate it with CONFORMANCE_UPDATE_DOCS=1 scripts/test tests/e2e/test_conformance.py"
    )
