"""A real Prometheus scrapes the real service and evaluates the repo's recording rules on its latencies.

Needs Debian's `prometheus` package (/usr/bin/prometheus, promtool); .ci/run installs it.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from bench.service import ServiceProcess, free_port, service_process, stop
from ensemble_contract.modes import Mode
from tests.support import LiveServer
from tests.test_compose import dashboard_queries

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
LOADGEN = REPO / "deploy" / "loadgen.py"
MODES = tuple(mode.value for mode in Mode)  # the test build ships the int8 graph: every mode is served
REQUEST_P50 = 'histogram_quantile(0.5, sum by (le, mode) (rate(ensemble_request_seconds_bucket{job="app"}[30s])))'
DEADLINE_S = 120  # a guard against hanging, not a performance expectation

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus)")


@needs_promtool
def test_repo_config_and_rules_are_valid() -> None:
    for command in ("config", "rules"):
        target = PROMETHEUS_DIR / ("prometheus.yml" if command == "config" else "rules.yml")
        result = subprocess.run([PROMTOOL, "check", command, str(target)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


RULES = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
ALERTS = {rule["alert"]: rule["expr"] for group in RULES for rule in group["rules"] if "alert" in rule}


@needs_promtool
def test_every_alert_fires_in_its_unit_test_and_has_a_runbook_line() -> None:
    """promtool runs alerts.test.yml, in which every alert of rules.yml fires at least once (and stays quiet on a
    healthy instance); docs/operations.md says what each one means and what to do."""
    tests = PROMETHEUS_DIR / "alerts.test.yml"
    result = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [case for test in yaml.safe_load(tests.read_text())["tests"] for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == set(ALERTS)
    operations = (REPO / "docs" / "operations.md").read_text()
    assert [name for name in ALERTS if f"`{name}`" not in operations] == []


def alert_metrics() -> set[str]:
    """The service's metrics the alerts read: not `up`, which Prometheus makes, nor a recording rule's (`mode:…`)."""
    return set(re.findall(r"(?<![:\w])((?:ensemble|process)_\w+)", " ".join(ALERTS.values())))


@pytest.fixture
def prometheus(server: LiveServer, tmp_path: Path) -> Iterator[httpx.Client]:
    with scraping(server, tmp_path) as api:
        yield api


@contextmanager
def scraping(server: LiveServer | ServiceProcess, tmp_path: Path) -> Iterator[httpx.Client]:
    """Prometheus scraping `server` every second with the repo's rules; a client of its HTTP API."""
    assert PROMETHEUS is not None
    target = server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{PROMETHEUS_DIR / 'rules.yml'}']\n"
        f"scrape_configs: [{{job_name: app, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            wait_for(lambda: target_health(api) == "up", process, "the scrape target to be up")
            yield api
    finally:
        stop(process, timeout_s=30)
        log.close()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert process.poll() is None, f"prometheus exited with {process.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def target_health(api: httpx.Client) -> str | None:
    try:
        response = api.get("/api/v1/targets")
    except httpx.TransportError:
        return None  # not listening yet
    if response.status_code != 200:
        return None  # 503 until its storage is ready
    targets = response.json()["data"]["activeTargets"]
    return targets[0]["health"] if targets else None


def finite_values_by_mode(api: httpx.Client, query: str) -> dict[str, float]:
    response = api.get("/api/v1/query", params={"query": query})
    assert response.status_code == 200, response.text
    result = response.json()["data"]["result"]
    values = {series["metric"].get("mode", ""): float(series["value"][1]) for series in result}
    return {mode: value for mode, value in values.items() if math.isfinite(value)}


def compare_traffic(server: LiveServer | ServiceProcess, requests: int = len(MODES)) -> str:
    """Runs deploy/loadgen.py against the server in compare mode (which rotates over the modes); its summary."""
    command = [sys.executable, str(LOADGEN), "--url", server.url, "--mode", "compare", "--count", str(requests)]
    result = subprocess.run(
        [*command, "--rate", "50", "--concurrency", "1", "--wait", "30"],  # one at a time: the server queues one
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


BATCHING_RULES = (
    "mode:ensemble_batch_rows:mean_1m",
    "mode:ensemble_predictions:ok_rate_1m",
    "mode:ensemble_cpu_seconds_per_prediction:mean_1m",
    "mode:ensemble_queue_seconds:p95_1m",
)


@needs_prometheus
def test_prometheus_computes_latency_quantiles_of_every_mode(server: LiveServer, prometheus: httpx.Client) -> None:
    summary = compare_traffic(server)
    assert all(f"{mode}: 1 ok" in summary for mode in MODES), summary

    # rate() needs two scrapes that saw the counters grow: keep the traffic going until they have.
    deadline = time.monotonic() + DEADLINE_S
    while set(finite_values_by_mode(prometheus, REQUEST_P50)) < set(MODES):
        assert time.monotonic() < deadline, f"no request p50 of every mode from {REQUEST_P50}"
        compare_traffic(server)
        time.sleep(0.5)

    # The recording rules (evaluated every second) give every mode's quantiles, and fused's ratio is 1.
    recorded = [
        f"mode:ensemble_{histogram}_seconds:{suffix}"
        for histogram in ("request", "inference")
        for suffix in ("p50_1m", "p95_1m", "p99_1m", "p50_1m_ratio_to_fused")
    ] + list(BATCHING_RULES)
    while not all(set(finite_values_by_mode(prometheus, name)) >= set(MODES) for name in recorded):
        assert time.monotonic() < deadline, f"recording rules without a value for every mode: {recorded}"
        compare_traffic(server)
        time.sleep(0.5)
    for histogram in ("request", "inference"):
        ratios = finite_values_by_mode(prometheus, f"mode:ensemble_{histogram}_seconds:p50_1m_ratio_to_fused")
        assert ratios["fused"] == pytest.approx(1.0)
        assert all(ratio > 0 for ratio in ratios.values())
    # Whether batching pays: the traffic went one request at a time, so every inference ran one row.
    assert set(finite_values_by_mode(prometheus, "mode:ensemble_batch_rows:mean_1m").values()) == {1.0}
    for name in BATCHING_RULES:
        assert all(value >= 0 for value in finite_values_by_mode(prometheus, name).values()), name


@needs_prometheus
def test_every_panel_of_the_dashboard_returns_data(model_dir: Path, tmp_path: Path) -> None:
    """deploy/grafana's dashboard, query by query, against Prometheus scraping a server of two worker processes (as
    compose runs it) under compare traffic (with COST_PER_HOUR, which the cost panel needs): every panel, the
    per-worker one too, has data from the one scrape target, and so has every series the alerts read."""
    with (
        service_process(model_dir, tmp_path, WORKERS=2, MAX_QUEUE=1, COST_PER_HOUR=0.5) as costed,
        scraping(costed, tmp_path) as api,
    ):
        deadline = time.monotonic() + DEADLINE_S
        while missing := [title for title, expr in dashboard_queries() if not finite_values_by_mode(api, expr)]:
            assert time.monotonic() < deadline, f"panels without data: {missing}"
            compare_traffic(costed)
            time.sleep(0.5)
        # Every series the alerts read is there too, as the workers export it.
        assert [name for name in sorted(alert_metrics()) if not finite_values_by_mode(api, f"count({name})")] == []
