"""The access log: logfmt and JSON lines, escaping, what is never written, and its configuration."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synapse_router.edge import clienterrors
from synapse_router.identity.tokens import short_hash, token_key
from synapse_router.observability.accesslog import (
    FORMATS,
    MAX_PATH,
    AccessLogConfig,
    AccessLogConfigError,
    AccessLogFormatter,
    AccessRecord,
    LogFormat,
    format_time,
    logfmt_value,
    parse_access_log_config,
    parse_logfmt,
    strip_query,
)
from synapse_router.routing.engine import Decision
from synapse_router.routing.upstream import Upstream

TOKEN = "syt_c2VjcmV0_ThisIsASecretAccessToken_0a1b2c"
T0 = 1714564800.25  # 2024-05-01T12:00:00.250Z


def record(**overrides: object) -> AccessRecord:
    fields: dict[str, object] = {
        "time": T0,
        "client_ip": "203.0.113.7",
        "method": "GET",
        "path": "/_matrix/client/v3/sync",
        "status": 200,
        "bytes_sent": 1234,
        "route": "sync",
        "pool": "sync",
        "worker": "http://10.0.0.1:8083",
        "key_kind": "user",
        "identity": "cache",
        "upstream_ms": 12.3456,
        "total_ms": 13.0,
        "user_id": "@alice:example.org",
        "token_hash": short_hash(token_key(TOKEN)),
    }
    fields.update(overrides)
    return AccessRecord(**fields)  # type: ignore[arg-type]


def logfmt(include_user: bool = False) -> AccessLogFormatter:
    return AccessLogFormatter("logfmt", include_user)


def jsonl(include_user: bool = False) -> AccessLogFormatter:
    return AccessLogFormatter("json", include_user)


# --- logfmt -----------------------------------------------------------------------------------


def test_logfmt_line() -> None:
    line = logfmt().format(record())
    assert line == (
        "time=2024-05-01T12:00:00.250Z client_ip=203.0.113.7 method=GET path=/_matrix/client/v3/sync"
        " status=200 bytes_sent=1234 total_ms=13.0 upstream_ms=12.346 route=sync pool=sync"
        f" worker=http://10.0.0.1:8083 key_kind=user identity=cache token_hash={short_hash(token_key(TOKEN))}"
    )


def test_logfmt_omits_none_and_empty_fields() -> None:
    line = logfmt(include_user=True).format(
        AccessRecord(time=T0, client_ip="::1", method="GET", path="/health", status=None)
    )
    assert parse_logfmt(line) == {
        "time": "2024-05-01T12:00:00.250Z",
        "client_ip": "::1",
        "method": "GET",
        "path": "/health",
    }


def test_logfmt_fallbacks_and_failover() -> None:
    r = record(
        fallbacks=["initial_sync:no usable worker", "sync:no usable worker"],
        failover="http://10.0.0.1:8083 -> http://10.0.0.2:8083: connect refused",
        status=None,
    )
    fields = parse_logfmt(logfmt().format(r))
    assert fields["fallbacks"] == "initial_sync:no usable worker,sync:no usable worker"
    assert fields["failover"] == "http://10.0.0.1:8083 -> http://10.0.0.2:8083: connect refused"
    assert "status" not in fields


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("@alice:example.org", "@alice:example.org"),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("k=v", '"k=v"'),
        ("back\\slash", "back\\slash"),  # a bare backslash needs no quotes
        ('back\\slash "q"', '"back\\\\slash \\"q\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("cr\rtab\t", '"cr\\rtab\\t"'),
        ("esc\x1b[31m", '"esc\\u001b[31m"'),
        ("del\x7f", '"del\\u007f"'),
        ("nel\x85", '"nel\\u0085"'),
        ("ls\u2028ps\u2029", '"ls\\u2028ps\\u2029"'),
        ("tag\U000e0041", '"tag\\U000e0041"'),
        ("undecodable\udcff", '"undecodable\\udcff"'),
        ("", '""'),
        ("héllo wörld", '"héllo wörld"'),
        ("日本", "日本"),
    ],
)
def test_logfmt_escaping(value: str, written: str) -> None:
    assert logfmt_value(value) == written
    assert parse_logfmt(f"k={written}") == {"k": value}


def test_logfmt_values_cannot_forge_fields_or_lines() -> None:
    evil = '/x status=999 user_id="@mallory:evil"\nfake=line'
    line = logfmt().format(record(path=evil, worker="a b=c"))
    assert "\n" not in line and len(line.splitlines()) == 1
    fields = parse_logfmt(line)
    assert fields["path"] == evil
    assert fields["status"] == "200"
    assert fields["worker"] == "a b=c"
    assert "user_id" not in fields and "fake" not in fields


@given(st.text(min_size=1))
def test_logfmt_round_trip(text: str) -> None:
    line = logfmt().format(record(worker=text, route=text))
    assert len(line.splitlines()) == 1
    fields = parse_logfmt(line)
    assert fields["worker"] == text
    assert fields["route"] == text
    line.encode("utf-8")  # always writable as UTF-8, even from a lone surrogate


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), st.text()))
def test_parse_logfmt_round_trip_any_fields(fields: dict[str, str]) -> None:
    line = " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())
    assert parse_logfmt(line) == fields


def test_parse_logfmt() -> None:
    assert parse_logfmt('a=1 b="x y"  c= flag d="q\\"\\\\"') == {"a": "1", "b": "x y", "c": "", "flag": "", "d": 'q"\\'}
    assert parse_logfmt("") == {}
    assert parse_logfmt("a=1 a=2") == {"a": "2"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('a="unterminated', "unterminated"),
        ('a="x\\', "unterminated"),
        ('a="x"b', "after the quoted value"),
        ('a="\\q"', "unknown escape"),
        ('a="\\u12"', "bad \\\\u escape"),
        ('a="\\U0000004g"', "bad \\\\U escape"),
        ("=v", "empty key"),
    ],
)
def test_parse_logfmt_errors(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_logfmt(line)


# --- JSON -------------------------------------------------------------------------------------


def test_json_line() -> None:
    line = jsonl().format(record(fallbacks=["initial_sync:no usable worker"]))
    assert "\n" not in line and ": " not in line and ", " not in line  # compact
    assert json.loads(line) == {
        "time": "2024-05-01T12:00:00.250Z",
        "client_ip": "203.0.113.7",
        "method": "GET",
        "path": "/_matrix/client/v3/sync",
        "status": 200,
        "bytes_sent": 1234,
        "total_ms": 13.0,
        "upstream_ms": 12.346,
        "route": "sync",
        "pool": "sync",
        "worker": "http://10.0.0.1:8083",
        "key_kind": "user",
        "identity": "cache",
        "fallbacks": ["initial_sync:no usable worker"],
        "token_hash": short_hash(token_key(TOKEN)),
    }


def test_json_keeps_unicode_and_escapes_controls() -> None:
    path = '/_matrix/media/v3/download/ex.org/日本 "q"\n\x1b\x85\u2028\udcff\U000e0041'
    line = jsonl().format(record(path=path))
    assert "日本" in line  # ensure_ascii=False
    for raw in ("\n", "\x1b", "\x85", "\u2028", "\udcff", "\U000e0041"):
        assert raw not in line
    assert len(line.splitlines()) == 1
    line.encode("utf-8")
    assert json.loads(line)["path"] == path


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_answer_written_under_an_unfinished_upload_is_marked(fmt: LogFormat) -> None:
    record = AccessRecord(time=T0, client_ip="::1", method="POST", path="/up", status=502, upload_cut=True)
    line = AccessLogFormatter(fmt, False).format(record)
    fields = json.loads(line) if fmt == "json" else parse_logfmt(line)
    assert fields["upload"] == "cut" and str(fields["status"]) == "502"
    plain = AccessLogFormatter(fmt, False).format(AccessRecord(time=T0, client_ip="::1", method="POST", path="/up"))
    assert "upload" not in plain


@pytest.mark.parametrize("fmt", FORMATS)
def test_what_the_client_broke_is_logged_with_the_status(fmt: LogFormat) -> None:
    record = AccessRecord(
        time=T0, client_ip="::1", method="PUT", path="/up", status=400, client_error="bad_chunked_body"
    )
    line = AccessLogFormatter(fmt, False).format(record)
    fields = json.loads(line) if fmt == "json" else parse_logfmt(line)
    assert fields["client_error"] == "bad_chunked_body" and str(fields["status"]) == "400"


def test_client_error_messages_round_trip() -> None:
    for error in clienterrors.ERRORS.values():
        assert clienterrors.parse(clienterrors.message(error)) == error
    assert clienterrors.parse("HTTP/1 protocol error: illegal chunk header") is None
    assert clienterrors.parse(None) is None
    assert clienterrors.parse("synapse-router: answered 400 (made_up)") is None


def test_json_omits_empty_fields() -> None:
    line = jsonl(include_user=True).format(AccessRecord(time=T0, client_ip="::1", method="GET", path="/"))
    assert json.loads(line) == {"time": "2024-05-01T12:00:00.250Z", "client_ip": "::1", "method": "GET", "path": "/"}


@given(st.text())
def test_json_round_trip(text: str) -> None:
    line = jsonl().format(record(worker=text))
    assert len(line.splitlines()) == 1
    line.encode("utf-8")
    assert json.loads(line).get("worker", "") == text


# --- what is never written --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_user_id_only_when_included(fmt: str) -> None:
    r = record()
    assert "@alice:example.org" not in AccessLogFormatter(fmt, False).format(r)  # type: ignore[arg-type]
    assert "user_id" not in AccessLogFormatter(fmt, False).format(r)  # type: ignore[arg-type]
    assert "@alice:example.org" in AccessLogFormatter(fmt, True).format(r)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
@pytest.mark.parametrize(
    "path",
    [
        f"/_matrix/client/v3/sync?access_token={TOKEN}",
        f"/_matrix/client/v3/sync?since=s1&access_token={TOKEN}&timeout=30000",
        f"/_matrix/media/v3/download/ex.org/abc#access_token={TOKEN}",
        f"/_matrix/client/v3/sync?x=1?access_token={TOKEN}",
    ],
)
def test_token_in_query_never_written(fmt: str, path: str) -> None:
    formatter = AccessLogFormatter(fmt, True)  # type: ignore[arg-type]
    line = formatter.format(record(path=path))
    assert TOKEN not in line
    assert "access_token" not in line
    assert "since" not in line


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
@pytest.mark.parametrize("bad_hash", [TOKEN, f"Bearer {TOKEN}", "DEADBEEF", "deadbee", "deadbeef0", "deadbeeg", ""])
def test_token_hash_must_be_a_short_hash(fmt: str, bad_hash: str) -> None:
    line = AccessLogFormatter(fmt, True).format(record(token_hash=bad_hash))  # type: ignore[arg-type]
    assert "token_hash" not in line
    assert TOKEN not in line


def test_token_hash_is_the_short_hash() -> None:
    h = short_hash(token_key(TOKEN))
    assert len(h) == 8
    assert parse_logfmt(logfmt().format(record()))["token_hash"] == h


def test_strip_query() -> None:
    assert strip_query("/a/b?c=d") == "/a/b"
    assert strip_query("/a/b#frag") == "/a/b"
    assert strip_query("/a/b") == "/a/b"
    assert strip_query("?access_token=x") == ""
    long = "/" + "a" * (MAX_PATH * 2)
    assert strip_query(long) == long[:MAX_PATH] + "..."


# --- numbers and time -------------------------------------------------------------------------


def test_format_time() -> None:
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_time(T0) == "2024-05-01T12:00:00.250Z"
    assert format_time(math.nan) is None
    assert format_time(1e20) is None


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_non_finite_numbers_are_omitted(fmt: str) -> None:
    r = record(time=math.nan, upstream_ms=math.inf, total_ms=math.nan)
    line = AccessLogFormatter(fmt, False).format(r)  # type: ignore[arg-type]
    for key in ("time", "upstream_ms", "total_ms"):
        assert key not in line
    assert "NaN" not in line and "Infinity" not in line and "inf" not in line
    if fmt == "json":
        json.loads(line)


def test_zero_values_are_written() -> None:
    fields = parse_logfmt(logfmt().format(record(bytes_sent=0, upstream_ms=0.0)))
    assert fields["bytes_sent"] == "0"
    assert fields["upstream_ms"] == "0.0"


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="logfmt, json"):
        AccessLogFormatter("xml", False)  # type: ignore[arg-type]


# --- from a routing decision ------------------------------------------------------------------


def test_set_decision() -> None:
    upstream = Upstream(url="http://10.0.0.2:8083", scheme="http", host="10.0.0.2", port=8083)
    decision = Decision(
        route="initial_sync",
        pool="sync",
        upstream=upstream,
        key_kind="user",
        fallbacks=["initial_sync:no usable worker"],
        identity="whoami",
    )
    r = AccessRecord(time=T0, client_ip="203.0.113.7", method="GET", path="/_matrix/client/v3/sync")
    r.set_decision(decision)
    assert (r.route, r.pool, r.worker, r.key_kind, r.identity) == (
        "initial_sync",
        "sync",
        "http://10.0.0.2:8083",
        "user",
        "whoami",
    )
    assert r.fallbacks == ["initial_sync:no usable worker"] and r.fallbacks is not decision.fallbacks
    assert r.failover is None  # "" in a Decision: no failover

    decision.failover = "http://10.0.0.1:8083 -> http://10.0.0.2:8083: connect"
    r.set_decision(decision)
    assert r.failover == decision.failover

    main = AccessRecord(time=T0, client_ip="::1", method="GET", path="/")
    main.set_decision(Decision(route="main", pool="main", upstream=None, key_kind="none"))
    assert (main.route, main.pool, main.worker) == ("main", "main", "main")


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults() -> None:
    assert parse_access_log_config(None) == AccessLogConfig(enabled=False, format="logfmt", include_user=False)
    assert parse_access_log_config({}) == AccessLogConfig()


def test_config_full() -> None:
    config = parse_access_log_config(
        {"enabled": True, "format": "json", "include_user": True, "path": "/var/log/synapse-router/access.log"}
    )
    assert config == AccessLogConfig(
        enabled=True, format="json", include_user=True, path="/var/log/synapse-router/access.log"
    )
    assert parse_access_log_config({"enabled": True}).format == "logfmt"


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        (True, None, "expected a mapping"),
        ("yes", None, "expected a mapping"),
        ([{"enabled": True}], None, "expected a mapping"),
        ({"enabeld": True}, "enabeld", "unknown key"),
        ({1: True}, "1", "unknown key"),
        ({"enabled": "yes"}, "enabled", "true or false"),
        ({"enabled": 1}, "enabled", "true or false"),
        ({"enabled": None}, "enabled", "true or false"),
        ({"include_user": "false"}, "include_user", "true or false"),
        ({"format": "text"}, "format", "logfmt, json"),
        ({"format": "JSON"}, "format", "logfmt, json"),
        ({"format": ["json"]}, "format", "logfmt, json"),
        ({"format": None}, "format", "logfmt, json"),
        ({"path": ""}, "path", "file path"),
        ({"path": "  "}, "path", "file path"),
        ({"path": 5}, "path", "file path"),
        ({"path": "/tmp/a\0b"}, "path", "file path"),
    ],
)
def test_config_errors_name_the_key(raw: object, key: str | None, message: str) -> None:
    with pytest.raises(AccessLogConfigError, match=message) as info:
        parse_access_log_config(raw)
    assert info.value.key == key
    assert message in info.value.reason
    assert isinstance(info.value, ValueError)
    if key is not None:
        assert str(info.value).startswith(f"{key}: ")


def test_config_null_path_is_the_default() -> None:
    assert parse_access_log_config({"enabled": True, "path": None}).path is None


@given(st.text(max_size=60))
def test_quoting_decided_as_a_per_character_check_would(text: str) -> None:
    from synapse_router.observability.accesslog import _needs_quotes

    assert _needs_quotes(text) == (not text or any(c in ' "=' or not c.isprintable() for c in text))
