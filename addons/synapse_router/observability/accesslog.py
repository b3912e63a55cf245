"""The access log: one line per request, as logfmt or JSON, and its configuration.

A line never holds an access token: the path is logged without its query string (where
`?access_token=` lives), a token is referred to only by an 8-hex-digit short hash (anything
else in `token_hash` is dropped), and the user id is written only when the operator asks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol


class RoutingFacts(Protocol):
    """What the access log takes from a routing decision (engine.Decision)."""

    route: str
    pool: str
    key_kind: str
    identity: str
    fallbacks: list[str]
    failover: str

    @property
    def worker(self) -> str: ...


LogFormat = Literal["logfmt", "json"]
FORMATS: tuple[LogFormat, ...] = ("logfmt", "json")
MAX_PATH = 2048  # longer paths are cut (and marked), so one request cannot write a huge line

_SHORT_HASH = re.compile(r"[0-9a-f]{8}")


@dataclass(slots=True)
class AccessRecord:
    time: float  # when the request arrived, seconds since the epoch
    client_ip: str
    method: str
    path: str  # without the query string (dropped again when formatting, to be sure)
    status: int | None = None  # None: no response
    bytes_sent: int | None = None
    route: str = ""
    pool: str = ""
    worker: str = ""
    key_kind: str = ""
    identity: str = ""  # cache, whoami, coalesced, negative, unresolved, or "" (no token)
    fallbacks: list[str] = field(default_factory=list)
    failover: str | None = None
    upstream_ms: float | None = None
    paced_ms: float | None = None  # the wait for its address's turn (limits.request_rate_per_address)
    total_ms: float | None = None
    user_id: str | None = None  # written only with include_user
    token_hash: str | None = None  # tokens.short_hash(key): 8 hex digits, never a token
    # The answer was written while the client was still sending its body, and the connection
    # closed with the rest unread: the client may have seen a reset instead of `status`.
    upload_cut: bool = False
    # The router answered because the client broke the request (clienterrors: bad_chunked_body,
    # body_timeout); a fixed word, never a byte the client sent.
    client_error: str | None = None
    # How the exchange failed (routing/exchange.FailureKind: connect_error, connect_timeout,
    # no_response, read_timeout, client_gone, client_error, killed), None when it did not.
    failure: str | None = None

    def set_decision(self, decision: RoutingFacts) -> None:
        """Copy the routing fields of a decision (its summary, no token, no user id)."""
        self.route = decision.route
        self.pool = decision.pool
        self.worker = decision.worker
        self.key_kind = decision.key_kind
        self.identity = decision.identity
        self.fallbacks = list(decision.fallbacks)
        self.failover = decision.failover or None


def strip_query(path: str) -> str:
    """The path without query string or fragment, cut to MAX_PATH characters."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    return path if len(path) <= MAX_PATH else path[:MAX_PATH] + "..."


def format_time(epoch: float) -> str | None:
    """RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.123Z (None for an impossible time)."""
    try:
        return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return None


def _ms(value: float | None) -> float | None:
    return round(value, 3) if value is not None and math.isfinite(value) else None


class AccessLogFormatter:
    """Formats AccessRecords as single lines (no trailing newline).

    Fields whose value is None, "" or an empty list are left out, in both formats.
    """

    def __init__(self, fmt: LogFormat, include_user: bool) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown access log format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.include_user = include_user

    def fields(self, record: AccessRecord) -> dict[str, str | int | float | list[str]]:
        """The fields to write, in order, without empty ones."""
        token_hash = record.token_hash if record.token_hash and _SHORT_HASH.fullmatch(record.token_hash) else None
        candidates: list[tuple[str, str | int | float | list[str] | None]] = [
            ("time", format_time(record.time)),
            ("client_ip", record.client_ip),
            ("method", record.method),
            ("path", strip_query(record.path)),
            ("status", record.status),
            ("bytes_sent", record.bytes_sent),
            ("total_ms", _ms(record.total_ms)),
            ("upstream_ms", _ms(record.upstream_ms)),
            ("paced_ms", _ms(record.paced_ms)),
            ("route", record.route),
            ("pool", record.pool),
            ("worker", record.worker),
            ("key_kind", record.key_kind),
            ("identity", record.identity),
            ("fallbacks", list(record.fallbacks)),
            ("failover", record.failover),
            ("token_hash", token_hash),
            ("upload", "cut" if record.upload_cut else None),
            ("client_error", record.client_error),
            ("failure", record.failure),
            ("user_id", record.user_id if self.include_user else None),
        ]
        return {k: v for k, v in candidates if v is not None and v != "" and v != []}

    def format(self, record: AccessRecord) -> str:
        fields = self.fields(record)
        if self.fmt == "json":
            return to_json_line(fields)
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())


