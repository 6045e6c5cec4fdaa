"""Autoscaling on a real server: `serve run serve_config.autoscale.yaml`, a load ramp (idle -> ``peak_x`` x one
replica's capacity -> idle), once with the SLO-headroom policy and once with Ray Serve's default queue-length
policy (the same YAML with ``target_ongoing_requests`` instead of ``policy``). Samples /metrics every second
(replicas reporting, the autoscaler's target and desired counts) and plots replicas, offered load, attainment and
TTFT over time (bench.plots.autoscale_plot).

CLI: ``python -m bench.autoscale --capacity-rps 0.7`` (about 10 minutes; run it under the heavy-run lock) writes
bench/runs/autoscale-*/ (records, timelines, summary.json, autoscale.png).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import run_http
from bench.paths import run_dir
from bench.serve import MODEL, PORT, ROOT, Server
from bench.simulate_cluster import (expected_arrivals, print_rule, ramp_arrivals, ramp_knots, summarize_run,
                                    write_results)
from bench.workloads import build_workload

CONFIG = ROOT / "serve_config.autoscale.yaml"


def write_config(out: Path, rule: str, target_ongoing_requests: float) -> Path:
    """The autoscale YAML on the bench port; ``queue`` swaps our policy for Serve's default rule."""
    raw = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    raw["http_options"]["port"] = PORT
    dep = {d["name"]: d for d in raw["applications"][0]["deployments"]}["LLMReplica"]
    if rule == "queue":
        del dep["autoscaling_config"]["policy"]
        dep["autoscaling_config"]["target_ongoing_requests"] = target_ongoing_requests
    path = out / f"serve_config.{rule}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sample_metrics(text: str) -> dict:
    """Replicas the router sees (those with a load gauge) and the autoscaler's published counts."""
    replicas, out = set(), {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "adaserve_replica_load_ratio":
                replicas.add(s.labels["replica"])
            elif s.name in ("adaserve_autoscaling_target_replicas", "adaserve_autoscaling_desired_replicas"):
                out[s.name.removeprefix("adaserve_autoscaling_").removesuffix("_replicas")] = int(s.value)
    return {"routing": len(replicas), **out}


async def watch(base_url: str, t0: float, stop: asyncio.Event, timeline: list[dict], period_s: float = 1.0) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            try:
                sample = sample_metrics((await client.get(f"{base_url}/metrics")).text)
                sample.setdefault("target", sample["routing"])  # the queue rule publishes no decision
                timeline.append({"t": time.perf_counter() - t0, "starting": 0, "draining": 0, **sample})
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(period_s)


async def drive(base_url: str, workload, duration_s: float) -> tuple[list, list[dict]]:
    timeline: list[dict] = []
    stop = asyncio.Event()
    t0 = time.perf_counter()
    watcher = asyncio.create_task(watch(base_url, t0, stop, timeline))
    records = await run_http(base_url, workload, "adaserve", None, model=MODEL, max_duration_s=duration_s + 120,
                             progress=False)
    await asyncio.sleep(30.0)  # the tail: the scaler's way back down
    stop.set()
    await watcher
    return [r.to_dict() for r in records], timeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", default=["slo", "queue"])
    ap.add_argument("--capacity-rps", type=float, required=True, help="one CPU replica's capacity (req/s)")
    ap.add_argument("--peak-x", type=float, default=3.0)
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--peak-s", type=float, default=100.0)
    ap.add_argument("--tail-s", type=float, default=50.0)
    ap.add_argument("--ramp-s", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--target-ongoing-requests", type=float, default=12.0,
                    help="the queue rule's target (0.75 x max_num_seqs, as the GPU YAML had it)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = run_dir("autoscale")
    out.mkdir(parents=True, exist_ok=True)
    knots = ramp_knots(args.capacity_rps, args.peak_x, args.idle_s, args.peak_s, args.tail_s, args.ramp_s)
    base = build_workload(int(expected_arrivals(knots) * 1.2) + 10, rate=1.0, seed=args.seed,
                          max_tokens_cap=args.max_tokens)
    times = ramp_arrivals(np.array([w.arrival_s for w in base]), knots)
    workload = [replace(w, arrival_s=float(t)) for w, t in zip(base, times) if np.isfinite(t)]
    window = (args.idle_s, args.idle_s + 2 * args.ramp_s + args.peak_s)
    results = {}
    for rule in args.rules:
        # PYTHONPATH: Serve's actors import this checkout's app/ and policies/ (not whichever one is installed)
        server = Server(write_config(out, rule, args.target_ongoing_requests), env={"PYTHONPATH": str(ROOT)})
        try:
            server.wait_first_answer()
            with httpx.Client(timeout=60) as client:  # the router reports replicas after its first call
                client.get(f"{server.base_url}/metrics")
            records, timeline = asyncio.run(drive(server.base_url, workload, knots[-1][0]))
        finally:
            server.stop()
        summary = summarize_run(records, timeline, window)
        summary["failed"] = sum(1 for r in records if r["error"] and not r["error"].startswith("http 429"))
        results[rule] = {"summary": summary, "timeline": timeline, "records": records}
        (out / f"records_{rule}.json").write_text(json.dumps(records))
        print_rule(rule, summary, f"failed {summary['failed']}")
    write_results(out, args, knots, results, "autoscale.png",
                  f"serve_config.autoscale.yaml on CPU: {args.peak_x:g}x one replica's capacity")


if __name__ == "__main__":
    main()
