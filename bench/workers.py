"""`python -m bench workers --model-dir DIR`: the default against the fixed numbers of worker processes, through HTTP.

`default` (WORKERS=auto with ALONE_ON_EVERY_CORE: a worker per core, a lone inference on every core), `1 worker`
(WORKERS=1: one process, its sessions on every core) and `N workers` (one per core, every inference on its worker's
share) take turns round by round under `hey` from 1, 4 and 16 clients sending v2 JSON, fused. The default should lose
nothing to either: at 1 client as fast as one process, at 16 as much goodput as the best fixed number.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from app.engine.resources import usable_cores
from bench.common import Interval, Report
from bench.service import DEFAULTS, service_process
from bench.serving import Run, Target, figures, load_rounds, load_table, requested_outputs, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

CLIENTS = (1, 4, 16)
DEFAULT = "default"
AT_MOST_P50_AT_1, AT_LEAST_GOODPUT_AT_16 = 1.05, 0.95  # the default against each fixed number


def run(model_dir: Path, rounds: int, seconds: float, work: Path) -> Report:
    manifest = load_manifest(model_dir)
    cores = usable_cores().count
    with ExitStack() as stack:
        servers = {
            DEFAULT: stack.enter_context(service_process(model_dir, work, **DEFAULTS)),
            "1 worker": stack.enter_context(service_process(model_dir, work, **DEFAULTS | {"WORKERS": "1"})),
            f"{cores} workers": stack.enter_context(
                service_process(model_dir, work, **DEFAULTS | {"WORKERS": str(cores), "ALONE_ON_EVERY_CORE": "false"})
            ),
        }
        body = v2_body(manifest, Mode.FUSED, work / "fused.json", requested_outputs(manifest))
        infer = f"/v2/models/{manifest.name}/infer"
        targets = [Target(name, server.url + infer, body) for name, server in servers.items()]
        runs = load_rounds(targets, CLIENTS, seconds, rounds)
    header = (
        f"Model directory {model_dir} ({manifest.name}); servers: {', '.join(servers)}; {rounds} interleaved rounds "
        f"of {seconds:g} s of `hey` per server and number of clients, v2 JSON, fused. The ratios are each server's "
        "figure over the default's, round by round."
    )
    return Report(f"{header}\n\n{load_table(runs, targets, CLIENTS)}\n\n{targets_met(runs, targets)}")


def targets_met(runs: dict[tuple[Target, int], list[Run]], targets: list[Target]) -> str:
    default, *fixed = targets
    lines = []
    for other in fixed:
        p50 = Interval.of_ratios(figures(runs[default, 1])[1], figures(runs[other, 1])[1])
        lines.append(p50.check(f"p50 at 1 default ÷ {other.name}", at_most=AT_MOST_P50_AT_1))
        goodput = Interval.of_ratios(figures(runs[default, 16])[0], figures(runs[other, 16])[0])
        lines.append(goodput.check(f"goodput at 16 default ÷ {other.name}", at_least=AT_LEAST_GOODPUT_AT_16))
    return "\n".join(f"- {line}" for line in lines)
