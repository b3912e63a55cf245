"""Requests the router refuses to pass on, and those it passes untouched."""

from __future__ import annotations

import re

import h11
import pytest
from h11._headers import normalize_and_validate
from hypothesis import given, settings
from hypothesis import strategies as st
from synapse_router.edge.wellformed import TOKEN_PATTERN, Refused, check_message, check_request, fields_writable

OK_FIELDS = [(b"Host", b"matrix.example"), (b"User-Agent", b"Element/1.0 (\xc3\xa9)"), (b"X-Tab", b"a\tb")]


def refusal(authority: str, target: str, fields: list[tuple[bytes, bytes]]) -> tuple[int, str]:
    with pytest.raises(Refused) as caught:
        check_request("GET", authority, target, fields)
    return caught.value.status, caught.value.errcode


def test_ordinary_requests_pass() -> None:
    check_request("GET", "", "/_matrix/client/v3/sync?since=s1&timeout=30000", OK_FIELDS)
    check_request("OPTIONS", "", "*", [])
    check_request("GET", "", "/_matrix/media/v3/download/x/y?allow_redirect=true", [(b"Range", b"bytes=0-")])


def test_absolute_form_is_refused() -> None:
    assert refusal("10.0.0.5:8083", "/_matrix/client/v3/sync", OK_FIELDS) == (400, "M_UNRECOGNIZED")


@pytest.mark.parametrize("target", ["", "sync", "/a b", "/a\r\nX: y", "/a\x00", "/\xe9", "http://x/y"])
def test_bad_targets_are_refused(target: str) -> None:
    assert refusal("", target, OK_FIELDS) == (400, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    "field",
    [
        (b"X-A", b"b\rc"),
        (b"X-A", b"b\nc"),
        (b"X-A", b"b\r\nGET /smuggled HTTP/1.1"),
        (b"X-A", b"b\x00"),
        (b"X-A", b"\x7f"),
        (b"X A", b"b"),
        (b"", b"b"),
        (b"X-A\r\n", b"b"),
    ],
)
def test_control_bytes_in_fields_are_refused(field: tuple[bytes, bytes]) -> None:
    assert refusal("", "/", [*OK_FIELDS, field]) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize("method", ["GE\x00T", "GET ", "", "G\rET", "GÉT"])
def test_bad_methods_are_refused(method: str) -> None:
    with pytest.raises(Refused) as caught:
        check_request(method, "", "/", OK_FIELDS)
    assert (caught.value.status, caught.value.errcode) == (400, "M_UNRECOGNIZED")


def test_two_host_headers_are_refused() -> None:
    # mitmproxy joins them ("a, b"); RFC 9112 says a server must answer 400.
    fields = [(b"Host", b"a.example"), (b"host", b"b.example")]
    assert refusal("", "/_matrix/client/v3/profile/x", fields) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize("version", ["HTTP/9.9", "HTTP/2.0", "HTTP/1.1\x00", ""])
def test_other_http_versions_are_refused(version: str) -> None:
    with pytest.raises(Refused) as caught:
        check_request("GET", "", "/", OK_FIELDS, version)
    assert (caught.value.status, caught.value.errcode) == (505, "M_UNRECOGNIZED")
    check_request("GET", "", "/", OK_FIELDS, "HTTP/1.0")


# Bytes that matter to the field rules: separators, whitespace, controls, obs-text.
_FIELD_BYTES = st.sampled_from([b"a", b"Z", b"-", b":", b"\n", b"\r", b"\t", b" ", b"\x00", b"\x01", b"\x7f", b"\xe9"])
_FIELDS = st.lists(
    st.tuples(st.lists(_FIELD_BYTES, max_size=4).map(b"".join), st.lists(_FIELD_BYTES, max_size=6).map(b"".join)),
    max_size=4,
)


@settings(max_examples=1000, deadline=None)
@given(fields=_FIELDS)
def test_fields_writable_refuses_all_h11_refuses_and_every_control_byte(fields: list[tuple[bytes, bytes]]) -> None:
    try:
        normalize_and_validate(fields)
        h11_refuses = False
    except h11.LocalProtocolError:
        h11_refuses = True
    if h11_refuses:
        assert not fields_writable(fields)
    if fields_writable(fields):
        assert not any(re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", v) for _, v in fields)
        assert all(re.fullmatch(TOKEN_PATTERN.encode(), n) for n, _ in fields)
    elif not h11_refuses:  # refused beyond h11: only for a control byte h11 lets through
        assert any(re.search(rb"[\x01-\x08\x0e-\x1f\x7f]", v) for _, v in fields)


@settings(max_examples=1000, deadline=None)
@given(fields=_FIELDS, hosts=st.integers(min_value=0, max_value=2))
def test_check_request_refuses_exactly_what_the_field_rules_refuse(
    fields: list[tuple[bytes, bytes]], hosts: int
) -> None:
    # The rules as regexes, one field at a time: what check_request's byte-set checks must equal.
    fields = fields + [(b"Host", b"a.example")] * hosts
    bad_field = any(
        re.fullmatch(TOKEN_PATTERN.encode(), n) is None or re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", v) for n, v in fields
    )
    many_hosts = sum(n.lower() == b"host" for n, _ in fields) > 1
    try:
        check_request("GET", "", "/", fields)
        refused = None
    except Refused as e:
        refused = str(e)
    if bad_field:
        assert refused == "Invalid header field."
    elif many_hosts:
        assert refused == "More than one Host header."
    else:
        assert refused is None


# --- check_message: well-formed requests the router still does not pass on (issue 20) ---


def message_refusal(method: str, fields: list[tuple[bytes, bytes]], version: str = "HTTP/1.1") -> tuple[int, bool]:
    with pytest.raises(Refused) as caught:
        check_message(method, fields, version)
    assert caught.value.errcode == "M_UNRECOGNIZED"
    return caught.value.status, caught.value.close


def test_check_message_passes_ordinary_requests() -> None:
    check_message("GET", OK_FIELDS, "HTTP/1.1")
    check_message("PUT", [*OK_FIELDS, (b"Transfer-Encoding", b"chunked")], "HTTP/1.1")
    check_message("PUT", [*OK_FIELDS, (b"transfer-encoding", b" Chunked ")], "HTTP/1.1")
    check_message("GET", [], "HTTP/1.0")  # HTTP/1.0 without Host is legal


@pytest.mark.parametrize("method", ["TRACE", "trace", "TRACK"])
def test_trace_is_refused_405(method: str) -> None:
    assert message_refusal(method, OK_FIELDS) == (405, False)


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity", b"gzip", b"chunked, chunked", b""])
def test_a_transfer_coding_other_than_chunked_is_refused_501_and_closed(coding: bytes) -> None:
    assert message_refusal("PUT", [*OK_FIELDS, (b"Transfer-Encoding", coding)]) == (501, True)


def test_http11_without_host_is_refused() -> None:
    assert message_refusal("GET", [(b"User-Agent", b"x")]) == (400, False)


def test_check_message_with_the_names_check_request_returns() -> None:
    names = check_request("GET", "", "/", OK_FIELDS)
    check_message("GET", OK_FIELDS, "HTTP/1.1", names)
    no_host = [(b"User-Agent", b"x"), (b"Transfer-Encoding", b"gzip")]
    with pytest.raises(Refused) as caught:
        check_message("PUT", no_host, "HTTP/1.1", check_request("PUT", "", "/", no_host))
    assert caught.value.status == 501
