"""What the HTTP layer answers before any endpoint runs: the framework's own errors in OpenAI's shape, the body-size
limit (413) and API keys (401). Runs the ingress's FastAPI app in-process (no Ray): these answers never reach a
replica, so no deployment is needed."""

from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from app.ingress import fastapi_app


@pytest.fixture()
def client() -> Iterator[TestClient]:
    saved = dict(fastapi_app.state._state)
    fastapi_app.state.max_body_bytes = 4096
    fastapi_app.state.api_keys = frozenset()
    fastapi_app.state.metrics_require_api_key = False
    try:
        yield TestClient(fastapi_app, raise_server_exceptions=False)
    finally:
        fastapi_app.state._state.clear()
        fastapi_app.state._state.update(saved)


def _assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_unknown_route_and_wrong_method_are_openai_errors(client: TestClient) -> None:
    err = _assert_openai_error(client.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in err["message"]
    response = client.get("/v1/chat/completions")
    err = _assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("body", ids=["not-utf8", "cut-off", "deep"], argvalues=[
    b'\xff\xfe{"model": "x"}',  # not UTF-8
    b'{"model": "x", "messages": [',  # cut off
    b"[" * 1800 + b"]" * 1800,  # nested deeper than the JSON parser recurses
])
def test_a_body_that_is_not_json_is_a_400(client: TestClient, body: bytes) -> None:
    err = _assert_openai_error(client.post("/v1/chat/completions", content=body,
                                           headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]


def test_an_oversized_body_is_a_413_whether_or_not_it_declares_its_length(client: TestClient) -> None:
    declared = client.post("/v1/completions", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert "4096 bytes" in _assert_openai_error(declared, 413)["message"]

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check up front
        for _ in range(10):
            yield b"x" * 1000

    streamed = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_openai_error(streamed, 413)


def test_api_keys_guard_v1_routes_only(client: TestClient) -> None:
    fastapi_app.state.api_keys = frozenset({"key-one", "key-two"})
    missing = _assert_openai_error(client.post("/v1/completions", json={}), 401)
    assert missing["code"] == "missing_api_key"
    wrong = client.post("/v1/completions", json={}, headers={"Authorization": "Bearer key-three"})
    assert _assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    not_bearer = client.post("/v1/completions", json={}, headers={"Authorization": "Basic key-one"})
    _assert_openai_error(not_bearer, 401)
    # a right key (either of the list) gets past the guard to the router: an unknown route is then a 404
    for key in ("key-one", "key-two"):
        _assert_openai_error(client.get("/v1/nothing", headers={"Authorization": f"Bearer {key}"}), 404)
    assert client.get("/v1/nothing").status_code == 401  # without a key, unknown /v1 routes do not reveal themselves


def test_metrics_needs_the_key_only_when_configured(client: TestClient) -> None:
    fastapi_app.state.api_keys = frozenset({"k"})
    assert client.get("/metrics").status_code != 401
    fastapi_app.state.metrics_require_api_key = True
    assert client.get("/metrics").status_code == 401
