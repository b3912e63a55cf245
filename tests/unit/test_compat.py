"""Behavioural tests of the private internals compat.py relies on."""

from __future__ import annotations

import pytest
from synapse_router.compat import parse_regex


def test_parse_regex_gives_the_tree_and_group_names() -> None:
    tree, names = parse_regex(r"^/a/(b|cd)/(?P<room_id>[^/]*)(/x)?\d$")
    ops = [op for op, _ in tree]
    assert ops[0] == "AT" and ops[-2] == "IN" and "SUBPATTERN" in ops and "MAX_REPEAT" in ops
    assert names == {2: "room_id"}
    group, body = next(av for op, av in tree if op == "SUBPATTERN")
    assert group == 1 and body[0][0] == "BRANCH" and len(body[0][1]) == 2
    repeat = next(av for op, av in tree if op == "MAX_REPEAT")
    assert repeat[:2] == (0, 1)


def test_parse_regex_unbounded_repeat_has_no_upper_bound() -> None:
    tree, _ = parse_regex(r"x*")
    assert tree == [("MAX_REPEAT", (0, None, [("LITERAL", ord("x"))]))]


def test_parse_regex_raises_value_error_on_a_bad_pattern() -> None:
    with pytest.raises(ValueError):
        parse_regex("(")
