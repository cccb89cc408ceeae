"""docs/operations.md's "A cloud VM, step by step" and its releases, run as written: every command block, in a
shell, against this machine's Docker engine, and what each step promises checked after it.

What stands in for what a reader has:
- The VM is a directory. `ssh vm CMD` runs CMD in it, `scp` copies to and from `vm:`, and tar there applies the
  umask as it does for the VM's user, who is not root. Its Docker engine is this machine's.
- "Your machine, in this checkout" is a git repository of this working tree's files.
- `docker compose` is Compose v2's plugin where it is installed, else docker-compose v1 (the stand-ins' here).
- The VM's public address (`curl https://checkip.amazonaws.com`) is 127.0.0.1, and its port 443 is a free
  port that curl reaches through `--connect-to`.
- The environment sets what differs from the recipe's 4-vCPU VM with every image at hand: MODEL_PRESET=test (tiny
  models built in seconds), APP_CPUS=1 (Docker refuses more CPUs than this 2-core machine has), COMPOSE_PROFILES=tls
  (Grafana's image cannot be had here), free ports, a project name of its own, and MODEL_SEED=7 for the upgrade
  (a release with other weights).

What does not run here, and why: NOT_RUN_HERE below (step 1's installs), and step 5, which has no block: an SSH
tunnel to Grafana (no SSH server, no Grafana image).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.service import free_port
from ensemble_contract.manifest import load_manifest
from tests.dockerhost import (
    BUILD_TIMEOUT_S,
    Published,
    compose_command,
    needs_docker,
    ready,
    run,
    users_environment,
    wait_until,
)
from tests.support import infer_body
from tests.third_party import TABULAR_FEATURES

pytestmark = needs_docker

REPO = Path(__file__).resolve().parents[1]
SECTION = "A cloud VM, step by step"
BLOCKS = ("1. install, copy the code", "2. .env", "3. start", "4. predict", "6. your own ensemble", "releases")
NOT_RUN_HERE = {
    "# on the VM, Ubuntu 24.04": "apt-get of Ubuntu's docker.io and docker-compose-v2: this machine is Debian, whose "
    "engine and docker-compose v1 ../shared/tools/docker-standins installed",
    "# on the VM, Amazon Linux 2023": "dnf, systemctl and the plugin's download from GitHub: no dnf nor systemd here, "
    "and no internet but the package registries",
    "# on the VM: let your user run docker": "usermod and a new login: the tests run as root, who needs no group",
}

# How a reader's shell reaches what stands in for the VM (see the module's docstring).
STAND_INS = r"""
ssh() { shift; (cd "$VM_HOME" && TAR_OPTIONS=--no-same-permissions bash -e -c "$*"); }
scp() {
  local arguments=()
  for argument in "$@"; do
    case $argument in -r) ;; vm:*) arguments+=("$VM_HOME/${argument#vm:}") ;; *) arguments+=("$argument") ;; esac
  done
  cp -r "${arguments[@]}"
}
curl() {
  case "$*" in
    *checkip.amazonaws.com*) echo 127.0.0.1 ;;
    *) command curl --silent --show-error --connect-to "127.0.0.1:443:127.0.0.1:$TLS_PORT" "$@" ;;
  esac
}
docker() {
  if [ "$1" = compose ] && ! command docker compose version >/dev/null 2>&1; then
    shift
    docker-compose "$@"
  else
    command docker "$@"
  fi
}
"""


@dataclass
class Commands:
    """Consecutive lines of a block that run in one place: on the VM (a block's lines start there) or, after a
    `# from your machine` line, on the reader's machine."""

    heading: str
    on_the_vm: bool
    text: str


def recipe() -> dict[str, list[Commands]]:
    """The section's bash blocks, in order, each as the runs of commands it holds."""
    operations = (REPO / "docs" / "operations.md").read_text()
    section = operations.split(f"\n## {SECTION}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^ *```bash\n(.*?)^ *```", section, re.DOTALL | re.MULTILINE)
    assert len(blocks) == len(BLOCKS), f"{SECTION} has {len(blocks)} blocks; this test knows {BLOCKS}"
    return {name: commands(textwrap.dedent(block)) for name, block in zip(BLOCKS, blocks, strict=True)}


def commands(block: str) -> list[Commands]:
    runs = [Commands("", True, "")]
    for line in block.splitlines(keepends=True):
        where = re.match(r"# (on the VM|from your machine)", line)
        if where:
            runs.append(Commands(line.strip(), where.group(1) == "on the VM", ""))
        else:
            runs[-1].text += line
    return [commands for commands in runs if commands.text.strip()]


@dataclass
class Reader(Published):
    """A reader typing the recipe: on the VM (a directory) and on their machine (a checkout), in the environment
    `env`, which publishes the stack's ports."""

    vm_home: Path
    checkout: Path

    @property
    def vm(self) -> Path:
        return self.vm_home / "onnx-ensemble-serving"

    def type(self, block: list[Commands], **variables: str) -> str:
        """Runs a block's commands as a reader's shell would (stopping at the first that fails); their output."""
        output = ""
        for commands in block:
            if any(commands.heading.startswith(heading) for heading in NOT_RUN_HERE):
                continue
            where = self.vm if commands.on_the_vm else self.checkout
            result = subprocess.run(
                ["bash", "-e", "-c", STAND_INS + commands.text],
                cwd=where,
                env={**self.env, **variables},
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            assert result.returncode == 0, f"{commands.text}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            output += result.stdout
        return output

    def served(self) -> dict[str, str]:
        """The app's /readyz once it answers (compose returns once a recreated container has started)."""
        wait_until(lambda: ready(self.app_url), "the app to be ready")
        return httpx.get(f"{self.app_url}/readyz", timeout=30).json()


def checkout_of_this_working_tree(target: Path) -> Path:
    """A git repository of the working tree's files (committed or not): what `git archive HEAD` copies over."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    author = ["-c", "user.name=reader", "-c", "user.email=reader@localhost"]
    for command in (["init", "-q"], ["add", "-A"], [*author, "commit", "-q", "-m", "this working tree"]):
        assert run("git", *command, cwd=target).returncode == 0, command
    return target


@pytest.fixture()
def reader(tmp_path: Path) -> Iterator[Reader]:
    (tmp_path / "vm").mkdir()
    checkout = checkout_of_this_working_tree(tmp_path / "checkout")
    ports = ("TLS_PORT", "HTTP_PORT", "APP_PORT", "APP_GRPC_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")
    environment = {
        **users_environment(),
        "VM_HOME": str(tmp_path / "vm"),
        "COMPOSE_PROJECT_NAME": f"recipe{os.getpid()}",
        "MODEL_PRESET": "test",
        "APP_CPUS": "1",
        "COMPOSE_PROFILES": "tls",
        **{port: str(free_port()) for port in ports},
    }
    reader = Reader(env=environment, vm_home=tmp_path / "vm", checkout=checkout)
    try:
        yield reader
    finally:
        if (reader.vm / "docker-compose.yml").exists():
            down = [*compose_command(), "down", "--volumes", "--remove-orphans"]
            run(*down, cwd=reader.vm, env=environment, timeout=BUILD_TIMEOUT_S)


def test_the_vm_recipe_runs_as_written(reader: Reader, tabular_dir: Path) -> None:
    steps = recipe()
    not_run = {commands.heading for commands in steps[BLOCKS[0]] if commands.heading.startswith(tuple(NOT_RUN_HERE))}
    assert len(not_run) == len(NOT_RUN_HERE), f"NOT_RUN_HERE names headings the recipe no longer has: {not_run}"

    reader.type(steps["1. install, copy the code"])
    assert (reader.vm / "docker-compose.yml").is_file() and not (reader.vm / ".git").exists()

    reader.type(steps["2. .env"])
    settings = dict(line.split("=", 1) for line in (reader.vm / ".env").read_text().splitlines())
    assert settings["SITE_ADDRESS"] == "127.0.0.1" and re.fullmatch("[0-9a-f]{64}", settings["API_KEY"])
    assert (reader.vm / ".env").stat().st_mode & 0o077 == 0

    readiness = json.loads(reader.type(steps["3. start"]).splitlines()[-1])  # curl's, through Caddy, with its CA
    assert readiness["model"] == "shapes-test", readiness
    first = reader.served()["sha256"]

    prediction = json.loads(reader.type(steps["4. predict"]))  # with the key and the address from the VM's .env
    assert prediction["model"]["name"] == "shapes-test" and len(prediction["labels"]) == 4, prediction

    upgrade, listing, rollback = steps["releases"][0].text.strip().splitlines()
    release = f"{version('onnx-ensemble-serving')}-{first[:12]}"
    reader.type([Commands("", True, upgrade)], MODEL_SEED="7")  # another model, another sha256
    second = reader.served()["sha256"]
    assert second != first
    listed = reader.type([Commands("", True, listing)]).split()
    assert {f"{version('onnx-ensemble-serving')}-{second[:12]}", release} <= set(listed), listed
    example = re.search(r"\d+\.\d+\.\d+-[0-9a-f]{12}", rollback)
    assert example, rollback
    reader.type([Commands("", True, rollback.replace(example.group(), release))])  # the first image, kept by build
    assert reader.served()["sha256"] == first

    shutil.copytree(tabular_dir, reader.checkout / "my-ensemble")  # fused on the reader's machine
    reader.type(steps["6. your own ensemble"])
    served = reader.served()
    assert (served["model"], served["sha256"]) == ("tabular", load_manifest(tabular_dir).ensemble.sha256)
    trust = ssl.create_default_context(cafile=str(reader.vm / "caddy-root.crt"))
    key = {"Authorization": f"Bearer {settings['API_KEY']}"}
    body = infer_body(np.zeros((2, TABULAR_FEATURES), np.float32), ["label"], input_name="X")
    with httpx.Client(base_url=f"https://{reader.tls_address}", verify=trust, headers=key, timeout=30) as client:
        answer = client.post("/v2/models/tabular/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [2]
