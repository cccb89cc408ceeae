"""`python -m bench peers --model-dir DIR`: this service against KServe's Python model server running the same
fused graph (bench/kserve_server.py, in its own virtual environment: `make kserve-venv`) and against the naive
server (bench/baseline_server.py: the members in a loop, default options), the same v2 JSON request, sent by
`hey`, the servers taking turns round by round:
- latency at one client: p50 over /v2, each server's, and ours over our own in-process time (target: ours below
  the peers', and within 1.25x of in-process);
- at 16 and 32 closed-loop clients: answered requests a second (goodput, target >= the peers') and accepted
  p99 (target within LATENCY_BUDGET_MS).
Ours runs with its default settings and DEFAULT_MODE=fused: the same graph as the peer.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.runtime import EnsembleRuntime
from app.settings import Settings
from bench import hey
from bench.machine import Machine
from bench.server import free_port, started
from bench.stats import Interval
from bench.targets import interval_check
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

KSERVE_SERVER = Path(__file__).with_name("kserve_server.py")


def _in_process_p50(model_dir: Path, calls: int) -> float:
    runtime = EnsembleRuntime.load(Settings(model_dir=model_dir))
    feeds = runtime.manifest.example_inputs()
    try:
        seconds = []
        for _ in range(calls):
            seconds.append(runtime.infer_measured(feeds, Mode.FUSED).seconds)
        return statistics.median(seconds)
    finally:
        runtime.close()


def _measure(url: str, body: Path, seconds: float, figures: dict[str, list[float]], name: str) -> None:
    """One round of one server: p50 at one client, goodput and accepted p99 at 16 and 32."""
    one = [r.seconds for r in hey.run(url, body, concurrency=1, seconds=seconds)]
    figures.setdefault(f"{name} p50 c=1", []).append(statistics.median(one) * 1000)
    for clients in (16, 32):
        accepted = [r.seconds for r in hey.run(url, body, concurrency=clients, seconds=seconds) if r.status == 200]
        figures.setdefault(f"{name} goodput c={clients}", []).append(len(accepted) / seconds)
        p99 = float(np.percentile(accepted, 99)) * 1000 if accepted else float("inf")
        figures.setdefault(f"{name} p99 c={clients}", []).append(p99)


def run(model_dir: Path, kserve_python: Path, rounds: int, seconds: float, log: Callable[[str], None]) -> str:
    manifest = load_manifest(model_dir)
    infer, directory = f"/v2/models/{manifest.name}/infer", str(model_dir.resolve())
    lines = [f"machine: {Machine.current().describe()}", f"{model_dir}: {rounds} rounds, fused graph, v2 JSON"]
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        body = Path(work) / "body.json"
        body.write_bytes(hey.v2_body(manifest, Mode.FUSED))
        ports = free_port(), free_port(), free_port()
        ours_env = {"MODEL_DIR": directory, "PORT": str(ports[0]), "LOG_LEVEL": "warning"}
        kserve_args = [str(KSERVE_SERVER), "--model-dir", directory, "--port", str(ports[1])]
        naive_args = ["-m", "bench.baseline_server", "--model-dir", directory, "--port", str(ports[2])]
        ready = f"{infer.removesuffix('/infer')}/ready"
        with (
            started(["-m", "app"], ours_env, ports[0], Path(work) / "ours.log", "/readyz") as ours,
            started(kserve_args, {}, ports[1], Path(work) / "kserve.log", ready, python=str(kserve_python)) as kserve,
            started(naive_args, {}, ports[2], Path(work) / "naive.log", ready) as naive,
        ):
            servers = [("ours", ours), ("kserve", kserve), ("naive", naive)]
            for turn in range(rounds):
                for name, server in servers[turn % 3 :] + servers[: turn % 3]:
                    _measure(server.url + infer, body, seconds, figures, name)
                log(f"[peers] round {turn + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()))
    in_process_ms = _in_process_p50(model_dir, 200) * 1000

    def ratios(ours: str, theirs: str) -> Interval:
        return Interval.of([o / t for o, t in zip(figures[ours], figures[theirs], strict=True)])

    lines += [f"{name}: {Interval.of(values)}" for name, values in figures.items()]
    over_in_process = Interval.of([p / in_process_ms for p in figures["ours p50 c=1"]])
    lines.append(
        interval_check(f"p50 at c=1 over /v2 / in-process ({in_process_ms:.2f} ms)", over_in_process, at_most=1.25)
    )
    for peer, title in (("kserve", "KServe's"), ("naive", "the naive server's")):
        lines.append(
            interval_check(f"p50 at c=1, ours / {title}", ratios("ours p50 c=1", f"{peer} p50 c=1"), at_most=1.0)
        )
        for clients in (16, 32):
            goodput = ratios(f"ours goodput c={clients}", f"{peer} goodput c={clients}")
            lines.append(interval_check(f"goodput at {clients} clients, ours / {title}", goodput, at_least=1.0))
    for clients in (16, 32):
        p99 = Interval.of(figures[f"ours p99 c={clients}"])
        lines.append(interval_check(f"ours: accepted p99 at {clients} clients, ms", p99, at_most=1000))
    return "\n".join(lines)
