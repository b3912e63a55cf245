"""A stand-in Synapse process for integration tests and the demo: a real HTTP server on
loopback that answers every request with what it received.

    python tests/standin.py --name generic1 --port 18081 [--whoami tokens.json]

Response: JSON {"server", "method", "path", "headers", "body_bytes", "body_sha256"}, with a
strong ETag and `Cache-Control: no-store, no-transform` as Synapse's rendezvous sends.
Query parameters steer it (they pass through the router untouched):
  standin_delay=S      answer after S seconds (a long-poll), or as soon as `/__standin/release`
                       is asked for (from then on every delay ends at once)
  standin_bytes=N      answer with N bytes of body, streamed in chunks (a media download)
  standin_status=C     answer with status C
  standin_errcode=E    answer Synapse's error body {"errcode": E, "error": ...} (with standin_status)
  standin_hang=1       accept, read the request, never answer (a wedged worker)
  standin_chunked=1    answer with Transfer-Encoding: chunked, as Synapse answers JSON (also
                       with standin_bytes: N bytes in chunks of 256 KiB)
  standin_login=1      answer as Synapse answers /login, /register and /refresh: {"user_id",
                       "device_id", "access_token", "refresh_token", "expires_in_ms"} (the
                       tokens are LOGIN_ACCESS_TOKEN and LOGIN_REFRESH_TOKEN) with a
                       Set-Cookie of LOGIN_COOKIE, chunked, nothing of the request echoed
  standin_plain=1      answer {"server"} only: nothing of the request echoed
  standin_cut_on=NAME&standin_cut_after=K  (with standin_bytes) the server named NAME sends the
                       head and K bytes of the body, then closes the connection (a worker dying
                       mid-answer); the others answer whole
  standin_early_status=C  answer status C (a Matrix error) before reading the request body,
                       then half-close, drain for 2 s and close (a 413 for an upload over a limit)
The body of standin_bytes=N is `bytes(range(256))` repeated: its SHA-256 is `pattern_sha256(N)`.
With --whoami FILE (JSON {token: user_id}) it answers /_matrix/client/v3/account/whoami
like Synapse: 200 {"user_id", "device_id", "is_guest"} or 401 M_UNKNOWN_TOKEN; `/health`
answers 200 OK (with --whoami-trickle S, whoami's body is sent a byte at a time over S seconds:
a slow main that never stops sending); `/__standin/stats` answers {"whoami_calls": N, "open_connections": M, "requests":
{method: count}} (M: client connections open now, not counting the one asking; requests: every
request received but /health, stats and whoami). During a `standin_delay` the server
watches its connection, as Synapse does: a client that closes it meanwhile gets no answer, and
the connection is counted closed at once. Request bodies are read in chunks and hashed, never
held whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

CHUNK = 256 * 1024


class StandinServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of new connections is queued, not dropped

    def __init__(
        self,
        address: tuple[str, int],
        name: str,
        whoami: dict[str, str] | None,
        whoami_delay: float = 0.0,
        whoami_trickle: float = 0.0,
    ) -> None:
        super().__init__(address, Handler)
        self.name = name
        self.whoami = whoami
        self.whoami_delay = whoami_delay
        self.whoami_trickle = whoami_trickle
        self.whoami_calls = 0
        self.open_connections = 0
        self.requests: dict[str, int] = {}  # method -> requests received (not /health, stats, whoami)
        self.lock = threading.Lock()
        self.released = threading.Event()  # set by /__standin/release: every standin_delay ends


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: no delayed-ACK stall
    server: StandinServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.open_connections += 1

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.open_connections -= 1

    def _client_gone_during(self, seconds: float) -> bool:
        """Wait `seconds` (less if released); True (at once) if the client closed the connection meanwhile."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0 and not self.server.released.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.05))
            if not readable:
                continue
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return True
            except OSError:
                return True
            self.server.released.wait(max(0.0, deadline - time.monotonic()))  # a pipelined request: just wait
            return False
        return False

    def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(1024)
                length = int(line.split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = length
                while remaining:
                    data = self.rfile.read(min(CHUNK, remaining))
                    if not data:
                        raise ConnectionError("client went away mid-chunk")
                    digest.update(data)
                    size += len(data)
                    remaining -= len(data)
                self.rfile.readline(16)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    raise ConnectionError("client went away mid-body")
                digest.update(data)
                size += len(data)
                remaining -= len(data)
        return size, digest.hexdigest()

    def _send_json(
        self, status: int, payload: object, extra: dict[str, str] | None = None, chunked: bool = False
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:  # as Synapse answers JSON: no Content-Length
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        if url.path not in ("/health", "/__standin/stats", "/__standin/release") and not url.path.endswith(
            "/account/whoami"
        ):
            with self.server.lock:
                self.server.requests[self.command] = self.server.requests.get(self.command, 0) + 1
        params = parse_qs(url.query)
        if early := params.get("standin_early_status"):  # answer before reading the body, and close
            self.close_connection = True
            self._send_json(int(early[0]), {"errcode": "M_TOO_LARGE", "error": "too large"}, {"Connection": "close"})
            # Half-closed, and what the client still sends read for a moment: a close with
            # unread bytes would be a reset, which can overtake the answer.
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2)
            try:
                while self.connection.recv(65536):
                    pass
            except OSError:
                pass
            return
        size, sha = self._read_body()
        if url.path == "/health":
            body = b"OK"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(body)
            return
        if url.path == "/__standin/release":
            self.server.released.set()
            self._send_json(200, {"server": self.server.name, "released": True})
            return
        if url.path == "/__standin/stats":
            with self.server.lock:
                stats = {
                    "server": self.server.name,
                    "whoami_calls": self.server.whoami_calls,
                    "open_connections": self.server.open_connections - 1,  # not this one
                    "requests": dict(self.server.requests),
                }
            self._send_json(200, stats)
            return
        if self.server.whoami is not None and url.path.endswith("/account/whoami"):
            self._whoami()
            return
        if params.get("standin_hang"):
            time.sleep(3600)
            return
        if (delay := params.get("standin_delay")) and self._client_gone_during(float(delay[0])):
            self.close_connection = True
            return
        status = int(params.get("standin_status", ["200"])[0])
        if errcode := params.get("standin_errcode"):
            self._send_json(status, {"errcode": errcode[0], "error": "Stand-in error"}, chunked=True)
            return
        if params.get("standin_login"):
            answer = {
                "user_id": "@alice:test",
                "device_id": "DEV",
                "access_token": LOGIN_ACCESS_TOKEN,
                "refresh_token": LOGIN_REFRESH_TOKEN,
                "expires_in_ms": 300000,
            }
            self._send_json(status, answer, {"Set-Cookie": f"session={LOGIN_COOKIE}; Path=/; HttpOnly"}, chunked=True)
            return
        if params.get("standin_plain"):
            self._send_json(status, {"server": self.server.name})
            return
        if n := params.get("standin_bytes"):
            cut = None
            if params.get("standin_cut_on", [""])[0] == self.server.name:
                cut = int(params.get("standin_cut_after", ["0"])[0])
            self._send_bytes(int(n[0]), bool(params.get("standin_chunked")), cut)
            return
        self._send_json(
            status,
            {
                "server": self.server.name,
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_bytes": size,
                "body_sha256": sha,
            },
            {"ETag": '"standin-etag-1"', "Cache-Control": "no-store, no-transform", "X-Standin": self.server.name},
            chunked=bool(params.get("standin_chunked")),
        )

    def _whoami(self) -> None:
        with self.server.lock:
            self.server.whoami_calls += 1
        if self.server.whoami_delay:
            time.sleep(self.server.whoami_delay)
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        assert self.server.whoami is not None
        user = self.server.whoami.get(token or "")
        if user is None:
            self._send_json(
                401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed.", "soft_logout": False}
            )
            return
        as_user = parse_qs(urlsplit(self.path).query).get("user_id")
        answer = {"user_id": as_user[0] if as_user else user, "device_id": "DEV", "is_guest": False}
        if self.server.whoami_trickle:
            self._trickle_json(answer, self.server.whoami_trickle)
            return
        self._send_json(200, answer)

    def _trickle_json(self, payload: object, seconds: float) -> None:
        """200 with its head at once, then the body a byte at a time over `seconds`."""
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        for i in range(len(body)):
            time.sleep(seconds / len(body))
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()

    def _send_bytes(self, n: int, chunked: bool = False, cut: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(n))
        self.send_header("X-Standin", self.server.name)
        self.end_headers()
        if self.command == "HEAD":
            return
        block = bytes(range(256)) * (CHUNK // 256)
        sent = 0
        while n > 0:
            part = block[: min(n, len(block))]
            if cut is not None and sent + len(part) > cut:
                part = part[: cut - sent]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked and part else part)
                self.wfile.flush()
                # Closed, as a killed process's connection is (a FIN after what was sent).
                self.connection.shutdown(socket.SHUT_RDWR)
                self.connection.close()
                self.close_connection = True
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            sent += len(part)
            n -= len(part)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle


def pattern_sha256(n: int) -> str:
    """The SHA-256 of a standin_bytes=N body."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * (CHUNK // 256)
    while n > 0:
        digest.update(block[: min(n, len(block))])
        n -= len(block)
    return digest.hexdigest()


LOGIN_ACCESS_TOKEN = "syt_YWxpY2U_standinAnswerSecret_0a1b2c"
LOGIN_REFRESH_TOKEN = "syr_YWxpY2U_standinRefreshSecret_3d4e5f"
LOGIN_COOKIE = "standinCookieSecret_6a7b8c"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--whoami", help="JSON file mapping access tokens to user ids")
    parser.add_argument("--whoami-delay", type=float, default=0.0, help="seconds each whoami answer takes")
    parser.add_argument(
        "--whoami-trickle", type=float, default=0.0, help="seconds over which whoami's body is sent, a byte at a time"
    )
    args = parser.parse_args()
    whoami = json.loads(Path(args.whoami).read_text()) if args.whoami else None
    server = StandinServer((args.host, args.port), args.name, whoami, args.whoami_delay, args.whoami_trickle)
    print(f"standin {args.name} listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
