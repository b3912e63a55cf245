#!/usr/bin/env python3
"""A stand-in for the Matrix Authentication Service (MAS), enough for Synapse's MAS mode.

MAS is a Rust service that no package registry this project installs from carries, so the
`mas` topology of scripts/synapse_deploy.py runs this instead. Standard library only. It
implements exactly what Synapse 1.163 calls on MAS and what the tests need from it:

What Synapse calls (synapse/api/auth/mas.py):

    POST /oauth2/introspect        RFC 7662 token introspection. Form body `token=..&
                                   token_type_hint=access_token`, `Authorization: Bearer SECRET`
                                   (the `matrix_authentication_service.secret`). A token this
                                   stand-in issued and did not end: 200 `{"active": true, "scope":
                                   "openid urn:matrix:org.matrix.msc2967.client:api:*
                                   urn:matrix:org.matrix.msc2967.client:device:DEV", "username":
                                   LOCALPART, "sub", "client_id", "token_type": "access_token",
                                   "iat", "nbf", "exp", "expires_in", "iss"}` (plus `"device_id"`
                                   when Synapse sends `X-MAS-Supports-Device-Id: 1`, as MAS 0.15+
                                   does); any other token: 200 `{"active": false}`. A wrong or
                                   missing secret: 401 `{"error": "invalid_client", ...}`; no
                                   `token`: 400 `{"error": "invalid_request", ...}`.
    GET  /.well-known/openid-configuration
                                   the server metadata Synapse fetches lazily (for
                                   `/_matrix/client/v1/auth_metadata`): `issuer`,
                                   `account_management_uri` and the endpoints.

What the stand-in calls on Synapse (synapse/rest/synapse/mas/, on the main process, `Bearer
SECRET`), as MAS does when a user logs in or a session ends:

    POST /_synapse/mas/provision_user  {"localpart"}               (201 created / 200 existed)
    POST /_synapse/mas/upsert_device   {"localpart", "device_id"}  (201 / 200)
    POST /_synapse/mas/delete_device   {"localpart", "device_id"}  (204)

The stand-in's own admin calls (not MAS's API: MAS logs users in through OAuth 2.0 in a
browser, which no test can drive; these give the tests what a login would), `Bearer SECRET`:

    POST /_standin/sessions      {"localpart", "device_id"?, "expires_in"?} -> 201
                                 {"access_token", "device_id", "user_id", "expires_in"}:
                                 provisions the user and the device in Synapse, then mints a
                                 MAS-style token (`mat_...`). Each call is a new session (a new
                                 device unless `device_id` is given): several per user.
    POST /_standin/sessions/end  {"access_token"} -> 200 {}: the session ends (introspection
                                 says inactive from then on) and its device is deleted in
                                 Synapse, as MAS does at logout.
    GET  /health                 200 `OK`

Every answer is JSON (`application/json`) except /health; request bodies are read only up to
64 KiB with a Content-Length (else 411/413), and each connection times out after 30 s idle.
The log names method, path and status, never a token or the secret.

    python3 scripts/mas_standin.py --listen 127.0.0.1:18440 --synapse http://127.0.0.1:18408 \
        --server-name test.local --secret-file STATE/mas_secret
"""

from __future__ import annotations

import argparse
import binascii
import hmac
import json
import secrets
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 64 * 1024
DEFAULT_TTL = 3600  # seconds an access token stays active (MAS's default is 300 s; tests are longer)
SCOPE_API = "urn:matrix:org.matrix.msc2967.client:api:*"
SCOPE_DEVICE = "urn:matrix:org.matrix.msc2967.client:device:"
CLIENT_ID = "01STANDIN0CLIENT0000000000"
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_ALNUM = string.ascii_letters + string.digits


@dataclass
class Session:
    localpart: str
    device_id: str
    sub: str
    issued_at: int
    expires_at: int
    active: bool = True


def _base62(n: int, width: int) -> str:
    out = ""
    for _ in range(width):
        n, rest = divmod(n, 62)
        out = _BASE62[rest] + out
    return out


