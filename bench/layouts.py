"""`python -m bench layouts --model-dir DIR`: the service under each inference-slot layout, through HTTP.

One server per `--slots` (INFERENCE_SLOTS, threads cores ÷ slots) side by side, taking turns round by round. In
fused (and fused-int8), `hey` sends the v2 JSON request of the model's example input from a few clients
(saturation) and from many (overload: what is refused, how long the accepted wait).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from app.core.auto import SlotLayout
from app.engine.resources import usable_cores
from bench.common import Report
from bench.service import service_process
from bench.serving import Target, load_rounds, load_table, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode, served_modes


def layout(slots: int) -> str:
    """The layout's name, slots x each session's intra-op threads: "2x1"."""
    return str(SlotLayout.on(usable_cores().count, slots))


def run(
    model_dir: Path, slots: Sequence[int], clients: Sequence[int], rounds: int, seconds: float, work: Path
) -> Report:
    manifest = load_manifest(model_dir)
    modes = [mode for mode in (Mode.FUSED, Mode.FUSED_INT8) if mode in served_modes(manifest)]
    infer = f"/v2/models/{manifest.name}/infer"
    with ExitStack() as stack:
        servers = {n: stack.enter_context(service_process(model_dir, work, INFERENCE_SLOTS=n)) for n in slots}
        bodies = {mode: v2_body(manifest, mode, work / f"{mode}.json") for mode in modes}
        targets = {mode: [Target(layout(n), s.url + infer, bodies[mode]) for n, s in servers.items()] for mode in modes}
        runs = load_rounds([t for mode in modes for t in targets[mode]], clients, seconds, rounds)
    header = (
        f"Model directory {model_dir} ({manifest.name}); layouts as slots x intra-op threads; {rounds} interleaved "
        f"rounds of {seconds:g} s of `hey` per layout, mode and number of clients."
    )
    tables = [f"{mode}:\n\n{load_table(runs, targets[mode], clients)}" for mode in modes]
    return Report("\n\n".join([header, *tables]))
