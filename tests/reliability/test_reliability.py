"""One client cannot break the server: a real `serve run` of serve_config.yaml (tiny KV cache, float32 so that token
identity across batch shapes is exact) with API keys on and a replica whose engine fails on purpose when a prompt
carries a marker (faulty_app.py). Every test ends by checking that a normal request is still served, token-identical
to the one served before any fault. The replica SIGKILL test runs last: it replaces the replica.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from app.config import load_serve_config
from tests.serve_harness import ROOT, serve_app

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
MODEL = "SmolLM2-135M-Instruct"
KEYS = ("reliability-key-1", "reliability-key-2")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
PROMPT = "The capital of France is"
NUM_TOKENS = 10
TIMEOUT = httpx.Timeout(120.0)


def _config() -> dict:
    raw = copy.deepcopy(load_serve_config(ROOT / "serve_config.yaml"))
    app = raw["applications"][0]
    app["import_path"] = "faulty_app:build_app"
    app["args"]["engine"].update(num_kv_blocks=64, max_num_seqs=4, dtype="float32")
    app["args"].update(max_waiting=16, replica_torch_threads=1, unloaded_tpot_probe_tokens=4)
    return raw


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_app(_config(), env={"ADASERVE_API_KEY": ",".join(KEYS)}, pythonpath=(HERE,)) as url:
        yield url


def _completion(base_url: str, prompt: str = PROMPT, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
            **fields}
    return httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT)


def _stream(base_url: str, prompt: str = PROMPT, **fields: Any) -> dict[str, Any]:
    """A streamed completion's outcome: status, the text, and the in-band error if one came."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, **fields}
    text, error, done, finish_reason = [], None, False, None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "error": response.json()["error"], "text": None}
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                error = chunk["error"]
            else:
                text.append(chunk["choices"][0]["text"])
                finish_reason = chunk["choices"][0]["finish_reason"] or finish_reason
    return {"status": 200, "error": error, "text": "".join(text), "done": done, "finish_reason": finish_reason}


def _gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def reference(base_url: str) -> str:
    """The normal request's text before anything was injected."""
    response = _completion(base_url)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _assert_still_serving(base_url: str, reference: str) -> None:
    response = _completion(base_url)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference
    assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200


def test_api_keys_guard_the_api_but_not_health_or_metrics(base_url: str, reference: str) -> None:
    models = f"{base_url}/v1/models"
    assert httpx.get(models, timeout=10).status_code == 401
    wrong = httpx.get(models, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    for key in KEYS:
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=10).status_code == 401
    health = httpx.get(f"{base_url}/health", timeout=1.5)  # answers within a second, without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"{base_url}/metrics", timeout=30).status_code == 200
    _assert_still_serving(base_url, reference)


@pytest.mark.parametrize("method, path, content, status", [
    ("GET", "/v1/does-not-exist", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("POST", "/v1/completions", b'\xff{"model": 1', 400),
    ("POST", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000, 400),
    ("POST", "/v1/completions", b"x" * (5 * 2**20), 413),
])
def test_the_frameworks_own_errors_are_openai_shaped(base_url: str, method: str, path: str, content: bytes | None,
                                                     status: int) -> None:
    response = httpx.request(method, f"{base_url}{path}", content=content, timeout=TIMEOUT,
                             headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),  # beyond this replica's 1024-token context window
    ({"ttft_slo_ms": 1e-9}, "ttft_slo_ms"),
    ({"stop": ["x" * 1000]}, "stop"),
    ({"seed": 2**64}, "seed"),
])
def test_what_the_server_cannot_honour_is_a_400_naming_the_field(base_url: str, fields: dict, param: str) -> None:
    response = _completion(base_url, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_without_max_tokens_a_long_prompt_gets_what_the_context_window_leaves(base_url: str) -> None:
    body = {"model": MODEL, "prompt": "hello " * 1000, "ignore_eos": True}  # ~1000 of the 1024-token window
    response = httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["total_tokens"] == 1024 and response.json()["choices"][0]["finish_reason"] == "length"
    over = httpx.post(f"{base_url}/v1/completions", json={**body, "max_tokens": 100}, headers=AUTH, timeout=TIMEOUT)
    assert over.status_code == 400 and "maximum context length is 1024 tokens" in over.json()["error"]["message"]


def test_a_tiny_temperature_is_greedy_and_breaks_nothing(base_url: str, reference: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_stream, base_url) for _ in range(3)]
        tiny = _completion(base_url, temperature=1e-40)
        results = [f.result() for f in others]
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == reference
    assert all(r["status"] == 200 and r["error"] is None and r["text"] == reference for r in results)


def test_a_request_whose_logits_go_nan_fails_alone(base_url: str, reference: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_stream, base_url) for _ in range(3)]
        time.sleep(0.2)
        bad = _stream(base_url, prompt=f"{PROMPT} inject-nan-fault")
        results = [f.result() for f in others]
    assert bad["error"] is not None and bad["error"]["type"] == "server_error", bad
    assert all(r["status"] == 200 and r["error"] is None and r["text"] == reference for r in results), results
    _assert_still_serving(base_url, reference)


def test_a_failing_step_fails_its_requests_and_serving_goes_on(base_url: str, reference: str) -> None:
    errors_before = _gauges(base_url).get("adaserve_replica_step_errors", 0.0)
    result = _stream(base_url, prompt=f"{PROMPT} inject-step-fault")
    assert result["error"] is not None or result["status"] >= 500
    deadline = time.monotonic() + 15
    while _gauges(base_url).get("adaserve_replica_step_errors", 0.0) <= errors_before:
        assert time.monotonic() < deadline, "the step error never reached /metrics"
        time.sleep(0.5)
    _assert_still_serving(base_url, reference)  # one failed step is not a reason to restart the replica


