"""GET /metrics for Prometheus, GET /stats for a quick per-mode latency view."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from app.core.auto import AutoChoice
from app.core.dataplane import DataPlane
from app.core.model import LoadedModel, SessionsNow
from app.core.service import Service
from app.engine.resources import usable_memory
from app.errors import NotFound
from app.http.deps import ArrivalDep, DataPlaneDep, ServiceDep
from app.http.errors import error_responses
from app.observability.stats import ModeSummary, Percentiles
from app.workers import WorkerGroup
from ensemble_contract.modes import Mode

router = APIRouter(tags=["monitoring"])


class LatencyMs(BaseModel):
    p50: float | None
    p95: float | None

    @classmethod
    def of(cls, percentiles: Percentiles) -> LatencyMs:
        return cls(p50=percentiles.p50_ms, p95=percentiles.p95_ms)


class ModeStats(BaseModel):
    requests: int = Field(description="Successful predictions in the window.")
    request_ms: LatencyMs = Field(description="From arrival to result.")
    queue_ms: LatencyMs = Field(description="Waiting for an inference slot, and for the requests batched with it.")
    inference_ms: LatencyMs = Field(description="ONNX Runtime time alone (of the batch a prediction ran in).")
    mean_batch_rows: float | None = Field(
        description="The rows of the inference a prediction ran in, on average (1: none was batched)."
    )
    cpu_ms_per_prediction: float | None = Field(description="Mean CPU time of a prediction, every thread's.")
    predictions_per_cpu_second: float | None = Field(description="What one busy core serves, in this mode.")
    cost_per_million_predictions: float | None = Field(
        description="COST_PER_HOUR / predictions an hour with every core the process may use busy, from the "
        "inference's CPU time (the event loop's HTTP and JSON work is not in it); None without COST_PER_HOUR or "
        "requests."
    )


class MemoryStats(BaseModel):
    budget_bytes: int = Field(description="MEMORY_BUDGET_BYTES: what the requests in flight may reserve together.")
    budget_source: str = Field(
        description="The memory the process may use, which the default budget is half of, "
        "less what the loaded model holds."
    )
    reserved_bytes: int = Field(description="What the requests in flight have reserved now.")
    peak_reserved_bytes: int = Field(
        description="The most the requests in flight have reserved at once since start: what to size the budget by."
    )
    per_request_bytes: int = Field(description="What one request may reserve (MAX_REQUEST_BYTES, within the budget).")
    max_batch_rows: int = Field(description="MAX_BATCH_ROWS: the most rows one request may carry.")
    working_bytes_per_input_element: float = Field(
        description="ONNX Runtime's working memory per input element, measured at start-up; a request reserves it "
        "for its inputs."
    )


class BatchingStats(BaseModel):
    max_rows: int = Field(description="The most rows one inference merges (BATCHING_MAX_ROWS, or auto's choice).")
    delay_ms: float = Field(description="BATCHING_DELAY_MS: how long a free slot waits to fill a batch.")
    off_because: str | None = Field(description="Why this model never batches, if it does not.")


class Stats(BaseModel):
    window_s: float
    workers: int = Field(
        description="Worker processes whose requests the modes' figures count (all of them); memory is the answering "
        "worker's own budget."
    )
    admitted_at_most: int = Field(
        description="The most inference requests admitted at once, every worker: workers x (inference slots + "
        "MAX_QUEUE); past it, 503."
    )
    cores: int = Field(description="Cores this process may use: its CPU affinity, or its cgroup CPU quota if smaller.")
    cores_source: str = Field(description="Where the core count comes from, e.g. '2 (cgroup quota 200000/100000 ...)'.")
    cost_per_hour: float | None
    modes: dict[Mode, ModeStats]
    memory: MemoryStats
    batching: BatchingStats
    auto: AutoChoice | None = Field(description="DEFAULT_MODE=auto: the choice, why, and every candidate's figures.")
    sessions: SessionsNow


def cost_per_million(cost_per_hour: float | None, per_cpu_second: float | None, cores: int) -> float | None:
    """What a million predictions cost with every core busy serving them."""
    if cost_per_hour is None or not per_cpu_second:
        return None
    return round(cost_per_hour / (per_cpu_second * cores * 3600) * 1e6, 4)


METRICS_RESPONSE = {200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}}


def prometheus_text(service: Service) -> Response:
    return Response(generate_latest(service.metrics.scrape_registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=METRICS_RESPONSE | error_responses(404, 500, s404="METRICS_PORT is set: /metrics is served there."),
)
async def metrics(service: ServiceDep) -> Response:
    if service.settings.metrics_port is not None:
        raise NotFound("/metrics is not served on this port")
    return prometheus_text(service)


@router.get(
    "/stats",
    summary="Requests and latency percentiles per mode over a recent window",
    responses=error_responses(500, 503),
)
async def stats(service: ServiceDep, dataplane: DataPlaneDep, arrived: ArrivalDep) -> Stats:
    with dataplane.using(arrived) as model:
        return _stats(service.workers, dataplane, model, await model.recent.shared_summary())


def _stats(workers: WorkerGroup, dataplane: DataPlane, model: LoadedModel, summaries: dict[Mode, ModeSummary]) -> Stats:
    cores, cost = workers.cores, dataplane.settings.cost_per_hour
    return Stats(
        window_s=model.recent.window_s,
        workers=len(workers.statuses()),
        admitted_at_most=workers.count * dataplane.admission.capacity,
        cores=cores.count,
        cores_source=cores.describe(),
        cost_per_hour=cost,
        auto=model.auto,
        sessions=model.sessions_now(dataplane.settings, cores),
        batching=BatchingStats(
            max_rows=model.batching.max_rows,
            delay_ms=round(model.batching.delay_s * 1000, 3),
            off_because=model.batching.off_because,
        ),
        memory=MemoryStats(
            budget_bytes=dataplane.memory.total_bytes,
            budget_source=usable_memory().describe(),
            reserved_bytes=dataplane.memory.held_bytes,
            peak_reserved_bytes=dataplane.memory.peak_held_bytes,
            per_request_bytes=dataplane.memory.per_request_bytes,
            max_batch_rows=model.cost.max_rows,
            working_bytes_per_input_element=round(model.cost.working_bytes_per_element, 1),
        ),
        modes={
            mode: ModeStats(
                requests=summary.requests,
                request_ms=LatencyMs.of(summary.request_ms),
                queue_ms=LatencyMs.of(summary.queue_ms),
                inference_ms=LatencyMs.of(summary.inference_ms),
                mean_batch_rows=summary.mean_batch_rows,
                cpu_ms_per_prediction=round(summary.cpu_s * 1000 / summary.requests, 3) if summary.requests else None,
                predictions_per_cpu_second=summary.predictions_per_cpu_second,
                cost_per_million_predictions=cost_per_million(cost, summary.predictions_per_cpu_second, cores.count),
            )
            for mode, summary in summaries.items()
        },
    )
