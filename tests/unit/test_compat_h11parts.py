"""compat/h11parts.py run against the installed h11 (0.16, mitmproxy 12.3's pin): the receive
buffer gives a head's lines, each body reader gives Data then EndOfMessage (None while more is
needed), and `request_head` writes a head without h11's per-field regexes but with its other
checks."""

from __future__ import annotations

import h11
import pytest
from synapse_router.compat.h11parts import ChunkedReader, ContentLengthReader, Http10Reader, ReceiveBuffer, request_head


def test_the_receive_buffer_gives_a_head_once_complete() -> None:
    buffer = ReceiveBuffer()
    buffer += b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    assert buffer.maybe_extract_lines() is None  # no blank line yet
    buffer += b"\r\n{}"
    assert buffer.maybe_extract_lines() == [b"HTTP/1.1 200 OK", b"Content-Length: 2"]
    assert bytes(buffer) == b"{}"


def read_all(reader: ChunkedReader | ContentLengthReader | Http10Reader, data: bytes) -> list[object]:
    buffer = ReceiveBuffer()
    buffer += data
    events: list[object] = []
    while (event := reader(buffer)) is not None:
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


def test_the_body_readers() -> None:
    chunked = read_all(ChunkedReader(), b"2\r\n{}\r\n0\r\n\r\n")
    assert [type(e) for e in chunked] == [h11.Data, h11.EndOfMessage]
    assert bytes(chunked[0].data) == b"{}"  # type: ignore[attr-defined]
    partial = read_all(ChunkedReader(), b"2\r\n{")  # the rest needed: then None
    assert len(partial) == 1 and bytes(partial[0].data) == b"{"  # type: ignore[attr-defined]
    sized = read_all(ContentLengthReader(2), b"{}")
    assert [type(e) for e in sized] == [h11.Data, h11.EndOfMessage]
    with pytest.raises(h11.RemoteProtocolError):
        ContentLengthReader(5).read_eof()  # closed before the whole body
    until_close = Http10Reader()
    assert [type(e) for e in read_all(until_close, b"abc")] == [h11.Data]
    assert isinstance(until_close.read_eof(), h11.EndOfMessage)
    with pytest.raises(h11.ProtocolError):  # what the upstream client catches
        read_all(ChunkedReader(), b"zz\r\n")  # not a chunk size


def test_request_head_skips_the_field_regexes_and_keeps_the_other_checks() -> None:
    fields = [(b"Host", b"w:8008"), (b"X-Padded", b" v")]
    with pytest.raises(h11.LocalProtocolError):  # h11's own field rules (the router applies its own)
        h11.Request(method=b"GET", target=b"/x", headers=fields)
    assert request_head(b"GET", b"/x", fields) == b"GET /x HTTP/1.1\r\nHost: w:8008\r\nX-Padded:  v\r\n\r\n"
    with pytest.raises(h11.LocalProtocolError):
        request_head(b"GET", b"/x", [(b"X", b"y")])  # no Host: still checked
    with pytest.raises(h11.LocalProtocolError):
        request_head(b"GET", b"/x", [(b"Host", b"w"), (b"Content-Length", b"1"), (b"Content-Length", b"2")])
