"""The engines a mode's sessions run on: ONNX Runtime, always, and OpenVINO where it is installed
(`pip install .[openvino]`), agrees with ONNX Runtime and, chosen by ENGINE=auto, was faster (app.engine.runtime
decides, mode by mode).

Both read the same ONNX files and answer `run(output_names, feeds)` as ONNX Runtime's InferenceSession does, so
nothing else of the runtime knows which engine runs a mode.
"""

from __future__ import annotations

import importlib.util
import queue
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.errors import StartupError
from app.settings import Engine

INSTALL = "pip install .[openvino]"


class Session(Protocol):
    """What the runtime asks of an engine's session (ONNX Runtime's InferenceSession is one)."""

    def run(self, output_names: Sequence[str], input_feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class EngineChoice:
    """The engine that runs a mode's sessions, and why."""

    engine: Engine
    reason: str


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    if importlib.util.find_spec("openvino") is None:
        return f"openvino is not installed ({INSTALL})"
    return None


class OpenVinoSession:
    """One model compiled by OpenVINO for the CPU. An infer request serves one caller at a time, so each caller
    running at once takes a request of its own (made when none is free: as many as callers ever ran at once)."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self, output_names: Sequence[str], input_feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._free.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            results = request.infer(dict(input_feed))  # copies the outputs out of the request's tensors
            return [results[name] for name in output_names]
        finally:
            self._free.put(request)


_core: Any = None


def open_openvino(path: Path, threads: int, callers: int) -> OpenVinoSession:
    """`path` compiled for `callers` running at once (one stream each, ONNX Runtime's session shares its pool
    the same way: one shared set for every slot only when its sessions run on one thread) of `threads` threads
    each, in fp32 (as ONNX Runtime computes; the CPU's bf16 would not agree), the batch dimension left dynamic."""
    global _core
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hint

    if _core is None:
        _core = ov.Core()
    config = {
        hint.performance_mode: hint.PerformanceMode.LATENCY,
        props.num_streams: callers,
        props.inference_num_threads: threads * callers,
        hint.inference_precision: ov.Type.f32,
        hint.enable_cpu_pinning: False,  # the cores are shared with other slots, modes and workers, as ONNX Runtime's
    }
    try:
        return OpenVinoSession(_core.compile_model(str(path), "CPU", config))
    except Exception as exc:  # OpenVINO raises RuntimeError with the whole trace of its frontend
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"OpenVINO cannot load {path}: {reason}") from None
