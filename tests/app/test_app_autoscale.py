"""Autoscaling end to end on CPU: serve_config.autoscale.yaml under a load ramp goes from 1 to 2 replicas and back
to 1 once the load stops, and no request fails or has its stream cut, not even on the replica that is removed.

The YAML runs as `serve run` would, with a tiny engine (4 sequences per replica, so 8 concurrent streams fill one
replica) and fast autoscaling (samples every 0.5 s, a 2 s window, no upscale delay, 4 s downscale delay).
"""

from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from app.config import load_serve_config
from tests.serve_harness import ROOT, serve_app

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_NUM_SEQS = 4


def _test_config() -> dict:
    raw = copy.deepcopy(load_serve_config(ROOT / "serve_config.autoscale.yaml"))
    args = raw["applications"][0]["args"]
    args["engine"].update(num_kv_blocks=128, max_num_seqs=MAX_NUM_SEQS)
    # no SLO: fail-fast admission would refuse (429) TTFTs a loaded 2-core box cannot meet; this test is about
    # replica counts and streams, the load signal here is the sequence slots
    args.update(max_waiting=32, default_slo_class=None, unloaded_tpot_probe_tokens=4)
    dep = {d["name"]: d for d in raw["applications"][0]["deployments"]}["LLMReplica"]
    dep["autoscaling_config"].update(max_replicas=2, metrics_interval_s=0.5, look_back_period_s=2,
                                     upscale_delay_s=0, downscale_delay_s=4)
    return raw


@pytest.fixture(scope="module")
def server():
    with serve_app(_test_config()) as base_url:
        yield base_url


def _running_replicas() -> int:
    deployment = serve.status().applications["adaserve"].deployments["LLMReplica"]
    return int(deployment.replica_states.get("RUNNING", 0))


class Load:
    """``workers`` threads streaming completions until stopped, each ``pause_s`` after its last one ended; every
    outcome is kept."""

    def __init__(self, base_url: str, workers: int, max_tokens: int, pause_s: float = 0.0):
        self.base_url, self.max_tokens, self.pause_s = base_url, max_tokens, pause_s
        self.outcomes: list[str] = []  # finish_reason of a complete stream, else what went wrong
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                self.outcomes.append(self._one(client))
                self._stop.wait(self.pause_s)

    def _one(self, client: httpx.Client) -> str:
        body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True}
        finish, done = None, False
        try:
            with client.stream("POST", f"{self.base_url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return f"http {response.status_code}: {response.read()[:200]!r}"
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return f"error in stream: {chunk['error']}"
                        for choice in chunk.get("choices") or []:
                            finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            return f"transport: {exc!r}"
        return finish if done and finish else f"cut (finish={finish}, done={done})"

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        return self.outcomes


def _wait_replicas(predicate, timeout_s: float, base_url: str) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := _running_replicas()) is not None and not predicate(n):
        if time.monotonic() > deadline:  # say why the scaler held: its last decision's gauges
            raise AssertionError(f"{n} running replicas after {timeout_s} s; {_autoscaling_gauges(base_url)}")
        time.sleep(0.5)
    return n


def _autoscaling_gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("adaserve_autoscaling_")}


def test_ramp_scales_up_then_back_down_without_losing_a_stream(server) -> None:
    base_url = server
    assert _running_replicas() == 1
    ramp = Load(base_url, workers=2 * MAX_NUM_SEQS, max_tokens=24)  # twice what one replica's slots hold
    try:
        _wait_replicas(lambda n: n >= 2, timeout_s=120, base_url=base_url)
        time.sleep(2.0)  # both replicas serve for a moment
    finally:
        ramp_outcomes = ramp.stop()
    gauges = _autoscaling_gauges(base_url)
    assert gauges['adaserve_autoscaling_desired_replicas{"deployment": "LLMReplica"}'] >= 1
    assert any(k.startswith("adaserve_autoscaling_reason") for k in gauges)
    # a trickle of long streams while the scaler removes a replica: the one it removes must finish its stream.
    # The pause keeps a worker's next request from overlapping the end of its last one on the replicas' load
    # samples: back to back, two workers read as three streams at the window's peak (0.75 of a replica), above what
    # scale-down allows (0.55), and the scaler held 2 replicas
    trickle = Load(base_url, workers=2, max_tokens=64, pause_s=0.5)
    try:
        _wait_replicas(lambda n: n == 1, timeout_s=120, base_url=base_url)
    finally:
        trickle_outcomes = trickle.stop()
    outcomes = ramp_outcomes + trickle_outcomes
    assert len(ramp_outcomes) >= 2 * MAX_NUM_SEQS and trickle_outcomes
    assert set(outcomes) == {"length"}, [o for o in outcomes if o != "length"][:5]
    assert _running_replicas() == 1
