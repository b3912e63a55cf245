"""edge/port_sharing.py: another socket on one of ours' listening address, as the kernel lists it."""

from __future__ import annotations

import socket
from pathlib import Path

from synapse_router.edge.port_sharing import listening, shared_with_another

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:B04D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4570764 1 0
   1: 0100007F:B04D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4570999 1 0
   2: 0100007F:B04D 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4571000 1 0
   3: 0100007F:6358 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 4568825 1 0
"""


def test_listening_sockets_by_address_leave_out_connections() -> None:
    assert listening(TABLE) == {"0100007F:B04D": {4570764, 4570999}, "0100007F:6358": {4568825}}
    assert listening("") == {} and listening("header only\n") == {}


def _listener(reuse: bool, port: int = 0) -> socket.socket:
    sock = socket.socket()
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_second_listener_on_the_same_port_is_seen_and_goes_away_with_it() -> None:
    with _listener(reuse=True) as ours:
        assert not shared_with_another([ours])
        port = ours.getsockname()[1]
        with _listener(reuse=True, port=port):
            assert shared_with_another([ours])
        assert not shared_with_another([ours])
        with _listener(reuse=False):  # another port: not shared
            assert not shared_with_another([ours])


def test_unreadable_tables_or_closed_sockets_share_nothing(tmp_path: Path) -> None:
    with _listener(reuse=True) as ours:
        port = ours.getsockname()[1]
        with _listener(reuse=True, port=port):
            assert not shared_with_another([ours], tables=[tmp_path / "absent"])
    closed = _listener(reuse=False)
    closed.close()
    assert not shared_with_another([closed])
