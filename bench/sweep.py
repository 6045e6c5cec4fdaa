"""The whole baseline comparison in one command: every policy x every arrival rate on the same workload.

    python -m bench.sweep --mode engine   # in-process engine, arrival-driven (default; cheapest on a CPU)
    python -m bench.sweep --mode http     # the Ray Serve app: one `serve run` per policy (engine.policy in
                                          # the YAML), the async streaming load driver against it

Both modes drive the same engine code with the same policies and workload (bench/workloads.py: HumanEval,
ShareGPT + MT-Bench, long ShareGPT summaries; 60/20/20; Poisson or gamma arrivals). SLOs are relative to the
unloaded TPOT measured once (policy none, batch 1, as the replica measures it) and sent as absolute ms, so
every policy faces the same targets; every request also has the server's default TTFT SLO (10x its prompt's idle
prefill + 1 s; ``--no-ttft`` for the paper's TPOT-only setting), and the summaries report attainment both ways
(TTFT+TPOT and TPOT only), refusals counting as misses. A policy name may carry the simulator's ``+`` options
(``bench.simulate.POLICY_OPTIONS``), e.g. ``adaserve+noadmission`` (FIFO prefill, no fail fast: the ablation of the
TTFT scheduling) or ``dynamic-tree+slochunk`` (the SLO pace plan under another policy). ``--interleave K`` runs
each rate's workload as K blocks of consecutive arrivals, every policy on a block before the next block, so that a
change in the shared machine's speed over the minutes of a sweep falls on every policy alike; every run starts with
an empty prefix cache, so none finds the prompts the runs before it prefilled. ``--cell-duration-s S`` gives every rate
at least S seconds of arrivals, so that a high rate is judged over as long a span as a low one. Outputs under
``--out`` (default bench/runs/sweep-<time>/): requests.jsonl (one line per request), summary.json / summary.csv
(per policy x rate x class), steps.json (per-run step statistics), profile_cpu.json (the latency profile the
simulator uses), the acceptance trace of the speculative runs (trace.jsonl), and the plots (bench/plots.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from app.engine.step import StepTotals
from bench.loadgen import format_summary, run_engine, run_http, server_accepted_tokens_per_step, summarize, write_jsonl
from bench.paths import run_dir
from bench.simulate import split_policy_options
from bench.workloads import CATEGORIES, build_workload, slo_targets_ms
from policies.admission import OfferedPrefill

POLICIES = ["none", "chain:4", "chain:6", "chain:8", "static-tree", "dynamic-tree", "adaserve"]


def measure_unloaded_tpot_s(engine, num_tokens: int = 8, probes: int = 3) -> float:
    """As the replica does (app/replica.py): best of a few short greedy requests on the idle engine, no
    speculation (policy none), after a 2-token warm-up."""
    from app.engine.config import SamplingParams

    engine.generate(["Hello"], SamplingParams(max_tokens=2, ignore_eos=True), policy="none")
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    return min(float(engine.generate(["Hello"], params, policy="none")[0].metrics.tpot_s) for _ in range(probes))


def profile_draft(engine, shapes=((1, 1, 1), (1, 4, 4), (4, 1, 4), (4, 4, 4), (8, 1, 4), (8, 4, 1), (16, 2, 4)),
                  context: int = 128, repeats: int = 2) -> tuple[float, float]:
    """(seconds per draft level, seconds per drafted token) from timing the real drafter on (requests, depth,
    beam) shapes after its catch-up, least squares on t = levels * a + tokens * b."""
    from app.engine.speculative import DraftRequest

    drafter = engine.speculator.drafter
    rows, ts = [], []
    for n, depth, beam in shapes:
        reqs = [DraftRequest(f"prof-{n}-{depth}-{beam}-{i}", [1 + (i * 7 + j) % 500 for j in range(context)])
                for i in range(n)]
        if drafter.uses_features:  # a feature draft reads the target's hidden states
            import torch

            for r in reqs:
                drafter.record_hidden(r.request_id, 0, torch.randn(context, engine.model_config.hidden_size,
                                                                   dtype=engine.dtype))
        drafter.propose(reqs, depth=depth, beam_width=beam, topk=beam)  # catch-up (prompt) not timed
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            drafter.propose(reqs, depth=depth, beam_width=beam, topk=beam)
            best = min(best, time.perf_counter() - t0)
        for r in reqs:
            drafter.release(r.request_id)
        tokens = n * (1 + (depth - 1) * beam)  # root level, then beam frontier nodes per level
        rows.append([depth, tokens])
        ts.append(best)
    coef, *_ = np.linalg.lstsq(np.asarray(rows, float), np.asarray(ts), rcond=None)
    return float(max(coef[0], 0.0)), float(max(coef[1], 0.0))


def step_overheads(steps: list[dict]) -> tuple[float, float]:
    """(host overhead of a plain step, extra of a speculating step) from the engine's StepResults."""
    plain = [s["step_s"] - s["verify_s"] - s["draft_s"] for s in steps if s["num_tree_nodes"] == 0]
    spec = [s["step_s"] - s["verify_s"] - s["draft_s"] for s in steps if s["num_tree_nodes"] > 0]
    base = float(np.median(plain)) if plain else 0.0
    return base, max(float(np.median(spec)) - base, 0.0) if spec else 0.0


