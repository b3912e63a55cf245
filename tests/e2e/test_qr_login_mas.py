"""QR login (MSC4108, MSC4388) and MAS-issued tokens through the router, against Synapse's real
servlets: `scripts/synapse_deploy.py --topology mas` (Synapse 1.163 with
`matrix_authentication_service` pointing at scripts/mas_standin.py, `msc4108_enabled`,
`msc4388_mode: open`, `compress: true` on every listener resource; main + 3 generic workers).

One deployment, both launchers against it (one router each, started once per module). Every
rendezvous request carries `Accept-Encoding: gzip`; Synapse's main process gzips the MSC4108
POST and every MSC4388 answer when asked (checked here straight against main), so an identity
answer through the router is the router's doing. What is checked through the router:

- MSC4108 (`POST /_matrix/client/unstable/org.matrix.msc4108/rendezvous`, then GET/PUT/DELETE
  on the session URL under `/_synapse/client/rendezvous/`): no `Content-Encoding` on any answer,
  the strong ETag of the POST is the GET's, `If-None-Match` with the current ETag gives 304, a
  PUT with the current `If-Match` 202 and a new ETag, a PUT with the stale one 412
  `M_CONCURRENT_WRITE`, DELETE 204 and then 404.
- MSC4388 (`/_matrix/client/unstable/io.element.msc4388/rendezvous[/<id>]`): the same flow with
  its `sequence_token` (409 on a stale one), no `Content-Encoding` on any answer.
- gzip is still applied where the router does not strip it: `/_matrix/client/v1/auth_metadata`
  (routed to main, the only process Synapse gzips on) with `Accept-Encoding: gzip` comes back
  `Content-Encoding: gzip`.
- Every MAS-issued token of one user (several devices, each a MAS session of the stand-in) has
  its `/sync` served by one and the same sync worker, as the workers' own access logs show, and
  the router resolved each token to the user through whoami (which Synapse answers through MAS
  introspection), never by the token's hash.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Router

from .clients import only_process
from .conftest import HEALTH, WHOAMI, Names, wait_until_routing
from .deployment import Deployment
from .matrix_helpers import served_by_uri

pytestmark = pytest.mark.e2e

MSC4108 = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous"
MSC4388 = "/_matrix/client/unstable/io.element.msc4388/rendezvous"
GZIP = {"Accept-Encoding": "gzip"}
LAUNCHERS = ("mitmdump", "synapse-router")


@dataclass
class MasRouter:
    router: Router
    launcher: str
    access_log: Path
    deployment: Deployment

    @property
    def url(self) -> str:
        return self.router.url

    def access_lines(self) -> list[dict[str, Any]]:
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module", params=LAUNCHERS)
def mas_router(
    request: pytest.FixtureRequest,
    mas_deployment: Deployment,
    start_router: Callable[..., Router],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MasRouter]:
    launcher = str(request.param)
    access_log = tmp_path_factory.mktemp(f"mas-{launcher}") / "access.log"
    urls = list(mas_deployment.workers.values())
    config = {
        "workers": {"sync": urls, "client_reader": urls},
        "health": HEALTH,
        "whoami": WHOAMI,
        "debug_headers": True,
        "access_log": {"enabled": True, "format": "json", "include_user": True, "path": str(access_log)},
    }
    router = start_router(mas_deployment.main, config, launcher=launcher)
    wait_until_routing(router)
    yield MasRouter(router, launcher, access_log, mas_deployment)
    router.stop()


def mas_session(dep: Deployment, localpart: str) -> dict[str, Any]:
    """A new MAS session (a new device) of `localpart`, from the stand-in's admin call."""
    mas = dep.info["mas"]
    response = httpx.post(
        mas["sessions"],
        json={"localpart": localpart},
        headers={"Authorization": f"Bearer {mas['secret']}"},
        timeout=30,
    )
    assert response.status_code == 201, (response.status_code, response.text)
    session: dict[str, Any] = response.json()
    return session


def assert_identity(response: httpx.Response, what: str) -> None:
    """No content coding on the answer (the client asked for gzip)."""
    assert "content-encoding" not in response.headers, (what, dict(response.headers))


def assert_via_rendezvous_route(response: httpx.Response, what: str) -> None:
    assert response.headers.get("x-synapse-router-route") == "rendezvous", (what, dict(response.headers))


