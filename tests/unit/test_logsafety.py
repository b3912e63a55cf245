"""What may be printed about a client: the allow-list of mitmproxy's messages, bodies, fields."""

from __future__ import annotations

import json
import sys

from hypothesis import given
from hypothesis import strategies as st
from synapse_router.observability import logsafety


def test_fixed_and_templated_messages_pass() -> None:
    for message in ("client connect", "client disconnect", "Client disconnected.", "Connection killed."):
        assert logsafety.safe_message(message) == message
    assert logsafety.safe_message("server connect 127.0.0.1:8083") == "server connect 127.0.0.1:8083"
    assert logsafety.safe_message("Streaming request to 10.0.0.5.") == "Streaming request to 10.0.0.5."
    refused = "error establishing server connection: [Errno 111] Connect call failed ('127.0.0.1', 1)"
    assert logsafety.safe_message(refused) == logsafety.WITHHELD  # a quote: not the safe template


def test_quoted_client_bytes_are_withheld_the_description_kept() -> None:
    cases = {
        "HTTP/1 protocol error: illegal chunk header: bytearray(b'2\\n{}\\n0\\n\\nGET /?access_token=S')": (
            "HTTP/1 protocol error: illegal chunk header "
        ),
        "127.0.0.1:4242: Bad HTTP request line: b'GET /?%61ccess_token=S HTTP/1.1 x'": (
            "127.0.0.1:4242: Bad HTTP request line "
        ),
        "Received invalid content-length header: b'1S' from client, refusing": (
            "Received invalid content-length header "
        ),
        "Client closed connection before completing request headers: b'GET /?a=S'": (
            "Client closed connection before completing request headers "
        ),
        "[::1]:5555: Invalid header line: b'Cookie S'": "[::1]:5555: Invalid header line ",
        "Deferring layer decision, not enough data: '4753'": "Deferring layer decision, not enough data ",
    }
    for message, start in cases.items():
        shown = logsafety.safe_message(message)
        assert shown == start + logsafety.DETAILS_WITHHELD
        assert "S'" not in shown


def test_unknown_messages_are_replaced_whole() -> None:
    assert logsafety.safe_message("a new mitmproxy message: b'secret'") == logsafety.WITHHELD
    assert logsafety.safe_message("HTTP/1 protocol error: something new secret") == (
        "HTTP/1 protocol error: " + logsafety.WITHHELD
    )


@given(st.text(max_size=200))
def test_no_unknown_text_survives(secret: str) -> None:
    for template in ("{}", "Bad HTTP request line: {}", "HTTP/1 protocol error: illegal chunk header: {}", "x {}"):
        shown = logsafety.safe_message(template.format(repr("SECRET" + secret)))
        assert "SECRET" not in shown


def test_traceback_without_the_exception_text() -> None:
    secret = "".join(["SEC", "RET"])  # not in the source line the traceback shows
    try:
        raise ValueError(f"Bad HTTP request line: b'GET /?access_token={secret}'")
    except ValueError:
        kind, value, tb = sys.exc_info()
    assert kind is not None and value is not None
    text = logsafety.traceback_without_message((kind, value, tb))
    assert "SECRET" not in text and "builtins.ValueError: [message withheld]" in text
    assert "test_traceback_without_the_exception_text" in text


def test_secret_fields_of_json_bodies_are_redacted_at_any_depth() -> None:
    body = json.dumps(
        {
            "type": "m.login.password",
            "password": "S1",
            "auth": {"new_password": "S2", "Token": ["S3"]},
            "n": [{"refresh_token": "S4"}],
            "threepid_creds": {"sid": "x", "client_secret": "S6"},  # 3PID validation secret
        }
    ).encode()
    shown = logsafety.shown_body(body)
    assert shown is not None
    assert not any(s in shown for s in (b"S1", b"S2", b"S3", b"S4", b"S6"))
    assert json.loads(shown)["type"] == "m.login.password"
    escaped = b'{"pass\\u0077ord": "S5"}'
    assert b"S5" not in (logsafety.shown_body(escaped) or escaped)
    assert logsafety.redacted_json(escaped) is not None


def test_bodies_without_secrets_shown_others_withheld() -> None:
    assert logsafety.shown_body(b"") is None
    assert logsafety.shown_body(b'{"room_id": "!a:b"}') is None
    assert logsafety.shown_body(b"password=S&user=a") == b"<body withheld by synapse-router: 17 bytes, not JSON>"
    assert logsafety.shown_body(b"[" * 100000 + b"]" * 100000) is not None  # too deep for json: withheld
    assert logsafety.redacted_json(b"password=S") is None
    assert logsafety.redacted_json(b'{"room_id": "!a:b"}') is None


def test_refused_header_fields_are_withheld() -> None:
    assert logsafety.shown_field(b"Content-Type", b"application/json") is None
    assert logsafety.shown_field(b"Content-Length", b"12") is None
    assert logsafety.shown_field(b"Transfer-Encoding", b"gzip, chunked") is None
    assert logsafety.shown_field(b"Authorization ", b"Bearer S") == (logsafety.WITHHELD_NAME, logsafety.WITHHELD_VALUE)
    assert logsafety.shown_field(b"Bad NameS", b"1") == (logsafety.WITHHELD_NAME, logsafety.WITHHELD_VALUE)
    assert logsafety.shown_field(b"Content-Length", b"1S") == (b"Content-Length", logsafety.WITHHELD_VALUE)
    assert logsafety.shown_field(b"Transfer-Encoding", b"xS") == (b"Transfer-Encoding", logsafety.WITHHELD_VALUE)