def test_a_failing_stats_publish_loses_nothing(base_url: str, reference: str) -> None:
    response = _completion(base_url, prompt=f"{PROMPT} inject-stats-fault")
    assert response.status_code == 200
    deadline = time.monotonic() + 15
    while not _gauges(base_url).get("adaserve_replica_loop_errors"):
        assert time.monotonic() < deadline, "the stats failure never reached /metrics"
        time.sleep(0.5)
    _assert_still_serving(base_url, reference)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                 max_size=4), max_leaves=12)
_FIELDS = {"temperature": st.floats() | st.integers(), "top_p": st.floats(), "top_k": st.integers(),
           "stop": _JSON, "seed": st.integers(), "n": st.integers(-2, 3), "stream": st.booleans(),
           "tpot_slo_ms": st.floats() | st.text(max_size=5), "ttft_slo_ms": st.floats(), "slo_class": _JSON,
           "logprobs": _JSON, "top_logprobs": st.integers(), "user": _JSON, "messages": _JSON, "prompt": _JSON,
           "stream_options": _JSON, "ignore_eos": _JSON, "presence_penalty": st.floats()}


@st.composite
def _bodies(draw) -> tuple[str, Any]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    if draw(st.booleans()):
        return path, draw(_JSON)  # anything at all
    body: dict[str, Any] = {"model": draw(st.sampled_from([MODEL, MODEL, "other"])),
                            "max_tokens": draw(st.integers(1, 3) | st.integers(-5, 0) | st.just(2**40))}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "tool", "robot"])),
                             "content": draw(st.text(max_size=30) | _JSON)}]
    else:
        body["prompt"] = draw(st.text(min_size=0, max_size=30) | st.lists(st.integers(-10, 60000), max_size=5))
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=3, unique=True)):
        body[name] = draw(_FIELDS[name])
    return path, body


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=_bodies())
def test_fuzzed_request_bodies_never_get_a_5xx(base_url: str, request: tuple[str, Any]) -> None:
    path, body = request
    if isinstance(body, dict) and body.get("stream") is True:
        with httpx.stream("POST", f"{base_url}{path}", json=body, headers=AUTH, timeout=TIMEOUT) as response:
            response.read()
    else:
        response = httpx.post(f"{base_url}{path}", content=json.dumps(body), headers=AUTH, timeout=TIMEOUT)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif not (isinstance(body, dict) and body.get("stream") is True):
        assert response.json()["choices"]


def test_after_the_fuzz_a_normal_request_is_token_identical(base_url: str, reference: str) -> None:
    _assert_still_serving(base_url, reference)


def test_mass_disconnect_frees_every_request_and_kv_block(base_url: str, reference: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    clients = [httpx.Client(timeout=TIMEOUT) for _ in range(12)]
    try:
        responses = [client.send(client.build_request("POST", f"{base_url}/v1/completions", json=body,
                                                      headers=AUTH), stream=True) for client in clients]
        assert all(r.status_code == 200 for r in responses)
        for response in responses[:4]:  # some are mid-stream, the rest still queued
            next(response.iter_lines())
    finally:
        for client in clients:
            client.close()  # all at once, without reading on
    deadline = time.monotonic() + 30
    while True:
        g = _gauges(base_url)
        running = sum(v for k, v in g.items() if k == "adaserve_replica_running_requests")
        free = sum(v for k, v in g.items() if k == "adaserve_replica_kv_free_blocks")
        total = sum(v for k, v in g.items() if k == "adaserve_replica_kv_total_blocks")
        if running == 0 and free == total:
            break
        assert time.monotonic() < deadline, f"after the disconnect: {running} running, {free}/{total} KV blocks free"
        time.sleep(0.5)
    _assert_still_serving(base_url, reference)


def test_sigkill_of_the_replica_ends_every_stream_within_10_s_and_serving_resumes(base_url: str,
                                                                                 reference: str) -> None:
    handle = serve.get_deployment_handle("LLMReplica", app_name="adaserve")
    pid = handle.pid.remote().result(timeout_s=30)
    long = {"max_tokens": 400}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(_stream, base_url, **long) for _ in range(4)]
        time.sleep(3.0)  # the streams are running
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        results = [f.result(timeout=60) for f in streams]
        ended_within_s = time.monotonic() - killed_at
    assert ended_within_s < 10, ended_within_s
    for r in results:  # an in-band error then [DONE], or an HTTP error before the first byte
        assert (r["status"] == 200 and r["error"] is not None and r["done"]) or r["status"] >= 500, r
    deadline = time.monotonic() + 180
    while True:  # a new replica comes up and serves the same tokens
        response = _completion(base_url)
        if response.status_code == 200:
            assert response.json()["choices"][0]["text"] == reference
            break
        assert response.status_code in (503, 429), response.text
        assert time.monotonic() < deadline, "serving did not resume"
        time.sleep(2)
    new_pid = handle.pid.remote().result(timeout_s=30)
    assert new_pid != pid


def test_shutting_the_app_down_lets_running_streams_finish(base_url: str) -> None:
    """Graceful drain: the replica stops taking requests but finishes the ones it runs (graceful_shutdown_timeout_s
    in serve_config.yaml). Last in this module: it deletes the app."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(_stream, base_url, max_tokens=60) for _ in range(2)]
        time.sleep(2.0)  # the streams are running
        serve.delete("adaserve", _blocking=False)
        results = [f.result(timeout=120) for f in streams]
    for r in results:  # every token the request asked for (ignore_eos), not a cut stream
        assert r["status"] == 200 and r["error"] is None and r["done"] and r["finish_reason"] == "length", r
