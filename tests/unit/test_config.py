"""Configuration parsing: good configs become typed objects, bad ones name the key and line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from synapse_router.config import ConfigError, load_config, parse_config
from synapse_router.routing.routes import Balance

EXAMPLE = Path(__file__).parents[2] / "config" / "router.yaml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.pools, "the shipped example must configure pools"


def test_full_config() -> None:
    config = parse_config(
        """
workers:
  sync: [http://127.0.0.1:18081, {url: "http://127.0.0.1:18082/", weight: 2}]
  client_reader: ["https://[::1]:8443"]
routes:
  - name: bots
    paths: ['^/_matrix/client/v3/rooms/[^/]+/send/']
    pool: [client_reader, main]
    balance: room
    methods: [put]
trusted_proxies: [10.0.0.0/8, "::1"]
whoami: {url: "http://127.0.0.1:18008", cache_ttl: 60, cache_size: 10, negative_ttl: 5, timeout: 0.5}
"""
    )
    sync = config.pools["sync"]
    assert [w.url for w in sync] == ["http://127.0.0.1:18081", "http://127.0.0.1:18082"]
    assert [w.weight for w in sync] == [1.0, 2.0]
    assert config.pools["client_reader"][0].host == "::1"
    assert config.pools["client_reader"][0].url == "https://[::1]:8443"
    (route,) = config.routes
    assert route.pools == ("client_reader",) and route.balance is Balance.ROOM
    assert route.methods == frozenset({"PUT"})
    assert ipaddress.ip_address("10.1.2.3") in config.trusted_proxies[0]
    assert config.whoami.url is not None and config.whoami.url.port == 18008
    assert (config.whoami.cache_ttl, config.whoami.cache_size, config.whoami.timeout) == (60.0, 10, 0.5)


def test_empty_config_is_valid() -> None:
    config = parse_config("")
    assert config.pools == {} and config.routes == ()


@pytest.mark.parametrize(
    ("text", "key", "line", "words"),
    [
        ("workers: [\n", "", 2, "invalid YAML"),
        ("wrokers: {}\n", "wrokers", 1, "unknown key"),
        ("workers:\n  sync: [http://a:1]\n  sync: [http://b:1]\n", "workers.sync", 3, "duplicate"),
        ("workers:\n  sync:\n    - http://a:1\n    - htp://b:1\n", "workers.sync[1]", 4, "http"),
        ("workers:\n  sync:\n    - {url: 'http://a:1/path'}\n", "workers.sync[0].url", 3, "no path"),
        ("workers:\n  sync:\n    - {url: 'http://a:99999'}\n", "workers.sync[0].url", 3, "port"),
        ("workers:\n  sync:\n    - {url: 'http://a:1', weight: 0}\n", "workers.sync[0].weight", 3, ">="),
        ("workers:\n  sync:\n    - {url: 'http://a:1', wieght: 2}\n", "workers.sync[0].wieght", 3, "unknown key"),
        ("workers:\n  sync:\n    - {weight: 2}\n", "workers.sync[0]", 3, "missing key 'url'"),
        ("workers:\n  sync: []\n", "workers.sync", 2, "non-empty"),
        ("workers:\n  Sync: [http://a:1]\n", "workers.Sync", 2, "lower-case"),
        ("workers:\n  main: [http://a:1]\n", "workers.main", 2, "reverse-mode target"),
        ("workers:\n  sync: [http://a:1, http://a:1]\n", "workers.sync[1]", 2, "twice"),
        # a misspelt pool would get nothing and its traffic would go to main, silently
        ("workers:\n  sync: [http://a:1]\n  meida: [http://b:1]\n", "workers.meida", 3, "no route sends to pool"),
        (
            "routes:\n  - {name: x, paths: ['^/a('], pool: main}\n",
            "routes[0].paths[0]",
            2,
            "invalid regular expression",
        ),
        ("routes:\n  - {name: x, paths: ['^/a'], pool: nope}\n", "routes[0].pool", 2, "unknown pool 'nope'"),
        (
            "routes:\n  - {name: x, paths: ['^/a'], pool: main, balance: sticky}\n",
            "routes[0].balance",
            2,
            "round_robin",
        ),
        ("routes:\n  - {name: x, pool: main}\n", "routes[0]", 2, "missing key 'paths'"),
        ("routes:\n  - {name: x, paths: ['^/(?P<a>x)'], pool: main}\n", "routes[0].paths[0]", 2, "named groups"),
        ("routes:\n  - {name: x, paths: ['^/a'], pool: main, method: [GET]}\n", "routes[0].method", 2, "unknown key"),
        ("trusted_proxies: [10.0.0.0/33]\n", "trusted_proxies[0]", 1, "10.0.0.0/33"),
        ("whoami: {timeout: -1}\n", "whoami.timeout", 1, ">="),
        ("whoami: {url: ftp://x}\n", "whoami.url", 1, "http"),
        ("whoami: {cache_size: 1.5}\n", "whoami.cache_size", 1, "integer"),
        ("whoami: {max_in_flight: 0}\n", "whoami.max_in_flight", 1, ">= 1"),
        ("whoami: {max_in_flight_per_client: 0}\n", "whoami.max_in_flight_per_client", 1, ">= 1"),
        ("whoami: {max_in_flight_per_client: 2.5}\n", "whoami.max_in_flight_per_client", 1, "integer"),
        (
            "whoami: {max_in_flight: 4, max_in_flight_per_client: 5}\n",
            "whoami.max_in_flight_per_client",
            1,
            "more than whoami.max_in_flight",
        ),
        ("whoami:\n  new_tokens: {rate: -1}\n", "whoami.new_tokens.rate", 2, ">= 0"),
        ("whoami:\n  new_tokens: {per_client_burst: 0}\n", "whoami.new_tokens.per_client_burst", 2, ">= 1"),
        ("whoami:\n  new_tokens: {per_client: 5}\n", "whoami.new_tokens.per_client", 2, "unknown key"),
        ("- a\n", "", 1, "expected a mapping"),
    ],
)
def test_bad_config_names_key_and_line(text: str, key: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert info.value.line == line
    assert words in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("whoami: {timeout: .nan}\n", "whoami.timeout"),
        ("whoami: {cache_ttl: .inf}\n", "whoami.cache_ttl"),
        ("whoami:\n  new_tokens: {rate: .nan}\n", "whoami.new_tokens.rate"),
        ("health: {interval: .nan}\n", "health.interval"),
        ("health: {connect_timeout: -.inf}\n", "health.connect_timeout"),
    ],
)
def test_numbers_must_be_finite(text: str, key: str) -> None:
    # NaN compares false with everything: a bare `< minimum` check let it through, and a NaN
    # whoami timeout turned every lookup into an error.
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key


def test_whoami_calls_per_client_default_and_bounded_by_the_process_cap() -> None:
    assert parse_config("").whoami.max_in_flight_per_client == 4
    assert parse_config("whoami: {max_in_flight: 2}\n").whoami.max_in_flight_per_client == 2
    config = parse_config("whoami: {max_in_flight: 32, max_in_flight_per_client: 8}\n").whoami
    assert (config.max_in_flight, config.max_in_flight_per_client) == (32, 8)
