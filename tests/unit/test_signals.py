"""on_signal: a signal reaches the event loop even when the loop's self-pipe is full."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest
from synapse_router.launcher.signals import on_signal


def _fill_self_pipe(loop: asyncio.AbstractEventLoop) -> int:
    """Write to the loop's self-pipe (its signal wakeup fd) until it takes no more, as
    mitmproxy's per-log-record call_soon_threadsafe does under a burst of connections."""
    csock: socket.socket = loop._csock  # type: ignore[attr-defined]
    written = 0
    while True:
        try:
            csock.send(b"\0")
        except BlockingIOError:
            return written
        written += 1


@pytest.fixture
def restore_sigusr2():
    previous = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)


async def test_signal_arriving_while_the_self_pipe_is_full_is_handled(restore_sigusr2) -> None:
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    on_signal(signal.SIGUSR2, received.set)
    assert _fill_self_pipe(loop) > 0
    os.kill(os.getpid(), signal.SIGUSR2)
    await asyncio.wait_for(received.wait(), 5)


async def test_each_signal_runs_the_callback(restore_sigusr2) -> None:
    calls: list[int] = []
    on_signal(signal.SIGUSR2, lambda: calls.append(1))
    for expected in (1, 2):
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(100):
            if len(calls) == expected:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == expected


def test_a_signal_after_the_loop_closed_is_ignored(restore_sigusr2) -> None:
    async def install() -> None:
        on_signal(signal.SIGUSR2, lambda: None)

    asyncio.run(install())
    os.kill(os.getpid(), signal.SIGUSR2)  # the handler must not raise "Event loop is closed" here
