"""The service's own runtime (app.runtime) in this process: the in-process floor of each service mode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from app.runtime import EnsembleRuntime, served_modes
from app.settings import Settings
from bench.engines import Runner
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

SERVICE_PREFIX = "service:"


def service_modes(model_dir: Path) -> tuple[str, ...]:
    """The modes the service serves for this model directory (fused-int8 only if the build shipped it)."""
    return tuple(mode.value for mode in served_modes(load_manifest(model_dir, verify_files=False)))


def service_runner_name(mode: Mode | str) -> str:
    return f"{SERVICE_PREFIX}{Mode(mode).value}"


def open_service_runners(model_dir: Path, names: Sequence[str], allow_spinning: bool | None) -> dict[str, Runner]:
    """One EnsembleRuntime, loaded as the service loads it (its default settings unless spinning is given),
    and a runner per `service:<mode>` name."""
    overrides: dict[str, object] = {"model_dir": model_dir}
    if allow_spinning is not None:
        overrides["allow_spinning"] = allow_spinning
    runtime = EnsembleRuntime.load(Settings(**overrides))
    runners: dict[str, Runner] = {}
    for name in names:
        mode = Mode(name.removeprefix(SERVICE_PREFIX))
        if mode not in runtime.modes:
            raise ValueError(f"{model_dir} does not serve {mode}: it serves {', '.join(runtime.modes)}")
        runners[name] = lambda batch, mode=mode: runtime.infer(batch, mode)
    return runners
