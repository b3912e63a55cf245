"""Opening a TCP connection to a worker within the connect timeout, judged by the kernel.

`asyncio.timeout` around a connect measures the event loop as much as the worker: a router busy
with a reconnect storm (thousands of new clients at once) runs its loop in turns of seconds, so
a connection the kernel completed in microseconds is seen only after the timer fired, and every
worker looks black-holed (measured: all 3,000 of a burst failed over twice, to main;
docs/benchmarks.md). Here, when the timer fires, the socket itself is asked: connected (a
late look at a fast worker) is a connection; still in progress means the SYN has had the whole
timeout unanswered, which is what the timeout is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from typing import Any

Address = tuple[int, int, int, tuple[Any, ...]]  # family, type, proto, socket address


async def open_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A non-blocking TCP socket connected to host:port, tried address by address. Raises
    TimeoutError if no connection opened within `timeout` seconds of the connect calls (a
    name is resolved within the same timeout), OSError if refused or unreachable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with asyncio.timeout_at(deadline):
        addresses = await _resolve(host, port)
    error: OSError | None = None
    for family, type_, proto, address in addresses:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await _connect(loop, sock, address, deadline)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as e:  # refused, unreachable: the next address, if any
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error or OSError(errno.EHOSTUNREACH, f"no address for {host}")


async def _connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: tuple[str, int] | tuple[str, int, int, int],
    deadline: float,
) -> None:
    try:
        async with asyncio.timeout_at(deadline):
            await loop.sock_connect(sock, address)
    except TimeoutError:
        if not connected(sock):
            raise


def connected(sock: socket.socket) -> bool:
    """Whether the kernel has completed this socket's connect; raises OSError if it failed."""
    try:
        sock.getpeername()
        return True
    except OSError:
        pass
    failure = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if failure:
        raise OSError(failure, os.strerror(failure))
    return False


async def _resolve(host: str, port: int) -> list[Address]:
    """An IP address without a lookup (the common case: workers are configured by address),
    else the resolver in asyncio's thread pool."""
    infos = None
    with contextlib.suppress(socket.gaierror):
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    if infos is None:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, type_, proto, address) for family, type_, proto, _, address in infos]
