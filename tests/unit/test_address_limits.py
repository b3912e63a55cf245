"""Per-address connection bounds (edge/address_limits.py, the pure half) and the accept-time
screen (compat/listening.py's ScreenedListener, run against the installed CPython's asyncio)."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket

import pytest
from synapse_router.compat.listening import MAX_REFUSED_PER_CALL, ScreenedListener, accept_per_wakeup
from synapse_router.config import parse_config
from synapse_router.edge.address_limits import AddressBounds
from synapse_router.edge.limits import (
    ADDRESS_CONNECTIONS,
    ADDRESS_RATE,
    LimitsConfig,
    LimitsConfigError,
    parse_limits,
)

# --- configuration ---


def test_defaults_and_values() -> None:
    config = LimitsConfig()
    assert (config.max_connections_per_address, config.connection_rate_per_address) == (2000, 200.0)
    assert config.connection_burst_per_address == 2000
    parsed = parse_limits(
        {"max_connections_per_address": 3, "connection_rate_per_address": 0.5, "connection_burst_per_address": 4}
    )
    assert (parsed.max_connections_per_address, parsed.connection_rate_per_address) == (3, 0.5)
    assert parsed.connection_burst_per_address == 4


@pytest.mark.parametrize(
    ("key", "bad", "words"),
    [
        ("max_connections_per_address", 0, "must be an integer >= 1"),
        ("max_connections_per_address", 2.5, "must be an integer >= 1"),
        ("connection_rate_per_address", 0, "must be a number > 0 (connections per second)"),
        ("connection_rate_per_address", math.inf, "must be a number > 0"),
        ("connection_rate_per_address", "10/s", "must be a number > 0"),
        ("connection_burst_per_address", 0, "must be an integer >= 1"),
    ],
)
def test_bad_values_name_the_key(key: str, bad: object, words: str) -> None:
    with pytest.raises(LimitsConfigError) as info:
        parse_limits({key: bad})
    assert info.value.key == key and words in info.value.reason


def test_the_configuration_file_names_the_key_and_line() -> None:
    with pytest.raises(ValueError, match=r"limits\.max_connections_per_address.*line 3"):
        parse_config("workers: {}\nlimits:\n  max_connections_per_address: -1\n")


# --- the bounds ---


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_open_connections_per_address() -> None:
    bounds = AddressBounds(LimitsConfig(max_connections_per_address=2))
    assert bounds.opened("10.0.0.1", charge_rate=True) is None
    assert bounds.opened("10.0.0.1", charge_rate=True) is None
    assert bounds.refusal("10.0.0.1") == ADDRESS_CONNECTIONS
    assert bounds.opened("10.0.0.1", charge_rate=True) == ADDRESS_CONNECTIONS  # not counted
    assert bounds.opened("10.0.0.2", charge_rate=True) is None  # another address
    bounds.closed("10.0.0.1")
    assert bounds.open_from("10.0.0.1") == 1
    assert bounds.refusal("10.0.0.1") is None
    bounds.closed("10.0.0.1")
    bounds.closed("10.0.0.2")
    assert bounds.open_from("10.0.0.1") == 0 and not bounds._open  # nothing left per address


def test_connection_rate_per_address() -> None:
    clock = Clock()
    bounds = AddressBounds(LimitsConfig(connection_rate_per_address=2, connection_burst_per_address=3), clock=clock)
    assert [bounds.refusal("10.0.0.1") for _ in range(4)] == [None, None, None, ADDRESS_RATE]
    assert bounds.refusal("10.0.0.2") is None  # its own bucket
    clock.now += 0.5  # one more token
    assert [bounds.refusal("10.0.0.1") for _ in range(2)] == [None, ADDRESS_RATE]
    # Charged at accept already: mitmproxy's report of the same connection does not take another.
    assert bounds.opened("10.0.0.1", charge_rate=False) is None
    assert bounds.opened("10.0.0.1", charge_rate=True) == ADDRESS_RATE


def test_trusted_proxies_are_exempt() -> None:
    trusted = [ipaddress.ip_network("10.1.0.0/16")]
    bounds = AddressBounds(LimitsConfig(max_connections_per_address=1, connection_burst_per_address=1), trusted)
    for _ in range(5):
        assert bounds.opened("10.1.2.3", charge_rate=True) is None
    assert bounds.opened("10.2.0.1", charge_rate=True) is None
    assert bounds.refusal("10.2.0.1") == ADDRESS_CONNECTIONS
    # A reload that no longer trusts it bounds it from then on.
    bounds.use(LimitsConfig(max_connections_per_address=1, connection_burst_per_address=1), ())
    assert bounds.refusal("10.1.2.3") == ADDRESS_CONNECTIONS


def test_reload_keeps_counts_and_restarts_buckets_on_a_new_rate() -> None:
    clock = Clock()
    bounds = AddressBounds(LimitsConfig(connection_burst_per_address=1), clock=clock)
    assert bounds.opened("10.0.0.1", charge_rate=True) is None
    assert bounds.refusal("10.0.0.1") == ADDRESS_RATE
    bounds.use(LimitsConfig(connection_burst_per_address=1), ())  # same rate: same buckets
    assert bounds.refusal("10.0.0.1") == ADDRESS_RATE
    bounds.use(LimitsConfig(connection_burst_per_address=2, max_connections_per_address=1), ())
    assert bounds.refusal("10.0.0.1") == ADDRESS_CONNECTIONS  # its open connection still counts


def test_tracked_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("synapse_router.edge.address_limits.MAX_TRACKED", 10)
    bounds = AddressBounds()
    for i in range(50):
        bounds.refusal(f"10.0.1.{i}")
    assert bounds.tracked() == 10


# --- the screen, on a real listening socket and asyncio's own accept handler ---


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


async def _screened_server(refuse: object) -> tuple[asyncio.Server, list[str]]:
    served: list[str] = []
    writers: list[asyncio.StreamWriter] = []

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer.get_extra_info("peername")[0])
        writers.append(writer)  # left open until the end of the test

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    assert accept_per_wakeup(server, lambda: 100, refuse)  # type: ignore[arg-type]
    server.writers = writers  # type: ignore[attr-defined]
    return server, served


def test_refused_connections_never_reach_the_server() -> None:
    async def run() -> tuple[list[str], list[str], list[bytes]]:
        asked: list[str] = []

        def refuse(host: str) -> bool:
            asked.append(host)
            return host == "127.0.0.2"

        server, served = await _screened_server(refuse)
        port = server.sockets[0].getsockname()[1]
        clients = [_connect(port, source) for source in ("127.0.0.2", "127.0.0.1", "127.0.0.2", "127.0.0.3")]
        for _ in range(20):
            await asyncio.sleep(0.01)
        received = []
        for client in clients:
            client.settimeout(5)
            try:
                received.append(client.recv(10))
            except ConnectionResetError:
                received.append(b"reset")
            except TimeoutError:
                received.append(b"open")
            client.close()
        for writer in server.writers:  # type: ignore[attr-defined]
            writer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        return asked, served, received

    asked, served, received = asyncio.run(run())
    assert sorted(asked) == ["127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.3"]
    assert sorted(served) == ["127.0.0.1", "127.0.0.3"]  # no transport, no task for the others
    # The refused ones are reset (no TIME_WAIT left per refused connection); the served ones
    # were closed by the handler only once it ran (it does not here: they stay open).
    assert received == [b"reset", b"open", b"reset", b"open"]


def test_a_flood_of_refusals_returns_to_the_loop() -> None:
    class Listening:
        def __init__(self) -> None:
            self.accepted = 0

        def accept(self) -> tuple[socket.socket, tuple[str, int]]:
            self.accepted += 1
            return socket.socket(), ("127.0.0.2", 1)

        def fileno(self) -> int:
            return -1

    listening = Listening()
    screened = ScreenedListener(listening, lambda host: True)  # type: ignore[arg-type]
    with pytest.raises(BlockingIOError):
        screened.accept()
    assert listening.accepted == MAX_REFUSED_PER_CALL
