"""`python -m bench peers --model-dir DIR`: this service against other servers of the same model, through HTTP.

The peers (bench/peer_servers.py): KServe's Python model server running the same fused graph with one default ONNX
Runtime session, in its own virtual environment (`make kserve-venv`; left out, saying so, when it is absent), and
the naive server users start from (the members' sessions in a loop with default options, straight on the event
loop). Ours runs with its default settings. `hey` sends each the same v2 JSON request (the model's example input,
fused mode) from 1, 16 and 32 closed-loop clients, the servers taking turns round by round.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from bench.common import Report, log
from bench.serving import Target, load_rounds, load_table, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode
from tests.service_process import free_port, server_process, service_process

CLIENTS = (1, 16, 32)
PEER_START_TIMEOUT_S = 180  # KServe imports a great deal


def run(model_dir: Path, kserve_python: Path, rounds: int, seconds: float, work: Path) -> Report:
    manifest = load_manifest(model_dir)
    infer = f"/v2/models/{manifest.name}/infer"
    peers = {"kserve": kserve_python, "naive": Path(sys.executable)}
    if not kserve_python.is_file():
        log(f"[peers] no {kserve_python} (`make kserve-venv` makes it): KServe is left out")
        del peers["kserve"]
    with ExitStack() as stack:
        servers = {"ours": stack.enter_context(service_process(model_dir, work))}
        for name, python in peers.items():
            port = free_port()
            command = [str(python), "-m", "bench.peer_servers", name, "--model-dir", str(model_dir.resolve())]
            server = server_process(
                [*command, "--port", str(port)],
                port,
                work / f"{name}.log",
                ready_path=infer.removesuffix("/infer") + "/ready",
                start_timeout_s=PEER_START_TIMEOUT_S,
            )
            servers[name] = stack.enter_context(server)
        body = v2_body(manifest, Mode.FUSED, work / "fused.json")
        targets = [Target(name, server.url + infer, body) for name, server in servers.items()]
        runs = load_rounds(targets, CLIENTS, seconds, rounds)
    header = (
        f"Model directory {model_dir} ({manifest.name}); servers: {', '.join(servers)}; {rounds} interleaved rounds "
        f"of {seconds:g} s of `hey` per server and number of clients. The ratios are each server's figure over ours, "
        "round by round."
    )
    return Report(f"{header}\n\n{load_table(runs, targets, CLIENTS)}")
