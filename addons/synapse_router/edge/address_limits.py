"""Per-address connection bounds (`limits.max_connections_per_address`,
`limits.connection_rate_per_address`, `limits.connection_burst_per_address`), as nginx's
`limit_conn` and HAProxy's `src_conn_cur` / `src_conn_rate`: one client address opening and
closing connections as fast as it can, or holding thousands, must not cost everyone else.

The address is the TCP peer's. These bounds apply when a connection is accepted, before any
byte of it is read, so `X-Forwarded-For` plays no part; a peer in `trusted_proxies` is
exempt, since it carries many clients (a reverse proxy in front of the router bounds its own
clients, e.g. with nginx's `limit_conn`).

Pure: the addon (addons/connection_limits.py) asks `refusal` at accept (compat/listening.py
screens the listening socket with it) and again when mitmproxy reports the client
(`opened`), which is exact where the accept-time check can run ahead of the count.
Memory is bounded: open counts exist only for addresses with open connections, and at most
`MAX_TRACKED` rate buckets are kept (least recently used dropped; a dropped address starts
again with a full bucket).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..identity.ratelimit import TokenBucket
from .client_address import IPNetwork, parse_ip
from .limits import ADDRESS_CONNECTIONS, ADDRESS_RATE, LimitsConfig

MAX_TRACKED = 65536  # rate buckets kept (addresses seen lately)
_EXEMPT_CACHE = 4096  # trusted-or-not verdicts remembered per address


class AddressBounds:
    def __init__(
        self,
        config: LimitsConfig | None = None,
        trusted: Sequence[IPNetwork] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._open: dict[str, int] = {}  # address -> connections counted open (opened, not closed)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._exempt: dict[str, bool] = {}
        self.config = config or LimitsConfig()
        self.trusted: tuple[IPNetwork, ...] = tuple(trusted)

    def use(self, config: LimitsConfig, trusted: Sequence[IPNetwork]) -> None:
        """A new configuration: counts of open connections are kept; a new rate or burst starts
        every address with a full bucket."""
        rate_changed = (config.connection_rate_per_address, config.connection_burst_per_address) != (
            self.config.connection_rate_per_address,
            self.config.connection_burst_per_address,
        )
        self.config = config
        if rate_changed:
            self._buckets.clear()
        if tuple(trusted) != self.trusted:
            self.trusted = tuple(trusted)
            self._exempt.clear()

    def exempt(self, host: str) -> bool:
        """A trusted proxy's address (never bounded as one client)."""
        verdict = self._exempt.get(host)
        if verdict is None:
            addr = parse_ip(host)
            verdict = addr is not None and any(addr in net for net in self.trusted)
            if len(self._exempt) >= _EXEMPT_CACHE:
                self._exempt.clear()
            self._exempt[host] = verdict
        return verdict

    def refusal(self, host: str, charge_rate: bool = True) -> str | None:
        """Why a new connection from `host` is refused (a metric label), or None to admit it;
        an admitted one takes a token of its address's rate (unless `charge_rate` is false:
        it was taken when the connection was accepted)."""
        if not self.trusted or not self.exempt(host):
            if self._open.get(host, 0) >= self.config.max_connections_per_address:
                return ADDRESS_CONNECTIONS
            if charge_rate and not self._take(host):
                return ADDRESS_RATE
        return None

    def _take(self, host: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(host)
        if bucket is None:
            config = self.config
            bucket = TokenBucket(config.connection_rate_per_address, config.connection_burst_per_address, now)
            self._buckets[host] = bucket
            if len(self._buckets) > MAX_TRACKED:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(host)
        return bucket.take(now)

    def opened(self, host: str, charge_rate: bool) -> str | None:
        """A connection mitmproxy reports: its refusal (then it is not counted), or None and
        it is counted open until `closed`."""
        reason = self.refusal(host, charge_rate)
        if reason is None:
            self._open[host] = self._open.get(host, 0) + 1
        return reason

    def closed(self, host: str) -> None:
        """A connection counted by `opened` has closed."""
        count = self._open.get(host, 0) - 1
        if count > 0:
            self._open[host] = count
        else:
            self._open.pop(host, None)

    def open_from(self, host: str) -> int:
        return self._open.get(host, 0)

    def tracked(self) -> int:
        return len(self._buckets)
