"""The client address and scheme Synapse is told."""

from __future__ import annotations

import ipaddress

from synapse_router.edge.client_address import TrustedProxies, parse_ip

TRAEFIK = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")])


def test_untrusted_peer_headers_ignored() -> None:
    fwd = TrustedProxies().resolve("203.0.113.9", "1.2.3.4", "https", tls=False)
    assert (fwd.client_ip, fwd.proto) == ("203.0.113.9", "http")
    fwd = TRAEFIK.resolve("203.0.113.9", "1.2.3.4", "https", tls=True)
    assert (fwd.client_ip, fwd.proto) == ("203.0.113.9", "https")


def test_trusted_proxy_rightmost_untrusted_wins() -> None:
    # the client forged 6.6.6.6; Traefik appended what it saw, 198.51.100.7
    fwd = TRAEFIK.resolve("10.0.0.2", "6.6.6.6, 198.51.100.7", "https", tls=False)
    assert (fwd.client_ip, fwd.proto) == ("198.51.100.7", "https")


def test_chain_of_trusted_proxies() -> None:
    fwd = TRAEFIK.resolve("10.0.0.2", "198.51.100.7, 10.9.9.9", None, tls=False)
    assert fwd.client_ip == "198.51.100.7"


def test_garbage_in_chain_stops_at_last_good_hop() -> None:
    fwd = TRAEFIK.resolve("10.0.0.2", "not-an-ip", None, tls=False)
    assert fwd.client_ip == "10.0.0.2"
    fwd = TRAEFIK.resolve("10.0.0.2", "198.51.100.7, 10.0.0.3", "gopher", tls=False)
    assert (fwd.client_ip, fwd.proto) == ("198.51.100.7", "http")


def test_ipv4_mapped_and_ports() -> None:
    assert str(parse_ip("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(parse_ip("192.0.2.1:5555")) == "192.0.2.1"
    assert str(parse_ip("[2001:db8::1]:443")) == "2001:db8::1"
    assert parse_ip("unknown") is None
    fwd = TRAEFIK.resolve("::1", "[2001:db8::5]:1234", None, tls=False)
    assert fwd.client_ip == "2001:db8::5"
