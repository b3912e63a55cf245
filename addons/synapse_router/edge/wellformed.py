"""Whether a client's request is fit to be passed on, byte for byte, to a Synapse process.

mitmproxy's HTTP/1 parser frames requests but lets through bytes that other parsers read
differently (a bare CR or a NUL in a header value, raw control bytes in the target), and
accepts absolute-form targets (`GET http://10.0.0.5:8083/...`), whose authority would then be
rewritten to an internal worker address. The router refuses all of these itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# RFC 9110: a field name is a token; a field value is visible characters, obs-text, spaces
# and tabs, never another control character (CR, LF, NUL above all).
TOKEN_PATTERN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # an RFC 9110 token: methods, field names, auth schemes
TOKEN = re.compile(TOKEN_PATTERN)
# The same rules as byte sets, for `bytes.translate(None, allowed)`: what it leaves of a name or
# value is what breaks the rule. One translate over all fields joined costs a third of a regex
# call per field (docs/benchmarks.md); the hypothesis tests hold both to the regexes.
_NAME_BYTES = bytes(b for b in range(256) if TOKEN.fullmatch(chr(b)))
_VALUE_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))  # no control byte but tab
_VERSIONS = frozenset({"HTTP/1.1", "HTTP/1.0"})  # the router serves HTTP/1 only (http2=false)
_TARGET = re.compile(r"/[\x21-\x7e]*|\*")  # origin-form (or OPTIONS *), visible ASCII only


class Refused(ValueError):
    """A request the router answers itself with this Matrix error instead of passing it on."""

    def __init__(self, status: int, errcode: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.close = close  # answer with `Connection: close`: the body's framing is not trusted


def check_request(
    method: str, authority: str, target: str, fields: Sequence[tuple[bytes, bytes]], version: str = "HTTP/1.1"
) -> bytes:
    """Raise Refused unless the request line and headers are safe to forward as they are.
    Returns the field names, lower-cased, each between newlines (for check_message)."""
    if version not in _VERSIONS:
        raise Refused(505, "M_UNRECOGNIZED", "HTTP version not supported.")
    if TOKEN.fullmatch(method) is None:
        raise Refused(400, "M_UNRECOGNIZED", "Invalid request method.")
    if authority:
        raise Refused(400, "M_UNRECOGNIZED", "Absolute-form request targets are not accepted; send the path only.")
    if _TARGET.fullmatch(target) is None:
        raise Refused(400, "M_UNRECOGNIZED", "Invalid request target.")
    joined = _joined(fields)
    if joined is None:
        raise Refused(400, "M_INVALID_PARAM", "Invalid header field.")
    names = joined[0].lower()
    if names.split(b"\n").count(b"host") > 1:
        # RFC 9112 3.2: a server must refuse it; proxies would pick different ones
        raise Refused(400, "M_INVALID_PARAM", "More than one Host header.")
    return b"\n" + names + b"\n"


# Methods no Synapse servlet serves and that a proxy must not pass on: TRACE (and Microsoft's
# TRACK) would echo the request, credentials included, back to a script (cross-site tracing).
_REFUSED_METHODS = frozenset({"TRACE", "TRACK"})


def check_message(method: str, fields: Sequence[tuple[bytes, bytes]], version: str, names: bytes | None = None) -> None:
    """Raise Refused for a request whose line and fields are well-formed (check_request passed)
    but that is not answered the way a client meant it if it is passed on, as nginx refuses it:
    TRACE (405), a Transfer-Encoding other than exactly `chunked` (501: it would be forwarded
    as it came, and a worker would read its body differently), an HTTP/1.1 request without
    Host (400, RFC 9112 3.2; an HTTP/1.0 one is legal and passed on)."""
    if method.upper() in _REFUSED_METHODS:
        raise Refused(405, "M_UNRECOGNIZED", "Unrecognized request")
    # The names joined and lower-cased once (by check_request): two searches in C.
    if names is None:
        names = b"\n" + b"\n".join([name for name, _ in fields]).lower() + b"\n"
    if b"\ntransfer-encoding\n" in names:
        for name, value in fields:
            if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                raise Refused(501, "M_UNRECOGNIZED", "Only the chunked transfer coding is supported.", close=True)
    if version == "HTTP/1.1" and b"\nhost\n" not in names:
        raise Refused(400, "M_UNRECOGNIZED", "An HTTP/1.1 request must carry a Host header.")


def _joined(fields: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """The names and the values, each joined by newlines (a byte no valid name or value has),
    if every name is a token and no value has a control byte but tab; else None."""
    names = [name for name, _ in fields]
    values = b"\n".join([value for _, value in fields])
    separators = b"\n" * (len(names) - 1)
    joined = b"\n".join(names)
    if not all(names) or joined.translate(None, _NAME_BYTES) != separators:
        return None
    if values.translate(None, _VALUE_BYTES) != separators:
        return None
    return joined, values


def head_relayable(reason: bytes, fields: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a worker's response head may go to a client as it is: check_request's rules for
    its fields, and no control byte but tab in its reason phrase (a bare CR there or in a value
    is a line break to some clients)."""
    return _joined(fields) is not None and not reason.translate(None, _VALUE_BYTES)


def head_bytes(reason: bytes, fields: Sequence[tuple[bytes, bytes]]) -> int:
    """The size of a response head as written: status line, each `name: value` line, the
    empty line (what a worker sent, give or take the whitespace a parser dropped)."""
    return len(b"HTTP/1.1 200 \r\n\r\n") + len(reason) + sum(len(name) + len(value) + 4 for name, value in fields)


def transfer_chunked(value: str) -> bool:
    """Whether a response's Transfer-Encoding is exactly `chunked` (any case, spaces around it):
    anything else (`gzip`, `gzip, chunked`) would reach the client still encoded or be read
    until the worker closes; nginx answers such a worker 502 ("upstream sent unknown
    Transfer-Encoding"), as the router-sent path does."""
    return value.strip().lower() == "chunked"


# What the router's own HTTP client writes (upstream_client.py): h11's rules for a field sent
# (a name is a token; a value is visible characters and obs-text, with runs of spaces and tabs
# only between them: no leading or trailing whitespace), and no other control byte either, as
# check_request. h11 is then told not to check the fields again.
def fields_writable(fields: list[tuple[bytes, bytes]]) -> bool:
    """Whether every header field may be written as it is: everything h11 refuses to send is
    refused here, and control bytes h11 would let through too."""
    joined = _joined(fields)
    if joined is None:
        return False
    framed = b"\n" + joined[1] + b"\n"  # whitespace at either end of a value touches a newline
    return not (b"\n " in framed or b" \n" in framed or b"\n\t" in framed or b"\t\n" in framed)
