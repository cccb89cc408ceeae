"""POST /predict: one image in (multipart field `file`, or the raw body with an image/* type), labels out."""

from __future__ import annotations

import base64
import time
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from app.core import imaging
from app.core.dataplane import Inferred
from app.engine.timing import Timing
from app.errors import InvalidParameter
from app.http.deps import OPTIONAL_BEARER, AdmitsInference, ArrivalDep, Authorized, DataPlaneDep, LeaseDep
from app.http.errors import error_responses
from app.http.images import ImageOutputs, ImageRequest
from ensemble_contract.manifest import ImageSpec, ImageTask
from ensemble_contract.modes import Mode, ModeChoice, describe_modes

router = APIRouter(tags=["predict"])

UPLOAD_FIELD = "file"
CLASSIFY_TOP = 5  # labels a classify model answers with unless ?top= says otherwise
GENERIC_PART_TYPES = frozenset({"", "application/octet-stream"})  # what clients send when they do not know
_BINARY = {"schema": {"type": "string", "format": "binary"}}
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: PNG, JPEG, WebP or BMP, any size or aspect ratio, grayscale, colour or with alpha.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            **{media_type: _BINARY for media_type in imaging.MEDIA_TYPES},
        },
    }
}


class Timings(BaseModel):
    """Where a prediction's time went, in milliseconds (the answer's `timings_ms`, its Server-Timing header)."""

    decode: float
    preprocess: float
    queue: float = Field(description="Waiting for an inference slot, and for the requests batched with it.")
    batch_wait: float = Field(
        description="The part of the queue spent gathering its batch once a slot was free (BATCHING_DELAY_MS)."
    )
    inference: float
    total: float = Field(description="From the start of decoding to the result.")
    cpu: float = Field(description="CPU time of every thread that served it (decode, inference, pools).")
    batch_rows: int = Field(description="Not a time: the rows of the inference it ran in, its own included.")

    @classmethod
    def of(cls, request: ImageRequest, timing: Timing) -> Timings:
        return cls(
            decode=request.decode_s * 1000,
            preprocess=request.preprocess_s * 1000,
            queue=timing.queue_s * 1000,
            batch_wait=timing.batch_wait_s * 1000,
            inference=timing.inference_s * 1000,
            total=(time.perf_counter() - request.started) * 1000,
            cpu=timing.cpu_s * 1000,
            batch_rows=timing.batch_rows,
        )


class Label(BaseModel):
    name: str
    probability: float = Field(ge=0, le=1, description="The ensemble's probability for this label.")
    present: bool = Field(
        description="multilabel models: probability >= the threshold; classify models: the most probable label."
    )


class MemberProbabilities(BaseModel):
    name: str
    probabilities: dict[str, float]


class Mask(BaseModel):
    png_base64: str = Field(description="Palette PNG at model resolution; pixel value i is mask class i.")
    width: int
    height: int
    classes: list[str] = Field(description="Mask class names by pixel value; 0 is the background.")


class ModelRef(BaseModel):
    name: str
    sha256: str = Field(description="sha256 of the fused graph, ensemble.onnx.")
    task: ImageTask


class Prediction(BaseModel):
    request_id: str
    model: ModelRef
    mode: Mode = Field(description="The mode that ran this request.")
    threshold: float
    labels: list[Label] = Field(
        description="multilabel: manifest order; classify, or with ?top=K: the most probable first."
    )
    members: list[MemberProbabilities] | None = Field(None, description="With ?members=true, for the same labels.")
    mask: Mask | None = Field(None, description="With ?mask=true.")
    timings_ms: Timings

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "request_id": "4f1c0c7e2b0a4d7e9a52f0b1c8e3d6a1",
                    "model": {"name": "shapes", "sha256": "9b6f" + "0" * 60, "task": "multilabel"},
                    "mode": "fused",
                    "threshold": 0.5,
                    "labels": [
                        {"name": "circle", "probability": 0.97, "present": True},
                        {"name": "square", "probability": 0.03, "present": False},
                    ],
                    "members": None,
                    "mask": None,
                    "timings_ms": {
                        "decode": 0.4,
                        "preprocess": 0.2,
                        "queue": 0.0,
                        "batch_wait": 0.0,
                        "inference": 13.1,
                        "total": 14.0,
                        "cpu": 14.2,
                        "batch_rows": 1,
                    },
                }
            ]
        }
    }

    @classmethod
    def of(
        cls,
        result: Inferred[ImageOutputs],
        timings: Timings,
        *,
        threshold: float,
        request_id: str,
        with_members: bool,
        top: int | None,
    ) -> Prediction:
        manifest, outputs = result.manifest, result.answer
        image = outputs.image
        shown = _shown_labels(outputs, image, top)
        members = None
        if with_members and outputs.member_probabilities is not None:
            members = [
                MemberProbabilities(name=member.name, probabilities={image.labels[i]: float(row[i]) for i in shown})
                for member, row in zip(manifest.members, outputs.member_probabilities, strict=True)
            ]
        mask = None
        if outputs.mask_png is not None:
            mask = Mask(
                png_base64=base64.b64encode(outputs.mask_png).decode("ascii"),
                width=image.width,
                height=image.height,
                classes=list(image.mask_classes),
            )
        return cls(
            request_id=request_id,
            model=ModelRef(name=manifest.name, sha256=manifest.ensemble.sha256, task=image.task),
            mode=result.mode,
            threshold=threshold,
            labels=_labels(outputs, image, shown, threshold),
            members=members,
            mask=mask,
            timings_ms=timings,
        )


