"""`python -m bench workers --model-dir DIR`: the service with one worker process against several, through HTTP.

`1 worker` (WORKERS=1), `N workers` (one per core) and `1 core` (WORKERS=auto pinned to one core) take turns round
by round, `hey` saturating each with CLIENTS clients sending v2 JSON (fused, fused-int8) and /predict's PNG upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from app.engine.resources import usable_cores
from bench.common import Interval, Report
from bench.service import png_bytes, service_process
from bench.serving import Run, Target, figures, load_rounds, load_table, requested_outputs, v2_body
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import Mode, served_modes

CLIENTS = 16
BOUNDARY = "bench-workers-boundary"
AT_LEAST_PER_KIND, AT_LEAST_SCALING = 1.3, 1.7


def request_kinds(manifest: Manifest, work: Path) -> dict[str, tuple[str, Path, str]]:
    """Each kind of request: its path, body and content type."""
    infer, outputs = f"/v2/models/{manifest.name}/infer", requested_outputs(manifest)
    kinds = {
        f"v2 JSON {mode}": (infer, v2_body(manifest, mode, work / f"{mode}.json", outputs), "application/json")
        for mode in (Mode.FUSED, Mode.FUSED_INT8)
        if mode in served_modes(manifest)
    }
    if manifest.image is not None:  # /predict's body as a browser or curl -F sends it: one file field, a PNG
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="picture.png"\r\n'
        png = work / "picture.multipart"
        png.write_bytes(
            f"{head}Content-Type: image/png\r\n\r\n".encode() + png_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        kinds["/predict PNG"] = ("/predict", png, f"multipart/form-data; boundary={BOUNDARY}")
    return kinds


def run(model_dir: Path, rounds: int, seconds: float, work: Path) -> Report:
    manifest = load_manifest(model_dir)
    cores = usable_cores().count
    many = f"{cores} workers"
    with ExitStack() as stack:
        servers = {
            "1 worker": stack.enter_context(service_process(model_dir, work, WORKERS=1)),
            many: stack.enter_context(service_process(model_dir, work, WORKERS=cores)),
            "1 core": stack.enter_context(service_process(model_dir, work, cores={0}, WORKERS="auto")),
        }
        kinds = request_kinds(manifest, work)
        targets = {
            kind: [Target(name, server.url + path, body, content_type) for name, server in servers.items()]
            for kind, (path, body, content_type) in kinds.items()
        }
        runs = load_rounds([t for kind in kinds for t in targets[kind]], [CLIENTS], seconds, rounds)
    header = (
        f"Model directory {model_dir} ({manifest.name}); servers: {', '.join(servers)}; {rounds} interleaved rounds "
        f"of {seconds:g} s of `hey` from {CLIENTS} clients per server and kind of request. The ratios are each "
        "server's figure over 1 worker's, round by round."
    )
    tables = [f"{kind}:\n\n{load_table(runs, targets[kind], [CLIENTS])}" for kind in kinds]
    return Report("\n\n".join([header, *tables, targets_met(runs, targets, many)]))


def targets_met(runs: dict[tuple[Target, int], list[Run]], targets: dict[str, Sequence[Target]], many: str) -> str:
    lines = []
    for kind, (one, several, one_core) in targets.items():
        goodput = [figures(runs[t, CLIENTS])[0] for t in (several, one, one_core)]
        lines.append(Interval.of_ratios(goodput[0], goodput[1]).check(f"{kind}: {many} ÷ 1 worker",
                                                                      at_least=AT_LEAST_PER_KIND))  # fmt: skip
        if kind.endswith(str(Mode.FUSED)):
            scaling = Interval.of_ratios(goodput[0], goodput[2])
            lines.append(scaling.check(f"{kind}: {many} ÷ 1 core", at_least=AT_LEAST_SCALING))
    return "\n".join(f"- {line}" for line in lines)
