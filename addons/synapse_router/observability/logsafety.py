"""What may be printed about a client: an allow-list, not a scrub-by-pattern.

mitmproxy's proxy layers quote what a client sent in their log lines and flow errors
(`Bad HTTP request line: b'GET /...?access_token=...'`, `HTTP/1 protocol error: illegal chunk
header: bytearray(b'{"password": ...')`). `safe_message` lets a message through only when it is
known to hold no client byte: one of mitmproxy's fixed messages, or one of its templates whose
variable parts are the router's own (an upstream address). A message that starts with a known
description keeps the description and loses the rest; anything else is replaced by a fixed
text. The next mitmproxy release's new message is therefore withheld, not printed.

Bodies and headers: `shown_body` gives what may be shown of a JSON body (the secret fields of
Matrix bodies replaced), and withholds any body that is not JSON.
"""

from __future__ import annotations

import json
import re
import traceback
from types import TracebackType

WITHHELD = "a message of mitmproxy's proxy layer, withheld: it may quote the client's bytes"
DETAILS_WITHHELD = "[the rest is withheld: it may quote the peer's bytes]"
REDACTED = "<redacted>"

# mitmproxy's (12.3) fixed messages: no variable part at all.
_EXACT = frozenset(
    {
        "client connect",
        "client disconnect",
        "client kill connection",
        "closing transports...",
        "transports closed!",
        "Client disconnected.",
        "Connection killed.",
        "Server disconnected.",
        "mitmproxy has crashed!",
        "HTTP trailers are not implemented yet.",
        "Sent HTTP 101 response, but no protocol is enabled to upgrade to.",
        "Request body exceeds mitmproxy's body_size_limit.",
        "Response body exceeds mitmproxy's body_size_limit.",
    }
)

# Templates whose variable part is an address or an OS error text, never a client's byte.
_ADDRESS = r"[A-Za-z0-9.:\[\]-]{1,300}"
_SAFE = tuple(
    re.compile(p)
    for p in (
        rf"server (?:dis)?connect {_ADDRESS}",
        rf"Streaming (?:request to|response from) {_ADDRESS}\.",
        r"error establishing server connection: [A-Za-z0-9 .:,()\[\]/_-]{0,300}",
    )
)

# Descriptions that begin mitmproxy's and h11's messages about a malformed message; what
# follows them (the bytes, a repr, a connection's repr) is withheld.
_DESCRIPTIONS = (
    "Bad HTTP request line",
    "Bad HTTP response line",
    "Invalid headers",
    "Invalid header line",
    "Unknown HTTP version",
    "invalid content-length header",
    "invalid transfer-encoding header",
    "unknown transfer-encoding header",
    "invalid header name",
    "multiple transfer-encoding headers",
    "multiple content-length headers",
    "message with both transfer-encoding and content-length headers",
    "unexpected HTTP transfer-encoding",
    "Client closed connection before completing request headers",
    "Client closed connection before completing SOCKS5 handshake",
    "Unexpected data from server",
    "Closing connection due to inactivity",
    "half-closing",
    "connection handler has crashed",
    "Client TLS handshake failed",
    "Server TLS handshake failed",
    "TLS Error",
    "Addon error",
    "Contentview",
    "Deferring layer decision, not enough data",
    # h11's ProtocolError texts, behind "HTTP/1 protocol error: "
    "illegal chunk header",
    "illegal chunk length",
    "malformed chunk footer",
    "peer closed connection without sending complete message body",
    "peer unexpectedly closed connection",
    "Can't receive data when peer state is ERROR",
    "Receive buffer too long",
    "illegal request line",
    "illegal status line",
    "illegal header line",
    "continuation line at start of headers",
)
# Known lead-ins whose continuation is judged again.
_NESTED = ("HTTP/1 protocol error: ", "Received ")
# human.format_address: "127.0.0.1:5555" or "[::1]:5555", as the HTTP/1 layer prefixes a head
# it could not parse.
_PEER = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}:\d{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:\d{1,5}): ")


def safe_message(message: str) -> str:
    """`message` if it is known to hold no byte a client sent; else what of it is known safe
    (a description, a peer address) followed by a fixed text, or a fixed text alone."""
    if message in _EXACT or any(p.fullmatch(message) for p in _SAFE):
        return message
    if peer := _PEER.match(message):
        return peer.group(0) + safe_message(message[peer.end() :])
    for lead in _NESTED:
        if message.startswith(lead):
            return lead + safe_message(message[len(lead) :])
    for description in _DESCRIPTIONS:
        if message.startswith(description):
            rest = message[len(description) :]
            return description if not rest.strip(" .") else f"{description} {DETAILS_WITHHELD}"
    return WITHHELD


