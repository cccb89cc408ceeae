"""`python -m bench peers --model-dir DIR`: this service against KServe's Python model server running the same
fused graph (in its own virtual environment: `make kserve-venv`) and against the naive server (the members in a
loop, default options), the same v2 JSON request, sent by `hey`, the servers taking turns round by round:
- latency at one client: p50 over /v2, each server's, and ours over our own in-process time (target: ours below
  the peers', and within 1.25x of in-process);
- at 16 and 32 closed-loop clients: answered requests a second (goodput, target >= the peers') and accepted
  p99 (target within LATENCY_BUDGET_MS).
Ours runs with its default settings and DEFAULT_MODE=fused: the same graph as the peer.

The peers run from this module, each in a process of its own:

    python -m bench.peers naive --model-dir DIR --port PORT                   (`bench load` starts it too)
    .venv-kserve/bin/python -m bench.peers kserve --model-dir DIR --port PORT

KServe's environment has numpy, FastAPI, uvicorn, Pillow and ONNX Runtime, but neither this project's packages
nor its other dependencies (kserve's pins clash with ours). So this module imports only the standard library at
its top, each part imports what it uses, and the KServe server reads manifest.json as plain JSON.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

REPO = Path(__file__).resolve().parents[1]
ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64", "tensor(int32)": "INT32"}


def naive_app(model_dir: Path) -> "FastAPI":
    """The server users start from: FastAPI + ONNX Runtime written the straightforward way.

    One InferenceSession per member with default SessionOptions, run one after another inside an `async`
    endpoint, outputs combined by the reference combination: `/predict` for an image, `/v2/models/{name}/infer`
    for JSON tensors. No fused graph, no thread tuning, no admission control."""
    import io

    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI, HTTPException, UploadFile
    from PIL import Image

    from ensemble_contract.combine import combine
    from ensemble_contract.datatypes import NUMPY, of_numpy
    from ensemble_contract.manifest import load_manifest

    manifest = load_manifest(model_dir)
    sessions = [
        ort.InferenceSession(str(model_dir / m.file.path), providers=["CPUExecutionProvider"]) for m in manifest.members
    ]
    spec, names = manifest.image, list(manifest.member_outputs)
    app = FastAPI(title="baseline: separate sessions in a loop, default options")

    def ensemble(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = [dict(zip(names, session.run(names, feeds), strict=True)) for session in sessions]
        return combine(outputs, manifest.combine, manifest.weights)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile) -> dict[str, object]:
        if spec is None or spec.scores_output is None:
            raise HTTPException(404, "this model takes no images")
        image = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((spec.width, spec.height))
        scores = spec.probabilities(
            ensemble({spec.input: spec.normalise(np.asarray(image)[None])})[spec.scores_output][0]
        )
        return {"labels": dict(zip(spec.labels, map(float, scores), strict=True)), "mode": "baseline"}

    @app.get("/v2/models/{name}/ready")
    async def ready(name: str) -> dict[str, object]:
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, object]:
        feeds = {t["name"]: np.asarray(t["data"], NUMPY[t["datatype"]]).reshape(t["shape"]) for t in body["inputs"]}
        outputs = [
            {"name": k, "shape": list(v.shape), "datatype": of_numpy(v.dtype), "data": v.ravel().tolist()}
            for k, v in ensemble(feeds).items()
        ]
        return {"model_name": name, "outputs": outputs}

    return app


def serve_naive(model_dir: Path, port: int) -> None:
    import uvicorn

    uvicorn.run(naive_app(model_dir), host="127.0.0.1", port=port, log_level="warning")


def serve_kserve(model_dir: Path, port: int) -> None:
    """KServe's Python model server (kserve 0.21) running the model directory's fused graph: a custom `Model` with
    one ONNX Runtime session, default session options, answering v2 requests."""
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    class FusedGraph(Model):
        def __init__(self, name: str, path: Path) -> None:
            super().__init__(name)
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.outputs = [(o.name, ORT_DATATYPES[o.type]) for o in self.session.get_outputs()]
            self.ready = True

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
            results = self.session.run([name for name, _ in self.outputs], feeds)
            outputs = [
                InferOutput(name=name, shape=list(array.shape), datatype=datatype, data=array.ravel().tolist())
                for (name, datatype), array in zip(self.outputs, results, strict=True)
            ]
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)

    manifest = json.loads((model_dir / "manifest.json").read_text())
    model = FusedGraph(manifest["name"], model_dir / manifest["ensemble"]["path"])
    ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False).start([model])


SERVERS = {"naive": serve_naive, "kserve": serve_kserve}


def _in_process_p50(model_dir: Path, calls: int) -> float:
    from app.engine.runtime import EnsembleRuntime
    from app.settings import Settings
    from ensemble_contract.modes import Mode

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
    from app.engine.timing import percentiles_ms
    from bench.http_load import hey

    one = [r.seconds for r in hey(url, body, concurrency=1, seconds=seconds)]
    figures.setdefault(f"{name} p50 c=1", []).append(statistics.median(one) * 1000)
    for clients in (16, 32):
        accepted = [r.seconds for r in hey(url, body, concurrency=clients, seconds=seconds) if r.status == 200]
        figures.setdefault(f"{name} goodput c={clients}", []).append(len(accepted) / seconds)
        (p99,) = percentiles_ms(accepted, [99]) if accepted else [float("inf")]
        figures.setdefault(f"{name} p99 c={clients}", []).append(p99)


def run(model_dir: Path, kserve_python: Path, rounds: int, seconds: float) -> str:
    from bench.core import Interval, Machine, interval_check, log
    from bench.http_load import free_port, started, v2_bodies
    from ensemble_contract.manifest import load_manifest
    from ensemble_contract.modes import Mode

    manifest = load_manifest(model_dir)
    infer, directory = f"/v2/models/{manifest.name}/infer", str(model_dir.resolve())
    lines = [f"machine: {Machine.current().describe()}", f"{model_dir}: {rounds} rounds, fused graph, v2 JSON"]
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        body = v2_bodies(manifest, Path(work))[Mode.FUSED]
        ports = free_port(), free_port(), free_port()
        ours_env = {"MODEL_DIR": directory, "PORT": str(ports[0]), "LOG_LEVEL": "warning"}
        kserve_args = ["-m", "bench.peers", "kserve", "--model-dir", directory, "--port", str(ports[1])]
        kserve_env = {"PYTHONPATH": str(REPO)}  # this module, and nothing else of the project, in KServe's venv
        naive_args = ["-m", "bench.peers", "naive", "--model-dir", directory, "--port", str(ports[2])]
        ready = f"{infer.removesuffix('/infer')}/ready"
        with (
            started(["-m", "app"], ours_env, ports[0], Path(work) / "ours.log", "/readyz") as ours,
            started(
                kserve_args, kserve_env, ports[1], Path(work) / "kserve.log", ready, python=str(kserve_python)
            ) as kserve,
            started(naive_args, {}, ports[2], Path(work) / "naive.log", ready) as naive,
        ):
            servers = [("ours", ours), ("kserve", kserve), ("naive", naive)]
            for turn in range(rounds):
                for name, server in servers[turn % 3 :] + servers[: turn % 3]:
                    _measure(server.url + infer, body, seconds, figures, name)
                log(f"[peers] round {turn + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()))
    in_process_ms = _in_process_p50(model_dir, 200) * 1000

    def ratios(ours: str, theirs: str) -> Interval:
        return Interval.of_ratios(figures[ours], figures[theirs])

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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description="Runs one of the peers as a server.")
    parser.add_argument("server", choices=sorted(SERVERS))
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    SERVERS[args.server](args.model_dir, args.port)


if __name__ == "__main__":
    main()
