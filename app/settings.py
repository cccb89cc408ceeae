"""The service's configuration, read from environment variables (docs/configuration.md lists them)."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.errors import StartupError
from ensemble_contract.modes import ModeChoice, describe_modes

# Pillow's own decompression-bomb guard; ours must stop an image before Pillow's warning fires.
PILLOW_MAX_IMAGE_PIXELS = 89_478_485
# MAX_IMAGE_PIXELS unset: this many times the model's input pixels, and at least DEFAULT_MIN_IMAGE_PIXELS.
IMAGE_PIXELS_PER_INPUT_PIXEL = 16
DEFAULT_MIN_IMAGE_PIXELS = 4_000_000
MIN_API_KEY_LENGTH = 16
MAX_WORKERS = 256
ORIGIN = re.compile(r"https?://[^/\s]+/?")
HttpParser = Literal["httptools", "h11"]
EventLoop = Literal["uvloop", "asyncio"]


SECRETS = ("API_KEY", "MODEL_CONTROL_KEY")  # never shown in an error


def _describe(error: Any) -> str:
    """'MAX_QUEUE=-1: Input should be ...', never showing a secret's value nor the whole environment."""
    if not error["loc"]:
        return str(error["msg"]).removeprefix("Value error, ")
    name = ".".join(map(str, error["loc"])).upper()
    shown = "(hidden)" if name in SECRETS else repr(error["input"])
    return f"{name}={shown}: {error['msg']}"


def valid_key(value: str) -> str:
    """A key as API_KEY, API_KEYS_FILE's lines and MODEL_CONTROL_KEY take it; ValueError saying why not."""
    if len(value) < MIN_API_KEY_LENGTH or not value.isprintable() or " " in value:
        raise ValueError(f"a key must be at least {MIN_API_KEY_LENGTH} printable characters without spaces")
    return value


def read_keys(path: Path) -> tuple[str, ...]:
    """API_KEYS_FILE's keys: one a line, blank lines and `#` comments skipped; ValueError (or OSError) if the file
    holds no key or an invalid one (named by its line, never shown)."""
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if (key := line.strip()) and not key.startswith("#"):
            try:
                keys.append(valid_key(key))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
    if not keys:
        raise ValueError("no key in it")
    return tuple(keys)


def is_loopback(host: str) -> bool:
    """Whether HOST reaches this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class Spinning(StrEnum):
    OFF = "off"
    DURING_RUNS = "during-runs"
    ALWAYS = "always"


class Engine(StrEnum):
    """What runs a mode's sessions; AUTO is a choice, never what runs."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    AUTO = "auto"