def traceback_without_message(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None],
) -> str:
    """The traceback's frames (code locations, no values) and the exception's type, not its
    message: an exception's text may quote what a client sent."""
    kind, _, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{kind.__module__}.{kind.__qualname__}: [message withheld]"


# Fields of Matrix request and answer bodies whose values are secrets (login, register,
# refresh, password change, UIA, login tokens); matched case-insensitively, at any depth.
SECRET_FIELDS = frozenset({"password", "new_password", "token", "access_token", "refresh_token", "client_secret"})
# What a body must contain before it can spell a secret field: a key is JSON text, so a letter
# is written as itself or as a \\u escape.
_MAY_SPELL_SECRET = re.compile(rb"(?i)password|token|\\u")
MAX_SHOWN_BODY = 1024 * 1024


def shown_body(body: bytes) -> bytes | None:
    """What may be shown of a request or answer body: None when it may be shown as it is (empty,
    or JSON without a secret field), else a replacement: the JSON with every secret field's
    value replaced, or a fixed text for a body that is not JSON (or is over 1 MiB)."""
    if not body:
        return None
    if len(body) > MAX_SHOWN_BODY:
        return _withheld_body(body, "over 1 MiB")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return _withheld_body(body, "not JSON")
    return _redacted_document(body, document)


def redacted_json(body: bytes) -> bytes | None:
    """`body` with its secret fields' values replaced if it is JSON (of at most 1 MiB) with
    any; else None."""
    if not body or len(body) > MAX_SHOWN_BODY or not _MAY_SPELL_SECRET.search(body):
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    shown = _redacted_document(body, document)
    return None if shown is None or shown.startswith(b"<body withheld") else shown


def _redacted_document(body: bytes, document: object) -> bytes | None:
    if not _MAY_SPELL_SECRET.search(body):
        return None
    try:
        redacted, changed = _redact_json(document)
    except RecursionError:
        return _withheld_body(body, "nested too deeply")
    if not changed:
        return None
    return json.dumps(redacted, ensure_ascii=False, indent=2).encode()


def _withheld_body(body: bytes, why: str) -> bytes:
    return f"<body withheld by synapse-router: {len(body)} bytes, {why}>".encode()


def _redact_json(value: object) -> tuple[object, bool]:
    """A copy of `value` with every secret field's value replaced; whether any was."""
    changed = False
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str) and key.lower() in SECRET_FIELDS:
                out[key], changed = REDACTED, True
            else:
                out[key], sub = _redact_json(item)
                changed = changed or sub
        return out, changed
    if isinstance(value, list):
        items = []
        for item in value:
            new, sub = _redact_json(item)
            items.append(new)
            changed = changed or sub
        return items, changed
    return value, False


# Header fields whose whole value is a credential (Authorization has its own labelled
# redaction, tokens.redact_authorization).
SECRET_REQUEST_HEADERS = frozenset({b"cookie", b"proxy-authorization"})
SECRET_RESPONSE_HEADERS = frozenset({b"set-cookie"})
WITHHELD_NAME = b"invalid-name-withheld"
WITHHELD_VALUE = b"<withheld: refused by the HTTP parser>"
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CODING = rb"\s*(?:chunked|identity|gzip|x-gzip|deflate|compress|br|zstd)\s*"
_CODINGS = re.compile(rb"(?i)" + _CODING + rb"(?:," + _CODING + rb")*")


def shown_field(name: bytes, value: bytes) -> tuple[bytes, bytes] | None:
    """What may be shown of a header field that HTTP's grammar or mitmproxy's framing checks
    refuse (its bytes are what mitmproxy's error would quote): None for a field that is well
    formed; a field whose name is not a token (a space before the colon, a control byte) is
    withheld whole; a Content-Length that is not digits and a Transfer-Encoding that is not a
    list of known codings keep their name only."""
    if not _FIELD_NAME.fullmatch(name):
        return WITHHELD_NAME, WITHHELD_VALUE
    lowered = name.lower()
    if lowered == b"content-length" and not value.strip(b" \t").isdigit():
        return name, WITHHELD_VALUE
    if lowered == b"transfer-encoding" and not _CODINGS.fullmatch(value):
        return name, WITHHELD_VALUE
    return None
