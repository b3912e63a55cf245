"""scripts/mas_standin.py (the MAS stand-in of synapse_deploy's `mas` topology) against a
loopback recorder of Synapse's `/_synapse/mas/` endpoints, and the `mas` topology's Synapse
configuration. The real Synapse side is tests/e2e/test_qr_login_mas.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts import mas_standin
from scripts.synapse_deploy import MAS_TOPOLOGY, Layout, Ports, Secrets, homeserver_config, worker_config

SECRET = "the-shared-secret"


class SynapseRecorder(BaseHTTPRequestHandler):
    """Records each `/_synapse/mas/` call (path, Authorization, JSON body) and answers as
    Synapse does: 201 for a new user or device, 204 for a deleted device."""

    calls: list[tuple[str, str | None, dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, self.headers.get("Authorization"), body))
        status = 204 if self.path.endswith("/delete_device") else 201
        payload = b"" if status == 204 else b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


@pytest.fixture
def standin() -> Iterator[tuple[str, list[tuple[str, str | None, dict[str, Any]]]]]:
    class Recorder(SynapseRecorder):
        calls: list[tuple[str, str | None, dict[str, Any]]] = []

    recorder = Recorder
    synapse = ThreadingHTTPServer(("127.0.0.1", 0), recorder)
    synapse_url = _serve(synapse)
    state = mas_standin.Standin("http://mas.test/", synapse_url, "test.local", SECRET)
    server = mas_standin.serve("127.0.0.1", 0, state)
    url = _serve(server)
    try:
        yield url, recorder.calls
    finally:
        for s in (server, synapse):
            s.shutdown()
            s.server_close()


def _session(url: str, localpart: str = "alice", secret: str = SECRET, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/_standin/sessions",
        json={"localpart": localpart, **extra},
        headers={"Authorization": f"Bearer {secret}"},
    )


def _introspect(url: str, token: str, secret: str = SECRET, device_header: bool = True) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"}
    if device_header:
        headers["X-MAS-Supports-Device-Id"] = "1"
    return httpx.post(
        f"{url}/oauth2/introspect", data={"token": token, "token_type_hint": "access_token"}, headers=headers
    )


def test_a_session_provisions_user_and_device_then_introspects_as_mas(
    standin: tuple[str, list[tuple[str, str | None, dict[str, Any]]]],
) -> None:
    url, calls = standin
    first, second = _session(url).json(), _session(url).json()
    assert first["user_id"] == second["user_id"] == "@alice:test.local"
    assert first["device_id"] != second["device_id"] and first["access_token"] != second["access_token"]
    assert first["access_token"].startswith("mat_")
    assert calls[:2] == [
        ("/_synapse/mas/provision_user", f"Bearer {SECRET}", {"localpart": "alice"}),
        ("/_synapse/mas/upsert_device", f"Bearer {SECRET}", {"localpart": "alice", "device_id": first["device_id"]}),
    ]

    answer = _introspect(url, first["access_token"])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["active"] is True and body["username"] == "alice" and body["device_id"] == first["device_id"]
    assert set(body["scope"].split()) == {
        "openid",
        "urn:matrix:org.matrix.msc2967.client:api:*",
        f"urn:matrix:org.matrix.msc2967.client:device:{first['device_id']}",
    }
    assert 0 < body["expires_in"] <= 3600 and body["exp"] > body["iat"]
    assert "device_id" not in _introspect(url, first["access_token"], device_header=False).json()
    assert _introspect(url, "mat_unknown").json() == {"active": False}


def test_an_ended_session_is_inactive_and_its_device_deleted(
    standin: tuple[str, list[tuple[str, str | None, dict[str, Any]]]],
) -> None:
    url, calls = standin
    session = _session(url, "bob").json()
    ended = httpx.post(
        f"{url}/_standin/sessions/end",
        json={"access_token": session["access_token"]},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    assert ended.status_code == 200
    assert calls[-1] == (
        "/_synapse/mas/delete_device",
        f"Bearer {SECRET}",
        {"localpart": "bob", "device_id": session["device_id"]},
    )
    assert _introspect(url, session["access_token"]).json() == {"active": False}


def test_refusals_are_json_and_name_no_secret(
    standin: tuple[str, list[tuple[str, str | None, dict[str, Any]]]],
) -> None:
    url, calls = standin
    token = _session(url).json()["access_token"]
    wrong = _introspect(url, token, secret="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert token not in wrong.text and SECRET not in wrong.text
    assert _session(url, secret="wrong").status_code == 401
    missing = httpx.post(f"{url}/oauth2/introspect", data={}, headers={"Authorization": f"Bearer {SECRET}"})
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    big = httpx.post(
        f"{url}/oauth2/introspect", content=b"t" * (65 * 1024), headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert big.status_code == 413
    assert httpx.get(f"{url}/oauth2/introspect").status_code == 405
    assert httpx.get(f"{url}/nowhere").status_code == 404
    assert _session(url, expires_in=True).status_code == 400
    metadata = httpx.get(f"{url}/.well-known/openid-configuration").json()
    assert metadata["issuer"] == "http://mas.test/" and metadata["account_management_uri"]
    assert httpx.get(f"{url}/health").text == "OK"


def test_mas_topology_configures_synapse_for_mas_qr_login_and_compression(tmp_path: Path) -> None:
    layout = Layout(tmp_path, MAS_TOPOLOGY)
    ports = Ports.from_base(18000, MAS_TOPOLOGY)
    assert (ports.main, ports.mas, ports.postgres, ports.redis) == (18408, 18440, 15832, 16779)
    assert Ports.from_json(json.loads(json.dumps(ports.to_json()))) == ports
    sec = Secrets(*(f"s{i}" for i in range(len(Secrets.__dataclass_fields__))))
    config = homeserver_config(layout, ports, sec)
    assert config["matrix_authentication_service"] == {
        "enabled": True,
        "endpoint": "http://127.0.0.1:18440/",
        "secret_path": str(layout.mas_secret_file),
    }
    assert config["experimental_features"] == {"msc4108_enabled": True, "msc4388_mode": "open"}
    assert config["password_config"] == {"enabled": False} and config["enable_registration"] is False
    main_listener = config["listeners"][0]
    assert main_listener["resources"] == [{"names": ["client", "federation"], "compress": True}]
    worker = worker_config(layout, ports, "generic1")
    assert worker["worker_listeners"][0]["resources"][0]["compress"] is True
    assert MAS_TOPOLOGY.helper_names == ("postgres", "redis", "mas")
