"""Finding access tokens and keeping them out of sight."""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synapse_router.edge.wellformed import Refused
from synapse_router.identity import tokens

SYNC = "/_matrix/client/v3/sync"


def find(authorization: str | list[str] | None, query: str = "", path: str = SYNC) -> tokens.FoundToken | None:
    values = [] if authorization is None else [authorization] if isinstance(authorization, str) else authorization
    return tokens.find_token(values, query, path)


def refused(authorization: str | list[str] | None, query: str = "", path: str = SYNC) -> tuple[int, str]:
    with pytest.raises(Refused) as caught:
        find(authorization, query, path)
    return caught.value.status, caught.value.errcode


def test_bearer_header() -> None:
    found = find("Bearer syt_abc")
    assert found is not None and found.token == "syt_abc" and not found.from_query


def test_scheme_case_insensitive() -> None:
    for header in ("bearer tok", "BEARER tok"):
        found = find(header)
        assert found is not None and found.token == "tok"


def test_query_token_decoded() -> None:
    found = find(None, "since=1&access_token=a%2Bb&timeout=30000")
    assert found is not None and found.token == "a+b" and found.from_query


def test_encoded_parameter_name_is_a_token_too() -> None:
    found = find(None, "access%5Ftoken=tok")
    assert found is not None and found.token == "tok"
    assert tokens.redact_query_token("a=1&access%5Ftoken=tok&b=2", "abcd") == "a=1&access_token=<redacted:abcd>&b=2"


def test_no_token() -> None:
    assert find(None, "") is None
    assert find(None, "since=1&timeout=0") is None
    assert find("X-Matrix origin=a,key=b,sig=c") is None  # federation: not a token, passed on as is


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Bearer a b",  # `Bearer tok extra`
        "Bearer  tok",  # two spaces: Synapse splits on one
        "Bearer\ttok",
        "Bearertok",
        "Bearer tok\r\nX-Injected: 1",
        "Bearer tok\x00",
        "Bearer tök€n",
        "Bearer tok\udcff",  # what mitmproxy makes of undecodable header bytes
        "Bearer " + "x" * (tokens.MAX_TOKEN_LENGTH + 1),
    ],
)
def test_implausible_header_token_is_refused_as_unknown(header: str) -> None:
    assert refused(header) == (401, "M_UNKNOWN_TOKEN")


@pytest.mark.parametrize(
    "query",
    [
        "access_token=",
        "access_token",
        "access_token=tok%0D%0A%0D%0AGET%20/_smuggled%20HTTP/1.1",
        "access_token=x%00",
        "access_token=tok-%E9-1",
        "access_token=tok-%C3%A9-1",
        "access_token=a+b",  # a space once decoded
        "access_token=" + "x" * (tokens.MAX_TOKEN_LENGTH + 1),
    ],
)
def test_implausible_query_token_is_refused_as_unknown(query: str) -> None:
    assert refused(None, f"since=1&{query}") == (401, "M_UNKNOWN_TOKEN")


@pytest.mark.parametrize(
    ("authorization", "query"),
    [
        (["Bearer a", "Bearer b"], ""),
        (["Bearer a", "Bearer a"], ""),
        (None, "access_token=a&access_token=b"),
        (None, "access_token=a&access%5Ftoken=a"),
        ("Bearer h", "access_token=q"),
        ("X-Matrix origin=a", "access_token=q"),
    ],
)
def test_more_than_one_token_is_a_bad_request(authorization: str | list[str] | None, query: str) -> None:
    assert refused(authorization, query) == (400, "M_INVALID_PARAM")


def test_huge_token_is_refused_not_hashed() -> None:
    assert refused("Bearer " + "x" * 1_000_000) == (401, "M_UNKNOWN_TOKEN")
    assert find("Bearer " + "x" * tokens.MAX_TOKEN_LENGTH) is not None


