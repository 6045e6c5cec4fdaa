"""Serving measurements (prints figures): `python -m bench.serve [--quick]`.

1. Start-up: seconds from `serve run serve_config.yaml` to the first answered completion, cold (fresh Ray and an
   empty weight cache: the GGUF is de-quantised again) and warm (fresh Ray, cached weights).
2. Overhead of the Serve path per request: the same greedy request (same prompt, N tokens) through HTTP
   (streamed and not) and through the engine in-process, interleaved; and, immune to background load, each HTTP
   request's client wall time minus the replica engine's own arrival-to-last-token time.
3. Throughput with 1 vs 2 CPU replicas: C concurrent streams, R requests in all, bounded by a time limit.

Everything talks to 127.0.0.1 only, on its own port; every loop is bounded. Each server is stopped with SIGINT
(as a user would) and killed if it has not exited after 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PORT = 8137
BASE_URL = f"http://127.0.0.1:{PORT}"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Explain in one paragraph why the sky is blue."


def write_config(tmp: Path, threads: int, num_replicas: int = 1) -> Path:
    """serve_config.yaml on the bench port, optionally with more replicas (the threads split between them)."""
    raw = copy.deepcopy(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    raw["http_options"]["port"] = PORT
    app = raw["applications"][0]
    app["args"]["replica_torch_threads"] = max(1, threads // num_replicas)
    for dep in app["deployments"]:
        if dep["name"] == "LLMReplica":
            dep["num_replicas"] = num_replicas
    path = tmp / f"serve_config.{num_replicas}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Server:
    """`serve run CONFIG` in the background; stop() sends SIGINT like Ctrl-C. port and model: the config's."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, port: int = PORT, model: str = MODEL):
        self.base_url, self.model = f"http://127.0.0.1:{port}", model
        self.started_at = time.perf_counter()
        self.log = open(config.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            ["serve", "run", str(config)], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # background jobs ignore SIGINT

    def wait_first_answer(self, timeout_s: float = 600.0) -> float:
        """Seconds from start to the first 200 on a 1-token completion."""
        body = {"model": self.model, "prompt": "Hello", "max_tokens": 1}
        deadline = self.started_at + timeout_s
        with httpx.Client(timeout=30) as http:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve run exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    if http.post(f"{self.base_url}/v1/completions", json=body).status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"no answer after {timeout_s} s; see {self.log.name}")

    def stop(self) -> float:
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return time.perf_counter() - t0


class InProcessEngine:
    """The same engine and settings as a replica, in this process, for the side-by-side comparison."""

    def __init__(self, threads: int):
        import torch

        from app.config import app_settings_from_config, load_serve_config
        from app.engine.engine import LLMEngine

        torch.set_num_threads(threads)
        self.engine = LLMEngine(app_settings_from_config(load_serve_config(ROOT / "serve_config.yaml")).engine_config())
        self.request(2)  # warm-up

    def request(self, num_tokens: int) -> float:
        from app.engine.config import SamplingParams

        t0 = time.perf_counter()
        self.engine.generate([PROMPT], SamplingParams(max_tokens=num_tokens, ignore_eos=True), chat=True)
        return time.perf_counter() - t0