def write_summaries(out: Path, rows: list[dict]) -> None:
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    keys = ["policy", "rate", "class", "requests", "attainment", "attainment_tpot", "goodput_tok_s",
            "goodput_tpot_tok_s", "goodput_req_s", "throughput_tok_s", "ttft_s_p50", "ttft_s_p90", "ttft_s_p99",
            "tpot_s_p50", "tpot_s_p90", "tpot_s_p99", "accepted_tokens_per_step", "rejected", "errors"]
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for row in rows:
            for cls, b in row["summary"].items():
                if cls == "wall_s":
                    continue
                w.writerow([row["policy"], row["rate"], cls] + [
                    (round(b[k], 5) if isinstance(b[k], float) else b[k]) for k in keys[3:]])


def sweep_engine(args) -> None:
    import torch

    from app.engine.config import EngineConfig
    from app.engine.engine import LLMEngine
    from app.engine.profiler import profile_target
    from bench.loadgen import encode_chat
    from bench.traces import TraceRecorder

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("requests.jsonl", "trace.jsonl", "trace.jsonl.gz"):
        (out / name).unlink(missing_ok=True)
    engine = LLMEngine(EngineConfig(draft=args.draft, policy="none", device="cpu", kv_cache_memory_gb=1.0,
                                    max_num_seqs=args.max_num_seqs, token_budget=args.token_budget,
                                    profile_latency=False))
    base_config = engine.config
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # a fresh profile, under today's load, not a cached one
        target = profile_target(engine.runner, "embedded", Path(tmp))
    engine.scheduler.latency_model = target  # t_step for A(r), as the engine would have profiled it
    level_s, token_s = profile_draft(engine)
    unloaded = measure_unloaded_tpot_s(engine)
    print(f"profiled in {time.perf_counter() - t0:.0f} s: unloaded TPOT {unloaded * 1e3:.1f} ms; target 1 tok "
          f"{target.predict(1, 256) * 1e3:.0f} ms, 32 tok x 8 req {target.predict(32, 8 * 256) * 1e3:.0f} ms; "
          f"draft {level_s * 1e3:.1f} ms/level + {token_s * 1e3:.2f} ms/token; token budget {engine.token_budget}",
          flush=True)
    slo_ms = slo_targets_ms(unloaded * 1e3, dict(zip(CATEGORIES, args.absolute_ms)) if args.absolute_ms else None)
    rows, step_rows = [], []
    recorder = None
    all_steps: list[dict] = []
    meta = {"unloaded_tpot_ms": unloaded * 1e3, "slo_ms": slo_ms, "token_budget": engine.token_budget,
            "num_requests": args.num_requests, "cell_duration_s": args.cell_duration_s, "rates": args.rates,
            "policies": args.policies, "seed": args.seed, "max_tokens": args.max_tokens, "arrival": args.arrival,
            "cv": args.cv, "mode": "engine", "threads": args.threads, "max_num_seqs": args.max_num_seqs}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    current = {"policy": "", "workload": []}

    recorder = TraceRecorder(engine, out / "trace.jsonl", policy_of=lambda rid: current["policy"],
                             category_of=lambda rid: current["workload"][int(rid)].slo_class)
    for rate in args.rates:
        wl = build_workload(cell_requests(args.num_requests, rate, args.cell_duration_s), rate=rate, seed=args.seed,
                            mix=tuple(args.mix), arrival=args.arrival,
                            cv=args.cv, max_tokens_cap=args.max_tokens, prompt_char_cap=args.prompt_chars)
        prompt_ids = [encode_chat(engine, r.messages) for r in wl]
        runs = {pol: ([], []) for pol in args.policies}  # policy -> (records, steps) over its blocks
        blocks = arrival_blocks([r.arrival_s for r in wl], args.interleave)
        for b, idx in enumerate(blocks):
            # block b: every policy serves the same requests (arrivals from the block's first one), in an order that
            # rotates from block to block, so that a drift of the machine's speed falls on all policies alike
            t_block = wl[idx[0]].arrival_s
            sub = [dataclasses.replace(wl[i], arrival_s=wl[i].arrival_s - t_block) for i in idx]
            current["workload"] = sub
            k = b % len(args.policies)
            for pol in args.policies[k:] + args.policies[:k]:
                current["policy"] = pol
                start_run(engine, base_config, pol)
                t_run = time.perf_counter()
                recs, steps = run_engine(engine, sub, pol.split("+")[0], slo_ms, max_duration_s=args.max_duration,
                                         prompt_ids=[prompt_ids[i] for i in idx], ttft=None if args.no_ttft else
                                         (args.ttft_x_prefill, args.ttft_allowance_ms))
                for rec in recs:
                    rec.policy = pol
                    rec.shift(t_block)
                runs[pol][0].extend(recs)
                runs[pol][1].extend(steps)
                if len(blocks) > 1:
                    print(f"{pol} @ {rate} req/s, block {b + 1}/{len(blocks)}: {len(recs)} requests in "
                          f"{time.perf_counter() - t_run:.0f} s", flush=True)
                recorder.flush()  # write what we have; keep recording
        for pol in args.policies:
            recs, steps = runs[pol]
            recs.sort(key=lambda r: r.index)
            s = summarize(recs)
            steps_d = [{k: getattr(st, k) for k in ("num_tokens", "num_decodes", "num_trees", "num_tree_nodes",
                                                     "num_accepted", "draft_s", "select_s", "verify_s", "accept_s",
                                                     "step_s")} for st in steps]
            all_steps += steps_d
            write_jsonl(out / "requests.jsonl", recs, {"rate": rate})
            rows.append({"policy": pol, "rate": rate, "summary": s})
            step_rows.append({"policy": pol, "rate": rate, "num_steps": len(steps_d),
                              **{f"mean_{k}": float(np.mean([d[k] for d in steps_d])) if steps_d else None
                                 for k in ("num_tokens", "num_decodes", "num_tree_nodes", "num_accepted", "draft_s",
                                           "verify_s", "step_s")}})
            print(format_summary(s, f"{pol} @ {rate} req/s"), flush=True)
            write_summaries(out, rows)
    recorder.close()
    from bench.traces import gzip_file

    gzip_file(out / "trace.jsonl")
    overhead, spec_overhead = step_overheads(all_steps)
    from bench.simulate import Profile

    profile = Profile(f"cpu-smollm2-135m-{args.draft.replace(',', '+')}", target, level_s, token_s, overhead, spec_overhead)
    (out / "profile_cpu.json").write_text(json.dumps({**profile.to_dict(), "unloaded_tpot_ms": unloaded * 1e3},
                                                     indent=1))
    (out / "steps.json").write_text(json.dumps(step_rows, indent=1))
    (out / "step_samples.json").write_text(json.dumps(
        [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()} for d in all_steps]))
    print(f"host overhead per step {overhead * 1e3:.1f} ms (+{spec_overhead * 1e3:.1f} ms when speculating)")


