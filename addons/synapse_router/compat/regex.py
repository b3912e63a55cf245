"""`re._parser` (Python's `sre_parse`): the parse tree of a regular expression. Python has no
public API for it; `routes audit` walks it to make a path that a Synapse servlet regex matches
(audit.py). Present, with this shape, from Python 3.11 on."""

from __future__ import annotations

import re
from re import _parser  # type: ignore[attr-defined]
from typing import Any


def parse_regex(pattern: str) -> tuple[list[tuple[Any, Any]], dict[int, str]]:
    """The parse tree of `pattern` as (opcode name, argument) pairs, and its group names by
    group number. Raises ValueError (re.error) for an invalid pattern."""
    try:
        parsed = _parser.parse(pattern)
    except re.error as e:  # not a ValueError
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
    names = {number: name for name, number in parsed.state.groupdict.items()}
    return _plain(parsed), names


def _plain(sub: Any) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for op, av in sub:
        out.append((str(op), _argument(str(op), av)))
    return out


def _argument(op: str, av: Any) -> Any:
    if op == "SUBPATTERN":
        group, _add, _del, body = av
        return (group, _plain(body))
    if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        low, high, body = av
        return (low, high if high != _parser.MAXREPEAT else None, _plain(body))
    if op == "BRANCH":
        return [_plain(branch) for branch in av[1]]
    if op == "IN":
        return [(str(item_op), str(item_av) if str(item_op) == "CATEGORY" else item_av) for item_op, item_av in av]
    if op in ("ASSERT", "ASSERT_NOT"):
        return None
    if op in ("AT", "CATEGORY"):
        return str(av)
    return av
