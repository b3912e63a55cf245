"""Small helpers for end-to-end tests against a real Synapse (see scripts/synapse_deploy.py).

    register_user(base_url, shared_secret, username, password, admin=False) -> dict
    login(base_url, username, password, device_id=None) -> (access_token, device_id)
    served_by(log_paths, user_id, path_fragment) -> {process_name: count}
    served_by_uri(log_paths, user_id, path_fragment, uri_fragment) -> {process_name: count}
    entries_of(log_paths, user_id, path_fragment, uri_fragment="") -> {process_name: [AccessLogEntry]}
    access_log_entries(path) -> list[AccessLogEntry]

`register_user` uses the shared-secret admin API of the main process
(`/_synapse/admin/v1/register`), which works with `enable_registration: false`. `served_by`
reads Synapse's own access logs to tell which process served a user's requests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TIMEOUT = 30.0

# Synapse's access line (synapse/http/site.py, `_finished_processing`), after the formatter's prefix:
#   2026-11-28 02:44:01,123 - synapse.access.http.18081 - 465 - INFO - GET-4 - 127.0.0.1 - 18081 -
#   {@alice:test.local} Processed request: 0.003sec/0.000sec ru=(0.002sec, 0.000sec)
#   db=(0.000sec/0.001sec/2) 261B 200 "GET /_matrix/client/v3/sync?timeout=0 HTTP/1.1" "python-httpx/0.28.1" [0 dbevts]
# The requester is `{None}` when unauthenticated and `{@admin:x|@puppet:x}` (authenticated entity | user)
# when someone acts as another user. The code gets a `!` suffix when the client went away first.
# The URI has no whitespace (it comes from the request line) but the user agent is arbitrary text,
# so the URI is matched as the first quoted `METHOD URI PROTO` after the status code.
_ACCESS_LINE = re.compile(
    r" - (?P<logger>synapse\.access\.https?\.\S+) - .*?"
    r"\{(?P<requester>[^{}]*)\} Processed request: .*? (?P<size>\d+)B (?P<code>\d{3}!?) "
    r'"(?P<method>[A-Z]+) (?P<uri>\S*) (?P<proto>[^"\s]*)"'
)


@dataclass(frozen=True)
class AccessLogEntry:
    requester: str  # as logged: "@alice:test.local", "None", or "@admin:x|@alice:x"
    method: str
    uri: str  # path and query, with access tokens redacted by Synapse
    code: str  # "200", or "200!" when the client disconnected before the response was sent
    logger: str  # "synapse.access.http.<port>"

    @property
    def user(self) -> str | None:
        """The user the request acted as (for `{@admin:x|@alice:x}`: @alice:x); None if unauthenticated."""
        last = self.requester.rsplit("|", 1)[-1]
        return last if last.startswith("@") else None

    @property
    def authenticated_entity(self) -> str | None:
        """Who authenticated, when it differs from `user` (an admin or appservice acting as a user)."""
        return self.requester.split("|", 1)[0] if "|" in self.requester else None

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


def parse_access_line(line: str) -> AccessLogEntry | None:
    match = _ACCESS_LINE.search(line)
    if match is None:
        return None
    return AccessLogEntry(
        requester=match["requester"],
        method=match["method"],
        uri=match["uri"],
        code=match["code"],
        logger=match["logger"],
    )


def access_log_entries(path: str | Path) -> Iterator[AccessLogEntry]:
    """Every access line of one Synapse log file (a missing file has none)."""
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            entry = parse_access_line(line)
            if entry is not None:
                yield entry


def served_by(log_paths: Mapping[str, str], user_id: str, path_fragment: str) -> dict[str, int]:
    """Per process, how many access-log lines of `user_id` have `path_fragment` in their path.

    `log_paths` is the `logs` object of synapse_deploy's JSON ({"main": ".../main.log", ...}).
    A request made by an admin or appservice acting as `user_id` counts for `user_id`.
    The query string is not searched, so "/sync" does not match "/messages?from=...sync".
    Every process of `log_paths` is in the result, with 0 when it served none.
    """
    counts: dict[str, int] = {}
    for name, path in log_paths.items():
        counts[name] = sum(
            1 for entry in access_log_entries(path) if entry.user == user_id and path_fragment in entry.path
        )
    return counts


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise AssertionError(
            f"{response.request.method} {response.request.url.path} -> {response.status_code}: {response.text[:500]}"
        )
    return response.json()


def register_user(
    base_url: str, shared_secret: str, username: str, password: str, admin: bool = False
) -> dict[str, Any]:
    """Register `username` with the shared-secret admin API; returns Synapse's answer
    ({"user_id", "access_token", "device_id", "home_server"}). Must target the main process."""
    url = base_url.rstrip("/") + "/_synapse/admin/v1/register"
    with httpx.Client(timeout=TIMEOUT) as client:
        nonce = _check(client.get(url))["nonce"]
        mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), username.encode(), password.encode()]))
        mac.update(b"\x00admin" if admin else b"\x00notadmin")
        body = {"nonce": nonce, "username": username, "password": password, "admin": admin, "mac": mac.hexdigest()}
        result: dict[str, Any] = _check(client.post(url, json=body))
        return result


def login(base_url: str, username: str, password: str, device_id: str | None = None) -> tuple[str, str]:
    """Password login (`m.login.password`); returns (access_token, device_id). A new device each
    call unless `device_id` is given. `username` may be a localpart or a full user id."""
    body: dict[str, Any] = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": username},
        "password": password,
    }
    if device_id is not None:
        body["device_id"] = device_id
    with httpx.Client(timeout=TIMEOUT) as client:
        result = _check(client.post(base_url.rstrip("/") + "/_matrix/client/v3/login", json=body))
    return result["access_token"], result["device_id"]


def entries_of(
    log_paths: Mapping[str, str], user_id: str | None, path_fragment: str, uri_fragment: str = ""
) -> dict[str, list[AccessLogEntry]]:
    """Per process, the access-log entries whose path contains `path_fragment` and whose full
    URI (query included) contains `uri_fragment`, made by `user_id` (None: by anyone, e.g.
    requests Synapse rejected with 401, which it logs as `{None}`)."""
    found: dict[str, list[AccessLogEntry]] = {}
    for name, path in log_paths.items():
        found[name] = [
            entry
            for entry in access_log_entries(path)
            if (user_id is None or entry.user == user_id) and path_fragment in entry.path and uri_fragment in entry.uri
        ]
    return found


def served_by_uri(
    log_paths: Mapping[str, str], user_id: str | None, path_fragment: str, uri_fragment: str
) -> dict[str, int]:
    """Like `served_by`, restricted to requests whose URI (query included) has `uri_fragment`:
    a marker a client put in its query (e.g. in a sync filter) tells its requests apart from
    those of the user's other devices."""
    return {name: len(found) for name, found in entries_of(log_paths, user_id, path_fragment, uri_fragment).items()}