def mint_token() -> str:
    """A token shaped like MAS's: `mat_` + 30 random characters + `_` + a base62 CRC-32."""
    body = "mat_" + "".join(secrets.choice(_ALNUM) for _ in range(30))
    return f"{body}_{_base62(binascii.crc32(body.encode()), 6)}"


def new_device_id() -> str:
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(10))


def ulid_like() -> str:
    return "01" + "".join(secrets.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(24))


class Standin:
    """The stand-in's state: sessions by token, and how to reach Synapse."""

    def __init__(self, issuer: str, synapse: str, server_name: str, secret: str) -> None:
        self.issuer = issuer.rstrip("/") + "/"
        self.synapse = synapse.rstrip("/")
        self.server_name = server_name
        self.secret = secret
        self.sessions: dict[str, Session] = {}
        self.subs: dict[str, str] = {}  # localpart -> sub
        self.lock = threading.Lock()

    def authorised(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].encode(), self.secret.encode())

    def synapse_call(self, path: str, body: dict[str, Any]) -> int:
        request = urllib.request.Request(
            f"{self.synapse}/_synapse/mas/{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as e:
            e.read()
            raise RuntimeError(f"Synapse answered {e.code} to /_synapse/mas/{path}") from None

    def start_session(self, localpart: str, device_id: str | None, ttl: int) -> tuple[str, Session]:
        self.synapse_call("provision_user", {"localpart": localpart})
        device = device_id or new_device_id()
        self.synapse_call("upsert_device", {"localpart": localpart, "device_id": device})
        now = int(time.time())
        with self.lock:
            sub = self.subs.setdefault(localpart, ulid_like())
            token = mint_token()
            session = Session(localpart, device, sub, now, now + ttl)
            self.sessions[token] = session
        return token, session

    def end_session(self, token: str) -> bool:
        with self.lock:
            session = self.sessions.get(token)
            if session is None or not session.active:
                return False
            session.active = False
        self.synapse_call("delete_device", {"localpart": session.localpart, "device_id": session.device_id})
        return True

    def introspect(self, token: str, with_device_id: bool) -> dict[str, Any]:
        now = int(time.time())
        with self.lock:
            session = self.sessions.get(token)
        if session is None or not session.active or session.expires_at <= now:
            return {"active": False}
        answer: dict[str, Any] = {
            "active": True,
            "scope": f"openid {SCOPE_API} {SCOPE_DEVICE}{session.device_id}",
            "client_id": CLIENT_ID,
            "username": session.localpart,
            "token_type": "access_token",
            "iat": session.issued_at,
            "nbf": session.issued_at,
            "exp": session.expires_at,
            "expires_in": session.expires_at - now,
            "sub": session.sub,
            "iss": self.issuer,
        }
        if with_device_id:
            answer["device_id"] = session.device_id
        return answer

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}authorize",
            "token_endpoint": f"{self.issuer}oauth2/token",
            "introspection_endpoint": f"{self.issuer}oauth2/introspect",
            "revocation_endpoint": f"{self.issuer}oauth2/revoke",
            "registration_endpoint": f"{self.issuer}oauth2/registration",
            "jwks_uri": f"{self.issuer}oauth2/keys.json",
            "account_management_uri": f"{self.issuer}account/",
            "account_management_actions_supported": ["org.matrix.profile", "org.matrix.sessions_list"],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "fragment"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid", "email"],
            "prompt_values_supported": ["create"],
        }


