"""ONNX Runtime's working memory per input element of a model directory's fused graph, measured in a fresh process.

The service reserves a request's working memory before it runs (app.core.cost), so it must know what a row costs. In
the service's own process the answer would be skewed: every session shares one arena (app.engine.runtime), which earlier
requests or models have already grown, and requests in flight allocate beside the measurement. A child process
opens the fused graph alone, runs it on one row, then on PROBE_ROWS rows, and reports how much its resident memory
grew per extra input element: the activations the arena had to grow for (the fused graph runs every member, so
it needs as much as the member modes do).

    python -m app.engine.probe MODEL_DIR    # prints the bytes per input element
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import sys
from pathlib import Path

PROBE_ROWS = 16  # enough rows that the activations outgrow what the heap holds free from loading
TIMEOUT_S = 120


def measure(model_dir: Path) -> float:
    """Bytes of working memory per input element; 0 for a model whose inputs have no batch dimension."""
    import onnxruntime as ort

    from app.engine.resources import charged_bytes
    from ensemble_contract.manifest import load_manifest

    manifest = load_manifest(model_dir, verify_files=False)  # the service has verified it
    if not all(spec.batched for spec in manifest.signature.inputs):
        return 0.0  # every request is the one row the warm-up ran
    one, probe = manifest.example_inputs(1), manifest.example_inputs(PROBE_ROWS)
    extra = sum(a.size for a in probe.values()) - sum(a.size for a in one.values())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / manifest.ensemble.path), options, providers=["CPUExecutionProvider"])
    session.run(None, one)
    _return_free_heap()
    before = charged_bytes()
    session.run(None, probe)
    return max(0.0, (charged_bytes() - before) / extra)


def _return_free_heap() -> None:
    """Gives the heap's free memory back to the system (glibc's malloc_trim), so that what the larger run needs
    shows in the resident memory instead of reusing what loading the session freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def working_bytes_per_element(model_dir: Path) -> float:
    """`measure`, in a child process (StartupError-worthy failures are the caller's to report)."""
    result = subprocess.run(
        [sys.executable, "-m", "app.engine.probe", str(model_dir)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring the working memory failed: {result.stderr.strip()[-500:]}")
    return float(result.stdout)


if __name__ == "__main__":
    print(measure(Path(sys.argv[1])))
