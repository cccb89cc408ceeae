# The service's image, in three stages:
#   requirements  the dependency lists of pyproject.toml, so that editing anything else in it (tool settings,
#                 dev extras) leaves the dependency layers below cached
#   builder       torch (CPU build) + onnx; builds models/$MODEL_PRESET, or reuses the one in the build context
#                 when it is already built from the same preset (model_build checks the manifest's build_config
#                 and every file's sha256)
#   runtime       the runtime dependencies only (no torch), the models, a non-root user
#
#   docker build -t onnx-ensemble-serving .                                       # default preset, ~10 min
#   docker build --build-arg MODEL_PRESET=test -t onnx-ensemble-serving:test .    # tiny preset
#   docker build --target builder -t onnx-ensemble-serving:builder .              # the builder stage alone
#   docker build --build-arg OPENVINO= -t onnx-ensemble-serving:small .           # without the OpenVINO engine
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp onnx-ensemble-serving

FROM python:3.11-slim AS requirements
WORKDIR /requirements
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('runtime.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('openvino.txt', 'w').write('\n'.join(p['optional-dependencies']['openvino']) + '\n'); \
open('build.txt', 'w').write('\n'.join(p['dependencies'] + p['optional-dependencies']['build']) + '\n')"


FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY constraints.txt ./
# torch's CPU build: PyPI's torch wheel for Linux is the CUDA one (GBs of nvidia-* wheels). Only torch itself
# comes from this index; its own dependencies come from PyPI below. A local wheel in pip's find-links
# (PIP_FIND_LINKS) counts too, so the build also works where this index is unreachable (then pip warns and
# takes the local wheel; --retries keeps that short).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-deps --retries 2 --timeout 15 --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
COPY --from=requirements /requirements/build.txt /tmp/
RUN pip install -c constraints.txt -r /tmp/build.txt
# Run from the source tree (python -m model_build from /src): no install, so a code change costs no download.
COPY ensemble_contract/ ensemble_contract/
COPY model_build/ model_build/
ARG MODEL_PRESET=default
# Another seed (the first member's) trains other weights from the same recipe: another model, another sha256.
ARG MODEL_SEED=
COPY models/ models/
RUN python -m model_build build --preset "$MODEL_PRESET" ${MODEL_SEED:+--seed "$MODEL_SEED"} --out "models/$MODEL_PRESET"


FROM python:3.11-slim AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
WORKDIR /srv
COPY constraints.txt ./
COPY --from=requirements /requirements/runtime.txt /requirements/openvino.txt /tmp/
# OpenVINO, the second engine ENGINE=auto chooses from, unless `--build-arg OPENVINO=` leaves it out (~180 MB less).
ARG OPENVINO=1
RUN pip install -c constraints.txt -r /tmp/runtime.txt ${OPENVINO:+-r /tmp/openvino.txt} && rm /tmp/*.txt
# The service only: model_build needs torch. Installed, not run from the source tree: the sources go, the
# site-packages copy stays (byte-compiled now, since a read-only root file system takes no .pyc later).
COPY pyproject.toml README.md ./
COPY app/ app/
COPY ensemble_contract/ ensemble_contract/
RUN pip install --no-deps . && rm -rf app ensemble_contract build *.egg-info
COPY deploy/loadgen.py deploy/healthcheck.py deploy/
ARG MODEL_PRESET=default
# The image's own models sit at one path whatever the preset, so that compose and Kubernetes can name it.
COPY --from=builder /src/models/$MODEL_PRESET /models/builtin

# Root owns every file; the service only reads them. It writes to /tmp only (uploads, onnxruntime's cache).
USER 10001:10001
ENV MODEL_DIR=/models/builtin HOST=0.0.0.0 PORT=8000 GRPC_PORT=8081 HOME=/tmp TMPDIR=/tmp
EXPOSE 8000 8081
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python", "/srv/deploy/healthcheck.py"]
# Exec form: the server is PID 1 and gets `docker stop`'s SIGTERM, and shuts down gracefully.
CMD ["python", "-m", "app"]
