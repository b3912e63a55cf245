"""SwitchedListener (listener.py): one address served at a time, moved by one task, a new one
published only once bound, the old one stopped only then."""

from __future__ import annotations

import asyncio
import socket

from synapse_router.launcher.listener import SwitchedListener
from synapse_router.observability.metrics_server import MetricsServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _answers(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    line = await reader.readline()
    writer.close()
    return line.startswith(b"HTTP/1.1 200")


def _listener(warnings: list[str]) -> SwitchedListener:
    return SwitchedListener(lambda listen: MetricsServer(lambda: b"", listen), warnings.append)


async def test_three_wishes_in_one_turn_end_on_the_last_with_nothing_left_on_the_others() -> None:
    a, b, c = _free_port(), _free_port(), _free_port()
    listener = _listener([])
    listener.want(f"127.0.0.1:{a}")
    await listener.settled()
    listener.want(f"127.0.0.1:{b}")
    listener.want(f"127.0.0.1:{c}")
    await listener.settled()
    assert listener.listen == f"127.0.0.1:{c}"
    assert [await _answers(p) for p in (a, b, c)] == [False, False, True]
    await listener.close()
    assert [await _answers(p) for p in (a, b, c)] == [False, False, False]


async def test_a_refused_address_leaves_the_old_one_and_is_tried_again_when_asked() -> None:
    first = _free_port()
    warnings: list[str] = []
    listener = _listener(warnings)
    listener.want(f"127.0.0.1:{first}")
    await listener.settled()
    holder = socket.socket()  # a program that holds the port without SO_REUSEPORT
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    listener.want(f"127.0.0.1:{busy}")
    await listener.settled()
    assert listener.listen == f"127.0.0.1:{first}" and await _answers(first)
    assert warnings and f"they stay on http://127.0.0.1:{first}/metrics" in warnings[-1]
    holder.close()
    listener.want(f"127.0.0.1:{busy}")  # the same address again: not sticky
    await listener.settled()
    assert listener.listen == f"127.0.0.1:{busy}"
    assert await _answers(busy) and not await _answers(first)
    await listener.close()


async def test_a_first_address_that_fails_says_none_is_served() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    warnings: list[str] = []
    listener = _listener(warnings)
    listener.want(f"127.0.0.1:{holder.getsockname()[1]}")
    await listener.settled()
    holder.close()
    assert listener.listen is None
    assert warnings and warnings[-1].endswith("none served")


async def test_close_during_a_move_leaves_nothing_listening() -> None:
    a, b = _free_port(), _free_port()
    listener = _listener([])
    listener.want(f"127.0.0.1:{a}")
    listener.want(f"127.0.0.1:{b}")
    await listener.close()
    assert listener.listen is None
    assert not await _answers(a) and not await _answers(b)