def _shown_labels(result: ImageOutputs, image: ImageSpec, top: int | None) -> list[int]:
    """Indices of the labels to answer with: all in manifest order (multilabel), the most probable (classify)."""
    if result.probabilities is None:
        return []
    if image.task is ImageTask.CLASSIFY:
        ranked = [int(i) for i in (-result.probabilities).argsort(kind="stable")]
        return ranked[: top or CLASSIFY_TOP]
    indices = list(range(len(image.labels)))
    return indices if top is None else sorted(indices, key=lambda i: -result.probabilities[i])[:top]


def _labels(result: ImageOutputs, image: ImageSpec, shown: list[int], threshold: float) -> list[Label]:
    if result.probabilities is None:
        return []
    best = int(result.probabilities.argmax())
    return [
        Label(
            name=image.labels[i],
            probability=float(result.probabilities[i]),
            present=i == best if image.task is ImageTask.CLASSIFY else bool(result.probabilities[i] >= threshold),
        )
        for i in shown
    ]


def server_timing(timings: Timings) -> str:
    durations = timings.model_dump(exclude={"batch_rows"})
    batch_rows = f"batch_rows;desc={timings.batch_rows}"
    return ", ".join([*(f"{name};dur={ms:.3f}" for name, ms in durations.items()), batch_rows])


async def read_image(request: Request) -> bytes:
    """The image bytes from a multipart upload or a raw image/* body; 415 for any other declared type."""
    content_type = request.headers.get("content-type", "")
    if imaging.media_type(content_type) != "multipart/form-data":
        imaging.check_media_type(content_type)
        return await request.body()
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise InvalidParameter(f"the multipart body has no file field named {UPLOAD_FIELD!r}")
        part_type = imaging.media_type(upload.content_type)
        if part_type not in GENERIC_PART_TYPES:
            imaging.check_media_type(part_type)
        return await upload.read()


@router.post(
    "/predict",
    summary="Labels (and optionally a mask) for one image",
    openapi_extra=REQUEST_BODY | OPTIONAL_BEARER,
    dependencies=[Authorized, AdmitsInference],
    responses=error_responses(
        *(400, 401, 404, 408, 413, 415, 422, 500, 503, 504),
        s400="The body is not a decodable PNG, JPEG, WebP or BMP image.",
        s404="The model takes tensors, not images: use /v2.",
        s422="Invalid query parameter, or no `file` field in a multipart body.",
    ),
)
async def predict(
    request: Request,
    response: Response,
    dataplane: DataPlaneDep,
    arrived: ArrivalDep,
    lease: LeaseDep,
    mode: Annotated[
        ModeChoice | None,
        Query(description=f"{describe_modes()}. Default: DEFAULT_MODE."),
    ] = None,
    members: Annotated[bool, Query(description="Include each member's probabilities.")] = False,
    mask: Annotated[
        bool, Query(description="Include the predicted mask as a base64 palette PNG (models with a mask output).")
    ] = False,
    top: Annotated[
        int | None,
        Query(
            ge=1,
            le=1000,
            description=f"Only the K most probable labels (default: all; {CLASSIFY_TOP} for classify models).",
        ),
    ] = None,
) -> Prediction:
    image = ImageRequest(dataplane, partial(read_image, request), mode, with_mask=mask)
    result = await dataplane.infer(image, arrived=arrived, front="http", lease=lease)
    timings = Timings.of(image, result.timing)
    response.headers["Server-Timing"] = server_timing(timings)
    return Prediction.of(
        result,
        timings,
        threshold=dataplane.settings.probability_threshold,
        request_id=request.state.request_id,
        with_members=members,
        top=top,
    )
