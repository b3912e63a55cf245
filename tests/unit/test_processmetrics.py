"""Merging the metrics of `--processes N` into one exposition (processmetrics.py)."""

from __future__ import annotations

import os
import socket

from prometheus_client.parser import text_string_to_metric_families
from synapse_router.launcher.channels import ProcessChannels, served_socket
from synapse_router.launcher.processmetrics import ProcessMetrics, merge
from synapse_router.observability.metrics import RouterMetrics
from synapse_router.observability.metrics_server import MetricsServer

W1 = "http://10.0.0.1:8083"


def _metrics(requests: int) -> RouterMetrics:
    m = RouterMetrics()
    for _ in range(requests):
        m.observe_request("sync", "sync", W1, "GET", 200, 0.02)
    m.observe_identity("cache")
    return m


def _samples(exposition: bytes, name: str) -> dict[str, float]:
    """process label -> value of the samples called `name` (summed over other labels)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels["process"]] = out.get(sample.labels["process"], 0.0) + sample.value
    return out


def test_every_sample_keeps_its_value_under_a_process_label() -> None:
    one, two = _metrics(3), _metrics(5)
    merged = merge([("1", one.render().decode()), ("2", two.render().decode())])
    assert _samples(merged, "synapse_router_requests_total") == {"1": 3.0, "2": 5.0}
    assert _samples(merged, "synapse_router_upstream_seconds_count") == {"1": 3.0, "2": 5.0}
    assert _samples(merged, "synapse_router_process_up") == {"1": 1.0, "2": 1.0}
    text = merged.decode()
    # one family header per metric, however many processes report it
    assert text.count("# TYPE synapse_router_requests_total counter") == 1
    assert text.count("# TYPE synapse_router_upstream_seconds histogram") == 1
    labels = 'le="0.025",pool="sync",process="2",worker="http://10.0.0.1:8083"'
    bucket = f"synapse_router_upstream_seconds_bucket{{{labels}}} 5.0"
    assert bucket in text


def test_a_silent_or_foreign_process_is_down_and_has_no_series() -> None:
    merged = merge([("1", _metrics(2).render().decode()), ("2", None), ("3", "<html>not metrics{</html>")])
    assert _samples(merged, "synapse_router_process_up") == {"1": 1.0, "2": 0.0, "3": 0.0}
    assert _samples(merged, "synapse_router_requests_total") == {"1": 2.0}


def test_restarts_counted_per_process() -> None:
    merged = merge([("1", _metrics(1).render().decode()), ("2", None)], {"1": 0, "2": 3})
    assert _samples(merged, "synapse_router_process_restarts_total") == {"1": 0.0, "2": 3.0}
    assert merged.decode().count("# TYPE synapse_router_process_restarts_total counter") == 1
    assert "synapse_router_process_restarts" not in merge([("1", None)]).decode()  # not a parent's


def test_no_process_answering_still_renders() -> None:
    merged = merge([("1", None), ("2", None)])
    assert _samples(merged, "synapse_router_process_up") == {"1": 0.0, "2": 0.0}


async def test_process_metrics_asks_each_process_on_its_slots_channel() -> None:
    """Slots 1 and 2 serve on their channels; slot 3 has no process serving (restarting): down
    at once, and named by the readiness check, without waiting for a scrape to time out."""
    channels = ProcessChannels(3)
    servers = [
        MetricsServer(_metrics(4).render, "channel 1", sock=served_socket(os.dup(channels.fileno(0)))),
        MetricsServer(_metrics(1).render, "channel 2", sock=served_socket(os.dup(channels.fileno(1)))),
    ]
    for server in servers:
        await server.start()
    source = ProcessMetrics(channels.addresses, serving=lambda index: index < 2)
    try:
        merged = await source.render()
        assert _samples(merged, "synapse_router_requests_total") == {"1": 4.0, "2": 1.0}
        assert _samples(merged, "synapse_router_process_up") == {"1": 1.0, "2": 1.0, "3": 0.0}
        assert await source.not_ready() == "process 3 is not serving (starting, or exited)"
        source.serving = lambda _index: True
        assert (await source.render()).count(b'synapse_router_process_up{process="3"} 0.0') == 1
    finally:
        await source.close()
        for server in servers:
            await server.stop()
        channels.close()


async def test_the_parent_never_reaches_another_routers_process() -> None:
    """A rolling restart: the old router's process 1 drains (its `/ready` says 503 stopping)
    and shares the TCP port P + 1 with the new router's process 1 (SO_REUSEPORT). The new
    parent asks its own process, on its channel, every time."""
    old = MetricsServer(_metrics(9).render, "127.0.0.1:0", ready=lambda: "stopping")
    await old.start()
    shared = MetricsServer(_metrics(1).render, old.bound, ready=lambda: None)
    await shared.start()  # the new process 1 on the same TCP port
    channels = ProcessChannels(1)
    own = MetricsServer(
        _metrics(1).render, "channel 1", ready=lambda: None, sock=served_socket(os.dup(channels.fileno(0)))
    )
    await own.start()
    source = ProcessMetrics(channels.addresses)
    try:
        for _ in range(30):
            assert await source.not_ready() is None
            assert _samples(await source.render(), "synapse_router_requests_total") == {"1": 1.0}
    finally:
        await source.close()
        for server in (own, shared, old):
            await server.stop()
        channels.close()


def test_channels_are_private_abstract_unix_sockets_per_slot() -> None:
    first, second = ProcessChannels(2), ProcessChannels(2)
    try:
        assert len(set(first.addresses + second.addresses)) == 4  # one name per slot and parent
        assert all(a.startswith("\0synapse-router-") and len(a) > 40 for a in first.addresses)
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(first.addresses[1])  # listening before any process serves it
    finally:
        first.close()
        second.close()
