"""What a failed replica call becomes for the client: never a 500 for something that is not our bug."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.ingress import APIError, error_from_handle_exception


@pytest.mark.parametrize("exc, status", [
    (BackPressureError(num_queued_requests=10, max_queued_requests=5), 429),
    (asyncio.TimeoutError(), 503),
    (DeploymentUnavailableError("LLMReplica"), 503),
    (StopAsyncIteration(), 503),
    (RuntimeError("bug"), 500),
])
def test_handle_failures_map_to_statuses(exc: BaseException, status: int) -> None:
    assert error_from_handle_exception(exc).status == status


def test_error_body_is_openai_shaped() -> None:
    body = APIError(429, "full").body()
    assert body == {"error": {"message": "full", "type": "rate_limit_error", "param": None, "code": None}}
