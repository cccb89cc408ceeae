"""docker-compose.yml and what it mounts, checked offline: every setting of the service reaches the container, the
ports the file fixes agree with Prometheus, Caddy and the health check, .env.example lists every setting with its
default, and the Grafana dashboard is well-formed and provisioned with the data source its panels name. (The stack
itself runs in tests/test_docker.py; the dashboard's queries run against a real Prometheus in test_prometheus.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from app.config_docs import env_lines
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
APP = COMPOSE["services"]["app"]
PROXY = COMPOSE["services"]["proxy"]
APP_BIND = "${APP_BIND:-127.0.0.1}"  # where the app's ports are published: loopback unless said otherwise
FIXED = {"HOST": "0.0.0.0", "PORT": "8000", "GRPC_PORT": "8081", "METRICS_PORT": "9100"}
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ensemble.json"
ENV_EXAMPLE = REPO / ".env.example"


def app_environment() -> dict[str, str | None]:
    """The app's environment list as name -> value (None: passed through from the environment or .env)."""
    entries = (entry.partition("=") for entry in APP["environment"])
    return {name: value if sep else None for name, sep, value in entries}


def test_every_setting_reaches_the_container() -> None:
    assert set(app_environment()) == {name.upper() for name in Settings.model_fields}


def test_only_the_port_settings_are_fixed_and_model_dir_defaults_to_the_images_models() -> None:
    environment = app_environment()
    fixed = {name: value for name, value in environment.items() if value is not None}
    assert fixed == FIXED | {"MODEL_DIR": "${MODEL_DIR:-/models/builtin}", "WORKERS": "${WORKERS:-auto}"}
    assert "ENV MODEL_DIR=/models/builtin" in (REPO / "Dockerfile").read_text()


def test_the_fixed_ports_are_the_ones_published_scraped_and_proxied() -> None:
    published = {mapping.rsplit(":", 1)[1] for mapping in APP["ports"]}
    assert published == {FIXED["PORT"], FIXED["GRPC_PORT"]}  # the metrics port stays on the compose network
    assert all(mapping.startswith(f"{APP_BIND}:") for mapping in APP["ports"])
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0]["port"] == int(FIXED["METRICS_PORT"])
    caddyfile = (REPO / "deploy" / "caddy" / "Caddyfile").read_text()
    assert f"reverse_proxy app:{FIXED['PORT']}" in caddyfile
    assert f"reverse_proxy @grpc h2c://app:{FIXED['GRPC_PORT']}" in caddyfile
    assert "METRICS_PORT" in (REPO / "deploy" / "healthcheck.py").read_text()


def test_with_the_proxy_in_front_the_apps_ports_stay_on_loopback() -> None:
    """Loopback by default, the .env lines that enable TLS say so, and the proxy is told what the app was given."""
    assert all(mapping.startswith(f"{APP_BIND}:") for mapping in APP["ports"])
    assert "# COMPOSE_PROFILES=tls,dashboard\n# APP_BIND=127.0.0.1\n" in ENV_EXAMPLE.read_text()
    assert f"APP_BIND={APP_BIND}" in PROXY["environment"]


def proxy_start(app_bind: str) -> subprocess.CompletedProcess[str]:
    """The proxy's entrypoint as its container runs it (compose's `$$` unescaped), with `true` for Caddy."""
    shell, flag, script, name = PROXY["entrypoint"]
    command = [shell, flag, script.replace("$$", "$"), name, "true"]
    environment = {"APP_BIND": app_bind, "PATH": os.environ["PATH"]}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "[::]"])
def test_the_proxy_refuses_to_start_beside_the_apps_ports_on_every_interface(address: str) -> None:
    refused = proxy_start(address)
    assert refused.returncode == 1
    assert f"APP_BIND={address} publishes the app's ports on every interface" in refused.stderr


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5"])
def test_the_proxy_starts_beside_the_apps_ports_on_one_interface(address: str) -> None:
    assert proxy_start(address).returncode == 0
    assert PROXY["command"] == ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose (.ci/run installs it)")
@pytest.mark.parametrize(
    ("variables", "host_ip"),
    [({"COMPOSE_PROFILES": "tls"}, "127.0.0.1"), ({}, "127.0.0.1"), ({"APP_BIND": "0.0.0.0"}, "0.0.0.0")],
)
def test_docker_compose_publishes_the_apps_ports_where_app_bind_says(
    variables: dict[str, str], host_ip: str, tmp_path: Path
) -> None:
    """The file as docker-compose reads it (`config`), with an empty .env: valid, and its ports where they belong."""
    environment = {"PATH": os.environ["PATH"], **variables}
    (empty := tmp_path / ".env").write_text("")
    command = ["docker-compose", "--env-file", str(empty), "--file", str(REPO / "docker-compose.yml"), "config"]
    result = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    ports = rendered["app"]["ports"]  # short syntax from docker-compose v1, long from Compose v2
    assert {p.split(":")[0] if isinstance(p, str) else p["host_ip"] for p in ports} == {host_ip}
    assert rendered["proxy"]["environment"]["APP_BIND"] == host_ip  # what the proxy checks before it starts


def test_a_users_model_directory_is_mounted_read_only() -> None:
    assert "${MODEL_MOUNT:-./models}:/mnt/models:ro" in APP["volumes"]


