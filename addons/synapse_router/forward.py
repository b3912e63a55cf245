"""The router's own upstream request, for requests it can retry on another worker.

mitmproxy answers a client 502 as soon as an upstream connection closes before the response,
and offers no hook to retry. For idempotent, bodiless requests (sync long-polls above all)
the addon sends the request itself: if the worker refuses the connection, times out
connecting, or fails before its whole response arrived, the request goes to the next worker.
Bytes pass untouched both ways: no Accept-Encoding is added, nothing is decoded.

This is a minimal HTTP/1.1 client on asyncio streams with keep-alive connections per worker,
not httpx: on this path httpx cost 1.1-2.4 ms of CPU per request, several times what
mitmproxy spends on a whole proxied request (docs/benchmarks.md). It sends exactly one kind of
request (no body, headers as given) and reads responses delimited by Content-Length, chunked
encoding or the connection's end.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .config import Upstream

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_HEAD = 64 * 1024  # bytes of status line and headers; more is not an HTTP response we relay
MAX_IDLE_PER_WORKER = 256


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    headers_at: float  # when the response headers arrived (epoch seconds)


class Failure(StrEnum):
    CONNECT_ERROR = "connect_error"  # refused, unreachable: the worker is not listening
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within the connect timeout
    NO_RESPONSE = "no_response"  # connected, but the whole response never arrived


class NoResponse(Exception):
    """The worker gave no (complete) response; `failure` says at which step."""

    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure


class BadResponse(Exception):
    """The worker answered something that is not an HTTP/1.x response."""


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


type Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class UpstreamClient:
    """Keep-alive HTTP/1.1 connections to workers, and the requests sent on them."""

    def __init__(self) -> None:
        self._idle: dict[str, list[Connection]] = {}
        self._busy: dict[str, set[asyncio.StreamWriter]] = {}
        self._aborts: dict[str, int] = {}  # per worker, how many times `abort` was called
        self._pooled: frozenset[str] | None = None  # workers whose connections are kept; None: all
        self._tls: ssl.SSLContext | None = None

    async def send(
        self, upstream: Upstream, method: str, path: str, headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> UpstreamResponse:
        """Send a bodiless request to a worker and read its whole response; raise NoResponse
        if there is none (also when `abort` closed the connection meanwhile)."""
        url = upstream.url
        head = _request_head(upstream, method, path, headers)
        aborts = self._aborts.get(url, 0)
        connection = self._checkout(url)
        if connection is not None:
            try:
                return await self._exchange(url, connection, head, method, aborts)
            except NoResponse:
                if self._aborts.get(url, 0) != aborts:
                    raise
                # The worker may have closed an idle connection as we reused it: once more, fresh.
        connection = await self._connect(upstream, connect_timeout)
        return await self._exchange(url, connection, head, method, aborts)

    def abort(self, url: str) -> int:
        """Close every connection to a worker found dead, so the requests waiting on it give
        up at once (each raises NoResponse); returns how many were in flight."""
        self._aborts[url] = self._aborts.get(url, 0) + 1
        for _, writer in self._idle.pop(url, []):
            writer.transport.abort()
        busy = self._busy.pop(url, set())
        for writer in busy:
            writer.transport.abort()
        return len(busy)

    def keep_only(self, urls: Iterable[str]) -> None:
        """Pool connections only to these workers (the configured ones) from now on: idle
        connections to others are closed, and requests in flight to them keep none."""
        self._pooled = frozenset(urls)
        for url in set(self._idle) - self._pooled:
            for _, writer in self._idle.pop(url):
                writer.transport.abort()

    def close(self) -> None:
        for url in list(self._idle) + list(self._busy):
            self.abort(url)

    def idle_connections(self, url: str) -> int:
        return len(self._idle.get(url, ()))

    def _checkout(self, url: str) -> Connection | None:
        idle = self._idle.get(url)
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.transport.is_closing():
                return reader, writer
            writer.transport.abort()
        return None

    async def _connect(self, upstream: Upstream, timeout: float) -> Connection:
        tls = self._tls_context() if upstream.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port, ssl=tls, limit=MAX_HEAD)
        except TimeoutError:
            raise NoResponse(Failure.CONNECT_TIMEOUT, f"no connection within {timeout:g}s") from None
        except (OSError, ssl.SSLError) as e:
            raise NoResponse(Failure.CONNECT_ERROR, e.strerror or str(e) or type(e).__name__) from e
        return reader, writer

    async def _exchange(
        self, url: str, connection: Connection, head: bytes, method: str, aborts: int
    ) -> UpstreamResponse:
        """Send `head` on the connection and read the response, unless the worker was found
        dead since the request began (`aborts` changed)."""
        reader, writer = connection
        if self._aborts.get(url, 0) != aborts:
            writer.transport.abort()
            raise NoResponse(Failure.NO_RESPONSE, "worker found dead while connecting")
        busy = self._busy.setdefault(url, set())
        busy.add(writer)
        try:
            writer.write(head)
            response, reusable = await _read_response(reader, method)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, BadResponse) as e:
            writer.transport.abort()
            raise NoResponse(Failure.NO_RESPONSE, _describe(e)) from e
        except BaseException:  # cancelled: the connection is mid-response, useless to anyone
            writer.transport.abort()
            raise
        finally:
            busy.discard(writer)
        if reusable and self._aborts.get(url, 0) == aborts and (self._pooled is None or url in self._pooled):
            idle = self._idle.setdefault(url, [])
            if len(idle) < MAX_IDLE_PER_WORKER:
                idle.append(connection)
                return response
        writer.transport.abort()
        return response

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _request_head(upstream: Upstream, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\n".encode()]
    has_host = False
    for name, value in headers:
        if name.lower() == b"host":
            has_host = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if not has_host:
        default_port = 443 if upstream.scheme == "https" else 80
        host = upstream.url.partition("://")[2] if upstream.port != default_port else upstream.host
        lines.append(f"Host: {host}\r\n".encode())
    lines.append(b"\r\n")
    return b"".join(lines)


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[UpstreamResponse, bool]:
    """One response, informational (1xx) ones skipped; and whether the connection may be reused."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        headers_at = time.time()
        status_line, _, header_block = head[:-4].partition(b"\r\n")
        version, status, reason = _parse_status_line(status_line)
        headers = _parse_headers(header_block)
        if not 100 <= status < 200:
            break
    connection_options = {t.strip().lower() for v in _values(headers, b"connection") for t in v.split(b",")}
    reusable = version == b"HTTP/1.1" and b"close" not in connection_options
    out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    if method == "HEAD" or status in (204, 304):
        return UpstreamResponse(status, reason, out, b"", headers_at), reusable
    encoding = b",".join(_values(headers, b"transfer-encoding")).strip().lower()
    if encoding:
        if encoding != b"chunked":
            raise BadResponse(f"unsupported Transfer-Encoding {encoding.decode(errors='replace')!r}")
        body = await _read_chunked(reader)
    else:
        lengths = set(_values(headers, b"content-length"))
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            raise BadResponse("invalid Content-Length")
        if lengths:
            body = await reader.readexactly(int(next(iter(lengths))))
        else:  # delimited by the connection's end
            body = await reader.read()
            reusable = False
    if not _values(out, b"content-length"):
        out.append((b"content-length", str(len(body)).encode()))
    return UpstreamResponse(status, reason, out, body, headers_at), reusable


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def _parse_status_line(line: bytes) -> tuple[bytes, int, bytes]:
    version, _, rest = line.partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(status) != 3 or not status.isdigit():
        raise BadResponse("not an HTTP/1.x status line")
    return version, int(status), reason


def _parse_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in block.split(b"\r\n") if block else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadResponse("malformed header line")
        headers.append((name, value.strip()))
    return headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line[:-2].partition(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadResponse("invalid chunk size") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, dropped
                pass
            return b"".join(chunks)
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise BadResponse("chunk not followed by CRLF")
        chunks.append(chunk[:-2])


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.IncompleteReadError):
        return "connection closed before the whole response"
    if isinstance(error, asyncio.LimitOverrunError):
        return f"response head over {MAX_HEAD} bytes"
    return str(error) or type(error).__name__
