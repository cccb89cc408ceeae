"""The server users start from: FastAPI + ONNX Runtime written the straightforward way.

One InferenceSession per member with default SessionOptions, run one after another inside an `async`
endpoint, outputs combined by the reference combination: `/predict` for an image, `/v2/models/{name}/infer` for
JSON tensors. No fused graph, no thread tuning, no admission control.
The load bench starts it on its own loopback port: `python -m bench.baseline_server --model-dir DIR --port PORT`.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, UploadFile
from PIL import Image

from ensemble_contract.combine import combine
from ensemble_contract.datatypes import NUMPY, of_numpy
from ensemble_contract.manifest import load_manifest


def create_app(model_dir: Path) -> FastAPI:
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