def test_the_load_generator_sends_the_api_key() -> None:
    assert COMPOSE["services"]["loadgen"]["environment"]["API_KEY"] == "${API_KEY:-}"


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = ENV_EXAMPLE.read_text()
    passed = [name for name, value in app_environment().items() if value is None]
    assert env_lines(passed) in text, "regenerate .env.example's settings with app.config_docs.env_lines"
    assert "# MODEL_DIR=/mnt/models/" in text and "# MODEL_MOUNT=./models" in text
    variables = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "docker-compose.yml").read_text()))
    listed = set(re.findall(r"^# ([A-Z_]+)=", text, re.MULTILINE))
    assert variables <= listed, f"docker-compose.yml's variables missing from .env.example: {variables - listed}"
    assert not re.search(r"^#? ?[A-Z_]+=\S*[ \t]+#", text, re.MULTILINE), "compose v1 reads a trailing comment as value"


def test_secrets_stay_out_of_git_and_the_image() -> None:
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert ".env" in (REPO / ".dockerignore").read_text().split()


class _GrafanaModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class DataSourceRef(_GrafanaModel):
    type: Literal["prometheus"]
    uid: str


class Target(_GrafanaModel):
    refId: str = Field(pattern=r"^[A-Z]$")
    expr: str = Field(min_length=1)
    datasource: DataSourceRef


class GridPos(_GrafanaModel):
    h: int = Field(gt=0)
    w: int = Field(gt=0, le=24)
    x: int = Field(ge=0, lt=24)
    y: int = Field(ge=0)


class Panel(_GrafanaModel):
    id: int
    type: Literal["timeseries", "table", "stat"]
    title: str = Field(min_length=1)
    datasource: DataSourceRef
    gridPos: GridPos
    targets: list[Target] = Field(min_length=1)


class Dashboard(_GrafanaModel):
    uid: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,40}$")
    title: str
    schemaVersion: int = Field(ge=36)
    panels: list[Panel] = Field(min_length=1)


def dashboard() -> Dashboard:
    return Dashboard.model_validate_json(DASHBOARD.read_text())


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert len({panel.id for panel in board.panels}) == len(board.panels)
    cells: set[tuple[int, int]] = set()
    for panel in board.panels:
        assert panel.gridPos.x + panel.gridPos.w <= 24, panel.title
        assert len({target.refId for target in panel.targets}) == len(panel.targets), panel.title
        area = {(x, y) for x in range(panel.gridPos.x, panel.gridPos.x + panel.gridPos.w)
                for y in range(panel.gridPos.y, panel.gridPos.y + panel.gridPos.h)}  # fmt: skip
        assert not area & cells, f"{panel.title} overlaps another panel"
        cells |= area


def test_the_dashboard_shows_what_a_user_compares() -> None:
    exprs = " ".join(target.expr for panel in dashboard().panels for target in panel.targets)
    needed = (
        *(f"histogram_quantile({q}, sum by (le, mode) (rate(ensemble_request_seconds_bucket" for q in ("0.5", "0.95")),
        "histogram_quantile(0.99, sum by (le, mode) (rate(ensemble_request_seconds_bucket",
        "ensemble_predictions_total",
        "ensemble_cpu_seconds_sum",
        "ensemble_cost_per_hour",
        "ensemble_cores",
        "ensemble_early_refusals_total",
        "ensemble_queue_seconds_bucket",
        "ensemble_model_info",
    )
    assert [text for text in needed if text not in exprs] == []


def test_the_dashboard_is_provisioned_with_the_data_source_its_panels_name() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {source["uid"] for source in sources if source["url"] == "http://prometheus:9090"}
    assert {panel.datasource.uid for panel in dashboard().panels} <= uids
    assert {t.datasource.uid for panel in dashboard().panels for t in panel.targets} <= uids
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ensemble.yml").read_text())["providers"]
    volumes = COMPOSE["services"]["grafana"]["volumes"]
    mounts = dict(volume.split(":")[:2] for volume in volumes if volume.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def dashboard_queries(rate_interval: str = "1m") -> list[tuple[str, str]]:
    """Every panel's queries as Prometheus runs them (Grafana's $__rate_interval given a value): (title, expr)."""
    return [
        (panel.title, target.expr.replace("$__rate_interval", rate_interval))
        for panel in dashboard().panels
        for target in panel.targets
    ]


@pytest.mark.parametrize(("title", "expr"), dashboard_queries())
def test_every_query_names_only_what_grafana_substitutes(title: str, expr: str) -> None:
    assert "$" not in expr, f"{title}: a template variable the test cannot give a value: {expr}"


def test_the_vm_recipe_writes_an_env_this_stack_reads() -> None:
    """docs/operations.md's step-by-step .env: only variables compose or the service reads, no trailing comment,
    and the set-up tests/test_docker.py runs for real (TLS in front, the app on loopback, a key)."""
    recipe = (REPO / "docs" / "operations.md").read_text().split("## A cloud VM, step by step", 1)[1]
    block = re.search(r"cat > \.env <<EOF\n(.*?)\n\s*EOF", recipe, re.DOTALL)
    assert block, "the recipe writes .env with a here-document"
    entries = dict(line.strip().split("=", 1) for line in block.group(1).splitlines())
    known = set(re.findall(r"^# ([A-Z_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE)) | set(app_environment())
    assert set(entries) <= known
    assert "tls" in entries["COMPOSE_PROFILES"].split(",") and entries["APP_BIND"] == "127.0.0.1"
    assert entries["API_KEY"] == "$(openssl rand -hex 32)"
    assert not any("#" in value for value in entries.values())
