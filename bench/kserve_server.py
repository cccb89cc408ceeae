"""KServe's Python model server (kserve 0.21) running a model directory's fused graph, as a peer to measure
against: a custom `Model` with one ONNX Runtime session, default session options, answering v2 requests.

Runs in a virtual environment of its own (`make kserve-venv`: kserve's pins clash with ours), so it imports
nothing of this project and reads manifest.json as plain JSON:
`.venv-kserve/bin/python bench/kserve_server.py --model-dir DIR --port PORT`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(double)": "FP64", "tensor(int32)": "INT32"}


class FusedGraph(Model):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.outputs = [(o.name, DATATYPES[o.type]) for o in self.session.get_outputs()]
        self.ready = True

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        results = self.session.run([name for name, _ in self.outputs], feeds)
        outputs = [
            InferOutput(name=name, shape=list(array.shape), datatype=datatype, data=array.ravel().tolist())
            for (name, datatype), array in zip(self.outputs, results, strict=True)
        ]
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    model = FusedGraph(manifest["name"], args.model_dir / manifest["ensemble"]["path"])
    ModelServer(http_port=args.port, enable_grpc=False, workers=1, enable_latency_logging=False).start([model])


if __name__ == "__main__":
    main()
