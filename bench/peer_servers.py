"""The servers `python -m bench peers` measures this service against, each answering v2 JSON inference requests:

    python -m bench.peer_servers naive --model-dir DIR --port PORT
    .venv-kserve/bin/python -m bench.peer_servers kserve --model-dir DIR --port PORT

KServe's environment (`make kserve-venv`) has numpy, FastAPI, uvicorn and ONNX Runtime, but neither this project's
packages nor its other dependencies (kserve's pins clash with ours). So this module imports only the standard
library at its top, each server imports what it uses, and the KServe server reads manifest.json as plain JSON.
"""

import argparse
import json
from pathlib import Path
from typing import Any

ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64", "tensor(int32)": "INT32"}


def serve_naive(model_dir: Path, port: int) -> None:
    """The server users start from: FastAPI and ONNX Runtime written the straightforward way. One session per member
    with default options, run one after another inside an `async` endpoint, the outputs combined as the fused graph
    combines them; no fused graph, no thread tuning, no admission control, no validation."""
    import numpy as np
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI

    from ensemble_contract.combine import combine
    from ensemble_contract.datatypes import NUMPY, of_numpy
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
        feeds = {t["name"]: np.asarray(t["data"], NUMPY[t["datatype"]]).reshape(t["shape"]) for t in body["inputs"]}
        members = [dict(zip(names, session.run(names, feeds), strict=True)) for session in sessions]
        outputs = [
            {"name": k, "shape": list(v.shape), "datatype": of_numpy(v.dtype), "data": v.ravel().tolist()}
            for k, v in combine(members, manifest.combine, manifest.weights).items()
        ]
        return {"model_name": name, "outputs": outputs}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_kserve(model_dir: Path, port: int) -> None:
    """KServe's Python model server (kserve 0.21) running the model directory's fused graph: a custom `Model` with
    one ONNX Runtime session, default session options."""
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_servers", description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=sorted(SERVERS))
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    SERVERS[args.server](args.model_dir, args.port)


if __name__ == "__main__":
    main()
