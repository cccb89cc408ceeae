"""`python -m bench peers --model-dir DIR`: this service against other servers of the same model, through HTTP.

Ours (and `ours-workers`, a worker per core), triton (`make triton-venv`; triton-tuned: an instance per core),
kserve (`make kserve-venv`) and naive (bench/peer_servers.py; a peer whose environment is absent is left out) take
turns round by round under `hey` from 1, 4 and 16 clients sending the same v2 JSON request, fused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from app.engine.resources import usable_cores
from bench.common import Interval, Report, log
from bench.service import ServerNotReady, ServiceProcess, free_port, server_process, service_process
from bench.serving import Run, Target, figures, load_rounds, load_table, requested_outputs, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

CLIENTS = (1, 4, 16)
OURS_WORKERS = "ours-workers"
WORKERS_OVER_TRITON = 1.2  # the goodput at 16 clients ours-workers must have, over Triton's
PEER_START_TIMEOUT_S = 180  # KServe imports a great deal; Triton starts a server and its Python stub
# PyTriton's proxy now and then misses the handshake with its Python backend on a busy machine (the model fails to
# load: "Connection refused"), a failure of its start-up, not of the server measured: it gets one more start.
PEER_STARTS = 2
TRITON = ("triton", "--max-batch", "8")  # bench.peer_servers' arguments for Triton with its dynamic batching


def run(model_dir: Path, kserve_python: Path, triton_python: Path, rounds: int, seconds: float, work: Path) -> Report:
    manifest = load_manifest(model_dir)
    infer, cores = f"/v2/models/{manifest.name}/infer", usable_cores().count
    peers = {  # each peer's interpreter and its arguments to bench.peer_servers
        "triton": (triton_python, TRITON),
        "triton-tuned": (triton_python, [*TRITON, "--instances", str(cores), "--intra-op-threads", "1"]),
        "kserve": (kserve_python, ["kserve"]),
        "naive": (Path(sys.executable), ["naive"]),
    }  # fmt: skip
    outputs = requested_outputs(manifest)
    with ExitStack() as stack:
        servers = {"ours": stack.enter_context(service_process(model_dir, work))}
        if cores > 1:
            servers[OURS_WORKERS] = stack.enter_context(service_process(model_dir, work, WORKERS=cores))
        for name, (python, arguments) in peers.items():
            if (peer := start_peer(stack, name, python, arguments, model_dir, work)) is not None:
                servers[name] = peer
        body = v2_body(manifest, Mode.FUSED, work / "fused.json", outputs)
        targets = [Target(name, server.url + infer, body) for name, server in servers.items()]
        runs = load_rounds(targets, CLIENTS, seconds, rounds)
    header = (
        f"Model directory {model_dir} ({manifest.name}); servers: {', '.join(servers)}; the request asks for "
        f"{', '.join(outputs) if outputs else 'every output'}; {rounds} interleaved rounds of {seconds:g} s of `hey` "
        "per server and number of clients. The ratios are each server's figure over ours, round by round."
    )
    return Report(f"{header}\n\n{load_table(runs, targets, CLIENTS)}\n\n{targets_met(runs, targets)}")


def start_peer(
    stack: ExitStack,
    name: str,
    python: Path,
    arguments: Sequence[str],
    model_dir: Path,
    work: Path,
    *,
    cores: set[int] | None = None,
) -> ServiceProcess | None:
    """bench.peer_servers with `arguments` under `python` (on `cores` only, if given), ready, and stopped when
    `stack` closes; None, said in the log, when that interpreter is absent (`make <peer>-venv` makes it)."""
    if not python.is_file():
        log(f"[peers] no {python} (`make {name.split('-')[0]}-venv` makes it): {name} is left out")
        return None
    command = [str(python), "-m", "bench.peer_servers", *arguments, "--model-dir", str(model_dir.resolve())]
    ready_path = f"/v2/models/{load_manifest(model_dir).name}/ready"

    def started(attempt: int) -> ServiceProcess:
        port = free_port()
        return stack.enter_context(server_process([*command, "--port", str(port)], port, work / f"{name}-{attempt}.log",
                                                  ready_path=ready_path, cores=cores,
                                                  start_timeout_s=PEER_START_TIMEOUT_S))  # fmt: skip

    for attempt in range(1, PEER_STARTS):
        try:
            return started(attempt)
        except ServerNotReady as failed:
            log(f"[peers] {name} did not start ({str(failed).splitlines()[0]}): starting it again")
    return started(PEER_STARTS)


def targets_met(runs: dict[tuple[Target, int], list[Run]], targets: Sequence[Target]) -> str:
    def ratio(mine: Target, peer: Target, figure: int, clients: int) -> Interval:
        """Figure 0: goodput, 1: p50, 2: p99; mine over the peer's, round by round."""
        return Interval.of_ratios(figures(runs[mine, clients])[figure], figures(runs[peer, clients])[figure])

    ours, lines = targets[0], []
    with_workers = next((t for t in targets if t.name == OURS_WORKERS), None)
    for peer in (t for t in targets[1:] if t.name not in ("naive", OURS_WORKERS)):
        if peer.name.startswith("triton"):
            for clients in (16, 4):
                lines.append(
                    ratio(ours, peer, 0, clients).check(f"goodput at {clients} ours ÷ {peer.name}", at_least=1)
                )
            lines.append(ratio(ours, peer, 2, 16).check(f"p99 at 16 ours ÷ {peer.name}", at_most=1))
            if with_workers is not None:
                name = f"goodput at 16 {OURS_WORKERS} ÷ {peer.name}"
                lines.append(ratio(with_workers, peer, 0, 16).check(name, at_least=WORKERS_OVER_TRITON))
        lines.append(ratio(ours, peer, 1, 1).check(f"p50 at 1 ours ÷ {peer.name}", at_most=1))
    return "\n".join(f"- {line}" for line in lines)
