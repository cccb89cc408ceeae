"""The fused graph as a LitServe API, for `python -m bench.peer_servers litserve` (the interpreter of `make
litserve-venv`). A module of its own, importing litserve at its top: LitServe spawns its inference workers and
unpickles the API there by its class's module-level name, which a class local to serve_litserve lacks."""

from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort

from bench.peer_servers import v2_inputs, v2_response

Decoded = tuple[dict[str, np.ndarray], list[str]]  # a request's input arrays, and the outputs it asks for


class FusedGraph(ls.LitAPI):
    """One ONNX Runtime session of the fused graph a worker. LitServe's default `batch` and `unbatch` pass its
    batches on as lists: `predict` runs the requests' rows one after another in one call and splits the results
    back, request by request."""

    def __init__(self, model_name: str, graph: Path, intra_op_threads: int, **options: Any) -> None:
        super().__init__(**options)
        self.model_name, self.graph, self.intra_op_threads = model_name, graph, intra_op_threads

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        self.session = ort.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def decode_request(self, request) -> Decoded:
        """`request`: the parsed JSON body. Unannotated: LitServe takes its annotation as the endpoint's body type."""
        return v2_inputs(request)

    def predict(self, requests: list[Decoded]) -> list[dict[str, np.ndarray]]:
        feeds = {name: np.concatenate([f[name] for f, _ in requests]) for name in requests[0][0]}
        results = self.session.run(self.names, feeds)
        ends = np.cumsum([len(next(iter(f.values()))) for f, _ in requests])[:-1]
        split = {name: np.split(array, ends) for name, array in zip(self.names, results, strict=True)}
        return [{name: split[name][i] for name in asked or self.names} for i, (_, asked) in enumerate(requests)]

    def encode_response(self, output: dict[str, np.ndarray]) -> dict[str, object]:
        return v2_response(self.model_name, output)