def on_router(router_url: str, session_url: str) -> str:
    """The session URL Synapse made from `public_baseurl` (main), pointed at the router."""
    parts = urllib.parse.urlsplit(session_url)
    return router_url + parts.path


def test_main_gzips_rendezvous_when_asked(mas_deployment: Deployment) -> None:
    """The deployment is one where stripping matters: straight to main, with Accept-Encoding:
    gzip, Synapse 1.163 gzips the MSC4108 POST and MSC4388's answers."""
    with httpx.Client(timeout=30) as client:
        posted = client.post(
            mas_deployment.main + MSC4108, content=b"x", headers={**GZIP, "Content-Type": "text/plain"}
        )
        assert posted.status_code == 201, posted.text
        assert posted.headers.get("content-encoding") == "gzip", dict(posted.headers)
        created = client.post(mas_deployment.main + MSC4388, json={"data": "x"}, headers=GZIP)
        assert created.status_code == 200, created.text
        assert created.headers.get("content-encoding") == "gzip", dict(created.headers)


def test_msc4108_rendezvous_through_router(mas_router: MasRouter) -> None:
    with httpx.Client(timeout=30) as client:
        offer = b"offer from the new device"
        posted = client.post(mas_router.url + MSC4108, content=offer, headers={**GZIP, "Content-Type": "text/plain"})
        assert posted.status_code == 201, posted.text
        assert_identity(posted, "POST")
        assert_via_rendezvous_route(posted, "POST")
        etag = posted.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/"), f"not a strong ETag: {etag!r}"
        session = on_router(mas_router.url, posted.json()["url"])
        assert urllib.parse.urlsplit(session).path.startswith("/_synapse/client/rendezvous/"), session

        got = client.get(session, headers=GZIP)
        assert got.status_code == 200, got.text
        assert_identity(got, "GET")
        assert_via_rendezvous_route(got, "GET")
        assert got.content == offer
        assert got.headers["etag"] == etag

        unchanged = client.get(session, headers={**GZIP, "If-None-Match": etag})
        assert unchanged.status_code == 304, (unchanged.status_code, unchanged.text)
        assert_identity(unchanged, "GET If-None-Match")
        assert unchanged.headers.get("etag") == etag

        answer = b"answer from the existing device"
        put = client.put(session, content=answer, headers={**GZIP, "If-Match": etag, "Content-Type": "text/plain"})
        assert put.status_code == 202, (put.status_code, put.text)
        assert_identity(put, "PUT")
        new_etag = put.headers["etag"]
        assert new_etag != etag and not new_etag.startswith("W/"), (etag, new_etag)

        stale = client.put(session, content=b"late", headers={**GZIP, "If-Match": etag, "Content-Type": "text/plain"})
        assert stale.status_code == 412, (stale.status_code, stale.text)
        assert_identity(stale, "PUT stale If-Match")
        assert stale.json().get("org.matrix.msc4108.errcode") == "M_CONCURRENT_WRITE", stale.text

        changed = client.get(session, headers={**GZIP, "If-None-Match": etag})
        assert changed.status_code == 200 and changed.content == answer, (changed.status_code, changed.text)
        assert_identity(changed, "GET after PUT")
        assert changed.headers["etag"] == new_etag
        assert client.get(session, headers={**GZIP, "If-None-Match": new_etag}).status_code == 304

        deleted = client.delete(session, headers=GZIP)
        assert deleted.status_code == 204, (deleted.status_code, deleted.text)
        assert_identity(deleted, "DELETE")
        gone = client.get(session, headers=GZIP)
        assert gone.status_code == 404, (gone.status_code, gone.text)
        assert_identity(gone, "GET after DELETE")


