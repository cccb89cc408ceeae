"""The server users start from: FastAPI + ONNX Runtime written the straightforward way.

One InferenceSession per member with default SessionOptions, run one after another inside an `async`
endpoint, outputs combined by the reference combination. No fused graph, no thread tuning, no admission control.
The load bench starts it on its own loopback port: `python -m bench.baseline_server --model-dir DIR --port PORT`.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image

from ensemble_contract.combine import combine
from ensemble_contract.manifest import load_manifest


def create_app(model_dir: Path) -> FastAPI:
    manifest = load_manifest(model_dir)
    if manifest.image is None or manifest.image.scores_output is None:
        raise SystemExit(f"{model_dir}: the baseline server answers image models that score labels")
    sessions = [
        ort.InferenceSession(str(model_dir / m.file.path), providers=["CPUExecutionProvider"]) for m in manifest.members
    ]
    spec, names = manifest.image, list(manifest.member_outputs)
    app = FastAPI(title="baseline: separate sessions in a loop, default options")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile) -> dict[str, object]:
        image = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((spec.width, spec.height))
        feeds = {spec.input: spec.normalise(np.asarray(image)[None])}
        outputs = [dict(zip(names, session.run(names, feeds), strict=True)) for session in sessions]
        scores = spec.probabilities(combine(outputs, manifest.combine, manifest.weights)[spec.scores_output][0])
        return {"labels": dict(zip(spec.labels, map(float, scores), strict=True)), "mode": "baseline"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
