"""Reading one parameter of a query string the way Synapse does (first value wins), fast."""

from __future__ import annotations

from urllib.parse import parse_qsl


def query_param(query: str, name: str) -> str | None:
    """The first value of `name` in `query` (percent-decoded), or None if absent."""
    if not query:
        return None
    if "%" in query or "+" in query:
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == name:
                return value
        return None
    # Nothing encoded: a plain split is several times faster than parse_qsl.
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == name:
            return value
    return None
