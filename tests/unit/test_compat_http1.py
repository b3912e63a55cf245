"""compat/http1.py, the router's new uses of mitmproxy internals, run for what they do: the HTTP/1
server layer it substitutes (fed bytes as mitmproxy feeds them, commands read back) and its
installation into mitmproxy's HttpLayer. Each `test_mitmproxy_still_...` test runs mitmproxy's
own layer on the same input and fails when an upgrade changes the behaviour the substitute
exists for (then compat/http1.py may be smaller) or the internals it builds on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from mitmproxy import options
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.test import tflow
from synapse_router.compat import http1
from synapse_router.edge import clienterrors

HEAD = b"PUT /_matrix/client/v3/rooms/!r:x/send/m.room.message/t1 HTTP/1.1\r\nHost: m\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
GET = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: m\r\n\r\n"
SECRET = b"zq9secret"


def start(cls: type[Http1Server]) -> Http1Server:
    context = Context(tflow.tclient_conn(), options.Options())
    layer = cls(context)
    list(layer.handle_event(events.Start()))
    return layer


def feed(layer: Http1Server, data: bytes) -> list[commands.Command]:
    return list(layer.handle_event(events.DataReceived(layer.conn, data)))


def http_events(cmds: list[commands.Command]) -> list[Any]:
    return [c.event for c in cmds if isinstance(c, ReceiveHttp)]


def sent(cmds: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, commands.SendData))


# --- empty lines before the request line ---


@pytest.mark.parametrize("blank", [b"\r\n", b"\n", b"\r\n\n\r\n"])
def test_empty_lines_before_a_request_line_are_skipped(blank: bytes) -> None:
    layer = start(http1.RouterHttp1Server)
    found = http_events(feed(layer, blank + GET))
    assert [type(e) for e in found] == [RequestHeaders, RequestEndOfMessage]
    assert found[0].request.path == "/_matrix/client/versions"


def test_empty_line_left_after_a_body_does_not_hide_the_next_request() -> None:
    layer = start(http1.RouterHttp1Server)
    found = http_events(feed(layer, HEAD + b"Content-Length: 2\r\n\r\n{}\r\n" + GET))
    assert [type(e) for e in found] == [RequestHeaders, RequestData, RequestEndOfMessage]
    assert layer.state.__name__ == "wait"  # what connection_limits' _HeadGuard reads


def test_too_many_empty_lines_are_answered_400_and_closed() -> None:
    layer = start(http1.RouterHttp1Server)
    cmds = feed(layer, b"\r\n" * (http1.MAX_EMPTY_LINES + 2) + GET)
    assert sent(cmds).startswith(b"HTTP/1.1 400 ")
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)
    assert not http_events(cmds)


def test_mitmproxy_still_stops_at_an_empty_line_before_a_request_line() -> None:
    assert not http_events(feed(start(Http1Server), b"\r\n" + GET))


# --- the HTTP/2 preface ---


def test_http2_preface_is_answered_505() -> None:
    layer = start(http1.RouterHttp1Server)
    cmds = feed(layer, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert sent(cmds).startswith(b"HTTP/1.1 505 ")
    assert b'"errcode": "M_UNRECOGNIZED"' in sent(cmds)
    assert any(isinstance(c, commands.CloseConnection) for c in cmds) and not http_events(cmds)


def test_a_head_trickled_in_is_parsed_as_usual() -> None:
    layer = start(http1.RouterHttp1Server)
    found = []
    for i in range(len(GET)):
        found += http_events(feed(layer, GET[i : i + 1]))
    assert [type(e) for e in found] == [RequestHeaders, RequestEndOfMessage]


# --- malformed chunked bodies ---


@pytest.mark.parametrize("body", [b"0x5\r\n", b" 5\r\n", b"+5\r\n", b"-5\r\n", b"5\x00\r\n", b"1" * 25 + b"\r\n"])
def test_malformed_chunk_is_answered_400_and_reported_without_client_bytes(body: bytes) -> None:
    layer = start(http1.RouterHttp1Server)
    cmds = feed(layer, CHUNKED + body + SECRET + b"\r\n0\r\n\r\n")
    answer = sent(cmds)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer.lower()
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)
    error = [e for e in http_events(cmds) if isinstance(e, RequestProtocolError)]
    assert len(error) == 1 and clienterrors.parse(error[0].message) == clienterrors.ERRORS["bad_chunked_body"]
    assert SECRET.decode() not in error[0].message and body.strip().decode(errors="replace") not in error[0].message


def test_data_longer_than_its_chunk_size_is_answered_400() -> None:
    cmds = feed(start(http1.RouterHttp1Server), CHUNKED + b"5\r\n" + SECRET + b"\r\n0\r\n\r\n")
    assert sent(cmds).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("body", [b"5\nhello\n0\n\n", b"5;ext=1\n", b"\n"])
def test_a_chunk_line_ended_by_a_bare_lf_is_answered_400(body: bytes) -> None:
    cmds = feed(start(http1.RouterHttp1Server), CHUNKED + body)
    assert sent(cmds).startswith(b"HTTP/1.1 400 ")


def test_mitmproxy_still_waits_for_a_crlf_after_a_chunk_size() -> None:
    cmds = feed(start(Http1Server), CHUNKED + b"5\nhello\n0\n\n")
    assert not sent(cmds) and not any(isinstance(c, commands.CloseConnection) for c in cmds)


def test_a_chunk_line_that_never_ends_is_answered_400_once_over_the_limit() -> None:
    layer = start(http1.RouterHttp1Server)
    assert not sent(feed(layer, CHUNKED + b"5;" + b"x" * 1000))
    fed = 1000
    while not (answer := sent(feed(layer, b"x" * 1000))):
        fed += 1000
        assert fed <= http1.MAX_CHUNK_LINE + 1000, "still buffering past the limit"
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert not layer.buf  # dropped


def test_lines_split_across_reads_are_read_as_usual() -> None:
    layer = start(http1.RouterHttp1Server)
    raw = CHUNKED + b"5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nX-T: 1\nX-U: 2\r\n\r\n"
    found = []
    for i in range(len(raw)):
        cmds = feed(layer, raw[i : i + 1])
        assert not sent(cmds), raw[: i + 1]
        found += http_events(cmds)
    assert b"".join(e.data for e in found if isinstance(e, RequestData)) == b"hello world"
    assert isinstance(found[-1], RequestEndOfMessage)


def test_a_client_leaving_mid_body_is_not_answered() -> None:
    layer = start(http1.RouterHttp1Server)
    feed(layer, CHUNKED + b"5\r\nhel")
    cmds = list(layer.handle_event(events.ConnectionClosed(layer.conn)))
    assert not sent(cmds)
    error = [e for e in http_events(cmds) if isinstance(e, RequestProtocolError)]
    assert error and clienterrors.parse(error[0].message) is None


def test_mitmproxy_still_closes_on_a_malformed_chunk_without_an_answer() -> None:
    cmds = feed(start(Http1Server), CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n")
    assert any(isinstance(c, commands.CloseConnection) for c in cmds) and not sent(cmds)
    assert any(isinstance(e, RequestProtocolError) for e in http_events(cmds))


# --- trailers ---


def test_trailer_fields_are_dropped() -> None:
    layer = start(http1.RouterHttp1Server)
    cmds = feed(layer, CHUNKED + b"5\r\nhello\r\n0\r\nX-Trailer: " + SECRET + b"\r\n\r\n")
    found = http_events(cmds)
    assert [type(e) for e in found] == [RequestHeaders, RequestData, RequestEndOfMessage]
    assert found[1].data == b"hello" and not sent(cmds)


def test_mitmproxy_still_fails_on_request_trailers() -> None:
    with pytest.raises(NotImplementedError):
        feed(start(Http1Server), CHUNKED + b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")


# --- installation ---


def test_install_makes_http_layer_build_the_router_server_layer() -> None:
    original = http_layers.Http1Server
    try:
        watch = http1.BodyWatch(5.0)
        http1.install()
        http1.install(watch)  # installing again replaces the watch
        installed = http1.installed()
        assert installed is not None and installed.body_watch is watch
        context = Context(tflow.tclient_conn(), options.Options())
        context.layers = []
        layer = HttpLayer(context, HTTPMode.transparent)
        context.layers.append(layer)
        list(layer.handle_event(events.Start()))
        built = layer.connections[context.client]
        assert type(built) is installed and isinstance(built, http1.RouterHttp1Server)
        assert built.body_watch is watch
    finally:
        http_layers.Http1Server = original  # type: ignore[misc]
    # restored to what it was (an earlier test's ConnectionLimits may have installed its own)
    assert http_layers.Http1Server is original


def test_each_connection_limits_instance_owns_its_body_watch() -> None:
    """The body timeout is the ConnectionLimits instance's state, not the module's: two
    instances (two routers in one process, a test's) each hold their own."""
    from synapse_router.addons.connection_limits import ConnectionLimits
    from synapse_router.edge.limits import LimitsConfig

    first, second = ConnectionLimits(None, LimitsConfig(body_timeout=5)), ConnectionLimits(None)
    first.use(LimitsConfig(body_timeout=7))
    assert first.body_watch.timeout == 7 and second.body_watch.timeout == 60
    assert first.body_watch.on_timeout == first.body_timed_out
    assert not hasattr(http1, "BODY_WATCH")


# --- the body watch (limits.body_timeout) ---


class Watched(http1.RouterHttp1Server):
    """The layer as `install(watch)` makes it, with a watch of 1 s that notes the stalls."""

    stalled: list[str] = []
    body_watch = http1.BodyWatch(1.0, stalled.append)


@pytest.fixture
def watch() -> Any:
    Watched.stalled.clear()
    yield Watched.stalled


async def test_a_stalled_body_is_reported_once_its_timeout_passed(watch: list[str]) -> None:
    layer = start(Watched)
    feed(layer, HEAD + b"Content-Length: 10\r\n\r\n{")
    assert watch == [] and layer._body_timer is not None
    await asyncio.sleep(1.5)
    assert watch == [layer.conn.id]


async def test_a_body_that_keeps_coming_is_not_reported(watch: list[str]) -> None:
    layer = start(Watched)
    feed(layer, HEAD + b"Content-Length: 12\r\n\r\n")
    for byte in b"{}          ":  # 12 bytes, 0.15 s apart: 1.8 s in all, over the timeout
        await asyncio.sleep(0.15)
        feed(layer, bytes([byte]))
    assert layer.state.__name__ == "wait" and layer._body_timer is None
    assert watch == []


async def test_a_request_without_a_body_sets_no_timer(watch: list[str]) -> None:
    layer = start(Watched)
    feed(layer, GET)
    assert layer._body_timer is None


# --- a worker head mitmproxy's HttpLayer refused ---


def _refused_head(cls: type[Http1Server]) -> list[commands.Command]:
    layer = start(cls)
    layer.conn.state = ConnectionState.OPEN
    (headers, end) = http_events(feed(layer, GET))
    assert isinstance(headers, RequestHeaders) and isinstance(end, RequestEndOfMessage)
    error = ResponseProtocolError(
        headers.stream_id,
        "Received message with both transfer-encoding and content-length",
        ErrorCode.RESPONSE_VALIDATION_FAILED,
    )
    return list(layer.send(error))


def test_a_refused_worker_head_is_answered_with_a_matrix_502() -> None:
    cmds = _refused_head(http1.RouterHttp1Server)
    answer = sent(cmds)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"application/json" in head
    assert json.loads(body) == {"errcode": "M_UNKNOWN", "error": "The server gave an invalid response."}
    assert isinstance(cmds[-1], commands.CloseConnection)


def test_mitmproxy_still_answers_a_refused_worker_head_with_its_html_page() -> None:
    answer = sent(_refused_head(Http1Server))
    assert answer.startswith(b"HTTP/1.1 502 ") and b"text/html" in answer


def test_other_response_errors_are_mitmproxys_as_before() -> None:
    layer = start(http1.RouterHttp1Server)
    layer.conn.state = ConnectionState.OPEN
    (headers, _) = http_events(feed(layer, GET))
    cmds = list(layer.send(ResponseProtocolError(headers.stream_id, "killed", ErrorCode.KILL)))
    assert sent(cmds) == b"" and isinstance(cmds[-1], commands.CloseConnection)
