"""Who the client really is, and the forwarding headers Synapse should see.

Synapse (with `x_forwarded: true`) takes the leftmost X-Forwarded-For entry as the client
address for rate limits and "last seen". So the router sends exactly one address: the
rightmost one not added by a trusted proxy. Client-sent values are believed only as far as
a chain of trusted proxies vouches for them.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Headers that could steer routing or the address Synapse records: never passed through as
# the client sent them.
SPOOFABLE_HEADERS = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
    "x-user-identifier",  # the nginx companion's internal routing header
    "x-access-token",  # HAProxy's (ESS) internal routing header
)
ROUTER_HEADER_PREFIX = "x-synapse-router-"
_DROPPED = frozenset(name.encode() for name in SPOOFABLE_HEADERS)
_ROUTER_PREFIX = ROUTER_HEADER_PREFIX.encode()


def without_spoofable(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...] | None:
    """The header fields minus those a client could spoof routing or its address with, or None
    if there are none (the common case: nothing to rebuild)."""
    kept = tuple(
        (name, value)
        for name, value in fields
        if (lower := name.lower()) not in _DROPPED and not lower.startswith(_ROUTER_PREFIX)
    )
    return kept if len(kept) != len(fields) else None


# Every request parses its peer's address (a flood pays it per request: ~18 us, as much as the
# rest of the routing hook's address handling, py-spy); the few addresses a process sees at
# a time are remembered, at most this many.
_PARSED = 4096


@functools.lru_cache(maxsize=_PARSED)
def parse_ip(value: str) -> IPAddress | None:
    value = value.strip()
    if value.startswith("["):  # [v6]:port
        value = value[1 : value.find("]")] if "]" in value else value
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class Forwarding:
    client_ip: str
    proto: str


class TrustedProxies:
    def __init__(self, networks: Sequence[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)

    def trusts(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.networks)

    def trusts_host(self, host: str) -> bool:
        """`trusts` for an address as text (False for one that does not parse)."""
        if not self.networks:
            return False
        addr = parse_ip(host)
        return addr is not None and self.trusts(addr)

    def resolve(self, peer: str, xff: str | None, xfp: str | None, tls: bool) -> Forwarding:
        """The real client address and scheme, given the TCP peer and the headers it sent."""
        proto = "https" if tls else "http"
        peer_addr = parse_ip(peer)
        if peer_addr is None:
            return Forwarding(peer, proto)
        if not self.networks or not self.trusts(peer_addr):
            return Forwarding(str(peer_addr), proto)
        client = peer_addr
        for hop in reversed((xff or "").split(",")):
            if not self.trusts(client):
                break
            hop_addr = parse_ip(hop)
            if hop_addr is None:
                break
            client = hop_addr
        if xfp:
            claimed = xfp.split(",")[0].strip().lower()
            if claimed in ("http", "https"):
                proto = claimed
        return Forwarding(str(client), proto)
