"""The Serve application end to end on CPU: one local Ray + Serve for the whole module.

The app is deployed from the repository's serve_config.yaml exactly as `serve run` does (ServeDeploySchema ->
deploy_apps), with only a tiny engine swapped in (64 KV blocks of 16 tokens = a 1024-token context window,
2 sequences + 1 queued before 429), on a free port. A second app of two fake replicas checks the SLO router.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

from app.config import load_serve_config
from tests.serve_harness import SLOW_MACHINE_ENV, free_port as _free_port, wait_running as _wait_running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT_PROMPT = "Name three colours."
NUM_TOKENS = 12
NUM_KV_BLOCKS = 64


def _test_config(port: int) -> dict:
    raw = copy.deepcopy(load_serve_config(ROOT / "serve_config.yaml"))
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    args = raw["applications"][0]["args"]
    # float32: output identity is judged there (in bf16 a near-tie can flip between the served batch and the CLI's)
    args["engine"].update(num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=2, dtype="float32")
    args.update(max_waiting=1, replica_torch_threads=1, unloaded_tpot_probe_tokens=4)
    return raw


def _cli(*extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.engine", "generate", "--max-tokens", str(NUM_TOKENS), "--dtype", "float32",
           "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in the replica; also keeps a shared CI box responsive
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def server():
    """Yields (base_url, cli_result). The engine CLI's model load overlaps Serve's start-up."""
    cli_proc = _cli("--prompt", CHAT_PROMPT, "--chat")
    port = _free_port()
    env = {**SLOW_MACHINE_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests" / "app"), str(ROOT),
                                                     os.environ.get("PYTHONPATH")) if p)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # inherited by the raylet and so by every Serve actor
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            config = ServeDeploySchema.model_validate(_test_config(port))
            client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
            client.deploy_apps(config)
            from fake_replica import FakeReplica

            serve.run(FakeReplica.bind(), name="routertest", route_prefix=None)
            _wait_running("adaserve", timeout_s=300)
            out, err = cli_proc.communicate(timeout=300)
            assert cli_proc.returncode == 0, err
            yield f"http://127.0.0.1:{port}", json.loads(out)
        finally:
            if cli_proc.poll() is None:
                cli_proc.kill()
            serve.shutdown()
            ray.shutdown()


def _oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120, max_retries=0)


def _replica_gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("adaserve_replica_")}


def _wait_gauges(base_url: str, predicate, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = _replica_gauges(base_url)
        if gauges and predicate(gauges):
            return gauges
        if time.monotonic() > deadline:
            raise AssertionError(f"replica gauges never matched: {gauges}")
        time.sleep(0.2)


def test_effective_config_is_what_the_yaml_says(server) -> None:
    details = serve.context._get_global_client().get_serve_details()
    deps = details["applications"]["adaserve"]["deployments"]
    yaml_deps = {d["name"]: d for d in load_serve_config(ROOT / "serve_config.yaml")["applications"][0]["deployments"]}
    for name in ("OpenAIIngress", "LLMReplica"):
        cfg = deps[name]["deployment_config"]
        assert cfg["max_ongoing_requests"] == yaml_deps[name]["max_ongoing_requests"]
        assert cfg["ray_actor_options"]["num_cpus"] == yaml_deps[name]["ray_actor_options"]["num_cpus"]
    router_cfg = deps["LLMReplica"]["deployment_config"]["request_router_config"]
    assert router_cfg["request_router_class"] == "app.router.SLORequestRouter"
    assert router_cfg["request_routing_stats_period_s"] == 0.3


def test_openai_client_chat_and_completion(server) -> None:
    base_url, _ = server
    client = _oai(base_url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 4
    assert chat.slo["class"] == "none" and chat.slo["attained"] is None
    comp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                     extra_body={"tpot_slo_ms": 60_000, "ttft_slo_ms": 60_000})
    assert comp.choices[0].text and comp.slo["class"] == "custom" and comp.slo["attained"] is True
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"slo_class": "summarization"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert text and final.slo["class"] == "summarization" and final.slo["tpot_slo_ms"] > 0
    assert chunks[-1].usage.completion_tokens == 5 or final.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in stream)


def test_greedy_output_over_http_equals_engine_cli(server) -> None:
    """Same chat template, same greedy tokens: HTTP (streamed) and `python -m app.engine generate --chat`."""
    base_url, cli = server
    chat = _oai(base_url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT_PROMPT}],
                                                  max_tokens=NUM_TOKENS, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = list(chat)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cli["text"]
    assert chunks[-1].usage.completion_tokens == len(cli["token_ids"])
    assert chunks[-1].usage.prompt_tokens == cli["num_prompt_tokens"]


def test_cancelled_stream_frees_its_kv_blocks(server) -> None:
    base_url, _ = server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            while got < 3:
                got += next(lines).startswith("data: {")
            busy = _wait_gauges(base_url, lambda g: g["adaserve_replica_running_requests"] == 1)
            assert busy["adaserve_replica_kv_free_blocks"] < busy["adaserve_replica_kv_total_blocks"]
        # leaving the block closes the connection mid-stream
    idle = _wait_gauges(base_url, lambda g: g["adaserve_replica_running_requests"] == 0
                        and g["adaserve_replica_kv_free_blocks"] == g["adaserve_replica_kv_total_blocks"])
    assert idle["adaserve_replica_kv_total_blocks"] == NUM_KV_BLOCKS


BAD_INPUTS = [  # (endpoint, body changes, status, message fragment, param)
    ("completions", {"model": "gpt-17"}, 404, "does not exist", "model"),
    ("completions", {"n": 2}, 400, "n = 1", "n"),
    ("completions", {"temperature": -1}, 400, "temperature", "temperature"),
    ("completions", {"top_p": 0}, 400, "top_p", "top_p"),
    ("completions", {"max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("completions", {"prompt": ""}, 400, "empty", "prompt"),
    ("completions", {"prompt": "hello " * 1100}, 400, "context window", "prompt"),
    ("completions", {"slo_class": "gaming"}, 400, "unknown slo_class", "slo_class"),
    ("completions", {"tpot_slo_ms": 0}, 400, "tpot_slo_ms", "tpot_slo_ms"),
    ("completions", {"tpot_slo_ms": 0.01}, 400, "impossible", "tpot_slo_ms"),
    ("completions", {"ttft_slo_ms": -5}, 400, "ttft_slo_ms", "ttft_slo_ms"),
    ("chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url",
     "messages"),
    ("chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
]


def test_bad_inputs_get_openai_errors(server) -> None:
    base_url, _ = server
    base = {"completions": {"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
            "chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
    with httpx.Client(timeout=120) as http:
        for endpoint, change, status, fragment, param in BAD_INPUTS:
            resp = http.post(f"{base_url}/v1/{endpoint}", json=base[endpoint] | change)
            err = resp.json()["error"]
            assert (resp.status_code, err["param"]) == (status, param), (change, err)
            assert fragment in err["message"] and err["type"] == "invalid_request_error", (change, err)
        resp = http.post(f"{base_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "error" in resp.json()
    with pytest.raises(openai.BadRequestError, match="unknown slo_class"):
        _oai(base_url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"slo_class": "x"})


def test_admission_full_answers_429(server) -> None:
    """max_num_seqs 2 + max_waiting 1: with three long streams held open, a fourth request is refused."""
    base_url, _ = server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def run() -> int:
        async with httpx.AsyncClient(timeout=120) as http:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(3):
                    resp = await stack.enter_async_context(http.stream("POST", f"{base_url}/v1/completions", json=body))
                    assert resp.status_code == 200
                full = await http.post(f"{base_url}/v1/completions", json=body | {"stream": False, "max_tokens": 2})
                assert full.json()["error"]["type"] == "rate_limit_error"
                return full.status_code

    assert asyncio.run(run()) == 429
    _wait_gauges(base_url, lambda g: g["adaserve_replica_running_requests"] == 0
                 and g["adaserve_replica_kv_free_blocks"] == g["adaserve_replica_kv_total_blocks"])


def test_router_sends_tight_slo_requests_to_spare_budget(server) -> None:
    handle = serve.get_app_handle("routertest").options(stream=True)

    async def ranks(tpot_slo_ms: float | None, n: int) -> list[int]:
        out = []
        for _ in range(n):
            async for msg in handle.generate.remote({}, tpot_slo_ms=tpot_slo_ms):
                out.append(msg["rank"])
        return out

    async def run() -> tuple[list[int], list[int]]:
        deadline = time.monotonic() + 20  # routing_stats are {} until the first poll reaches the router
        while time.monotonic() < deadline and set(await ranks(60.0, 4)) != {1}:
            await asyncio.sleep(0.3)
        return await ranks(60.0, 20), await ranks(None, 20)

    tight, loose = asyncio.run(run())
    assert tight == [1] * 20  # 60 ms < 2 x 50 ms unloaded TPOT: tight -> the replica with spare budget
    assert set(loose) <= {0, 1}


def _samples(base_url: str) -> dict[tuple[str, tuple], float]:
    resp = httpx.get(f"{base_url}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(resp.text) for s in fam.samples}


def test_metrics_parse_as_prometheus_text(server) -> None:
    base_url, _ = server
    schema_400 = ("adaserve_requests_total", (("endpoint", "completion"), ("status", "400")))
    before = _samples(base_url).get(schema_400, 0.0)
    _oai(base_url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"slo_class": "chat"})
    assert httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "n": 3},
                      timeout=30).status_code == 400
    samples = _samples(base_url)
    names = {name for name, _ in samples}
    for name in ("adaserve_requests_total", "adaserve_generation_tokens_total", "adaserve_ttft_seconds_bucket",
                 "adaserve_tpot_seconds_count", "adaserve_slo_attainment_ratio", "adaserve_goodput_tokens_total",
                 "adaserve_replica_kv_usage_ratio", "adaserve_replica_queue_length",
                 "adaserve_replica_accepted_tokens_per_step", "adaserve_replica_spare_token_budget"):
        assert name in names, name
    assert samples[schema_400] == before + 1
    # the request was counted under its class; whether it attained depends on this machine's timing
    chat = [samples.get(("adaserve_slo_requests_total", (("attained", a), ("slo_class", "chat"))), 0.0)
            for a in ("true", "false")]
    assert sum(chat) >= 1
    assert httpx.get(f"{base_url}/health", timeout=30).json()["status"] == "ok"
