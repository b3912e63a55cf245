"""Access tokens in Matrix requests: where they are, and how to refer to one safely.

A token is never stored, logged or used as a key as-is: everything keys on a SHA-256 of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import unquote_plus

from .query import query_param

TOKEN_PARAM = "access_token"
AS_USER_PARAM = "user_id"


@dataclass(frozen=True, slots=True)
class FoundToken:
    token: str
    from_query: bool
    conflict: bool  # both a header and a query token: Synapse rejects such a request
    as_user: str | None  # an appservice acting as this user (`?user_id=`)
    key: bytes  # token_key(token, as_user): what caches and logs refer to


def token_key(token: str, as_user: str | None = None) -> bytes:
    material = token.encode("utf-8", "surrogateescape")
    if as_user:
        material += b"\0" + as_user.encode("utf-8", "surrogateescape")
    return hashlib.sha256(material).digest()


def short_hash(key: bytes) -> str:
    """A short, non-reversible label for logs and flow comments."""
    return key[:4].hex()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    token = rest.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def find_token(authorization: str | None, query: str) -> FoundToken | None:
    """The access token of a request, from `Authorization: Bearer` or `?access_token=`."""
    header_token = bearer_token(authorization)
    query_token = query_param(query, TOKEN_PARAM) or None
    as_user = query_param(query, AS_USER_PARAM) or None
    if header_token is not None:
        return FoundToken(header_token, False, query_token is not None, as_user, token_key(header_token, as_user))
    if query_token is not None:
        return FoundToken(query_token, True, authorization is not None, as_user, token_key(query_token, as_user))
    return None


def _is_token_param(pair: str) -> bool:
    # Names are compared decoded, as Synapse parses them: `access%5Ftoken` is a token too.
    return unquote_plus(pair.split("=", 1)[0]) == TOKEN_PARAM


def remove_query_token(query: str) -> str:
    """The query string without its access_token parameter(s), otherwise byte-for-byte kept."""
    return "&".join(p for p in query.split("&") if not _is_token_param(p))


def redact_query_token(query: str, label: str) -> str:
    return "&".join(f"{TOKEN_PARAM}=<redacted:{label}>" if _is_token_param(p) else p for p in query.split("&"))
