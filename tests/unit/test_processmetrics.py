"""Merging the metrics of `--processes N` into one exposition (processmetrics.py)."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families
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


async def test_process_metrics_scrapes_ports_above_the_base() -> None:
    first, second = _metrics(4), _metrics(1)
    servers = [MetricsServer(first.render, "127.0.0.1:0"), MetricsServer(second.render, "127.0.0.1:0")]
    for server in servers:
        await server.start()
    try:
        with socket.socket() as closed:  # bound, not listening: the third "process" refuses
            closed.bind(("127.0.0.1", 0))
            ports = [servers[0].port, servers[1].port, closed.getsockname()[1]]
            source = ProcessMetrics("0.0.0.0", 0, 3)
            source.urls = [f"http://127.0.0.1:{p}/metrics" for p in ports]  # ephemeral, not base + i
            merged = await source.render()
            await source.close()
        assert _samples(merged, "synapse_router_requests_total") == {"1": 4.0, "2": 1.0}
        assert _samples(merged, "synapse_router_process_up") == {"1": 1.0, "2": 1.0, "3": 0.0}
    finally:
        for server in servers:
            await server.stop()


def test_process_metrics_addresses() -> None:
    assert ProcessMetrics("0.0.0.0", 9105, 2).urls == [
        "http://127.0.0.1:9106/metrics",
        "http://127.0.0.1:9107/metrics",
    ]
    assert ProcessMetrics("10.1.2.3", 9105, 1).urls == ["http://10.1.2.3:9106/metrics"]
