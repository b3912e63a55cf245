"""The pieces of h11 (0.16, the version mitmproxy 12.3 pins) the router's upstream client
(edge/upstream_client.py) uses without h11's connection state machine, as mitmproxy's own
HTTP/1 layer does; each run by tests/unit/test_compat_h11parts.py against the installed h11:

 - `_receivebuffer.ReceiveBuffer`: bytes in, `maybe_extract_lines()` for a head;
 - `_readers.ChunkedReader`, `ContentLengthReader(n)`, `Http10Reader`: called with the buffer,
   each returns h11.Data, h11.EndOfMessage or None (more bytes needed); `read_eof()` at close;
 - `_writers.write_request(request, write)` writes a request head;
 - `h11.Request(..., _parsed=True)` skips h11's per-field regexes (the router validates the
   fields itself, with the same rules and more) and keeps every other check.
"""

from __future__ import annotations

import h11
from h11._readers import ChunkedReader, ContentLengthReader, Http10Reader
from h11._receivebuffer import ReceiveBuffer
from h11._writers import write_request

__all__ = ["BodyReader", "ChunkedReader", "ContentLengthReader", "Http10Reader", "ReceiveBuffer", "request_head"]

BodyReader = ChunkedReader | ContentLengthReader | Http10Reader


def request_head(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A request head as h11 writes it, the fields taken as already validated; raises
    h11.LocalProtocolError for what h11 still checks (method, target, Host, Content-Length and
    Transfer-Encoding)."""
    request = h11.Request(method=method, target=target, headers=fields, _parsed=True)
    parts: list[bytes] = []
    write_request(request, parts.append)
    return b"".join(parts)
