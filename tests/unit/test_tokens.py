"""Finding access tokens and keeping them out of sight."""

from __future__ import annotations

import hashlib
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st
from synapse_router import tokens


def test_bearer_header() -> None:
    found = tokens.find_token("Bearer syt_abc", "")
    assert found is not None and found.token == "syt_abc" and not found.from_query and not found.conflict


def test_scheme_case_insensitive() -> None:
    for header in ("bearer tok", "BEARER tok", "  Bearer   tok  "):
        found = tokens.find_token(header, "")
        assert found is not None and found.token == "tok"


def test_query_token_decoded() -> None:
    found = tokens.find_token(None, "since=1&access_token=a%2Bb&timeout=30000")
    assert found is not None and found.token == "a+b" and found.from_query


def test_encoded_parameter_name_is_a_token_too() -> None:
    found = tokens.find_token(None, "access%5Ftoken=tok")
    assert found is not None and found.token == "tok"
    assert tokens.remove_query_token("a=1&access%5Ftoken=tok&b=2") == "a=1&b=2"


def test_both_forms_is_a_conflict() -> None:
    found = tokens.find_token("Bearer h", "access_token=q")
    assert found is not None and found.token == "h" and found.conflict


def test_non_bearer_header_with_query_token_is_a_conflict() -> None:
    found = tokens.find_token("X-Matrix origin=a", "access_token=q")
    assert found is not None and found.from_query and found.conflict


def test_malformed() -> None:
    assert tokens.find_token("Bearer", "") is None
    assert tokens.find_token("Bearer a b", "") is None
    assert tokens.find_token("Basic abc", "") is None
    assert tokens.find_token(None, "access_token=") is None
    assert tokens.find_token(None, "%zz=%zz&&=&access_token") is None
    assert tokens.find_token("", "") is None


def test_non_ascii_and_huge() -> None:
    found = tokens.find_token("Bearer tök€n", "")
    assert found is not None and found.token == "tök€n"
    huge = "x" * 1_000_000
    found = tokens.find_token(f"Bearer {huge}", "")
    assert found is not None and len(found.key) == 32
    surrogate = "tok\udcff"  # what mitmproxy makes of undecodable header bytes
    assert tokens.find_token(f"Bearer {surrogate}", "") is not None
    assert len(tokens.token_key(surrogate)) == 32


def test_appservice_user_id_changes_the_key() -> None:
    plain = tokens.find_token("Bearer as_token", "")
    acting = tokens.find_token("Bearer as_token", "user_id=%40bridge_alice%3Aexample.org")
    assert plain is not None and acting is not None
    assert acting.as_user == "@bridge_alice:example.org"
    assert plain.key != acting.key


def test_key_is_sha256_not_the_token() -> None:
    assert tokens.token_key("tok") == hashlib.sha256(b"tok").digest()
    assert b"tok" not in tokens.token_key("tok")
    assert len(tokens.short_hash(tokens.token_key("tok"))) == 8


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_redaction_removes_the_token(secret: str) -> None:
    query = f"since=1&access_token={quote(secret, safe='')}&x=2"
    redacted = tokens.redact_query_token(query, "abcd")
    assert redacted == "since=1&access_token=<redacted:abcd>&x=2"
    assert tokens.remove_query_token(query) == "since=1&x=2"
