"""Soak test (prints figures): `python -m bench.soak --minutes 20 [--workers 6] [--url URL]`.

Mixed traffic for N minutes against `serve run serve_config.yaml` (started here on its own port, or a running server
with --url): normal chat and completion requests, streamed and not, with and without SLOs, interleaved with odd
inputs (bodies that are not JSON, unknown fields, impossible limits, prompts past the context window, tiny
temperatures, long stop strings) and clients that disconnect mid-stream. It samples the replicas' resident memory
and KV blocks from /metrics every --sample-s seconds and prints:

- requests by kind and HTTP status; the 5xx count (a 5xx, or an in-band server_error on a normal request);
- RSS growth of each replica after warm-up (first sample after --warmup-min minutes vs the last);
- KV blocks leaked: after the traffic stops and the replicas go idle, total - free blocks (must be 0).

Goal: zero 5xx, zero leaked blocks, RSS growth < 5% after warm-up. Writes samples.jsonl, summary.json and
soak.png (RSS and KV use over time) to a fresh bench/runs/soak-<time>/.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.paths import run_dir
from bench.serve import MODEL, Server, write_config

PROMPTS = ["Explain why the sky is blue.", "Write a haiku about autumn.", "List three prime numbers.",
           "def fibonacci(n):", "Summarise: the quick brown fox jumps over the lazy dog. " * 6,
           "Translate to French: good morning", "What is 17 * 23?", "Name a city in Japan."]


def _chat(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def _completion(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, **fields}


class Traffic:
    """Worker threads sending weighted random scenarios until stopped; outcomes counted under a lock."""

    def __init__(self, base_url: str, headers: dict[str, str], seed: int):
        self.base_url, self.headers = base_url, headers
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()  # (scenario, status)
        self.failures: list[dict[str, Any]] = []  # 5xx and in-band server errors, with what was sent
        self.stop = threading.Event()
        # (weight, name, is_normal, body maker, path, stream, disconnect after n chunks)
        self.scenarios: list[tuple[float, str, Callable[[random.Random], dict], str, bool, int | None]] = [
            (30, "chat", lambda r: _chat(r.choice(PROMPTS), max_tokens=r.randint(8, 48)), "chat", False, None),
            (20, "chat-stream", lambda r: _chat(r.choice(PROMPTS), max_tokens=r.randint(8, 48), stream=True),
             "chat", True, None),
            (10, "completion-slo", lambda r: _completion(r.choice(PROMPTS), max_tokens=r.randint(8, 32),
                                                         slo_class=r.choice(["chat", "coding", "summarization"])),
             "completion", False, None),
            (6, "disconnect", lambda r: _chat(r.choice(PROMPTS), max_tokens=200, stream=True), "chat", True, 2),
            (3, "tiny-temperature", lambda r: _completion(r.choice(PROMPTS), max_tokens=8, temperature=1e-40),
             "completion", False, None),
            (3, "sampled", lambda r: _chat(r.choice(PROMPTS), max_tokens=16, temperature=0.9, top_p=0.8,
                                           seed=r.randint(0, 2**31)), "chat", False, None),
            (3, "stop-strings", lambda r: _completion(r.choice(PROMPTS), max_tokens=24, stop=[" the", "\n", "."]),
             "completion", True, None),
            (2, "bad-json", lambda r: {"__raw__": b'{"model": "x", "messages": [' + bytes([r.randint(128, 255)])},
             "chat", False, None),
            (2, "unknown-field", lambda r: _chat("hi", tools=[{"type": "function"}], max_tokens=4), "chat", False,
             None),
            (2, "huge-max-tokens", lambda r: _completion("hi", max_tokens=2**40), "completion", False, None),
            (2, "past-context", lambda r: _completion("hello " * 9000, max_tokens=4), "completion", False, None),
            (2, "long-stop", lambda r: _completion("hi", stop=["x" * 5000], max_tokens=4), "completion", False, None),
            (1, "empty-prompt", lambda r: _completion("", max_tokens=4), "completion", False, None),
            (1, "impossible-slo", lambda r: _completion("hi", max_tokens=4, ttft_slo_ms=1e-9), "completion", False,
             None),
        ]
        self.normal = {"chat", "chat-stream", "completion-slo", "disconnect", "tiny-temperature", "sampled",
                       "stop-strings"}

    def worker(self, index: int) -> None:
        rng = random.Random(self.rng.random() + index)
        weights = [s[0] for s in self.scenarios]
        with httpx.Client(timeout=httpx.Timeout(300.0)) as http:
            while not self.stop.is_set():
                _, name, make, path, stream, disconnect_after = rng.choices(self.scenarios, weights)[0]
                body = make(rng)
                url = f"{self.base_url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
                try:
                    status, server_error = self._send(http, url, body, stream, disconnect_after)
                except httpx.HTTPError as exc:
                    status, server_error = f"client-{type(exc).__name__}", None
                with self.lock:
                    self.counts[(name, status)] += 1
                    bad = status.startswith("5") or (server_error is not None and name in self.normal)
                    if bad and len(self.failures) < 200:
                        self.failures.append({"scenario": name, "status": status, "error": server_error,
                                              "body": {k: v for k, v in body.items() if k != "__raw__"}})

    def _send(self, http: httpx.Client, url: str, body: dict, stream: bool,
              disconnect_after: int | None) -> tuple[str, dict | None]:
        if "__raw__" in body:
            r = http.post(url, content=body["__raw__"], headers={**self.headers, "content-type": "application/json"})
            return str(r.status_code), None
        if not stream:
            r = http.post(url, json=body, headers=self.headers)
            return str(r.status_code), None
        with http.stream("POST", url, json={**body, "stream": True}, headers=self.headers) as r:
            if r.status_code != 200:
                r.read()
                return str(r.status_code), None
            chunks = 0
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return "200+error", chunk["error"] if chunk["error"].get("type") == "server_error" else None
                chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    return "disconnected", None  # leaving the with-block closes the connection mid-stream
        return "200", None


def replica_sample(http: httpx.Client, base_url: str, headers: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per replica: rss_bytes, kv_free_blocks, kv_total_blocks, running_requests (from /metrics)."""
    text = http.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    wanted = {"adaserve_replica_rss_bytes": "rss_bytes", "adaserve_replica_kv_free_blocks": "kv_free_blocks",
              "adaserve_replica_kv_total_blocks": "kv_total_blocks",
              "adaserve_replica_running_requests": "running_requests",
              "adaserve_replica_queue_length": "queue_length"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out.setdefault(s.labels.get("replica", "?"), {})[wanted[s.name]] = s.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--sample-s", type=float, default=15.0)
    ap.add_argument("--warmup-min", type=float, default=2.0, help="RSS growth is measured from this point on")
    ap.add_argument("--url", help="a running server (default: start `serve run serve_config.yaml` here)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--threads", type=int, default=2, help="replica torch threads when starting the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=run_dir("soak"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    server = None
    if args.url is None:
        tmp = Path(tempfile.mkdtemp(prefix="soak-"))
        server = Server(write_config(tmp, args.threads))
        print(f"started serve run; waiting for the first answer (log: {server.log.name})", flush=True)
        print(f"first answer after {server.wait_first_answer():.0f} s", flush=True)
        base_url = server.base_url
    else:
        base_url = args.url.rstrip("/")
    traffic = Traffic(base_url, headers, args.seed)
    threads = [threading.Thread(target=traffic.worker, args=(i,), daemon=True) for i in range(args.workers)]
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        with httpx.Client() as http, (args.out / "samples.jsonl").open("w") as log:
            while (elapsed := time.monotonic() - t0) < args.minutes * 60:
                time.sleep(min(args.sample_s, max(0.0, args.minutes * 60 - elapsed)))
                sample = {"t_s": round(time.monotonic() - t0, 1), "replicas": replica_sample(http, base_url, headers)}
                with traffic.lock:
                    sample["requests"] = sum(traffic.counts.values())
                    sample["failures"] = len(traffic.failures)
                samples.append(sample)
                log.write(json.dumps(sample) + "\n")
                log.flush()
                rss = ", ".join(f"{v.get('rss_bytes', 0) / 2**20:.0f} MiB" for v in sample["replicas"].values())
                print(f"[{sample['t_s']:6.0f} s] {sample['requests']} requests, {sample['failures']} failures, "
                      f"replica RSS {rss}", flush=True)
            traffic.stop.set()
            for t in threads:
                t.join(timeout=330)
            idle = _wait_idle(http, base_url, headers, timeout_s=60)
    finally:
        traffic.stop.set()
        if server is not None:
            server.stop()
    summary = _summarise(traffic, samples, idle, args)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(samples, args.out / "soak.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2))
    for f in summary["failures"][:10]:
        print("failure:", json.dumps(f)[:300])
    print(f"wrote {args.out}")


def _wait_idle(http: httpx.Client, base_url: str, headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """The replicas' state once nothing runs or waits (or after timeout_s): what a leak would leave behind."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = replica_sample(http, base_url, headers)
        busy = any(v.get("running_requests", 0) or v.get("queue_length", 0) for v in replicas.values())
        if not busy or time.monotonic() > deadline:
            return replicas
        time.sleep(1.0)


def _summarise(traffic: Traffic, samples: list[dict], idle: dict[str, dict[str, float]],
               args: argparse.Namespace) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (name, status), n in sorted(traffic.counts.items()):
        by_kind[name][status] = n
    num_5xx = sum(n for (_, status), n in traffic.counts.items() if status.startswith("5"))
    after_warmup = [s for s in samples if s["t_s"] >= args.warmup_min * 60] or samples
    rss_growth = {}
    for replica in (after_warmup[-1]["replicas"] if after_warmup else {}):
        series = [s["replicas"][replica]["rss_bytes"] for s in after_warmup
                  if "rss_bytes" in s["replicas"].get(replica, {})]
        if len(series) >= 2:
            rss_growth[replica] = {"warm_mib": round(series[0] / 2**20, 1), "end_mib": round(series[-1] / 2**20, 1),
                                   "growth_pct": round(100 * (series[-1] / series[0] - 1), 2)}
    leaked = {r: int(v.get("kv_total_blocks", 0) - v.get("kv_free_blocks", 0)) for r, v in idle.items()}
    return {"minutes": args.minutes, "workers": args.workers, "requests": sum(traffic.counts.values()),
            "num_5xx": num_5xx, "server_errors_in_band": len(traffic.failures) - num_5xx,
            "kv_blocks_leaked": leaked, "idle_running": {r: v.get("running_requests") for r, v in idle.items()},
            "rss_after_warmup": rss_growth, "by_kind": by_kind, "failures": traffic.failures}


def _plot(samples: list[dict], path: Path) -> None:
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_kv) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    replicas = sorted({r for s in samples for r in s["replicas"]})
    for replica in replicas:
        pts = [(s["t_s"] / 60, s["replicas"][replica]) for s in samples if replica in s["replicas"]]
        ax_rss.plot([t for t, _ in pts], [v.get("rss_bytes", 0) / 2**20 for _, v in pts], label=replica[-8:])
        ax_kv.plot([t for t, _ in pts], [1 - v.get("kv_free_blocks", 0) / max(v.get("kv_total_blocks", 1), 1)
                                         for _, v in pts])
    ax_rss.set_ylabel("replica RSS (MiB)")
    ax_kv.set_ylabel("KV blocks in use")
    ax_kv.set_xlabel("minutes")
    ax_rss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
