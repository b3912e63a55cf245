"""Where a Synapse process is: an upstream URL (a worker, the main process) or a listen address."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class Upstream:
    """A Synapse process reachable over HTTP: a worker, or the main process."""

    url: str  # as configured, normalised: scheme://host:port
    scheme: str
    host: str
    port: int
    weight: float = 1.0
    drained: bool = False  # out of rotation by configuration


def parse_upstream_url(value: str) -> Upstream:
    """Parse `http(s)://host[:port]`; raise ValueError on anything else."""
    if not isinstance(value, str):
        raise ValueError(f"expected a URL string, got {type(value).__name__}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{value!r} must be scheme://host[:port] with no path, query or credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"{value!r} has an invalid port") from e
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return Upstream(f"{parts.scheme}://{shown}:{port}", parts.scheme, host, port)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse a listen address: "host:port", "0.0.0.0:9105", "[::1]:9105", "[::]:0"."""
    if not isinstance(value, str):
        raise ValueError(f"expected a listen address 'host:port', got {type(value).__name__}")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"{value!r} is not 'host:port' (e.g. 127.0.0.1:9105 or [::1]:9105)")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{value!r} has an invalid port {port_text!r}: expected 0-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port_text)
        except ValueError:
            raise ValueError(f"{value!r}: {host[1:-1]!r} is not an IPv6 address") from None
    if not host:
        raise ValueError(f"{value!r} has no host; to listen on every interface use 0.0.0.0:PORT or [::]:PORT")
    if ":" in host:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:9105")
    if host.replace(".", "").isdigit():
        try:
            return str(ipaddress.IPv4Address(host)), int(port_text)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv4 address") from None
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{value!r}: {host!r} is not a valid host name or IPv4 address")
    return host, int(port_text)