def start_run(engine, base_config, policy: str) -> None:
    """Set up the idle engine for one policy's run on a block that other policies served before it.

    - the policy's engine options (its ``+`` suffixes) over the sweep's base configuration;
    - overload shedding judges the load this run offers, not what the previous runs left;
    - a cold prefix cache: the previous runs prefilled the same prompts, and a run that found them cached would
      skip most of its prefill, the very work that overloads this CPU. Within a run the cache works as served;
    - no measured gain per step: the scheduler prices tree nodes, the pace plan and admission with the tokens a
      tree has gained over the replica's life (``StepTotals``), and another policy's trees (dynamic-tree fills the
      step budget) gain differently from this one's. Each run measures its own, as a fresh replica does."""
    engine.config = engine.scheduler.config = dataclasses.replace(base_config, **_policy_options(policy))
    engine.scheduler.offered_prefill = OfferedPrefill()
    engine.scheduler.totals = StepTotals()
    engine.kv.reset_prefix_cache()


def cell_requests(num_requests: int, rate_rps: float, cell_duration_s: float | None) -> int:
    """Requests in one rate's cell: ``num_requests``, or more so that arrivals span ``cell_duration_s``.

    A fixed count gives a high rate only a few seconds of arrivals, too short for a queue to build: an overloaded
    policy then looks as good as its first seconds. Equal durations judge every rate over the same span."""
    if cell_duration_s is None:
        return num_requests
    return max(num_requests, int(np.ceil(rate_rps * cell_duration_s - 1e-9)))  # 0.7 x 60 is 42, not 43