def test_msc4388_rendezvous_through_router(mas_router: MasRouter) -> None:
    with httpx.Client(timeout=30) as client:
        available = client.get(mas_router.url + MSC4388, headers=GZIP)
        assert available.status_code == 200 and available.json() == {"create_available": True}, available.text
        assert_identity(available, "GET create")

        created = client.post(mas_router.url + MSC4388, json={"data": "offer"}, headers=GZIP)
        assert created.status_code == 200, created.text
        assert_identity(created, "POST")
        assert_via_rendezvous_route(created, "POST")
        body = created.json()
        session = f"{mas_router.url}{MSC4388}/{urllib.parse.quote(body['id'], safe='')}"
        token = body["sequence_token"]

        got = client.get(session, headers=GZIP)
        assert got.status_code == 200, got.text
        assert_identity(got, "GET")
        assert got.json()["data"] == "offer" and got.json()["sequence_token"] == token, got.text

        put = client.put(session, json={"sequence_token": token, "data": "answer"}, headers=GZIP)
        assert put.status_code == 200, put.text
        assert_identity(put, "PUT")
        new_token = put.json()["sequence_token"]
        assert new_token != token

        stale = client.put(session, json={"sequence_token": token, "data": "late"}, headers=GZIP)
        assert stale.status_code == 409, (stale.status_code, stale.text)
        assert_identity(stale, "PUT stale sequence_token")

        after = client.get(session, headers=GZIP)
        assert after.status_code == 200 and after.json()["data"] == "answer", after.text
        assert after.json()["sequence_token"] == new_token
        assert_identity(after, "GET after PUT")

        deleted = client.delete(session, headers=GZIP)
        assert deleted.status_code == 200, (deleted.status_code, deleted.text)
        assert_identity(deleted, "DELETE")
        gone = client.get(session, headers=GZIP)
        assert gone.status_code == 404, (gone.status_code, gone.text)
        assert_identity(gone, "GET after DELETE")


def test_gzip_still_applied_on_other_client_endpoints(mas_router: MasRouter) -> None:
    """Synapse gzips only its main process's client resource (a generic worker's has no gzip
    wrapper), so the endpoint is one the router sends to main: `/_matrix/client/v1/auth_metadata`,
    which Synapse in MAS mode answers from the MAS stand-in's OpenID metadata."""
    with httpx.Client(timeout=30) as client:
        metadata = client.get(mas_router.url + "/_matrix/client/v1/auth_metadata", headers=GZIP)
    assert metadata.status_code == 200, metadata.text
    assert metadata.headers.get("x-synapse-router-pool") == "main", dict(metadata.headers)
    assert metadata.headers.get("content-encoding") == "gzip", dict(metadata.headers)
    # httpx decoded it (real gzip); the issuer is the stand-in's
    assert metadata.json()["issuer"] == mas_router.deployment.info["mas"]["url"] + "/", metadata.text


def test_every_mas_token_of_one_user_on_one_sync_worker(mas_router: MasRouter, names: Names) -> None:
    dep = mas_router.deployment
    [localpart] = names(mas_router.launcher[0], 1)
    sessions = [mas_session(dep, localpart) for _ in range(4)]
    user_id = sessions[0]["user_id"]
    assert {s["user_id"] for s in sessions} == {user_id}
    assert len({s["device_id"] for s in sessions}) == 4
    with httpx.Client(timeout=60) as client:
        for s in sessions:
            auth = {"Authorization": f"Bearer {s['access_token']}"}
            whoami = client.get(mas_router.url + "/_matrix/client/v3/account/whoami", headers=auth)
            assert whoami.json() == {"user_id": user_id, "is_guest": False, "device_id": s["device_id"]}, whoami.text
            sync_filter = json.dumps({"account_data": {"not_types": [f"e2e.{s['device_id']}"]}})
            since = None
            for _ in range(2):  # an initial sync, then an incremental one
                params = {"timeout": "0", "filter": sync_filter, **({"since": since} if since else {})}
                synced = client.get(mas_router.url + "/_matrix/client/v3/sync", params=params, headers=auth)
                assert synced.status_code == 200, (synced.status_code, synced.text)
                since = synced.json()["next_batch"]

    per_device = {s["device_id"]: served_by_uri(dep.logs, user_id, "/sync", f"e2e.{s['device_id']}") for s in sessions}
    serving = {device: only_process(counts) for device, counts in per_device.items()}
    assert None not in serving.values(), f"a device's syncs were served by several processes (or none): {per_device}"
    assert len(set(serving.values())) == 1, f"the user's MAS tokens synced on different processes: {per_device}"
    worker = next(iter(serving.values()))
    assert worker in dep.workers, f"syncs were served by {worker}, not by a sync worker: {per_device}"
    assert all(counts[worker] == 2 for counts in per_device.values()), per_device

    syncs = [line for line in mas_router.access_lines() if line.get("path") == "/_matrix/client/v3/sync"]
    mine = [line for line in syncs if line.get("user_id") == user_id]
    assert len(mine) == 8, syncs
    assert {line.get("key_kind") for line in mine} == {"user"}, mine
    assert {line.get("identity") for line in mine} <= {"whoami", "cache", "coalesced"}, mine
    assert {line.get("worker") for line in mine} == {dep.workers[worker]}, mine
