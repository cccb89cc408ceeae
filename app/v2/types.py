"""Messages of the Open Inference Protocol (KServe v2) REST API (the JSON part of the binary extension too)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ensemble_contract.modes import describe_modes


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dynamic dimension.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        None, description="Row-major elements, flat or nested; absent when parameters.binary_data_size is given."
    )


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description=f'{{"mode": ...}}: {describe_modes()}. Default: DEFAULT_MODE.',
    )
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = Field(None, description="Default: every output.")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "id": "42",
                    "parameters": {"mode": "parallel"},
                    "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.0, -2.0, 0.0]}],
                    "outputs": [{"name": "probabilities"}],
                }
            ]
        }
    }


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | list[int] | list[bool] | None = Field(None, description="Absent for a binary output.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    parameters: dict[str, Any] = Field(default_factory=dict, description='{"mode": the mode that ran}')
    outputs: list[OutputTensor]
