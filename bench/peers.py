"""`python -m bench peers --model-dir DIR`: this service against KServe's Python model server running the same
fused graph (bench/kserve_server.py, in its own virtual environment: `make kserve-venv`), the same v2 JSON
request, sent by `hey`, the servers taking turns round by round:
- latency at one client: p50 over /v2, each server's, and ours over our own in-process time (target: ours below
  KServe's, and within 1.25x of in-process);
- at 16 and 32 closed-loop clients: answered requests a second (goodput, target >= KServe's) and accepted p99
  (target within LATENCY_BUDGET_MS).
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
from bench.layouts import Interval, _check
from bench.machine import Machine
from bench.server import free_port, started
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


def run(model_dir: Path, kserve_python: Path, rounds: int, seconds: float, log: Callable[[str], None]) -> str:
    manifest = load_manifest(model_dir)
    infer = f"/v2/models/{manifest.name}/infer"
    lines = [f"machine: {Machine.current().describe()}", f"{model_dir}: {rounds} rounds, fused graph, v2 JSON"]
    with tempfile.TemporaryDirectory() as work:
        body = Path(work) / "body.json"
        body.write_bytes(hey.v2_body(manifest, Mode.FUSED))
        ours_port, peer_port = free_port(), free_port()
        ours_env = {"MODEL_DIR": str(model_dir.resolve()), "PORT": str(ours_port), "LOG_LEVEL": "warning"}
        peer_args = [str(KSERVE_SERVER), "--model-dir", str(model_dir.resolve()), "--port", str(peer_port)]
        with (
            started(["-m", "app"], ours_env, ours_port, Path(work) / "ours.log", "/readyz") as ours,
            started(peer_args, {}, peer_port, Path(work) / "kserve.log", f"{infer.removesuffix('/infer')}/ready",
                    python=str(kserve_python)) as peer,
        ):  # fmt: skip
            figures: dict[str, list[float]] = {}
            for turn in range(rounds):
                for name, server in (("ours", ours), ("kserve", peer))[:: 1 if turn % 2 == 0 else -1]:
                    one = [r.seconds for r in hey.run(server.url + infer, body, concurrency=1, seconds=seconds)]
                    figures.setdefault(f"{name} p50 c=1", []).append(statistics.median(one) * 1000)
                    for clients in (16, 32):
                        replies = hey.run(server.url + infer, body, concurrency=clients, seconds=seconds)
                        accepted = [r.seconds for r in replies if r.status == 200]
                        figures.setdefault(f"{name} goodput c={clients}", []).append(len(accepted) / seconds)
                        p99 = float(np.percentile(accepted, 99)) * 1000 if accepted else float("inf")
                        figures.setdefault(f"{name} p99 c={clients}", []).append(p99)
                log(f"[peers] round {turn + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()))
    in_process_ms = _in_process_p50(model_dir, 200) * 1000

    def ratios(ours: str, theirs: str) -> Interval:
        return Interval.of([o / t for o, t in zip(figures[ours], figures[theirs], strict=True)])

    lines += [f"{name}: {Interval.of(values)}" for name, values in figures.items()]
    lines.append(_check("p50 at c=1, ours / KServe's", ratios("ours p50 c=1", "kserve p50 c=1"), at_most=1.0))
    over_in_process = Interval.of([p / in_process_ms for p in figures["ours p50 c=1"]])
    lines.append(_check(f"p50 at c=1 over /v2 / in-process ({in_process_ms:.2f} ms)", over_in_process, at_most=1.25))
    for clients in (16, 32):
        goodput = ratios(f"ours goodput c={clients}", f"kserve goodput c={clients}")
        lines.append(_check(f"goodput at {clients} clients, ours / KServe's", goodput, at_least=1.0))
        p99 = Interval.of(figures[f"ours p99 c={clients}"])
        lines.append(_check(f"ours: accepted p99 at {clients} clients, ms", p99, at_most=1000))
    return "\n".join(lines)
