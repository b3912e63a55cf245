"""Reading parameters of a query string the way Synapse does, fast.

Synapse reads Twisted's `request.args`, whose `parse_qs` splits the query on `&` and on `;`
and decodes `+` and percent escapes in names and values. Every value is kept, in order; Synapse
takes the first. (A pair without `=`, which Twisted skips, is read here as an empty value: a
bare `access_token` is then refused as an implausible token rather than passed on.)
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

_SEPARATOR = re.compile("[&;]")


def pairs(query: str) -> list[str]:
    """The `name=value` pairs of a query string, as they are written (not decoded)."""
    return _SEPARATOR.split(query) if ";" in query else query.split("&")


def query_values(query: str, name: str) -> list[str]:
    """Every value of `name` in `query` (names and values decoded), in order."""
    if not query:
        return []
    decode = "%" in query or "+" in query
    values = []
    for pair in pairs(query):
        key, _, value = pair.partition("=")
        if decode:
            key, value = unquote_plus(key), unquote_plus(value)
        if key == name:
            values.append(value)
    return values


def query_param(query: str, name: str) -> str | None:
    """The first value of `name` in `query` (decoded), or None if absent."""
    values = query_values(query, name) if (query and name in query) or "%" in query else []
    return values[0] if values else None