class Settings(BaseSettings):
    # An empty variable counts as unset: compose passes `VAR=` for a setting its .env leaves empty.
    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False, env_ignore_empty=True)

    model_dir: Path = Field(
        Path("models/default"),
        description="Directory holding manifest.json, members/*.onnx and ensemble.onnx.",
    )
    default_mode: ModeChoice = Field(
        ModeChoice.FUSED,
        description=f"Mode for requests that do not ask for one. {describe_modes()}.",
    )
    latency_budget_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="DEFAULT_MODE=auto picks the fastest mode and layout whose p99 latency at full load stays "
        "within this.",
    )
    auto_budget_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="DEFAULT_MODE=auto: the longest the start-up measurement of every mode and layout may take.",
    )
    auto_window_ms: float = Field(
        250.0,
        ge=10,
        le=10_000,
        description="DEFAULT_MODE=auto: length of one timing window; candidates take turns window by window until "
        "each one's last three agree within 5 %.",
    )
    fused_intra_op_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Intra-op threads of each fused-graph session (fp32, int8). Unset: cores // slots.",
    )
    sequential_intra_op_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Intra-op threads of each member session of sequential mode. Unset: cores // slots.",
    )
    parallel_intra_op_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Intra-op threads of each member session of parallel mode. "
        "Unset: max(1, cores // slots // members), so the members running at once share the cores.",
    )
    inter_op_threads: int = Field(
        1, ge=1, le=256, description="Inter-op threads of every session (used only by graphs with parallel branches)."
    )
    spinning: Spinning = Field(
        Spinning.DURING_RUNS,
        description="When ONNX Runtime's intra-op threads spin (wait actively for their next piece of work) rather "
        "than sleep. during-runs: between the operators of an inference (10-20 % faster on small convolutions), "
        "stopping when it ends, so that idle pools never take the cores of another mode's or slot's run. always: "
        "ONNX Runtime's default, spinning on after each run too (what the benchmarks call spinning on). off: never.",
    )
    engine: Engine = Field(
        Engine.AUTO,
        description="What runs each mode's sessions. onnxruntime. openvino (installed by `pip install .[openvino]`, "
        "in the image and `make serve`): for every mode whose outputs on the example input equal ONNX Runtime's "
        "within the manifest's tolerance, ONNX Runtime for the others. auto: each mode timed on both at load, "
        "OpenVINO kept where it agrees and was faster (ONNX Runtime alone when OpenVINO is not installed). /metrics "
        "(ensemble_model_info), /readyz and the log say which engine runs each mode.",
    )
    inference_slots: int = Field(
        1,
        ge=1,
        le=64,
        description="Inference slots shared by all modes: how many inferences run at once in this process. Sessions' "
        "intra-op threads default to the cores divided by the slots (and by the members in parallel mode, one at "
        "least), and each slot has sessions of its own when they use several threads. DEFAULT_MODE=auto "
        "chooses the slots itself.",
    )
    alone_on_every_core: bool = Field(
        True,
        description="An inference that starts while no other runs in the worker group (light traffic) runs on "
        "sessions sized for every core the process may use rather than on its worker's or slot's share: a lone "
        "request gets the whole machine, many requests get every worker and slot. Costs one more set of sessions "
        "per worker, loaded only where the layout gives a session fewer threads than that. false: every inference "
        "runs on its share.",
    )
    inline_inference_ms: float = Field(
        0.2,
        ge=0,
        le=10,
        description="An inference expected to take less than this (by the recent runs' duration per row) runs on "
        "the event loop instead of an inference thread, whose hand-off would cost about as much as the run: for "
        "models of microseconds. 0: every inference on an inference thread.",
    )
    batching_max_rows: int = Field(
        8,
        ge=1,
        le=1024,
        description="Requests waiting for an inference slot whose inputs agree in all but the batch dimension (same "
        "model and mode) run as one inference of up to this many rows, each getting its own rows back, as "
        "Triton's dynamic batcher does. 1: no batching. Models whose batch dimension is fixed are never batched. "
        "DEFAULT_MODE=auto chooses it itself, keeping batching only where it was measured to pay.",
    )
    batching_delay_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="How long a free slot waits for more requests to fill a batch. 0: it takes what is already "
        "waiting (Triton's default), so batching costs no latency to a lone request.",
    )
    max_queue: int = Field(
        64,
        ge=0,
        le=10_000,
        description="Most requests admitted beyond the inference slots (decoding or waiting for a slot), whatever "
        "their expected wait; more are refused at once with 503 and Retry-After.",
    )
    max_queue_wait_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="A request whose expected wait for an inference slot (requests ahead / slots x the measured "
        "inference time) is longer is refused at once with 503 and Retry-After, as its headers arrive; a "
        "burst that can be served in time is queued.",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Longest wait for an inference slot plus the inference itself; beyond, 504.",
    )
    max_upload_bytes: int = Field(
        20 * 2**20,
        ge=1024,
        le=512 * 2**20,
        description="Largest request body in bytes (uploads and v2 JSON tensors); beyond, 413.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Longest time from a request's arrival to the last byte of its body; beyond, 408 and the "
        "connection is closed (a stalled upload never holds a queue place or an inference slot).",
    )
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        le=PILLOW_MAX_IMAGE_PIXELS,
        description="Largest image (width x height) POST /predict accepts, checked from the header before decoding; "
        f"beyond, 413. Unset: proportionate to the model's input, {IMAGE_PIXELS_PER_INPUT_PIXEL} times its pixels and "
        f"{DEFAULT_MIN_IMAGE_PIXELS:,} at least (4 megapixels for the default 48x48 models).",
    )
    max_batch_rows: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="Most rows (the batch dimension, the first of each input) one inference request may carry, as "
        "Triton's max_batch_size; beyond, 413 before the tensors are converted. MAX_REQUEST_BYTES may allow fewer.",
    )
    max_request_bytes: int = Field(
        512 * 2**20,
        ge=2**20,
        description="Most memory one request may hold: its body, the objects its JSON becomes, its tensors, ONNX "
        "Runtime's working memory for its rows, its encoded response (each estimated before the work that needs it); "
        "beyond, 413 saying which part, and for large JSON outputs, that binary tensors cost a fraction.",
    )
    memory_budget_bytes: int | None = Field(
        None,
        ge=2**20,
        description="Most memory the requests in flight may hold together, counted as MAX_REQUEST_BYTES counts it; a "
        "request that would go past it gets 503 and Retry-After. Unset: half of what the process may use (its cgroup's "
        "memory limit, or the machine's memory) beyond what it holds once the model is loaded and what ONNX Runtime's "
        "arena keeps after a request of MAX_BATCH_ROWS rows; the other half is room for what is not counted.",
    )
    max_concurrency: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Most HTTP requests in flight at once in each process (from their headers to their answer; the "
        "probes /healthz, /readyz, /v2/health/live and /v2/health/ready are never refused), and apart from them most "
        "gRPC calls; beyond, 503 `overloaded` with Retry-After (gRPC: RESOURCE_EXHAUSTED) at once. Idle connections "
        "hold none: MAX_CONNECTIONS bounds them.",
    )
    max_connections: int = Field(
        2000,
        ge=2,
        le=1_000_000,
        description="Most HTTP connections open at once on each port (PORT, METRICS_PORT) of each process, idle ones "
        "included. A connection beyond makes room by closing the one that has waited longest for its client (for a "
        "request's headers), so idle connections never keep a request or a probe out; only when every connection has "
        "a request in flight is the new one closed. More than MAX_CONCURRENCY. The process raises its limit on open "
        "files (a container's is often 1024) as far as its hard limit allows to hold them.",
    )
    header_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Longest time a client may take to send a request's headers, from the opening of its connection "
        "or from the previous answer on a kept-alive one; beyond, the connection is closed without an answer (on "
        "PORT and METRICS_PORT). The rest of a body answered before it was read (a refusal) gets BODY_TIMEOUT_S.",
    )
    http_parser: HttpParser = Field(
        "httptools",
        description="How the HTTP servers (PORT, METRICS_PORT) parse requests: httptools (compiled, llhttp) or h11 "
        "(pure Python: more CPU per request). Both within HEADER_TIMEOUT_S, BODY_TIMEOUT_S and "
        "MAX_CONNECTIONS, their headers within 16 KiB.",
    )
    event_loop: EventLoop = Field(
        "uvloop",
        description="The event loop of each process: uvloop (libuv's, compiled) or the standard library's asyncio.",
    )
    cost_per_hour: float | None = Field(
        None,
        gt=0,
        description="What this machine costs an hour (any currency): /stats and the page then show each mode's "
        "cost per million predictions, from its measured CPU time per prediction with every core busy.",
    )
    probability_threshold: float = Field(
        0.5, gt=0, lt=1, description="A label is `present` when its ensemble probability is at least this."
    )
    stats_window_s: float = Field(
        60.0, gt=0, le=3600, description="Window of recent requests that GET /stats summarizes, in seconds."
    )
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address `python -m app` listens on (0.0.0.0 in a container)."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port `python -m app` listens on.")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="If set, /metrics (and the probes /healthz and /readyz) are also served on this port, on HOST, "
        "and /metrics is no longer served on PORT. Unset: everything on PORT.",
    )
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="If set, the Open Inference Protocol is also served over gRPC on HOST:GRPC_PORT (8081 in the "
        "image, as KServe uses): the same modes (request parameter `mode`), admission control, metrics and API key "
        "(`authorization: Bearer <key>` metadata). Unset: no gRPC.",
    )
    api_key: SecretStr | None = Field(
        None,
        description=f"If set (or API_KEYS_FILE), POST /predict and POST /v2/models/{{name}}/infer (and gRPC "
        f"ModelInfer) need `Authorization: Bearer <key>` (at least {MIN_API_KEY_LENGTH} characters); without it, "
        "401 (gRPC: UNAUTHENTICATED). Unset: no authentication. Probes, metadata, /stats and /metrics stay open.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of inference keys, one a line (`#` comments), each valid beside API_KEY: read again "
        "whenever it is replaced, so that a key rotates without a restart (docs/operations.md). A version that "
        "cannot be read or holds an invalid key is logged and the previous keys stay valid.",
    )
    model_control_key: SecretStr | None = Field(
        None,
        description="The key the model repository calls (and their gRPC twins) need with MODEL_CONTROL=explicit, "
        "as `Authorization: Bearer <key>`; no inference key opens them. Required with MODEL_CONTROL=explicit "
        "unless HOST is a loopback address.",
    )
    model_control: Literal["none", "explicit"] = Field(
        "none",
        description="`explicit`: the model repository calls (POST /v2/repository/index, .../load, .../unload, their "
        "gRPC twins) and SIGHUP reload or unload the model. `none`: they answer 403 (gRPC: PERMISSION_DENIED) and "
        "SIGHUP is ignored, so nobody who reaches the port can unload the model. `explicit` needs "
        "MODEL_CONTROL_KEY unless HOST is a loopback address.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser on another origin, comma-separated "
        "(`https://a.example,https://b.example`, or `*`). Empty: no CORS headers, so browsers allow same-origin only.",
    )
    shutdown_grace_s: float = Field(
        8.0,
        ge=0,
        le=600,
        description="On SIGTERM: readiness turns false at once, no new connection is accepted, and requests in "
        "flight get this long to finish before they are cancelled. Keep it below the orchestrator's kill "
        "timeout (docker stop: 10 s).",
    )
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Worker processes serving the same ports (HTTP, METRICS_PORT, GRPC_PORT), each with its own "
        "sessions, inference slots, batches and admission control on its share of the cores and of the memory "
        "budget; /metrics, /stats, /readyz and model loads cover them all, and a worker that dies is replaced. "
        "auto: one per core the process may use (its cgroup quota or CPU affinity), at most one per "
        "512 MiB of its memory (its cgroup limit, or the machine's). 1: one process. With ALONE_ON_EVERY_CORE, a lone "
        "request still gets every core.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and the service."
    )

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment; StartupError naming every bad variable if any is invalid."""
        try:
            return cls()
        except ValidationError as exc:
            raise StartupError(f"invalid configuration: {'; '.join(map(_describe, exc.errors()))}") from None

    @field_validator("api_key", "model_control_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None:
            valid_key(key.get_secret_value())
        return key

    @field_validator("api_keys_file")
    @classmethod
    def _readable_keys(cls, path: Path | None) -> Path | None:
        if path is not None:
            try:
                read_keys(path)
            except OSError as exc:
                raise ValueError(f"cannot read it: {exc.strerror}") from None
        return path

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: give scheme://host[:port], without a path, or *")
        return [origin.rstrip("/") for origin in origins]

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        ports = {"PORT": self.port, "METRICS_PORT": self.metrics_port, "GRPC_PORT": self.grpc_port}
        given = {name: port for name, port in ports.items() if port is not None}
        if len(set(given.values())) < len(given):
            raise ValueError(f"PORT, METRICS_PORT and GRPC_PORT must all differ (or be unset), got {given}")
        return self

    @model_validator(mode="after")
    def _room_for_probes(self) -> Settings:
        if self.max_connections <= self.max_concurrency:
            raise ValueError(
                f"MAX_CONNECTIONS ({self.max_connections}) must be more than MAX_CONCURRENCY ({self.max_concurrency}): "
                "every request in flight holds a connection, and a probe needs one beyond them"
            )
        return self

    @model_validator(mode="after")
    def _model_control_guarded(self) -> Settings:
        if self.model_control == "explicit" and self.model_control_key is None and not is_loopback(self.host):
            raise ValueError(
                "MODEL_CONTROL=explicit lets any caller unload the model: set MODEL_CONTROL_KEY too (an inference "
                f"key does not open model control), or listen on a loopback HOST (127.0.0.1), not {self.host!r}"
            )
        control, inference = self.model_control_key, self.api_key
        if control is not None and inference is not None and control.get_secret_value() == inference.get_secret_value():
            raise ValueError("MODEL_CONTROL_KEY must differ from API_KEY: whoever may infer would control the model")
        return self

    @field_validator("workers")
    @classmethod
    def _workers(cls, workers: int | str) -> int | str:
        if workers != "auto" and not 1 <= int(workers) <= MAX_WORKERS:
            raise ValueError(f"must be auto or a number from 1 to {MAX_WORKERS}")
        return workers

    def image_pixel_limit(self, width: int, height: int) -> int:
        """MAX_IMAGE_PIXELS, or when unset the limit for a model whose input is width x height."""
        if self.max_image_pixels is not None:
            return self.max_image_pixels
        proportionate = max(DEFAULT_MIN_IMAGE_PIXELS, IMAGE_PIXELS_PER_INPUT_PIXEL * width * height)
        return min(PILLOW_MAX_IMAGE_PIXELS, proportionate)
