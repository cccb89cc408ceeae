"""The tree's layers, checked from the imports themselves: the fronts (REST in app.http, gRPC in app.grpc) over the
core (app.core: the data plane, admission, memory, the served model) and the protocol's codec (app.v2), over the
metrics (app.observability), over the worker group (app.workers: the processes and the files they share), over the
engine (app.engine: ONNX Runtime, the modes, the machine's resources) and the model directory's contract
(ensemble_contract). No import runs back up, the fronts do not import each other, the benchmarks import nothing of
the tests, and the tests import of the benchmarks only what both use (SHARED) but to test them.

    app.http ─┐  app.grpc ─┐          (fronts)
              ├─ app.v2 ───┤          (the protocol's codec)
              └─ app.core ─┴─ app.observability
                   └─ app.workers
                        └─ app.engine ─ app.settings, app.errors
                             └─ ensemble_contract
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may import of the project's own packages (besides itself).
ALLOWED: dict[str, set[str]] = {
    "ensemble_contract": set(),
    "app.errors": set(),
    "app.settings": {"app.errors", "ensemble_contract"},
    "app.engine": {"app.settings", "app.errors", "ensemble_contract"},
    "app.workers": {"app.engine", "app.settings", "app.errors", "ensemble_contract"},
    "app.observability": {"app.workers", "app.engine", "app.settings", "app.errors", "ensemble_contract"},
    "app.core": {"app.engine", "app.workers", "app.observability", "app.settings", "app.errors", "ensemble_contract"},
    "app.v2": {"app.core", "app.errors", "ensemble_contract"},
    "app.http": {"app.core", "app.v2", "app.engine", "app.workers", "app.observability", "app.settings", "app.errors",
                 "ensemble_contract"},
    "app.grpc": {"app.core", "app.v2", "app.engine", "app.workers", "app.observability", "app.settings", "app.errors",
                 "ensemble_contract"},
    "model_build": {"ensemble_contract"},
}  # fmt: skip
PACKAGES = ("app", "ensemble_contract", "model_build", "bench", "tests")
SHARED = {"bench.service", "bench.hostile"}  # the service in a child process, its request bodies, hostile requests


def layer_of(module: str) -> str | None:
    """The most specific entry of ALLOWED the module belongs to."""
    return max((name for name in ALLOWED if module == name or module.startswith(name + ".")), key=len, default=None)


def own_imports(path: Path) -> set[str]:
    """The project's modules a file imports (absolute imports: the project uses no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def modules(package: str) -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(ROOT).with_suffix("").parts), p) for p in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize(
    ("module", "path"), [m for package in ("app", "ensemble_contract", "model_build") for m in modules(package)]
)
def test_no_import_runs_back_up(module: str, path: Path) -> None:
    layer = layer_of(module)
    if layer is None:  # the wiring (app.main, app.__main__, app.supervisor, app.config_docs) may import anything
        return
    wrong = {name for name in own_imports(path) if layer_of(name) != layer and layer_of(name) not in ALLOWED[layer]}
    wrong |= {name for name in own_imports(path) if name.split(".")[0] in ("bench", "tests")}
    assert not wrong, f"{module} ({layer}) imports {sorted(wrong)}"


def test_the_benchmarks_import_no_test_and_the_tests_import_only_the_shared_modules_of_the_benchmarks() -> None:
    standing = {module for module, path in modules("bench") if any(n.startswith("tests") for n in own_imports(path))}
    assert not standing, standing
    importing = {
        module
        for module, path in modules("tests")
        if any(n.split(".")[0] == "bench" and n not in SHARED for n in own_imports(path))
    }
    assert importing <= {"tests.test_bench"}, importing
