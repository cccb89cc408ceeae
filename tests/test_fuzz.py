"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): at least 1000 generated requests over every
operation, valid and invalid, and not one 5xx; every response is documented, with the documented body."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from tests.support import LiveServer

CASES = 1200
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_generated_requests_get_documented_answers_and_never_a_5xx(server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    sent = 0

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy())
    def call(case: schemathesis.Case) -> None:
        nonlocal sent
        response = case.call(base_url=server.url, timeout=30)
        sent += 1
        case.validate_response(response, checks=CHECKS)

    call()
    assert sent >= 1000
