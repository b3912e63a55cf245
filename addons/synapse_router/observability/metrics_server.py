"""The metrics endpoint: a small asyncio HTTP server for `/metrics`, `/health` and `/ready`,
bounded in connections, request size and time (it is reachable by anyone who can reach its port)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import sys
from collections.abc import Awaitable, Callable

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..compat.listening import close_listener, serve_accepted
from ..edge.port_sharing import shared_with_another
from ..edge.wellformed import TOKEN
from ..routing.upstream import parse_listen

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/health"  # liveness for an orchestrator (container HEALTHCHECK, liveness probes)
READY_PATH = "/ready"  # readiness: 503 from the moment a stop begins, and while main is unreachable
_PLAIN = "text/plain; charset=utf-8"
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
STREAM_LIMIT = 16 * 1024  # the longest request line or header line read
STOP_GRACE = 1.0  # seconds a request being served at stop gets to be answered (a probe takes ms)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# Why the router should get no new traffic (None: it should): what `/ready` asks.
Readiness = Callable[[], str | None | Awaitable[str | None]]


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class MetricsServer:
    """Serves `GET /metrics` on its own address, one request per connection: what `render`
    returns (RouterMetrics.render, or a coroutine function, e.g. the aggregate of processes).

    Minimal HTTP/1.1: `GET` or `HEAD /metrics` (a query string is ignored) answers 200 with the
    exposition, and `/health` 200 `OK` without rendering anything, as Synapse's `/health` does
    (for an orchestrator's probes: this server runs on the router's event loop, or with
    `--processes` on the parent's, and starts once the proxy listens, so an answer means the
    router is up), and `/ready` 200 `OK` or 503 with the reason `ready()` gives (a stop has
    begun, main is unreachable: a load balancer should send elsewhere); another method 405;
    any other path 404; an unparseable request 400
    (414 or 431 when too long). Every response closes its connection. A client has
    `read_timeout` seconds to send its request head and as long again to take the response;
    at most `max_connections` are open at once (more are closed at once). Rendering runs on
    the event loop (about 10 ms per thousand series, once per scrape).

    On Linux the port is bound with SO_REUSEPORT, as the proxy's: in a rolling restart the new
    router serves its metrics and `/health` beside the old one while that one drains, instead of
    failing to bind and staying without them once the old one has gone.
    """

    def __init__(
        self,
        render: Callable[[], bytes | Awaitable[bytes]],
        listen: str,
        *,
        read_timeout: float = 10.0,
        max_connections: int = 64,
        max_header_lines: int = 100,
        ready: Readiness | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.listen = listen
        self.ready = ready
        # `sock`: a listening Unix socket to serve instead of `listen` (a --processes child's
        # private channel to its parent, launcher/channels.py; `listen` then only names it)
        self._sock = sock
        self.host, self._configured_port = parse_listen(listen) if sock is None else ("", 0)
        self.render = render
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_header_lines = max_header_lines
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[object]] = set()  # the requests being served

    @property
    def port(self) -> int:
        """The bound port (the first socket's, if the host name resolved to several addresses)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def bound(self) -> str:
        """The address it serves: `listen` with the bound port (an ephemeral port's number; in a
        `--processes` child, the port its event loop moved it to: launcher/childprocess.py)."""
        return f"{self.listen.rpartition(':')[0]}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def shares_its_port(self) -> bool:
        """Whether another socket (a router replacing this one) listens on this address too."""
        return self._server is not None and shared_with_another(self._server.sockets)

    async def start(self) -> None:
        if self._server is not None:
            return
        if self._sock is not None:
            self._server = await asyncio.start_unix_server(self._handle, sock=self._sock, limit=STREAM_LIMIT)
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self._configured_port, limit=STREAM_LIMIT, reuse_port=REUSE_PORT
        )

    async def stop(self) -> None:
        """Stop listening. The probes already connected are still answered: those accepted or
        waiting in the listening sockets' queues (compat.listening.close_listener), and the
        requests being read or answered get up to STOP_GRACE seconds before their connections
        are closed."""
        server, self._server = self._server, None
        if server is None:
            return
        for conn in await close_listener(server):
            queued = serve_accepted(self._handle, conn, STREAM_LIMIT)
            self._handlers.add(asyncio.create_task(queued, name="metrics probe queued at stop"))
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=STOP_GRACE)
        for writer in list(self._writers):
            writer.close()  # the handler sees EOF and finishes
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    method, path = await self._read_head(reader)
            except _BadRequest as e:
                status, body, head_only, extra = e.status, b"", False, b""
            except (TimeoutError, EOFError):
                return  # a silent or vanished client gets no answer
            else:
                status, body, head_only, extra = await self._respond(method, path)
            ctype = CONTENT_TYPE if status == 200 and path == METRICS_PATH else _PLAIN
            async with asyncio.timeout(self.read_timeout):  # a client that does not read is let go
                await self._send(writer, status, body, head_only=head_only, ctype=ctype, extra=extra)
        except OSError:  # includes ConnectionError and TimeoutError
            pass
        except Exception:
            log.warning("metrics server: unexpected error serving a request", exc_info=True)
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _respond(self, method: str, path: str) -> tuple[int, bytes, bool, bytes]:
        """(status, body, head only, extra header lines) for a well-formed request."""
        if path not in (METRICS_PATH, HEALTH_PATH, READY_PATH):
            return 404, b"not found\n", method == "HEAD", b""
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", False, b"Allow: GET, HEAD\r\n"
        if path == HEALTH_PATH:
            return 200, b"OK\n", method == "HEAD", b""
        if path == READY_PATH:
            reason = await self._not_ready()
            if reason is not None:
                return 503, f"not ready: {reason}\n".encode(), method == "HEAD", b""
            return 200, b"OK\n", method == "HEAD", b""
        try:
            rendered = self.render()
            body = await rendered if inspect.isawaitable(rendered) else rendered
        except Exception:
            log.warning("metrics server: rendering the metrics failed", exc_info=True)
            return 500, b"internal server error\n", method == "HEAD", b""
        return 200, body, method == "HEAD", b""

    async def _not_ready(self) -> str | None:
        if self.ready is None:
            return None
        try:
            answer = self.ready()
            return await answer if inspect.isawaitable(answer) else answer
        except Exception:
            log.warning("metrics server: the readiness check failed", exc_info=True)
            return "readiness unknown"

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """Read the request line and headers; return (method, path without query)."""
        line = await self._readline(reader, too_long=414)
        if not line:
            raise EOFError
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400)
        method, target = parts[0], parts[1]
        if not target.startswith("/"):
            raise _BadRequest(400)
        for _ in range(self.max_header_lines):
            header = await self._readline(reader, too_long=431)
            if not header:
                raise EOFError
            if header in (b"\r\n", b"\n"):
                return method, target.split("?", 1)[0]
        raise _BadRequest(431)

    @staticmethod
    async def _readline(reader: asyncio.StreamReader, too_long: int) -> bytes:
        try:
            line = await reader.readline()
        except ValueError:  # longer than the stream's limit
            raise _BadRequest(too_long) from None
        if line and not line.endswith(b"\n"):
            raise EOFError  # the connection ended mid-line
        return line

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        head_only: bool,
        ctype: str,
        extra: bytes,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode("ascii")
        writer.write(head + extra + b"\r\n" + (b"" if head_only else body))
        await writer.drain()
