"""Every Prometheus metric of the service, on a registry passed in (tests use a fresh one each).

Latency histograms use geometric buckets from 1 ms to 10 s with a ratio of 1.12, so histogram_quantile
can tell apart two modes whose latencies differ by 10 %. Label values are bounded: the modes served,
route templates, status classes, worker indexes.

With worker processes (app.workers) the counters, histograms and gauges live in prometheus-client's
multiprocess files, and a scrape of any worker reads them all (`scrape_registry`, `MetricFiles`): counters and
histograms summed, so every request counts once, a dead worker's too; the gauges of requests and memory in flight
summed over the live workers, the others (the same in every worker) their maximum. Every gauge is written when its
value changes (the autoscaler reads ensemble_inferences_admitted at scrape time: it must not lag). What multiprocess
mode cannot carry is never left to it: the model's info, the workers and their restarts, and each worker's process
metrics come from WorkerGroupCollector, computed at each scrape from the group's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from app.engine.resources import usable_cores, usable_memory
from app.engine.runtime import EnsembleRuntime
from app.engine.timing import Timing
from app.settings import Settings
from app.workers import LoadCell, WorkerGroup, WorkerStatus

PREFIX = "ensemble"
OUTCOMES = ("ok", "bad_input", "overloaded", "timeout", "error")
PROTOCOLS = ("http", "grpc")


def geometric_buckets(start: float = 0.001, stop: float = 10.0, ratio: float = 1.12) -> tuple[float, ...]:
    count = math.ceil(math.log(stop / start) / math.log(ratio))
    return (*(float(f"{start * ratio**i:.6g}") for i in range(count)), stop)


LATENCY_BUCKETS = geometric_buckets()
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class MetricFiles(Collector):
    """The worker processes' metric files (prometheus-client's multiprocess mode: `{type}_{pid}.db`, for gauges
    `gauge_{mode}_{pid}.db`), every one of which a scrape reads. A dead worker's counters and histograms are folded
    into one archive file per type (`{type}_archive.db`) by the supervisor, their only writer, and its files removed:
    the directory holds the live workers' files and the archives, however many workers died. A scrape reads while no
    fold runs, so each count is read once and no file vanishes between the listing and the reading."""

    ARCHIVED = ("counter", "histogram")  # the types whose values add up across processes (we have no summary)

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        with self._locked(fcntl.LOCK_SH):
            return MultiProcessCollector.merge([str(path) for path in self.directory.glob("*.db")])

    def fold_dead(self, pid: int) -> bool:
        """Adds the dead process `pid`'s counters and histograms to the archives and removes its files, its live
        gauges' too (they leave the scrape). False, having changed nothing, while a scrape reads: try again."""
        try:
            with self._locked(fcntl.LOCK_EX | fcntl.LOCK_NB):
                for kind in self.ARCHIVED:
                    dead = self.directory / f"{kind}_{pid}.db"
                    if dead.exists():  # not if it died before creating a metric of this type
                        _add_values(dead, self.directory / f"{kind}_archive.db")
                        dead.unlink()
                mark_process_dead(pid, str(self.directory))
        except BlockingIOError:
            return False
        return True

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        with open(self.directory / "fold.lock", "a") as lock:  # released when closed, or when its holder dies
            fcntl.flock(lock, operation)
            yield


def _add_values(source: Path, archive: Path) -> None:
    """Adds every value of one metric file to the same key's in another (created if missing)."""
    totals = MmapedDict(str(archive))
    try:
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(source)):
            totals.write_value(key, totals.read_value(key)[0] + value, 0.0)
    finally:
        totals.close()


