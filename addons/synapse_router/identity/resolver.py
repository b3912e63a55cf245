"""Access token -> Matrix user, through Synapse's `/account/whoami`, cached and coalesced.

Keys are SHA-256 digests of the token (plus an appservice's `user_id`), never tokens.
- A resolved user is cached for `cache_ttl`, at most `cache_size` tokens (LRU beyond).
- A token Synapse rejects (401 M_UNKNOWN_TOKEN / M_MISSING_TOKEN) is cached for `negative_ttl`.
- 5xx, 429, timeouts and connection errors are never cached. After UNAVAILABLE_AFTER
  timeouts or connection errors of main in a row, whoami is not asked for UNAVAILABLE_BACKOFF
  seconds, so a hung main process does not cost every new token `timeout` (meanwhile requests
  are routed by token hash). Only main's failures count: never a wait in the router's own
  queue, nor anything the client sent, nor the event loop's own lateness: a timeout counts only
  if the call had at least half the timeout beyond the total lateness of the loop's timers
  while it ran (looplag.py; a flood that saturates the loop delays the read of whoami's answer
  and the deadline's timer alike, which says nothing about main), and, when whoami asks main,
  only while main also fails its health checks.
- Bounded, so that clients cannot steer it: a request waits for its user at most `timeout`,
  queueing included, under one deadline over the slot and the whole call (httpx's timeout
  bounds each phase of a call, not the call); the event loop acts on it as soon as it gets
  its turn (late by a turn when a flood keeps it busy); at most `max_in_flight` calls run at
  once, and at most `max_in_flight_per_client` for one client address (so one address sending
  new tokens cannot hold every slot; its other requests wait for one of its own, within their
  deadline: many first requests of one address, e.g. behind a NAT, are resolved in turn, not
  routed by token hash, which would put a user's devices on different sync workers); calls
  for tokens the cache does not know are rate-limited for the process and per client address,
  and beyond these a request is routed by its token's hash (source LIMITED) at once, without a
  call or a wait.
- Concurrent first requests of one token share one whoami call: in one process through a
  future per token; across processes through the shared cache (`whoami.redis`), where the
  process that claims the token asks whoami and the others wait for its answer, at most the
  whoami timeout, then ask themselves (see sharedcache.py). Only the request that makes a
  process's call touches Redis.
Nothing here blocks a request for long: every outcome yields a routing key, and a first
request waits at most `timeout` in all (for another process's claim, a free slot and the call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import httpx
from cachetools import TTLCache

from ..config import WhoamiConfig
from .looplag import LoopLag
from .ratelimit import NewTokenLimiter
from .sharedcache import REJECTED, Claim, SharedCache

log = logging.getLogger(__name__)

WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
UNAVAILABLE_BACKOFF = 5.0
UNAVAILABLE_AFTER = 3
NEGATIVE_ERRCODES = frozenset({"M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"})
# A claim on a token's whoami call in the shared cache outlives the whoami timeout by this much,
# so a slow but successful call is not made twice; a process that dies holding one delays the
# others' first request of that token by at most the whoami timeout (they stop waiting then).
CLAIM_MARGIN = 1.0


class Source(StrEnum):
    CACHE = "cache"  # a cached user
    SHARED = "shared"  # from the shared (Redis) cache of all router processes
    WHOAMI = "whoami"  # this request made the whoami call
    COALESCED = "coalesced"  # waited for another request's whoami call
    NEGATIVE = "negative"  # Synapse rejected the token (now or recently, cached)
    UNRESOLVED = "unresolved"  # whoami failed or took too long: routed by token hash
    LIMITED = "limited"  # over a new-token limit (rate, or calls per client): routed by token hash, no call


@dataclass(frozen=True, slots=True)
class Resolution:
    user_id: str | None
    source: Source


class WhoamiError(Exception):
    """whoami gave no usable answer (not cacheable)."""


class TokenRejected(Exception):
    """Synapse rejected the token (cacheable as negative)."""


# A whoami call: (token, as_user, user_agent, client_ip, timeout) -> user id;
# raises TokenRejected or WhoamiError (or an httpx error).
WhoamiCall = Callable[[str, str | None, str | None, str, float], Awaitable[str]]


class _Users(TTLCache[bytes, str]):
    """The token -> user cache; a missing key reads as None instead of raising KeyError:
    under a flood of new tokens every lookup misses, and cachetools raised and caught
    KeyError three times per miss (about half the cost of the cache lookup, py-spy)."""

    def __missing__(self, key: bytes) -> str | None:  # type: ignore[override]
        return None


class IdentityResolver:
    def __init__(
        self,
        config: WhoamiConfig,
        call: WhoamiCall,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCache | None = None,
        main_failing: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self._call = call
        # Whether whoami's server fails its own health checks (None: not checked). When given,
        # a timed-out call counts against main only while they fail too: a flood that saturates
        # the router's loop makes calls time out while main answers in time (an outside trial
        # saw whoami paused with main answering in 1.0 s), which loop lateness alone misjudged.
        self._main_failing = main_failing
        self.shared = shared
        self._background: set[asyncio.Task[None]] = set()  # shared-cache writes in flight
        self._clock = clock
        self.users: TTLCache[bytes, str] = _Users(config.cache_size, config.cache_ttl, timer=clock)
        self.rejected: TTLCache[bytes, bool] = TTLCache(
            max(1, min(config.cache_size, 10_000)), max(config.negative_ttl, 1e-9), timer=clock
        )
        self._in_flight: dict[bytes, asyncio.Future[Resolution]] = {}
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._per_client: dict[str, int] = {}  # client address -> its calls in flight (slot wait included)
        # client address -> the slots its calls share (max_in_flight_per_client), while it has any
        self._client_slots: dict[str, asyncio.Semaphore] = {}
        self.lag = LoopLag(clock=clock)
        self.limiter = NewTokenLimiter(
            config.new_token_rate,
            config.new_token_burst,
            config.new_token_rate_per_client,
            config.new_token_burst_per_client,
            clock=clock,
        )
        self._unavailable_until = 0.0
        self._transport_failures = 0  # in a row

    def cached(self, key: bytes) -> Resolution | None:
        """The answer without waiting, if one is known."""
        user: str | None = self.users[key]  # None when missing (_Users); not .get(): one lookup
        if user is not None:
            return Resolution(user, Source.CACHE)
        if self.config.negative_ttl > 0 and key in self.rejected:
            return Resolution(None, Source.NEGATIVE)
        return None

    async def resolve(
        self, key: bytes, token: str, as_user: str | None, user_agent: str | None, client_ip: str
    ) -> Resolution:
        known = self.cached(key)
        if known is not None:
            return known
        pending = self._in_flight.get(key)
        if pending is not None:
            result = await asyncio.shield(pending)
            return Resolution(result.user_id, Source.COALESCED if result.user_id else result.source)
        if self._clock() < self._unavailable_until:
            return Resolution(None, Source.UNRESOLVED)
        if not self.limiter.allow(client_ip):
            return Resolution(None, Source.LIMITED)
        self._per_client[client_ip] = self._per_client.get(client_ip, 0) + 1
        future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        deadline = self._clock() + self.config.timeout
        try:
            result = await self._ask(key, token, as_user, user_agent, client_ip, deadline)
            future.set_result(result)
            return result
        finally:
            if not future.done():  # cancelled mid-call: waiters get a fallback answer
                future.set_result(Resolution(None, Source.UNRESOLVED))
            del self._in_flight[key]
            left = self._per_client[client_ip] - 1
            if left:
                self._per_client[client_ip] = left
            else:
                del self._per_client[client_ip]
                self._client_slots.pop(client_ip, None)  # nobody of this address holds or awaits it

    def calls_of(self, client_ip: str) -> int:
        """The whoami calls in flight (or waiting for a slot) for one client address."""
        return self._per_client.get(client_ip, 0)

    async def _ask(
        self, key: bytes, token: str, as_user: str | None, user_agent: str | None, client_ip: str, deadline: float
    ) -> Resolution:
        shared = self.shared
        claimed = False
        if shared is not None:
            known = await shared.get(key)
            if known is None:
                claim = await shared.claim(key, self.config.timeout + CLAIM_MARGIN)
                if claim is Claim.OURS:
                    claimed = True
                elif claim is Claim.THEIRS:  # another process is asking whoami right now
                    # Half the budget at most: if that process died holding the claim, the
                    # other half is still enough to ask whoami ourselves.
                    known = await shared.wait(key, max(0.0, deadline - self._clock()) / 2)
                    if known is None and self._clock() < self._unavailable_until:
                        return Resolution(None, Source.UNRESOLVED)
                else:
                    known = claim  # a value that arrived since the get, or None: Redis unavailable
            if known == REJECTED:
                self.rejected[key] = True
                return Resolution(None, Source.NEGATIVE)
            if known is not None:
                self.users[key] = known
                return Resolution(known, Source.SHARED)
        try:
            resolution, share = await self._whoami(key, token, as_user, user_agent, client_ip, deadline)
        except BaseException:  # cancelled (or a bug) mid-call: the waiting processes ask for themselves
            if claimed and shared is not None:
                self._in_background(shared.publish(key, None, 0))
            raise
        # Tell the other router processes without making this request wait for Redis. A claim
        # is ended by one pipeline that stores the answer and then drops the lock, so ordering
        # holds though it runs in the background; failures drop the lock without a value.
        if shared is not None:
            value, ttl = share if share is not None else (None, 0.0)
            if claimed:
                self._in_background(shared.publish(key, value, ttl))
            elif value is not None:
                self._in_background(shared.put(key, value, ttl))
        return resolution

    async def _whoami(
        self, key: bytes, token: str, as_user: str | None, user_agent: str | None, client_ip: str, deadline: float
    ) -> tuple[Resolution, tuple[str, float] | None]:
        """Ask whoami, within the deadline and a free slot, and cache the answer in this
        process; returns the resolution and what to tell the other processes (value and TTL)."""
        unresolved = Resolution(None, Source.UNRESOLVED), None
        budget = 0.0  # what the call had left of the deadline when it started (0: no call yet)
        started = 0.0
        # One deadline over the slot and the whole call: httpx's timeout bounds each of its
        # phases (pool, connect, write, every read) separately, so a call given 0.5 s could take
        # several times that; a slow or trickling main, or a busy event loop, must not stretch a
        # request's wait beyond `timeout`.
        limit = asyncio.timeout(max(0.0, deadline - self._clock()))
        self.lag.watch()
        try:
            async with limit:
                # One of its address's slots first, then one of the process's: an address with
                # many new tokens at once waits for its own calls (within the deadline) and
                # holds at most max_in_flight_per_client of the process's slots.
                client_slots = self._client_slots.get(client_ip)
                if client_slots is None:
                    client_slots = asyncio.Semaphore(self.config.max_in_flight_per_client)
                    self._client_slots[client_ip] = client_slots
                async with client_slots:
                    await self._slots.acquire()
                    try:
                        started = self._clock()
                        budget = deadline - started
                        if budget <= 0:
                            return unresolved
                        user = await self._call(token, as_user, user_agent, client_ip, budget)
                    finally:
                        self._slots.release()
        except TimeoutError:
            if not limit.expired():
                raise
            # The deadline passed waiting for a slot (the router's queue, not main) or in the call.
            if budget > 0:
                late = max(0.0, self._clock() - deadline)  # how late the deadline's own timer ran
                self._call_failed(httpx.TimeoutException("whoami deadline"), budget, self._lateness(started, late))
            return unresolved
        except TokenRejected:
            if self.config.negative_ttl > 0:
                self.rejected[key] = True
                return Resolution(None, Source.NEGATIVE), (REJECTED, self.config.negative_ttl)
            return Resolution(None, Source.NEGATIVE), None
        except (WhoamiError, httpx.HTTPError) as e:
            self._call_failed(e, budget, self._lateness(started, 0.0))
            return unresolved
        except Exception as e:  # a bug must not cost the request its routing, nor print a token
            log.warning(f"synapse-router: whoami call failed: {type(e).__name__}")
            return unresolved
        finally:
            self.lag.unwatch()
        self._transport_failures = 0
        self.users[key] = user
        return Resolution(user, Source.WHOAMI), (user, self.config.cache_ttl)

    def _lateness(self, started: float, late: float) -> float:
        """How much of the call's time the event loop took: its total lateness since the call
        started, or `late` (a lateness seen by the caller itself, e.g. the deadline's timer's)
        if more."""
        return max(late, self.lag.late_since(started)) if started else late

    def _call_failed(self, error: Exception, budget: float, lateness: float = 0.0) -> None:
        if self._main_failed(error, budget, lateness):
            self._transport_failures += 1
            if self._transport_failures >= UNAVAILABLE_AFTER:
                paused = self._clock() < self._unavailable_until
                self._unavailable_until = self._clock() + UNAVAILABLE_BACKOFF
                if not paused:
                    log.warning(
                        f"synapse-router: whoami paused for {UNAVAILABLE_BACKOFF:g} s: {self._transport_failures} "
                        f"calls to main failed in a row (last: {type(error).__name__} with {budget:.2f} s of the "
                        f"timeout left at its start, the event loop late by {lateness:.2f} s in all)"
                    )

    def _main_failed(self, error: Exception, budget: float, lateness: float = 0.0) -> bool:
        """Whether a failed call says main is down or hung: a connection error, or a timeout
        of a call that had a fair share of the timeout beyond the event loop's lateness while
        it ran (not one that started late in the request's budget, nor one the router's own
        busy loop could not read in time, nor a wait for one of the router's own connections)."""
        if isinstance(error, httpx.NetworkError):
            return True
        return (
            isinstance(error, httpx.TimeoutException)
            and not isinstance(error, httpx.PoolTimeout)
            and budget - lateness >= self.config.timeout / 2
            and (self._main_failing is None or self._main_failing())
        )

    def _in_background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def forget(self, key: bytes) -> None:
        self.users.pop(key, None)
        self.rejected.pop(key, None)
        if self.shared is not None:
            self._in_background(self.shared.delete(key))

    def forget_user(self, user_id: str) -> int:
        """Evict every cached token of a user (after /logout/all). O(cache size), rare. In the
        shared cache only the tokens this process knows are dropped; the others expire."""
        keys = [k for k, u in list(self.users.items()) if u == user_id]
        for k in keys:
            self.users.pop(k, None)
        if self.shared is not None and keys:
            self._in_background(self.shared.delete(*keys))
        return len(keys)

    def clear(self) -> None:
        self.users.clear()
        self.rejected.clear()

    def keep_answers(self, previous: IdentityResolver) -> None:
        """Take over `previous`'s cached answers (a reload that changed the whoami settings).
        What is cached is Synapse's answer about a token (its user, or that it is refused),
        which does not depend on how it was asked: a new `url` (of the same homeserver),
        `timeout`, `max_in_flight`, `new_tokens` or `redis` leaves every entry right, and
        dropping them would make each user's next request ask again, and route it by its
        token's hash meanwhile if whoami is slow (another worker). An entry's expiry is fixed
        when it is cached, under the TTL and size of then: a new `cache_ttl` or `cache_size`
        starts an empty user cache (carried over, an entry would outlive the TTL it was cached
        under, or the new one), a new `negative_ttl` or `cache_size` an empty negative cache.
        Answers of calls still in flight in `previous` land in the caches taken over."""
        old, new = previous.config, self.config
        if (old.cache_ttl, old.cache_size) == (new.cache_ttl, new.cache_size):
            self.users = previous.users
        if (old.negative_ttl, old.cache_size) == (new.negative_ttl, new.cache_size):
            self.rejected = previous.rejected


def whoami_over_http(
    client: Callable[[], httpx.AsyncClient], base_url: Callable[[], str], timeout: float
) -> WhoamiCall:
    """A WhoamiCall that asks Synapse, forwarding the client's address and User-Agent so the
    device's "last seen" stays true."""

    async def call(token: str, as_user: str | None, user_agent: str | None, client_ip: str, budget: float) -> str:
        # Bytes, not str: httpx would encode str values as ASCII and raise on anything else. The
        # token is plausible (printable ASCII) and every client header was checked for CR/LF/NUL.
        headers = {b"Authorization": b"Bearer " + token.encode(), b"X-Forwarded-For": client_ip.encode()}
        if user_agent:
            headers[b"User-Agent"] = user_agent.encode("utf-8", "surrogateescape")
        params = {"user_id": as_user} if as_user else None
        response = await client().get(
            base_url() + WHOAMI_PATH, headers=headers, params=params, timeout=min(budget, timeout)
        )
        if response.status_code == 200:
            try:
                user_id = response.json()["user_id"]
            except (ValueError, KeyError, TypeError):
                raise WhoamiError("whoami answered 200 without a user_id") from None
            if not isinstance(user_id, str) or not user_id.startswith("@"):
                raise WhoamiError("whoami answered an invalid user_id")
            return user_id
        if response.status_code == 401:
            try:
                errcode = response.json().get("errcode")
            except (ValueError, AttributeError):
                errcode = None
            if errcode in NEGATIVE_ERRCODES:
                raise TokenRejected()
        raise WhoamiError(f"whoami answered {response.status_code}")

    return call
