"""Choosing the lean launcher's event loop (launcher/eventloop.py): the flag, the environment
variable, their errors, and uvloop's loop keeping SharedPorts' SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import socket

import pytest
from synapse_router.launcher.childprocess import SharedPortLoop, SharedPorts
from synapse_router.launcher.eventloop import ENVIRONMENT, chosen_event_loop, loop_factory, loop_name


def test_asyncio_unless_asked() -> None:
    assert chosen_event_loop(["--mode", "reverse:http://x:1@8080"], {}) == "asyncio"
    assert chosen_event_loop([], {ENVIRONMENT: ""}) == "asyncio"
    assert loop_factory("asyncio") is SharedPortLoop


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {ENVIRONMENT: "uvloop"}, "uvloop"),
        (["--event-loop", "uvloop"], {}, "uvloop"),
        (["--event-loop=uvloop"], {}, "uvloop"),
        (["--event-loop", "asyncio"], {ENVIRONMENT: "uvloop"}, "asyncio"),  # the flag wins
        (["--event-loop", "uvloop", "--event-loop", "asyncio"], {}, "asyncio"),  # the last one
    ],
)
def test_the_flag_then_the_environment(argv: list[str], environ: dict[str, str], expected: str) -> None:
    assert chosen_event_loop(argv, environ) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        (["--event-loop", "tokio"], {}, "--event-loop: expected one of asyncio, uvloop, got 'tokio'"),
        (["--event-loop"], {}, "--event-loop: expected one of asyncio, uvloop"),
        ([], {ENVIRONMENT: "libuv"}, f"{ENVIRONMENT}: expected one of asyncio, uvloop, got 'libuv'"),
    ],
)
def test_an_unknown_loop_is_refused_naming_where(argv: list[str], environ: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        chosen_event_loop(argv, environ)


def test_uvloop_loop_shares_ports_like_asyncio_s() -> None:
    pytest.importorskip("uvloop")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = loop_factory("uvloop")()
    assert isinstance(loop, SharedPorts) and loop_name(loop) == "uvloop"
    loop.shared_ports = frozenset({port})  # type: ignore[attr-defined]

    async def listen() -> list[int]:
        # mitmproxy's listeners are made by asyncio.start_server (test_mitmproxy_internals.py)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        try:
            return [s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in server.sockets]
        finally:
            server.close()
            await server.wait_closed()

    try:
        options = loop.run_until_complete(listen())
    finally:
        loop.close()
    assert options and all(options)
    default = SharedPortLoop()
    try:
        assert loop_name(default) == "asyncio"
    finally:
        default.close()
