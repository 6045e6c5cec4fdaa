"""Time ``tree_selection.select`` on realistic candidate trees and compare it with a target step.

    python -m bench.selection_overhead --requests 256 --nodes 64 --step-ms 100

Trees are drafted the way the engine's beam drafter does: ``depth`` levels of ``nodes / depth`` nodes, each
level's parents drawn among the previous level (best-first, as a beam keeps high path probabilities), draft
probabilities from a Beta so that f spans several orders of magnitude. SLOs mix three classes (tight,
medium, none) with decode progress around their targets, so both selection phases do real work.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from policies import token_tree
from policies.tree_selection import SLOState, select


def random_candidate_trees(
    rng: np.random.Generator, num_requests: int, num_nodes: int, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(path_prob float32, parent, valid), each [R, M]: beam-shaped trees, parents-first, all slots valid."""
    r, m = num_requests, num_nodes
    per_level = max(1, m // depth)
    level = np.minimum(np.arange(m) // per_level, depth - 1)
    level_start = np.searchsorted(level, np.arange(depth))
    parent = np.full((r, m), -1, dtype=np.int64)
    for lvl in range(1, depth):
        cols = np.nonzero(level == lvl)[0]
        lo, hi = level_start[lvl - 1], level_start[lvl]
        # skew towards the best (first) nodes of the previous level, as a beam does
        u = rng.random((r, cols.size)) ** 2
        parent[:, cols] = lo + (u * (hi - lo)).astype(np.int64)
    draft_prob = rng.beta(2.0, 1.5, size=(r, m))
    valid = np.ones((r, m), dtype=bool)
    # float32, as the drafter's torch tensors come (float64 input costs select one conversion)
    return token_tree.path_probs(parent, draft_prob, valid).astype(np.float32), parent, valid


def random_slo_state(rng: np.random.Generator, num_requests: int, t_step_s: float) -> SLOState:
    """Mixed SLO classes; o_r around the on-target count so that A(r) spans [1, d + 1]."""
    tpot_s = rng.choice([0.6 * t_step_s, 1.2 * t_step_s, np.inf], size=num_requests, p=[0.4, 0.3, 0.3])
    decode_time_s = rng.uniform(0.5, 5.0, size=num_requests)
    on_target = np.where(np.isfinite(tpot_s), decode_time_s / np.where(np.isfinite(tpot_s), tpot_s, 1.0), 10.0)
    decoded = np.maximum(on_target + rng.normal(0.0, 2.0, size=num_requests), 1.0).round()
    return SLOState(decode_time_s, decoded, tpot_s)


def time_select(policy: str, args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(wall, thread CPU) seconds per call over ``args.runs`` calls, each on a fresh random batch (inputs
    built outside the clock). CPU time leaves out the time this process waits for a core on a shared
    machine; wall time is what a step pays."""
    t_step_s = args.step_ms / 1e3
    times, cpu_times = [], []
    for i in range(args.runs + args.warmup):
        f, parent, valid = random_candidate_trees(rng, args.requests, args.nodes, args.depth)
        slo = random_slo_state(rng, args.requests, t_step_s)
        t0, c0 = time.perf_counter(), time.thread_time()
        keep = select(policy, f, parent, valid, slo, args.budget, t_step_s, args.depth, args.n_max)
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        if i >= args.warmup:
            times.append(dt)
            cpu_times.append(dc)
        if i == 0 and not token_tree.is_valid_tree(parent, keep):
            raise AssertionError(f"{policy} produced an invalid tree")
    return np.asarray(times), np.asarray(cpu_times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--nodes", type=int, default=64, help="candidate slots per request (M)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--budget", type=int, default=None, help="node budget; default 4 x requests")
    p.add_argument("--n-max", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=100.0, help="measured target step time to compare with")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--policies", default="adaserve,dynamic-tree,static-tree,chain:4")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.budget is None:
        args.budget = 4 * args.requests
    rng = np.random.default_rng(args.seed)
    print(f"select() on {args.requests} requests x {args.nodes} candidates, depth {args.depth}, "
          f"budget {args.budget} nodes, n_max {args.n_max}, {args.runs} runs; step {args.step_ms:g} ms")
    print(f"{'policy':<14} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'cpu med ms':>11} {'% of step':>10}")
    for policy in args.policies.split(","):
        wall_s, cpu_s = time_select(policy, args, rng)
        ms, cpu_ms = wall_s * 1e3, cpu_s * 1e3
        med = float(np.median(ms))
        print(f"{policy:<14} {med:>10.3f} {np.percentile(ms, 90):>8.3f} {ms.min():>8.3f} "
              f"{np.median(cpu_ms):>11.3f} {100 * med / args.step_ms:>9.3f}%")
    print("% of step = median wall time / --step-ms; cpu = this thread's CPU time (excludes waiting for a core)")


if __name__ == "__main__":
    main()