class BadRequest(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mas-standin"
    sys_version = ""
    timeout = 30
    standin: Standin  # set on the subclass made by `serve`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # every request is logged once, by `_log`, without its query or body

    def _log(self, status: int) -> None:
        path = urllib.parse.urlsplit(self.path).path[:200]
        print(f"{self.log_date_time_string()} {self.command} {path!r} {status}", file=sys.stderr, flush=True)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status)

    def _json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode())

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise BadRequest(411, "invalid_request", "a Content-Length is required")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        if not raw.isdigit():
            raise BadRequest(400, "invalid_request", "bad Content-Length")
        length = int(raw)
        if length > MAX_BODY:
            raise BadRequest(413, "invalid_request", "request body too large")
        return self.rfile.read(length)

    def _json_body(self) -> dict[str, Any]:
        try:
            data = json.loads(self._body() or b"null")
        except ValueError:
            raise BadRequest(400, "invalid_request", "the body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest(400, "invalid_request", "the body is not a JSON object")
        return data

    def _require_secret(self) -> None:
        if not self.standin.authorised(self.headers.get("Authorization")):
            raise BadRequest(401, "invalid_client", "client authentication failed")

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        routes = {
            ("GET", "/health"): self._health,
            ("HEAD", "/health"): self._health,
            ("GET", "/.well-known/openid-configuration"): self._metadata,
            ("POST", "/oauth2/introspect"): self._introspect,
            ("POST", "/_standin/sessions"): self._start_session,
            ("POST", "/_standin/sessions/end"): self._end_session,
        }
        handler = routes.get((self.command, path))
        try:
            if handler is None:
                self._body()  # keep the connection in step
                known = any(p == path for _, p in routes)
                if known:
                    raise BadRequest(405, "invalid_request", "method not allowed")
                raise BadRequest(404, "not_found", "no such endpoint")
            handler()
        except BadRequest as e:
            self._json(e.status, {"error": e.error, "error_description": e.description})
        except RuntimeError as e:  # Synapse refused a /_synapse/mas call
            self._json(502, {"error": "server_error", "error_description": str(e)})

    def _health(self) -> None:
        self._send(200, b"OK", "text/plain")

    def _metadata(self) -> None:
        self._json(200, self.standin.metadata())

    def _introspect(self) -> None:
        body = self._body()
        self._require_secret()
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        tokens = form.get("token", [])
        if len(tokens) != 1 or not tokens[0]:
            raise BadRequest(400, "invalid_request", "exactly one token is required")
        with_device = self.headers.get("X-MAS-Supports-Device-Id") == "1"
        self._json(200, self.standin.introspect(tokens[0], with_device))

    def _start_session(self) -> None:
        data = self._json_body()
        self._require_secret()
        localpart, device_id, ttl = data.get("localpart"), data.get("device_id"), data.get("expires_in", DEFAULT_TTL)
        if not isinstance(localpart, str) or not localpart:
            raise BadRequest(400, "invalid_request", "localpart (a string) is required")
        if device_id is not None and (not isinstance(device_id, str) or not device_id):
            raise BadRequest(400, "invalid_request", "device_id must be a non-empty string")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise BadRequest(400, "invalid_request", "expires_in must be a positive integer")
        token, session = self.standin.start_session(localpart, device_id, ttl)
        user_id = f"@{session.localpart}:{self.standin.server_name}"
        self._json(201, {"access_token": token, "device_id": session.device_id, "user_id": user_id, "expires_in": ttl})

    def _end_session(self) -> None:
        data = self._json_body()
        self._require_secret()
        token = data.get("access_token")
        if not isinstance(token, str) or not self.standin.end_session(token):
            raise BadRequest(404, "not_found", "no active session with that token")
        self._json(200, {})


def serve(host: str, port: int, standin: Standin) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"standin": standin})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--synapse", required=True, help="the Synapse main process's base URL")
    parser.add_argument("--server-name", required=True)
    parser.add_argument("--secret-file", required=True, help="file holding matrix_authentication_service.secret")
    parser.add_argument("--issuer", help="default: http://HOST:PORT/")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with open(args.secret_file, encoding="utf-8") as f:
        secret = f.read().strip()
    if not secret:
        parser.error(f"{args.secret_file} is empty")
    standin = Standin(args.issuer or f"http://{host}:{port}/", args.synapse, args.server_name, secret)
    server = serve(host, int(port), standin)
    print(f"mas-standin listening on {host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
