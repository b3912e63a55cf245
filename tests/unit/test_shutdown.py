"""The `shutdown` key (graceful stop; integration: tests/integration/test_graceful_stop.py)."""

from __future__ import annotations

import pytest
from synapse_router.config import ConfigError, RouterConfig, parse_config
from synapse_router.edge.shutdown import ShutdownConfig, ShutdownConfigError, parse_shutdown


def test_defaults() -> None:
    assert parse_shutdown(None) == ShutdownConfig(35.0)
    assert parse_shutdown({}) == ShutdownConfig()
    assert RouterConfig().shutdown == ShutdownConfig()
    assert parse_config("workers: {}").shutdown.grace == 35.0


@pytest.mark.parametrize(("raw", "grace"), [({"grace": 0}, 0.0), ({"grace": 2.5}, 2.5), ({"grace": 600}, 600.0)])
def test_grace(raw: dict, grace: float) -> None:
    assert parse_shutdown(raw).grace == grace


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"grace": -1}, "shutdown.grace: must be a number >= 0 (seconds), got -1"),
        ({"grace": "35s"}, "shutdown.grace: must be a number >= 0 (seconds), got '35s'"),
        ({"grace": True}, "shutdown.grace: must be a number >= 0 (seconds), got True"),
        ({"grace": float("inf")}, "shutdown.grace: must be a number >= 0 (seconds), got inf"),
        ({"grace": None}, "shutdown.grace: must be a number >= 0 (seconds), got None"),
        ({"timeout": 5}, "shutdown.timeout: unknown key; expected one of grace"),
        ([35], "shutdown: expected a mapping, got list"),
    ],
)
def test_bad_values_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ShutdownConfigError) as info:
        parse_shutdown(raw)
    assert str(info.value) == message


def test_config_error_names_key_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("workers: {}\nshutdown:\n  grace: -5\n")
    assert str(info.value) == "shutdown.grace (line 3): must be a number >= 0 (seconds), got -5"
    with pytest.raises(ConfigError) as info:
        parse_config("shutdown: 35\n")
    assert str(info.value).startswith("shutdown (line 1): expected a mapping")
    assert parse_config("shutdown: {grace: 10}\n").shutdown == ShutdownConfig(10.0)
