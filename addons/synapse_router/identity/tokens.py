"""Access tokens in Matrix requests: where they are, whether they are plausible, and how to
refer to one safely.

A token is never stored, logged or used as a key as-is: everything keys on a SHA-256 of it.

Only plausible tokens go anywhere: printable ASCII without whitespace (what Synapse, MAS and
appservice registrations issue), at most MAX_TOKEN_LENGTH characters. Anything else, and any
request with more than one token, is a `Refused` that the router answers itself, so
no decoded byte of a client's token (a CR, LF or NUL above all) is ever copied into a header
the router writes, and no whoami call or worker is spent on it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus

from ..edge.wellformed import TOKEN, Refused
from ..routing.query import pairs, query_values

TOKEN_PARAM = "access_token"
AS_USER_PARAM = "user_id"
# Where `?user_id=` is an appservice acting as a user: the client-server API (media included).
# Synapse's auth reads it for an appservice's token on any request it authenticates, but the
# router resolves users only there; elsewhere it means something else (the admin API's
# `/_synapse/admin/v2/users?user_id=` is a substring filter) and is passed on unread.
MASQUERADE_PREFIXES = ("/_matrix/client/", "/_matrix/media/")
MAX_TOKEN_LENGTH = 1024
MAX_USER_ID_LENGTH = 255  # the Matrix spec's limit on a user id
_PLAUSIBLE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no whitespace


@dataclass(frozen=True, slots=True)
class FoundToken:
    token: str
    from_query: bool
    as_user: str | None  # an appservice acting as this user (`?user_id=`)
    key: bytes  # token_key(token, as_user): what caches and logs refer to


def invalid_token() -> Refused:
    return Refused(401, "M_UNKNOWN_TOKEN", "Invalid access token passed.")


def token_key(token: str, as_user: str | None = None) -> bytes:
    material = token.encode("utf-8", "surrogateescape")
    if as_user:
        material += b"\0" + as_user.encode("utf-8", "surrogateescape")
    return hashlib.sha256(material).digest()


def short_hash(key: bytes) -> str:
    """A short, non-reversible label for logs and flow comments."""
    return key[:4].hex()


def _is_user_id(value: str) -> bool:
    """`@localpart:server`, printable ASCII, at most 255 characters (the Matrix spec's form)."""
    return value.startswith("@") and ":" in value and plausible(value, MAX_USER_ID_LENGTH)


def plausible(token: str, limit: int = MAX_TOKEN_LENGTH) -> bool:
    return len(token) <= limit and _PLAUSIBLE.fullmatch(token) is not None


def is_bearer(authorization: str) -> bool:
    """Whether a header value is meant as a bearer token (any case, however malformed)."""
    return authorization[:6].lower() == "bearer"


def bearer_token(authorization: str) -> str:
    """The token of a Bearer header value; Refused unless it is exactly
    `Bearer <plausible token>` (one space, as Synapse splits it)."""
    scheme, space, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not space or not plausible(token):
        raise invalid_token()
    return token


def find_token(authorizations: Sequence[str], query: str, path: str) -> FoundToken | None:
    """The access token of a request, from `Authorization: Bearer` or `?access_token=`; None
    if it has none (another scheme, e.g. federation's X-Matrix, is not a token). Raises
    Refused for an implausible token or more than one. `path` (raw, without the query)
    decides whether `?user_id=` is read as an appservice's user (MASQUERADE_PREFIXES)."""
    bearers = [value for value in authorizations if is_bearer(value)]
    # Names are compared decoded: only a query with the name as written or a `%` escape can hold one.
    query_tokens = query_values(query, TOKEN_PARAM) if TOKEN_PARAM in query or "%" in query else []
    if len(bearers) + len(query_tokens) > 1 or (query_tokens and authorizations):
        raise Refused(400, "M_INVALID_PARAM", "More than one access token or Authorization header.")
    if bearers:
        token, from_query = bearer_token(bearers[0]), False
    elif query_tokens:
        token, from_query = query_tokens[0], True
        if not plausible(token):
            raise invalid_token()
    else:
        return None
    masquerade = path.startswith(MASQUERADE_PREFIXES)
    as_users = query_values(query, AS_USER_PARAM) if masquerade and (AS_USER_PARAM in query or "%" in query) else []
    as_user = as_users[0] if as_users and as_users[0] else None
    if len(as_users) > 1 or (as_user is not None and not _is_user_id(as_user)):
        raise Refused(400, "M_INVALID_PARAM", "Invalid user_id parameter.")
    return FoundToken(token, from_query, as_user, token_key(token, as_user))


def is_token_param(pair: str) -> bool:
    # Names are compared decoded, as Synapse parses them: `access%5Ftoken` is a token too.
    return unquote_plus(pair.split("=", 1)[0]) == TOKEN_PARAM


def redact_query_token(query: str, label: str) -> str:
    return "&".join(f"{TOKEN_PARAM}=<redacted:{label}>" if is_token_param(p) else p for p in pairs(query))


def redact_authorization(value: str, label: str | None) -> str:
    """An Authorization header value fit to show: its scheme, never its credentials. A bearer
    token is labelled with `label` (its short hash), so the flow and the access log match."""
    if is_bearer(value):
        if label is None:
            scheme, _, rest = value.partition(" ")
            label = short_hash(token_key(rest.strip() or scheme))
        return f"Bearer <redacted:{label}>"
    scheme, separator, _ = value.partition(" ")
    # A lone word may be the credential itself (`Authorization: <token>`): only a word followed
    # by credentials is shown, as the scheme it is.
    return f"{scheme} <redacted>" if separator and TOKEN.fullmatch(scheme) else "<redacted>"