def http_request(http: httpx.Client, num_tokens: int, stream: bool) -> tuple[float, float]:
    """(client wall, engine-side arrival-to-last-token) for one greedy chat request; the difference is what
    the Serve path (HTTP, proxy, ingress, handle, queues) adds to this very request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": num_tokens,
            "ignore_eos": True, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    if stream:
        slo = None
        with http.stream("POST", f"{BASE_URL}/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if '"slo":{' in line:
                    slo = json.loads(line.removeprefix("data: "))["slo"]
    else:
        resp = http.post(f"{BASE_URL}/v1/chat/completions", json=body)
        assert resp.json()["usage"]["completion_tokens"] == num_tokens, resp.text
        slo = resp.json()["slo"]
    wall = time.perf_counter() - t0
    engine_s = (slo["ttft_ms"] + slo["tpot_ms"] * (num_tokens - 1)) / 1e3
    return wall, engine_s


def overhead(threads: int, num_tokens: int, reps: int) -> None:
    """Interleaved (engine in-process, HTTP, HTTP stream) rounds, so that all three see the same background load."""
    local = InProcessEngine(threads)
    rows: dict[str, list[float]] = {"in-process": [], "http": [], "http engine-side": [], "sse": [],
                                    "sse engine-side": []}
    with httpx.Client(timeout=300) as http:
        http_request(http, 2, stream=False)  # warm-up
        for _ in range(reps):
            rows["in-process"].append(local.request(num_tokens))
            wall, engine_s = http_request(http, num_tokens, stream=False)
            rows["http"].append(wall)
            rows["http engine-side"].append(engine_s)
            wall, engine_s = http_request(http, num_tokens, stream=True)
            rows["sse"].append(wall)
            rows["sse engine-side"].append(engine_s)
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    added = {k: statistics.median([w - e for w, e in zip(rows[k], rows[f"{k} engine-side"])]) * 1e3
             for k in ("http", "sse")}
    print(f"overhead, {num_tokens} greedy tokens, {reps} interleaved rounds (medians): engine in-process "
          f"{med['in-process']:.0f} ms; HTTP non-stream {med['http']:.0f} ms (Serve path adds {added['http']:.0f} ms "
          f"= {added['http'] / num_tokens:.1f} ms/token over the replica's own time); HTTP stream {med['sse']:.0f} ms "
          f"(adds {added['sse']:.0f} ms = {added['sse'] / num_tokens:.1f} ms/token)", flush=True)
    del local
    gc.collect()


async def _one_stream(http: httpx.AsyncClient, num_tokens: int) -> tuple[int, float | None]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": num_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", f"{BASE_URL}/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if ttft is None and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t0
            if '"usage":{' in line:
                tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
    return tokens, ttft


async def _load(concurrency: int, num_requests: int, num_tokens: int, limit_s: float) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + limit_s

    async def worker(http: httpx.AsyncClient) -> tuple[int, float | None]:
        async with sem:
            if time.perf_counter() > deadline:
                return 0, None
            return await _one_stream(http, num_tokens)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=limit_s + 60, limits=limits) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(http) for _ in range(num_requests)))
        wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in results)
    ttfts = [x for _, x in results if x is not None]
    return {"requests": sum(1 for t, _ in results if t), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "median_ttft_s": statistics.median(ttfts) if ttfts else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and requests")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold start (re-quantises weights)")
    parser.add_argument("--skip-throughput", action="store_true", help="stop after the overhead measurement")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in all (default: serve_config.yaml's replica_torch_threads); "
                             "use 1 on a machine shared with other jobs, where spinning OpenMP threads stall")
    args = parser.parse_args()
    default_threads = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"].get(
        "replica_torch_threads") or 1  # null: Ray gives a 0.5-CPU actor OMP_NUM_THREADS=1
    threads = args.threads or default_threads
    reps, num_tokens = (3, 16) if args.quick else (5, 32)
    concurrency, num_requests, load_tokens, limit_s = (16, 16, 32, 300) if args.quick else (16, 32, 64, 420)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch threads {threads}; "
          f"logs in {tmp}", flush=True)

    if not args.skip_cold:
        with tempfile.TemporaryDirectory(prefix="adaserve_cache_") as cache:
            server = Server(write_config(tmp, threads), env={"ADASERVE_CACHE_DIR": cache})
            try:
                cold_s = server.wait_first_answer()
            finally:
                stop_s = server.stop()
        print(f"start-up cold (fresh Ray, empty weight cache): {cold_s:.1f} s to first answer; "
              f"SIGINT to exit {stop_s:.1f} s", flush=True)

    server = Server(write_config(tmp, threads))
    try:
        warm_s = server.wait_first_answer()
        print(f"start-up warm (fresh Ray, cached weights): {warm_s:.1f} s to first answer", flush=True)
        overhead(threads, num_tokens, reps)
        if args.skip_throughput:
            return 0
        one = asyncio.run(_load(concurrency, num_requests, load_tokens, limit_s))
    finally:
        server.stop()
    print(f"1 replica : {one['requests']} x {load_tokens} tokens at {concurrency} streams: "
          f"{one['tokens_per_s']:.1f} tok/s, median TTFT {one['median_ttft_s']:.2f} s, wall {one['wall_s']:.1f} s",
          flush=True)

    server = Server(write_config(tmp, threads, num_replicas=2))
    try:
        server.wait_first_answer()
        two = asyncio.run(_load(concurrency, num_requests, load_tokens, limit_s))
    finally:
        server.stop()
    print(f"2 replicas: {two['requests']} x {load_tokens} tokens at {concurrency} streams: "
          f"{two['tokens_per_s']:.1f} tok/s, median TTFT {two['median_ttft_s']:.2f} s, wall {two['wall_s']:.1f} s "
          f"({two['tokens_per_s'] / one['tokens_per_s']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
