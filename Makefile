# Two commands for a newcomer: `make serve` and `make test`. Everything else is a helper of those two.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
MODEL_DIR ?= models/default
# Triton's environment needs the system's Python (its stub links /usr/lib's libpython3.11).
TRITON_PYTHON ?= /usr/bin/python3.11
# torch's CPU build. PyPI's torch for Linux is the CUDA one (GBs of nvidia-* wheels), so torch alone comes from this
# index, as in the Dockerfile; a wheel in pip's find-links (PIP_FIND_LINKS) is taken too, so the install also works
# where this index is unreachable. Its own dependencies then come from PyPI with the rest.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH := torch==2.13.0

.PHONY: serve test audit models install-runtime install-torch install-build install-fuse install-dev lock kserve-venv triton-venv litserve-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install-runtime: $(BIN)/python
	$(PIP) -e ".[openvino]"

install-torch: $(BIN)/python
	$(PIP) --no-deps --retries 2 --timeout 15 --index-url $(TORCH_INDEX_URL) "$(TORCH)"

install-build: install-torch
	$(PIP) -e ".[build]"

## `python -m model_build fuse` for ONNX members you bring: onnx, no torch.
install-fuse: $(BIN)/python
	$(PIP) -e ".[fuse]"

install-dev: install-torch
	$(PIP) -e ".[build,bench,dev]"

## Builds the default models unless they are already built (needs the build extra: torch, onnx).
models:
	@if [ -f $(MODEL_DIR)/manifest.json ]; then echo "models: $(MODEL_DIR) is built"; \
	else $(MAKE) --no-print-directory install-build && $(BIN)/python -m model_build build --preset default --out $(MODEL_DIR); fi

## Installs, builds the default models if missing, starts the service on http://127.0.0.1:8000.
## `models` first when they are missing (torch's CPU build, then the build extra), then the service's install
## (OpenVINO, the second engine, included), whether or not the models were built now.
serve: $(if $(wildcard $(MODEL_DIR)/manifest.json),,models) install-runtime
	MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m app

## Installs everything and runs the linter and the whole test suite.
test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## Checks every pinned dependency against PyPI's vulnerability data (pip-audit).
audit: install-dev
	$(BIN)/pip-audit --disable-pip --no-deps --requirement constraints.txt

## KServe's Python model server, in a virtual environment of its own (its pins clash with ours), for `bench peers`.
kserve-venv:
	$(PYTHON) -m venv .venv-kserve
	.venv-kserve/bin/python -m pip install --quiet --disable-pip-version-check -c bench/kserve-constraints.txt kserve onnxruntime

## Triton Inference Server through PyTriton (its bundled tritonserver), for `bench peers`, in a virtual environment of
## its own. PyTriton's Python stub links the system's libpython3.11: make it from Debian's python3.11 (pyenv's fails).
triton-venv:
	$(TRITON_PYTHON) -m venv .venv-triton
	.venv-triton/bin/python -m pip install --quiet --disable-pip-version-check -c bench/triton-constraints.txt nvidia-pytriton onnxruntime

## LitServe, for `bench peers`, in a virtual environment of its own.
litserve-venv:
	$(PYTHON) -m venv .venv-litserve
	.venv-litserve/bin/python -m pip install --quiet --disable-pip-version-check -c bench/litserve-constraints.txt litserve onnxruntime

## Re-pins every dependency (run after changing pyproject.toml).
lock:
	rm -rf /tmp/lock-venv && $(PYTHON) -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install --quiet --no-deps --index-url $(TORCH_INDEX_URL) "$(TORCH)"
	/tmp/lock-venv/bin/pip install --quiet -e ".[build,bench,dev]"
	/tmp/lock-venv/bin/pip freeze --exclude-editable | sed "s/+cpu$$//" | sort > constraints.txt
