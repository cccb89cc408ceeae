"""The servers `python -m bench peers` measures this service against, each answering v2 JSON inference requests:
`python -m bench.peer_servers naive|kserve|triton|litserve --model-dir DIR --port PORT`, kserve, triton and litserve
with the interpreter of `make kserve-venv`, `make triton-venv` or `make litserve-venv`. Those lack this project's
packages (their pins clash with ours): this module imports only the standard library at its top, each server what it
uses (of this project, ensemble_contract.datatypes: numpy only); they read manifest.json as plain JSON."""

import argparse
import json
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64", "tensor(int32)": "INT32"}
# LitServe's batcher waits this long for more requests once it has one (0 would spin on its queue, taking a core).
LITSERVE_BATCH_TIMEOUT_S = 0.001


def v2_inputs(body: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A v2 JSON request's input tensors as numpy arrays, and the outputs it asks for (none: every one)."""
    import numpy as np

    from ensemble_contract.datatypes import NUMPY

    feeds = {t["name"]: np.asarray(t["data"], NUMPY[t["datatype"]]).reshape(t["shape"]) for t in body["inputs"]}
    return feeds, [o["name"] for o in body.get("outputs") or []]


def v2_response(model_name: str, outputs: Mapping[str, Any]) -> dict[str, object]:
    """The v2 JSON response holding `outputs` (numpy arrays by name)."""
    from ensemble_contract.datatypes import of_numpy

    tensors = [
        {"name": k, "shape": list(v.shape), "datatype": of_numpy(v.dtype), "data": v.ravel().tolist()}
        for k, v in outputs.items()
    ]
    return {"model_name": model_name, "outputs": tensors}


def serve_naive(model_dir: Path, port: int) -> None:
    """The server users start from: one default session per member, run one after another in an `async` FastAPI
    endpoint, the outputs combined as the fused graph combines them; no tuning, admission control or validation."""
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI

    from ensemble_contract.combine import combine
    from ensemble_contract.manifest import load_manifest

    manifest = load_manifest(model_dir)
    sessions = [ort.InferenceSession(str(model_dir / m.file.path)) for m in manifest.members]
    names = list(manifest.member_outputs)
    app = FastAPI(title="naive: separate sessions in a loop, default options")

    @app.get("/v2/models/{name}/ready")
    async def ready(name: str) -> dict[str, object]:
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, object]:
        feeds, asked = v2_inputs(body)
        members = [dict(zip(names, session.run(names, feeds), strict=True)) for session in sessions]
        combined = combine(members, manifest.combine, manifest.weights)
        return v2_response(name, {k: combined[k] for k in asked or combined})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_kserve(model_dir: Path, port: int) -> None:
    """KServe's Python model server (kserve 0.21): a custom `Model` with one default session of the fused graph."""
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
            asked = {output.name for output in payload.request_outputs or []}
            outputs = [
                InferOutput(name=name, shape=list(array.shape), datatype=datatype, data=array.ravel().tolist())
                for (name, datatype), array in zip(self.outputs, results, strict=True)
                if not asked or name in asked
            ]
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)

    manifest = json.loads((model_dir / "manifest.json").read_text())
    model = FusedGraph(manifest["name"], model_dir / manifest["ensemble"]["path"])
    ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False).start([model])


def serve_triton(
    model_dir: Path, port: int, *, max_batch: int = 8, instances: int = 1, intra_op_threads: int = 0
) -> None:
    """Triton Inference Server (PyTriton 0.7 bundles a real `tritonserver`, its C++ front end and dynamic batcher)
    running the fused graph behind a Python function: up to `max_batch` rows an inference, no queue delay,
    `instances` model instances, each a session of `intra_op_threads` threads (0: ONNX Runtime's default)."""
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    manifest = json.loads((model_dir / "manifest.json").read_text())
    path = str(model_dir / manifest["ensemble"]["path"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads

    def instance() -> Any:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        @batch
        def infer(**inputs: Any) -> dict[str, Any]:
            results = session.run(names, inputs)
            return {
                name: array.reshape(len(array), 1) if array.ndim == 1 else array
                for name, array in zip(names, results, strict=True)
            }

        return infer

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # to describe the tensors

    def tensors(described: list[Any]) -> list[Any]:
        """PyTriton's tensors: the shape without the batch dimension, -1 where it is dynamic; a tensor of the batch
        dimension alone ([N], as a classifier's labels) as [N, 1], since Triton's batched tensors need dims."""
        dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}
        shapes = [tuple(d if isinstance(d, int) else -1 for d in t.shape[1:]) or (1,) for t in described]
        return [Tensor(name=t.name, dtype=dtypes[t.type], shape=s) for t, s in zip(described, shapes, strict=True)]

    config = TritonConfig(http_address="127.0.0.1", http_port=port, allow_grpc=False, allow_metrics=False)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=manifest["name"],
            infer_func=[instance() for _ in range(instances)],
            inputs=tensors(session.get_inputs()),
            outputs=tensors(session.get_outputs()),
            config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher()),
            strict=False,
        )
        triton.serve()


def serve_litserve(
    model_dir: Path, port: int, *, max_batch: int = 8, instances: int = 1, intra_op_threads: int = 0
) -> None:
    """LitServe 0.2 running the fused graph (bench/litserve_api.py) on the v2 path: its batcher up to `max_batch`
    requests, waiting LITSERVE_BATCH_TIMEOUT_S for them; `instances` inference worker processes
    (`workers_per_device`, with as many of its HTTP server processes, its default), each a session of
    `intra_op_threads` threads (0: ONNX Runtime's default). Ready on the v2 path (its health check, moved there)."""
    import litserve as ls

    from bench.litserve_api import FusedGraph

    manifest = json.loads((model_dir / "manifest.json").read_text())
    path = f"/v2/models/{manifest['name']}"
    api = FusedGraph(
        manifest["name"], model_dir / manifest["ensemble"]["path"], intra_op_threads,
        api_path=f"{path}/infer", max_batch_size=max_batch, batch_timeout=LITSERVE_BATCH_TIMEOUT_S,
    )  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=instances, healthcheck_path=f"{path}/ready")
    # LitServe stops its processes on Ctrl+C only: SIGTERM (what `bench peers` sends) must do the same, or its HTTP
    # server processes outlive it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


SERVERS = {"naive": serve_naive, "kserve": serve_kserve, "triton": serve_triton, "litserve": serve_litserve}
TUNABLE = ("triton", "litserve")  # the servers taking the three options below


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_servers", description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=sorted(SERVERS))
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=8, help="triton: rows, litserve: requests a batch")
    parser.add_argument("--instances", type=int, default=1, help="triton: model instances, litserve: workers")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="threads a session (0: default)")
    args = parser.parse_args()
    tuning = {"max_batch": args.max_batch, "instances": args.instances, "intra_op_threads": args.intra_op_threads}
    SERVERS[args.server](args.model_dir, args.port, **(tuning if args.server in TUNABLE else {}))


if __name__ == "__main__":
    main()