# --- logfmt ----------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def _needs_quotes(text: str) -> bool:
    # Whole-string C-level checks, not a Python loop per character (most of a line's cost).
    return not text or not text.isprintable() or " " in text or '"' in text or "=" in text


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def logfmt_value(value: str | int | float | list[str]) -> str:
    """One logfmt value: bare when safe, else double-quoted with control characters escaped."""
    if isinstance(value, list):
        value = ",".join(value)
    text = str(value)
    if not _needs_quotes(text):
        return text
    return '"' + "".join(_escape_char(c) for c in text) + '"'


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse a logfmt line (as written by AccessLogFormatter) into its keys and string values.
    A key without `=` has the value "". Raises ValueError on an unterminated quote or bad escape."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        start = i
        while i < n and line[i] not in " =":
            i += 1
        key = line[start:i]
        if not key:
            raise ValueError(f"empty key at column {start}")
        if i >= n or line[i] == " ":
            out[key] = ""
            continue
        i += 1  # the "="
        if i < n and line[i] == '"':
            value, i = _parse_quoted(line, i + 1)
            if i < n and line[i] != " ":
                raise ValueError(f"unexpected {line[i]!r} after the quoted value of {key!r}")
        else:
            start = i
            while i < n and line[i] != " ":
                i += 1
            value = line[start:i]
        out[key] = value
    return out


def _parse_quoted(line: str, i: int) -> tuple[str, int]:
    """The value of a quoted string starting after its opening quote, and the index after its end."""
    chars: list[str] = []
    n = len(line)
    while i < n:
        c = line[i]
        if c == '"':
            return "".join(chars), i + 1
        if c != "\\":
            chars.append(c)
            i += 1
            continue
        if i + 1 >= n:
            break
        e = line[i + 1]
        if e in _UNESCAPES:
            chars.append(_UNESCAPES[e])
            i += 2
        elif e in "uU":
            width = 4 if e == "u" else 8
            digits = line[i + 2 : i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError(f"bad \\{e} escape at column {i}")
            chars.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            raise ValueError(f"unknown escape \\{e} at column {i}")
    raise ValueError("unterminated quoted value")


_NON_ASCII = re.compile(r"[^\x20-\x7e]")


def _escape_unprintable(match: re.Match[str]) -> str:
    c = match[0]
    return c if c.isprintable() else json.dumps(c)[1:-1]  # \u escapes, surrogate pairs beyond the BMP


def to_json_line(fields: Mapping[str, object]) -> str:
    """Compact JSON, non-ASCII text kept as is, except characters that are not printable: C0/C1
    controls, line and paragraph separators, lone surrogates (from an undecodable path) are
    escaped, so a line stays one line for any reader and encodes as UTF-8."""
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    return _NON_ASCII.sub(_escape_unprintable, text)


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = False
    format: LogFormat = "logfmt"
    include_user: bool = False  # write the Matrix user id (personal data: off by default)
    path: str | None = None  # a file to append to; None: the caller's default destination


class AccessLogConfigError(ValueError):
    """A bad `access_log` setting. `key` is the sub-key at fault (None: the section itself),
    `reason` the message without it, for a caller that adds the full key path and line."""

    def __init__(self, key: str | None, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)


ACCESS_LOG_KEYS = ("enabled", "format", "include_user", "path")


def parse_access_log_config(raw: object) -> AccessLogConfig:
    """Validate the `access_log` section: absent or null means disabled; otherwise a mapping of
    `enabled` (bool, default false), `format` (logfmt | json), `include_user` (bool), `path`."""
    if raw is None:
        return AccessLogConfig()
    if not isinstance(raw, Mapping):
        raise AccessLogConfigError(None, f"expected a mapping with keys {', '.join(ACCESS_LOG_KEYS)}")
    for key in raw:
        if not isinstance(key, str) or key not in ACCESS_LOG_KEYS:
            raise AccessLogConfigError(str(key), f"unknown key; expected one of {', '.join(ACCESS_LOG_KEYS)}")
    defaults = AccessLogConfig()

    def flag(key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise AccessLogConfigError(key, f"expected true or false, got {value!r}")
        return value

    fmt_value = raw.get("format", defaults.format)
    if fmt_value not in FORMATS:
        raise AccessLogConfigError("format", f"expected one of {', '.join(FORMATS)}, got {fmt_value!r}")
    fmt: LogFormat = "json" if fmt_value == "json" else "logfmt"
    path = raw.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip() or "\0" in path):
        raise AccessLogConfigError("path", f"expected a file path, got {path!r}")
    return AccessLogConfig(
        enabled=flag("enabled", defaults.enabled),
        format=fmt,
        include_user=flag("include_user", defaults.include_user),
        path=path,
    )
