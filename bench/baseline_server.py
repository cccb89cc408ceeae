"""The server users start from: FastAPI + ONNX Runtime written the straightforward way.

One InferenceSession per member with default SessionOptions, run one after another inside an `async`
endpoint, probabilities averaged. No fused graph, no thread tuning, no admission control. The load bench
starts it on its own loopback port: `python -m bench.baseline_server --model-dir DIR --port PORT`.
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

from app.manifest import load_manifest


def create_app(model_dir: Path) -> FastAPI:
    manifest = load_manifest(model_dir)
    sessions = [
        ort.InferenceSession(str(model_dir / m.file.path), providers=["CPUExecutionProvider"]) for m in manifest.members
    ]
    spec = manifest.input
    app = FastAPI(title="baseline: separate sessions in a loop, default options")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile) -> dict[str, object]:
        image = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((spec.width, spec.height))
        batch = spec.normalise(np.asarray(image)[None])
        outputs = [session.run(None, {spec.name: batch}) for session in sessions]
        class_probs = np.mean([out[0] for out in outputs], axis=0)[0]
        return {"labels": dict(zip(manifest.labels, map(float, class_probs), strict=True)), "mode": "baseline"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