def test_appservice_user_id_changes_the_key() -> None:
    plain = find("Bearer as_token")
    acting = find("Bearer as_token", "user_id=%40bridge_alice%3Aexample.org")
    assert plain is not None and acting is not None
    assert acting.as_user == "@bridge_alice:example.org"
    assert plain.key != acting.key
    assert refused("Bearer as_token", "user_id=%40a%0D%0Ab%3Ax") == (400, "M_INVALID_PARAM")


@given(st.text(max_size=40))
def test_whatever_is_accepted_is_printable_ascii(token: str) -> None:
    for authorization, query in ((f"Bearer {token}", ""), (None, f"access_token={quote(token, safe='')}")):
        try:
            found = find(authorization, query)
        except Refused:
            continue
        assert found is not None and found.token == token
        assert all(0x21 <= ord(c) <= 0x7E for c in token) and token


def test_key_is_sha256_not_the_token() -> None:
    assert tokens.token_key("tok") == hashlib.sha256(b"tok").digest()
    assert b"tok" not in tokens.token_key("tok")
    assert len(tokens.short_hash(tokens.token_key("tok"))) == 8


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_redaction_removes_the_token(secret: str) -> None:
    query = f"since=1&access_token={quote(secret, safe='')}&x=2"
    redacted = tokens.redact_query_token(query, "abcd")
    assert redacted == "since=1&access_token=<redacted:abcd>&x=2"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("Bearer syt_secret", "Bearer <redacted:abcd1234>"),
        ("bearer\tsyt_secret", "Bearer <redacted:abcd1234>"),
        ("Bearer syt_secret extra", "Bearer <redacted:abcd1234>"),
        ("X-Matrix origin=a,key=b,sig=secret", "X-Matrix <redacted>"),
        ("Basic c2VjcmV0", "Basic <redacted>"),
        ("\x01secret", "<redacted>"),
        ("syt_secret_without_scheme", "<redacted>"),  # a lone word may be the token itself
        ("Basic\tc2VjcmV0", "<redacted>"),
    ],
)
def test_authorization_redaction_keeps_only_the_scheme(value: str, shown: str) -> None:
    assert tokens.redact_authorization(value, "abcd1234") == shown


@pytest.mark.parametrize("query", ["user_id=notauser", "user_id=a%3Ab", "user_id=%40a%3Ax&user_id=%40b%3Ax"])
def test_appservice_user_id_must_be_one_user_id(query: str) -> None:
    assert refused("Bearer as_token", query) == (400, "M_INVALID_PARAM")
    assert refused("Bearer as_token", query, "/_matrix/media/v3/upload") == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    "path",
    [
        "/_synapse/admin/v2/users",  # List Accounts: `user_id` is a substring filter
        "/_synapse/admin/v1/event_reports",
        "/_matrix/federation/v1/openid/userinfo",
        "/_matrix/clientx/v3/sync",
    ],
)
def test_user_id_is_an_appservice_user_only_on_the_client_server_api(path: str) -> None:
    # Issue 22: elsewhere it means something else, and is neither read nor refused.
    for query in ("from=0&limit=10&user_id=ali", "user_id=%40a%3Ax&user_id=%40b%3Ax"):
        found = find("Bearer syt_admin", query, path)
        assert found is not None and found.as_user is None and found.key == tokens.token_key("syt_admin")
    found = find("Bearer as_token", "user_id=%40bridged%3Ax", SYNC)
    assert found is not None and found.as_user == "@bridged:x"


@pytest.mark.parametrize(
    "query",
    ["foo=1;access_token=syt_semicolon", "access_token=syt_semicolon;foo=1", "a=1&b=2;access%5Ftoken=syt_semicolon"],
)
def test_a_token_after_a_semicolon_is_a_token_as_twisted_splits_on_both(query: str) -> None:
    # Synapse reads Twisted's request.args, whose parse_qs splits on `&` and `;`.
    found = tokens.find_token([], query, SYNC)
    assert found is not None and found.token == "syt_semicolon" and found.from_query
    assert "syt_semicolon" not in tokens.redact_query_token(query, "abcd")
    with pytest.raises(tokens.Refused):
        tokens.find_token(["Bearer syt_other"], query, SYNC)
