"""Matrix clients for the end-to-end tests: matrix-nio's AsyncClient, talking to the router.

Each `Device` is one nio client logged in with its own device. Its syncs carry a filter that
names a marker unique to the device (`e2e.<device id>`), which Synapse writes into its access
log as part of the request URI: the workers' own logs then tell which process served which
device's syncs (`matrix_helpers.served_by_uri`).

nio retries failed connections and 429s by itself by default; these clients never do
(`max_timeouts=0`, `max_limit_exceeded=0`), so every failure the router lets through is seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nio import AsyncClient, AsyncClientConfig, LoginResponse, SyncResponse

from .matrix_helpers import register_user

PASSWORD = "e2e-password-1"


def client_config() -> AsyncClientConfig:
    return AsyncClientConfig(max_timeouts=0, max_limit_exceeded=0, request_timeout=60, encryption_enabled=False)


class SyncFailed(AssertionError):
    pass


@dataclass
class Device:
    client: AsyncClient
    user_id: str
    quiet: bool = False  # filter out presence and ephemeral events (a long-poll wakes only for room events)
    syncs: int = 0  # syncs this device made
    failures: list[str] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return str(self.client.device_id)

    @property
    def marker(self) -> str:
        return f"e2e.{self.device_id}"

    @property
    def token(self) -> str:
        return str(self.client.access_token)

    def sync_filter(self) -> dict[str, Any]:
        flt: dict[str, Any] = {"account_data": {"not_types": [self.marker]}}
        if self.quiet:
            flt["presence"] = {"not_types": ["*"]}
            flt["room"] = {"ephemeral": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}}
        return flt

    async def sync(self, timeout_ms: int = 0, since: str | None = None) -> SyncResponse:
        """One sync (incremental once the device has a next_batch); raises SyncFailed on any
        error the client sees: an error response or a failed connection."""
        self.syncs += 1
        try:
            response = await self.client.sync(timeout=timeout_ms, sync_filter=self.sync_filter(), since=since)
        except Exception as e:  # aiohttp's connection errors, timeouts
            self.failures.append(f"{type(e).__name__}: {e}")
            raise SyncFailed(f"{self.user_id}/{self.device_id}: sync raised {type(e).__name__}: {e}") from e
        if not isinstance(response, SyncResponse):
            status = getattr(getattr(response, "transport_response", None), "status", None)
            self.failures.append(f"HTTP {status}: {response}")
            raise SyncFailed(f"{self.user_id}/{self.device_id}: sync failed with HTTP {status}: {response}")
        return response

    async def close(self) -> None:
        await self.client.close()


async def login_device(router_url: str, user_id: str, password: str = PASSWORD, quiet: bool = False) -> Device:
    client = AsyncClient(router_url, user_id, config=client_config())
    response = await client.login(password, device_name="e2e")
    if not isinstance(response, LoginResponse):
        await client.close()
        raise AssertionError(f"login of {user_id} through the router failed: {response}")
    return Device(client, user_id, quiet=quiet)


def register_users(main_url: str, secret: str, names: list[str], password: str = PASSWORD) -> list[str]:
    """Register each name with the shared-secret admin API of the main process; their user ids."""
    return [register_user(main_url, secret, name, password)["user_id"] for name in names]


async def close_all(devices: list[Device]) -> None:
    await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)


async def wait_for_logs[T](read: Callable[[], T], done: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Synapse writes an access line as its response finishes, which may be a moment after the
    client has it: poll `read()` (something counted from the logs) until `done(it)` or the
    timeout; the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


def only_process(counts: Mapping[str, int]) -> str | None:
    """The single process with a non-zero count, or None if none or several."""
    serving = [name for name, n in counts.items() if n > 0]
    return serving[0] if len(serving) == 1 else None
