"""GET /metrics for Prometheus, GET /stats for a quick per-mode latency view."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from app.deps import DataPlaneDep
from app.errors import NotFound, error_responses
from app.stats import Percentiles
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
    inference_ms: LatencyMs = Field(description="ONNX Runtime time alone.")


class Stats(BaseModel):
    window_s: float
    modes: dict[Mode, ModeStats]


METRICS_RESPONSE = {200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}}


def prometheus_text(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=METRICS_RESPONSE | error_responses(404, 500, s404="METRICS_PORT is set: /metrics is served there."),
)
async def metrics(request: Request) -> Response:
    settings = getattr(request.app.state, "settings", None)
    if settings is not None and settings.metrics_port is not None:
        raise NotFound("/metrics is not served on this port")
    return prometheus_text(request)


@router.get(
    "/stats",
    summary="Requests and latency percentiles per mode over a recent window",
    responses=error_responses(500, 503),
)
async def stats(dataplane: DataPlaneDep) -> Stats:
    recent = dataplane.recent
    return Stats(
        window_s=recent.window_s,
        modes={
            mode: ModeStats(
                requests=summary.requests,
                request_ms=LatencyMs.of(summary.request),
                inference_ms=LatencyMs.of(summary.inference),
            )
            for mode, summary in recent.summary().items()
        },
    )
