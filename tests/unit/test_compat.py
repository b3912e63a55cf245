"""Behavioural tests of compat.regex and compat.printing, run against the installed Python and mitmproxy:
a release that changes one fails here."""

from __future__ import annotations

import io
import json
import logging

import pytest
from mitmproxy import contentviews
from mitmproxy.addons import dumper
from mitmproxy.test import taddons, tflow, tutils
from synapse_router.addons import credentials
from synapse_router.compat import printing
from synapse_router.compat.regex import parse_regex
from synapse_router.observability import logsafety


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


def login_flow() -> object:
    flow = tflow.tflow(
        req=tutils.treq(
            method=b"POST",
            path=b"/_matrix/client/v3/login",
            headers=[(b"host", b"h"), (b"cookie", b"c=SECRETCOOKIE"), (b"content-type", b"application/json")],
            content=json.dumps({"type": "m.login.password", "password": "SECRETPW"}).encode(),
        ),
        resp=tutils.tresp(
            headers=[(b"content-type", b"application/json"), (b"set-cookie", b"s=SECRETSET")],
            content=json.dumps({"user_id": "@a:b", "access_token": "SECRETAT", "refresh_token": "SECRETRT"}).encode(),
        ),
    )
    return flow


def test_the_dumper_prints_the_transformed_flow_and_the_flow_is_left_alone() -> None:
    out = io.StringIO()
    d = dumper.Dumper(out)
    with taddons.context(d) as tctx:
        tctx.configure(d, flow_detail=4)
        assert printing.print_flows_through(tctx.master, credentials.shown)
        assert printing.print_flows_through(tctx.master, credentials.shown)  # once only
        flow = login_flow()
        d.response(flow)
        printed = out.getvalue()
        assert "/_matrix/client/v3/login" in printed and "@a:b" in printed
        for secret in ("SECRETCOOKIE", "SECRETPW", "SECRETSET", "SECRETAT", "SECRETRT"):
            assert secret not in printed, printed
        # the flow (what is relayed) is untouched
        assert b"SECRETAT" in flow.response.content and flow.response.headers["set-cookie"] == "s=SECRETSET"
        assert b"SECRETPW" in flow.request.content


def test_no_dumper_nothing_to_do() -> None:
    with taddons.context() as tctx:
        assert not printing.print_flows_through(tctx.master, credentials.shown)


def test_answered_flow_keeps_no_request_secret_and_no_quoted_error() -> None:
    from mitmproxy import flow as mflow

    flow = login_flow()
    flow.error = mflow.Error('HTTP/1 protocol error: illegal chunk header: bytearray(b\'{"password": "SECRETPW"}\')')
    credentials.redact_answered(flow)
    assert b"SECRETPW" not in flow.request.content
    assert flow.request.headers["cookie"] == "<redacted>"
    assert "SECRETPW" not in flow.error.msg and flow.error.msg.startswith("HTTP/1 protocol error: illegal chunk header")
    assert b"SECRETAT" in flow.response.content  # the answer is Synapse's, as relayed


def test_contentview_auto_shows_secret_fields_redacted() -> None:
    contentviews.add(credentials.SecretsWithheldView())
    flow = login_flow()
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == "Matrix, secrets withheld"
    assert "SECRETAT" not in shown.text and "@a:b" in shown.text
    plain = tflow.tflow(resp=tutils.tresp(headers=[(b"content-type", b"application/json")], content=b'{"a": 1}'))
    assert contentviews.prettify_message(plain.response, plain).view_name != "Matrix, secrets withheld"


def test_proxy_log_records_pass_the_allow_list() -> None:
    addon = credentials.LogRedaction()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(logging.Formatter().format(record))

    handler = Keep()
    logger = logging.getLogger("mitmproxy.proxy.server")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    addon.load(None)
    try:
        logger.info("client connect")
        logger.info("127.0.0.1:5: Bad HTTP request line: b'GET /?%61ccess_token=SECRETQ HTTP/1.1 x'")
        try:
            raise ValueError("".join(["SECRET", "EXC"]))
        except ValueError:
            logger.error("mitmproxy has crashed!", exc_info=True)
    finally:
        addon.done()
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert "client connect" in records
    bad_line = [r for r in records if r.startswith("127.0.0.1:5: ")]
    assert bad_line == [f"127.0.0.1:5: Bad HTTP request line {logsafety.DETAILS_WITHHELD}"]
    crashed = [r for r in records if r.startswith("mitmproxy has crashed!")]
    assert len(crashed) == 1 and crashed[0].startswith("mitmproxy has crashed!\nTraceback")
    assert "ValueError: [message withheld]" in crashed[0]
    assert not any("SECRETQ" in r or "SECRETEXC" in r for r in records), records
