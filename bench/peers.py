"""`python -m bench peers --model-dir DIR`: this service against other servers of the same model, through HTTP.

Ours (the service's defaults: WORKERS=auto, a lone inference on every core), triton (`make triton-venv`;
triton-tuned: an instance per core), kserve (`make kserve-venv`), litserve (`make litserve-venv`: LitServe's
batching of up to 8 requests, one worker; litserve-tuned: a worker per core, one intra-op thread each) and naive
(bench/peer_servers.py; a peer whose environment is absent is left out) take turns round by round under `hey` from
1, 4 and 16 clients sending the same v2 JSON request, fused.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from app.engine.resources import usable_cores
from bench.common import Interval, Report, log
from bench.service import DEFAULTS, ServerNotReady, ServiceProcess, free_port, server_process, service_process
from bench.serving import Run, Target, figures, load_rounds, load_table, requested_outputs, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

CLIENTS = (1, 4, 16)
# Ours over each peer (the best of them at each load, then): p50 at 1 client, goodput at 4 and 16, p99 at 16.
AT_MOST_P50_AT_1, AT_LEAST_GOODPUT, AT_MOST_P99_AT_16 = 0.9, 1.2, 1.0
PEER_START_TIMEOUT_S = 180  # KServe imports a great deal; Triton starts a server and its Python stub
# PyTriton's proxy now and then misses the handshake with its Python backend on a busy machine (the model fails to
# load: "Connection refused"), a failure of its start-up, not of the server measured: it gets one more start.
PEER_STARTS = 2
ENVIRONMENTS = ("kserve", "triton", "litserve")  # the peers in a virtual environment of their own (`make NAME-venv`)
TRITON = ("triton", "--max-batch", "8")  # bench.peer_servers' arguments for Triton with its dynamic batching


def run(model_dir: Path, pythons: Mapping[str, Path], rounds: int, seconds: float, work: Path) -> Report:
    """`pythons`: the interpreter of each of ENVIRONMENTS."""
    manifest = load_manifest(model_dir)
    infer, cores = f"/v2/models/{manifest.name}/infer", usable_cores().count
    tuned = ["--instances", str(cores), "--intra-op-threads", "1"]
    peers = {  # each peer's interpreter and its arguments to bench.peer_servers
        "triton": (pythons["triton"], TRITON),
        "triton-tuned": (pythons["triton"], [*TRITON, *tuned]),
        "kserve": (pythons["kserve"], ["kserve"]),
        "litserve": (pythons["litserve"], ["litserve", "--max-batch", "8"]),
        "litserve-tuned": (pythons["litserve"], ["litserve", "--max-batch", "8", *tuned]),
        "naive": (Path(sys.executable), ["naive"]),
    }
    outputs = requested_outputs(manifest)
    with ExitStack() as stack:
        servers = {"ours": stack.enter_context(service_process(model_dir, work, **DEFAULTS))}
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
    """Ours over each peer but the naive one, round by round, against the targets."""

    def ratio(peer: Target, figure: int, clients: int) -> Interval:
        """Figure 0: goodput, 1: p50, 2: p99."""
        return Interval.of_ratios(figures(runs[ours, clients])[figure], figures(runs[peer, clients])[figure])

    ours, lines = targets[0], []
    for peer in (t for t in targets[1:] if t.name != "naive"):
        lines.append(ratio(peer, 1, 1).check(f"p50 at 1 ours ÷ {peer.name}", at_most=AT_MOST_P50_AT_1))
        for clients in (4, 16):
            name = f"goodput at {clients} ours ÷ {peer.name}"
            lines.append(ratio(peer, 0, clients).check(name, at_least=AT_LEAST_GOODPUT))
        lines.append(ratio(peer, 2, 16).check(f"p99 at 16 ours ÷ {peer.name}", at_most=AT_MOST_P99_AT_16))
    return "\n".join(f"- {line}" for line in lines)
