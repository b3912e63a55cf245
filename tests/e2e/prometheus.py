"""A real Prometheus server (Debian's `prometheus`, installed by `synapse_deploy.py install`) for
the end-to-end tests: started on loopback with a private data directory and a short scrape
interval, queried through its HTTP API, stopped at the end. The package's own service is never
used (it does not run: the install keeps it from starting).

Also the Grafana dashboard's queries, as Grafana would send them to Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness import free_port

SCRAPE_INTERVAL = 1.0  # seconds; Prometheus' default is 60 s, far too slow for a test
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval): with a
# 1 s step that is 4 scrape intervals, the shortest window rate() is still meaningful over.
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL:g}s"


def binary(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, endpoint: str, params: dict[str, Any] | list[tuple[str, str]]) -> Any:
        """GET /api/v1/<endpoint>; the `data` of a successful answer, else AssertionError with
        Prometheus' own error (a PromQL syntax error, an unknown function, ...)."""
        response = httpx.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=30)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus {endpoint} {params}: {response.status_code} {body}")
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", {"state": "active"})["activeTargets"])

    def wait_scraped(self, timeout: float = 60.0) -> None:
        """Until every target was scraped successfully once: a counter's first sample is its
        baseline, so what happens before it shows in no rate()."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus did not scrape its targets within {timeout:g}s: {targets}")
            time.sleep(SCRAPE_INTERVAL / 4)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """The series of `expr` over [start, end] (a matrix: [{metric, values: [[t, "v"], ...]}])."""
        data = self.api("query_range", {"query": expr, "start": start, "end": end, "step": step})
        assert data["resultType"] == "matrix", data
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.api(f"label/{label}/values", [("match[]", match)]))


def start_prometheus(work: Path, targets: list[str], timeout: float = 60.0) -> Prometheus:
    """Prometheus scraping `targets` ("host:port", path /metrics) every SCRAPE_INTERVAL, its data
    in `work`/data; returns once it answers /-/ready. RuntimeError if it is not installed."""
    exe = binary("prometheus")
    if exe is None:
        raise RuntimeError("prometheus is not installed: `scripts/synapse_deploy.py install` installs it")
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s", "scrape_timeout": f"{SCRAPE_INTERVAL:g}s"},
        "scrape_configs": [{"job_name": "synapse_router", "static_configs": [{"targets": targets}]}],
    }
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = work / "prometheus.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            start_new_session=True,
        )
    prom = Prometheus(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200:
                return prom
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            prom.stop()
            raise RuntimeError(f"Prometheus did not become ready:\n{prom.log()[-4000:]}")
        time.sleep(0.2)


# --- the Grafana dashboard ---------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    where: str  # the panel title and target refId
    expr: str  # as written in the dashboard
    legend: str  # the target's legendFormat ("{{pool}} {{worker}}")


@dataclass(frozen=True)
class Variable:
    name: str
    query: str  # Grafana's `label_values(metric, label)`
    all_value: str | None


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))  # a collapsed row holds its panels
    return found


def dashboard_queries(path: Path) -> tuple[list[DashboardQuery], list[Variable]]:
    """Every target's `expr` of every panel (rows included), and every query variable."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                where = f"{panel.get('title')!r} {target.get('refId', '')}".strip()
                queries.append(DashboardQuery(where, target["expr"], target.get("legendFormat", "")))
    variables = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        variables.append(Variable(var["name"], str(text or var.get("definition", "")), var.get("allValue")))
    return queries, variables


def grouping_labels(expr: str) -> set[str]:
    """The labels an expression groups by (`by (pool, worker)`), without histograms' `le`: each
    must be a label of a metric it selects, so a misspelt one cannot pass as an empty label."""
    found = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        found.update(label.strip() for label in group.split(",") if label.strip())
    return found - {"le"}


def metric_names(expr: str) -> set[str]:
    """The router's metrics an expression selects (synapse_router_*)."""
    return set(re.findall(r"\bsynapse_router_\w+", expr))


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<match>[^,]+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[str, str]:
    """(series selector, label) of Grafana's `label_values(selector, label)`."""
    found = LABEL_VALUES.match(query)
    if found is None:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return found["match"], found["label"]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's variables (`$name`, `${name}`); ValueError naming one that has no value."""

    def one(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        if name not in values:
            raise ValueError(f"no value for ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))", one, expr)
