"""Every Prometheus metric of the service, on a registry passed in (tests use a fresh one each).

Latency histograms use geometric buckets from 1 ms to 10 s with a ratio of 1.12, so histogram_quantile
can tell apart two modes whose latencies differ by 10 %. Label values are bounded: the modes served,
route templates, status classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.engine.resources import usable_cores
from app.engine.runtime import EnsembleRuntime

PREFIX = "ensemble"
OUTCOMES = ("ok", "bad_input", "overloaded", "timeout", "error")
PROTOCOLS = ("http", "grpc")


def geometric_buckets(start: float = 0.001, stop: float = 10.0, ratio: float = 1.12) -> tuple[float, ...]:
    count = math.ceil(math.log(stop / start) / math.log(ratio))
    return (*(float(f"{start * ratio**i:.6g}") for i in range(count)), stop)


LATENCY_BUCKETS = geometric_buckets()
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        mode_histogram = {"labelnames": ["mode"], "buckets": LATENCY_BUCKETS, "registry": registry}
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds",
            "Successful predictions, from the request's arrival to the result (upload, decode, queue, inference), "
            "by mode and protocol (http: /predict and /v2 over HTTP; grpc).",
            labelnames=["mode", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_seconds",
            "ONNX Runtime time of the inference a successful prediction ran in (its batch's), all members.",
            **mode_histogram,
        )
        self.cpu_seconds = Histogram(
            f"{PREFIX}_cpu_seconds",
            "CPU seconds of a successful prediction: the threads that decoded, preprocessed and ran it, ONNX "
            "Runtime's pools included (their spinning too); of a batch, its share by rows.",
            **mode_histogram,
        )
        self.slot_wait_seconds = Histogram(
            f"{PREFIX}_inference_slot_wait_seconds",
            "Time a successful prediction waited for a free inference slot, and for the requests batched with it.",
            **mode_histogram,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Rows of each inference run: requests waiting together merged into one (1 when batching is off).",
            labelnames=["mode"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.decode_seconds = Histogram(
            f"{PREFIX}_decode_seconds", "Image decoding time.", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.preprocess_seconds = Histogram(
            f"{PREFIX}_preprocess_seconds",
            "Resize and normalization time of a decoded image.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.predictions = Counter(
            f"{PREFIX}_predictions",
            "Inference requests by mode, protocol and outcome.",
            ["mode", "protocol", "outcome"],
            registry=registry,
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route template, method and status class.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.grpc_requests = Counter(
            f"{PREFIX}_grpc_requests", "gRPC calls by method and status code.", ["method", "code"], registry=registry
        )
        self.model_loads = Counter(
            f"{PREFIX}_model_loads",
            "Model loads after start-up (the repository API, SIGHUP) by outcome: ok, or failed (the old model "
            "kept serving; the log and the response say why).",
            ["outcome"],
            registry=registry,
        )
        self.early_refusals = Counter(
            f"{PREFIX}_early_refusals",
            "Inference requests refused with 503 as their headers arrived (overload), before any parsing.",
            registry=registry,
        )
        self.auto_choice = Gauge(
            f"{PREFIX}_auto_choice",
            "DEFAULT_MODE=auto: 1 for the mode, layout (slots x threads) and batching (the most rows one inference "
            "merges, 1: none) chosen at start-up, 0 for the other candidates.",
            ["mode", "layout", "batching_rows"],
            registry=registry,
        )
        self.in_flight = Gauge(f"{PREFIX}_http_requests_in_flight", "HTTP requests being served.", registry=registry)
        self.memory_reserved = Gauge(
            f"{PREFIX}_memory_reserved_bytes",
            "Memory the requests in flight have reserved (bodies, parsed JSON, tensors, ONNX Runtime's working "
            "memory, encoded responses), every protocol.",
            registry=registry,
        )
        self.memory_budget = Gauge(
            f"{PREFIX}_memory_budget_bytes",
            "MEMORY_BUDGET_BYTES: what the requests in flight may reserve together; past it, 503.",
            registry=registry,
        )
        self.inferences_admitted = Gauge(
            f"{PREFIX}_inferences_admitted",
            "Inference requests admitted and not finished (running or queued for a slot), every protocol: the "
            "load signal to autoscale on.",
            registry=registry,
        )
        self.cores = Gauge(
            f"{PREFIX}_cores",
            "Cores this process sizes its sessions, layouts and costs by: its CPU affinity, or its cgroup's CPU "
            "quota when that is smaller (source: affinity or cgroup).",
            ["source"],
            registry=registry,
        )
        self.cost_per_hour = Gauge(
            f"{PREFIX}_cost_per_hour",
            "COST_PER_HOUR, what the machine costs an hour (absent when unset): cost per million predictions = "
            "cost_per_hour x CPU seconds per prediction x 1e6 / (cores x 3600).",
            registry=registry,
        )
        self.model = Info(
            f"{PREFIX}_model",
            "The model served (its sha256 changes with a reload) and the session options of each mode.",
            registry=registry,
        )

    @classmethod
    def with_process_collectors(cls) -> ServiceMetrics:
        """On a new registry that also reports the process (memory, CPU, file descriptors) and the GC."""
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        return cls(registry)

    def describe_machine(self, cost_per_hour: float | None) -> None:
        """The cores and what they cost, which a reload does not change."""
        cores = usable_cores()
        self.cores.labels(cores.source).set(cores.count)
        if cost_per_hour is not None:
            self.cost_per_hour.set(cost_per_hour)

    def describe_model(self, runtime: EnsembleRuntime, auto_candidates: Mapping[tuple[str, str, int], bool]) -> None:
        """The model's info, every served mode's series at zero from the start, and auto's candidates (mode, layout,
        batching rows), true for the one chosen."""
        manifest, cores = runtime.manifest, usable_cores()
        for mode in runtime.modes:
            for histogram in (self.inference_seconds, self.slot_wait_seconds, self.cpu_seconds, self.batch_size):
                histogram.labels(mode)
            for protocol in PROTOCOLS:
                self.request_seconds.labels(mode, protocol)
                for outcome in OUTCOMES:
                    self.predictions.labels(mode, protocol, outcome)
        for outcome in ("ok", "failed"):
            self.model_loads.labels(outcome)
        self.model.info(
            {
                "name": manifest.name,
                "sha256": manifest.ensemble.sha256,
                "members": ",".join(member.name for member in manifest.members),
                "inference_slots": str(runtime.slots),
                "cores": str(cores.count),
                "cores_source": cores.source,
                **{f"{mode.replace('-', '_')}_session": plan.describe() for mode, plan in runtime.plans.items()},
            }
        )
        self.auto_choice.clear()
        for (mode, layout, batching_rows), chosen in auto_candidates.items():
            self.auto_choice.labels(mode, layout, str(batching_rows)).set(1 if chosen else 0)