def model_info(runtime: EnsembleRuntime) -> dict[str, str]:
    """ensemble_model_info's labels for a model served (which the worker serving it publishes in its status)."""
    manifest, cores = runtime.manifest, usable_cores()
    return {
        "name": manifest.name,
        "sha256": manifest.ensemble.sha256,
        "members": ",".join(member.name for member in manifest.members),
        "inference_slots": str(runtime.slots),
        "cores": str(cores.count),
        "cores_source": cores.source,
        **{f"{mode.replace('-', '_')}_session": plan.describe() for mode, plan in runtime.plans.items()},
        **{f"{mode.replace('-', '_')}_engine": choice.engine.value for mode, choice in runtime.engines.items()},
    }


class WorkerGroupCollector(Collector):
    """What each worker says of itself in its status: the model it serves, and the workers and their restarts; with
    worker processes, each one's process metrics (memory, CPU, file descriptors) labelled by worker."""

    def __init__(self, workers: WorkerGroup) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        statuses = self.workers.statuses()
        info = InfoMetricFamily(
            f"{PREFIX}_model",
            "The model each worker serves (its sha256 changes with a reload), and each mode's session options and "
            "engine (onnxruntime or openvino).",
            labels=["worker"],
        )
        for status in statuses:
            if status.model is not None:
                info.add_metric([str(status.worker)], status.info)
        yield info
        yield GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes alive (WORKERS).", value=len(statuses))
        load = self.workers.load
        yield GaugeMetricFamily(
            f"{PREFIX}_inferences_running", "Inferences running in the worker group now.", value=load.running_now()
        )
        runs = CounterMetricFamily(
            f"{PREFIX}_inference_runs",
            "Inferences run, by whether they ran alone in the worker group (on every core, with ALONE_ON_EVERY_CORE) "
            "or beside others (on their worker's and slot's share).",
            labels=["sessions"],
        )
        runs.add_metric(["alone"], load.ran(LoadCell.ALONE))
        runs.add_metric(["shared"], load.ran(LoadCell.SHARED))
        yield runs
        yield CounterMetricFamily(
            f"{PREFIX}_worker_restarts",
            "Worker processes that died and were replaced.",
            value=self.workers.restarts(),
        )
        if self.workers.shared:
            yield from _per_worker_process_metrics(statuses)