def arrival_blocks(arrival_s: list[float], num_blocks: int) -> list[np.ndarray]:
    """Indices of the requests in ``num_blocks`` blocks of consecutive arrivals (sizes differ by at most one)."""
    order = np.argsort(np.asarray(arrival_s, np.float64), kind="stable")
    return [b for b in np.array_split(order, max(int(num_blocks), 1)) if b.size]


def _policy_options(policy: str) -> dict:
    """The engine options a policy name's ``+`` suffixes set (``bench.simulate.split_policy_options``, the
    simulator's table): ``adaserve+noadmission`` is adaserve with ``ttft_admission: false``. A bad name exits."""
    try:
        return split_policy_options(policy)[1]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _http_config(tmp: Path, policy: str, token_budget: int | None, threads: int, max_num_seqs: int,
                 draft: str) -> Path:
    from bench import serve as serve_bench

    path = serve_bench.write_config(tmp, threads)
    import yaml

    raw = yaml.safe_load(path.read_text())
    eng = raw["applications"][0]["args"]["engine"]
    base = policy.split("+")[0]
    eng.update({"policy": base, "draft": draft if base != "none" else None, "max_num_seqs": max_num_seqs,
                **_policy_options(policy)})
    if token_budget is not None:
        eng["token_budget"] = token_budget
    out = tmp / f"serve_{policy.replace(':', '_').replace('+', '_')}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def sweep_http(args) -> None:
    from bench import serve as serve_bench

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.jsonl").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    rows = []
    slo_ms = None
    if args.absolute_ms:
        slo_ms = dict(zip(CATEGORIES, args.absolute_ms))
    elif args.unloaded_tpot_ms:
        slo_ms = slo_targets_ms(args.unloaded_tpot_ms)
    for pol in args.policies:
        server = serve_bench.Server(_http_config(tmp, pol, args.token_budget, args.threads, args.max_num_seqs,
                                                    args.draft))
        try:
            print(f"{pol}: server up in {server.wait_first_answer():.0f} s (logs {tmp})", flush=True)
            for rate in args.rates:
                wl = build_workload(cell_requests(args.num_requests, rate, args.cell_duration_s), rate=rate,
                                    seed=args.seed, mix=tuple(args.mix),
                                    arrival=args.arrival, cv=args.cv, max_tokens_cap=args.max_tokens,
                                    prompt_char_cap=args.prompt_chars)
                # None: the server resolves relative classes against ITS unloaded TPOT (the first server's
                # figure is then reused as absolute ms for the others, so all policies face the same targets)
                recs = asyncio.run(run_http(serve_bench.BASE_URL, wl, pol, slo_ms, max_duration_s=args.max_duration))
                if slo_ms is None:
                    per = {}
                    for r in recs:
                        if r.tpot_slo_ms is not None:
                            per[r.slo_class] = r.tpot_slo_ms
                    if len(per) == len(CATEGORIES):
                        slo_ms = per
                s = summarize(recs)
                acc = server_accepted_tokens_per_step(serve_bench.BASE_URL)
                if acc is not None:
                    s["overall"]["server_accepted_tokens_per_step"] = acc
                write_jsonl(out / "requests.jsonl", recs, {"rate": rate})
                rows.append({"policy": pol, "rate": rate, "summary": s})
                write_summaries(out, rows)
                print(format_summary(s, f"{pol} @ {rate} req/s (HTTP)"), flush=True)
        finally:
            server.stop()
    (out / "meta.json").write_text(json.dumps({"mode": "http", "slo_ms": slo_ms, "rates": args.rates,
                                               "policies": args.policies, "num_requests": args.num_requests,
                                               "cell_duration_s": args.cell_duration_s, "seed": args.seed,
                                               "max_tokens": args.max_tokens}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["engine", "http"], default="engine")
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("-n", "--num-requests", type=int, default=16)
    ap.add_argument("--cell-duration-s", type=float, default=None,
                    help="at least this many seconds of arrivals per rate (more requests at higher rates than -n)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-chars", type=int, default=1200)
    ap.add_argument("--mix", type=float, nargs=3, default=(0.6, 0.2, 0.2))
    ap.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-budget", type=int, default=24,
                    help="engine step token budget (roots included); the profiled default is ~2 on this CPU")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--draft", default="feature,ngram", help="draft sources for the engine (e.g. feature, distilled,ngram)")
    ap.add_argument("--max-duration", type=float, default=150.0, help="per run (policy x rate x block)")
    ap.add_argument("--interleave", type=int, default=1, metavar="K",
                    help="split each rate's workload into K blocks of consecutive arrivals and run every policy on "
                         "block 1, then block 2, ... (policy order rotating): ratios between policies then see the "
                         "same machine; each run starts from an idle engine with a cold prefix cache")
    ap.add_argument("--absolute-ms", type=float, nargs=3, default=None, metavar=("CODING", "CHAT", "SUMM"))
    ap.add_argument("--ttft-x-prefill", type=float, default=10.0,
                    help="every request's TTFT SLO: this x the idle prefill time of its prompt ... (the server's default)")
    ap.add_argument("--ttft-allowance-ms", type=float, default=1000.0, help="... plus this allowance")
    ap.add_argument("--no-ttft", action="store_true", help="TPOT SLOs only (the paper's setting)")
    ap.add_argument("--unloaded-tpot-ms", type=float, default=None, help="http mode: reuse this baseline")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", type=Path, default=run_dir("sweep"), help="default: a fresh bench/runs/sweep-<time>/")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    if args.mode == "http" and args.interleave != 1:
        ap.error("--interleave applies to --mode engine (an HTTP run starts one server per policy)")
    if args.interleave < 1:
        ap.error(f"--interleave must be >= 1, got {args.interleave}")
    if args.cell_duration_s is not None and not args.cell_duration_s > 0:
        ap.error(f"--cell-duration-s must be > 0, got {args.cell_duration_s}")
    for pol in args.policies:
        _policy_options(pol)  # a misspelled option fails before any run
    (sweep_engine if args.mode == "engine" else sweep_http)(args)
    if not args.no_plots:
        from bench.plots import plot_sweep

        for p in plot_sweep(args.out / "summary.json", args.out):
            print(f"plot: {p}")


if __name__ == "__main__":
    main()
