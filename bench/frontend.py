"""`python -m bench frontend`: the service's own cost per request, on one core, with each lever of its front end.

On a trivial ensemble (bench.trivial, built unless --model-dir names another), whose inference costs microseconds:
`ours` (the defaults: uvloop, httptools, a run this short on the event loop), `asyncio` (EVENT_LOOP=asyncio), `h11`
(HTTP_PARSER=h11) and `threaded` (INLINE_INFERENCE_MS=0: every run handed to an inference thread), each one lever
off, and `triton` (`make triton-venv`; left out when absent) take turns round by round under `hey` from 1 and
CLIENTS clients sending the same v2 JSON request. Every server runs on one core and `hey` on the others, so that a
server's goodput is its requests a second per core.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import trivial
from bench.common import Report, log
from bench.peers import TRITON, start_peer
from bench.service import service_process
from bench.serving import Target, load_rounds, load_table, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

CLIENTS = (1, 16)
LEVERS: dict[str, dict[str, str]] = {  # each server of ours: the settings it changes from the defaults
    "ours": {},
    "asyncio": {"EVENT_LOOP": "asyncio"},
    "h11": {"HTTP_PARSER": "h11"},
    "threaded": {"INLINE_INFERENCE_MS": "0"},
}


@contextmanager
def clients_apart(server_core: int) -> Iterator[None]:
    """This process (and so `hey`, which it starts) on every usable core but the servers' while the block runs
    (with one core, the clients share it)."""
    cores = os.sched_getaffinity(0)
    others = cores - {server_core}
    if not others:
        log("[frontend] one core: the clients share it with the server")
    os.sched_setaffinity(0, others or cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def run(model_dir: Path | None, triton_python: Path, rounds: int, seconds: float, work: Path) -> Report:
    model_dir = model_dir or trivial.build(work / "trivial")
    manifest = load_manifest(model_dir)
    infer, server_core = f"/v2/models/{manifest.name}/infer", min(os.sched_getaffinity(0))
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(service_process(model_dir, work, cores={server_core}, WORKERS=1, **settings))
            for name, settings in LEVERS.items()
        }
        triton = start_peer(stack, "triton", triton_python, TRITON, model_dir, work, cores={server_core})
        if triton is not None:
            servers["triton"] = triton
        body = v2_body(manifest, Mode.FUSED, work / "fused.json")
        targets = [Target(name, server.url + infer, body) for name, server in servers.items()]
        with clients_apart(server_core):
            runs = load_rounds(targets, CLIENTS, seconds, rounds)
    header = (
        f"Model directory {model_dir} ({manifest.name}, {len(manifest.members)} members); servers: "
        f"{', '.join(servers)}, each on core {server_core} alone (goodput: requests a second per core); "
        f"{rounds} interleaved rounds of {seconds:g} s of `hey` per server and number of clients. The ratios are "
        "each server's figure over ours, round by round."
    )
    return Report(f"{header}\n\n{load_table(runs, targets, CLIENTS)}")