def _per_worker_process_metrics(statuses: list[WorkerStatus]) -> Iterator[Metric]:
    families: dict[str, Metric] = {}
    for status in statuses:
        for family in ProcessCollector(pid=lambda pid=status.pid: pid, registry=None).collect():
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "worker": str(status.worker)}))
    yield from families.values()


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry, workers: WorkerGroup | None = None) -> None:
        """The metrics on `registry`, with those of `workers` (by default: a process serving alone)."""
        workers = workers or WorkerGroup()
        self.registry = registry
        self._auto_candidates: set[tuple[str, str, int]] = set()
        registry.register(WorkerGroupCollector(workers))
        # What a scrape reports: this process's registry, or with worker processes every worker's metrics.
        self.scrape_registry = registry if workers.metrics_dir is None else _every_worker_registry(workers)
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
        self.queue_seconds = Histogram(
            f"{PREFIX}_queue_seconds",
            "Time a successful prediction waited for a free inference slot, and for the requests batched with it.",
            **mode_histogram,
        )
        self.batch_rows = Histogram(
            f"{PREFIX}_batch_rows",
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
            multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight",
            "HTTP requests being served.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.memory_reserved = Gauge(
            f"{PREFIX}_memory_reserved_bytes",
            "Memory the requests in flight have reserved (bodies, parsed JSON, tensors, ONNX Runtime's working "
            "memory, encoded responses), every protocol.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.memory_budget = Gauge(
            f"{PREFIX}_memory_budget_bytes",
            "MEMORY_BUDGET_BYTES: what the requests in flight may reserve together; past it, 503 (with workers, "
            "the sum of theirs).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.inferences_admitted = Gauge(
            f"{PREFIX}_inferences_admitted",
            "Inference requests admitted and not finished (running or queued for a slot), every protocol: the "
            "load signal to autoscale on.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.cores = Gauge(
            f"{PREFIX}_cores",
            "Cores this process sizes its sessions, layouts and costs by: its CPU affinity, or its cgroup's CPU "
            "quota when that is smaller (source: affinity or cgroup).",
            ["source"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.memory_limit = Gauge(
            f"{PREFIX}_memory_limit_bytes",
            "What this process may use: its cgroup's memory limit, or the machine's memory (with workers, each "
            "worker's share is this divided by ensemble_workers).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.latency_budget = Gauge(
            f"{PREFIX}_latency_budget_seconds",
            "LATENCY_BUDGET_MS in seconds: the p99 the operator wants (the alert EnsembleLatencyOverBudget).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.cost_per_hour = Gauge(
            f"{PREFIX}_cost_per_hour",
            "COST_PER_HOUR, what the machine costs an hour (absent when unset): cost per million predictions = "
            "cost_per_hour x CPU seconds per prediction x 1e6 / (cores x 3600).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.worker_http_requests = Counter(
            f"{PREFIX}_worker_http_requests",
            "HTTP requests by the worker process that served them: how the connections spread over the workers.",
            ["worker"],
            registry=registry,
        )

    @classmethod
    def for_process(cls, workers: WorkerGroup) -> ServiceMetrics:
        """On a new registry that also reports the process (memory, CPU, file descriptors) and the GC; with worker
        processes, every worker's process instead (labelled), the GC of none."""
        registry = CollectorRegistry()
        if not workers.shared:
            ProcessCollector(registry=registry)
            GCCollector(registry=registry)
        PlatformCollector(registry=registry)
        return cls(registry, workers)

    def observe(self, mode: str, protocol: str, timing: Timing) -> None:
        """A successful prediction, and where its time went."""
        self.predictions.labels(mode, protocol, "ok").inc()
        self.request_seconds.labels(mode, protocol).observe(timing.request_s)
        self.queue_seconds.labels(mode).observe(timing.queue_s)
        self.inference_seconds.labels(mode).observe(timing.inference_s)
        self.cpu_seconds.labels(mode).observe(timing.cpu_s)

    def describe_machine(self, settings: Settings) -> None:
        """The cores, the memory, what they cost and the latency budget, which a reload does not change."""
        cores = usable_cores()
        self.cores.labels(cores.source).set(cores.count)
        self.memory_limit.set(usable_memory().bytes)
        self.latency_budget.set(settings.latency_budget_ms / 1000)
        if settings.cost_per_hour is not None:
            self.cost_per_hour.set(settings.cost_per_hour)

    def describe_model(self, runtime: EnsembleRuntime, auto_candidates: Mapping[tuple[str, str, int], bool]) -> None:
        """Every served mode's series at zero from the start, and auto's candidates (mode, layout, batching rows),
        true for the one chosen."""
        for mode in runtime.modes:
            for histogram in (self.inference_seconds, self.queue_seconds, self.cpu_seconds, self.batch_rows):
                histogram.labels(mode)
            for protocol in PROTOCOLS:
                self.request_seconds.labels(mode, protocol)
                for outcome in OUTCOMES:
                    self.predictions.labels(mode, protocol, outcome)
        for outcome in ("ok", "failed"):
            self.model_loads.labels(outcome)
        # Candidates of a previous model go to 0 rather than away: multiprocess mode cannot remove a series.
        for labels in self._auto_candidates - set(auto_candidates):
            self.auto_choice.labels(labels[0], labels[1], str(labels[2])).set(0)
        self._auto_candidates |= set(auto_candidates)
        for (mode, layout, batching_rows), chosen in auto_candidates.items():
            self.auto_choice.labels(mode, layout, str(batching_rows)).set(1 if chosen else 0)


def _every_worker_registry(workers: WorkerGroup) -> CollectorRegistry:
    assert workers.metrics_dir is not None
    registry = CollectorRegistry()
    registry.register(MetricFiles(workers.metrics_dir))
    registry.register(WorkerGroupCollector(workers))
    PlatformCollector(registry=registry)
    return registry
