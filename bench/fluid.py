"""Fluid ceiling on goodput for schedules that keep every request on its TPOT SLO (in expectation).

The simulator shows what our step rule does; this asks what any schedule of the same shape could do. Every step
has the same make-up: each class c gets k_c draft nodes per request (a chain at per-token acceptance a, so
``g(k) = 1 + a (1 - a^k) / (1 - a)`` tokens per step), Little's law gives the decoding requests per class
(``rate x output tokens / g x step time``), the step's time is the latency model's at its token count plus the
draft forwards (one per level) and the host's time, and every class must be on its SLO with ``margin``
(``step time / g <= margin x SLO``). What such a step leaves for prefill, per second, against what the workload
offers, bounds how fast all requests can be served on their SLOs: goodput <= output tokens / that time.

It ignores acceptance variance (``margin`` < 1 stands in for it), queueing and startup; a schedule that gives
up some requests is not bounded by it.

CLI: ``python -m bench.fluid --rate 10 [--tokens-per-step 2.3] [--margins 1 0.95 0.9]``.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import numpy as np

from bench.simulate import Profile, roofline_70b, synthetic_requests
from policies.budget import chain_tokens


@dataclass(frozen=True)
class ClassLoad:
    rate_per_s: float
    output_tokens: float
    tpot_slo_s: float


@dataclass(frozen=True)
class FluidStep:
    prefill_tokens_per_s: float
    nodes_per_request: dict[str, int]
    step_tokens: int
    step_s: float
    decoding_requests: float


def best_step(profile: Profile, classes: dict[str, ClassLoad], acceptance: float, margin: float = 1.0,
              max_step_tokens: int = 512, max_nodes: int = 8, context_per_request: float = 500.0) -> FluidStep | None:
    """The step make-up with the most prefill per second that keeps every class on its SLO; None if none does."""
    best = None
    names = list(classes)
    for ks in itertools.product(range(max_nodes + 1), repeat=len(names)):
        k = dict(zip(names, ks))
        g = {c: chain_tokens(k[c], acceptance) for c in names}
        levels = max(ks)
        for n in range(16, max_step_tokens + 1, 4):
            t = 0.1
            for _ in range(100):  # decoding requests grow with the step time, and the draft's cost with them
                d = {c: classes[c].rate_per_s * classes[c].output_tokens / g[c] * t for c in names}
                dt = sum(d.values())
                t_next = (float(profile.target.predict(n, dt * context_per_request)) + profile.overhead_s
                          + (levels * (profile.draft_level_s + profile.draft_token_s * dt) + profile.spec_overhead_s
                             if levels else 0.0))
                if abs(t_next - t) < 1e-7:
                    break
                t = t_next
            prefill = n - dt - sum(d[c] * k[c] for c in names)
            if prefill <= 0 or any(t / g[c] > margin * classes[c].tpot_slo_s for c in names):
                continue
            if best is None or prefill / t > best.prefill_tokens_per_s:
                best = FluidStep(prefill / t, k, n, t, dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("-n", "--num-requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=float, default=2.3,
                    help="tokens a speculating request gains per step (the simulator's acc/step)")
    ap.add_argument("--baseline-goodput", type=float, default=None, help="to print the ceiling as a ratio")
    ap.add_argument("--margins", type=float, nargs="+", default=[1.0, 0.95, 0.9])
    args = ap.parse_args()
    profile = roofline_70b()
    reqs = synthetic_requests(args.num_requests, args.rate, profile, max_tokens_cap=args.max_tokens)
    span_s = max(r.arrival_s for r in reqs)
    classes = {c: ClassLoad(sum(r.slo_class == c for r in reqs) / span_s,
                            float(np.mean([r.max_tokens for r in reqs if r.slo_class == c])),
                            next(r.tpot_slo_ms for r in reqs if r.slo_class == c) / 1e3)
               for c in sorted({r.slo_class for r in reqs})}
    offered = sum(r.prompt_tokens for r in reqs) / span_s
    output = sum(r.max_tokens for r in reqs)
    e = args.tokens_per_step - 1.0
    a = e / (1.0 + e)
    print(f"{profile.name}, {args.rate} req/s: offered prefill {offered:.0f} tok/s, output {output / span_s:.0f} tok/s "
          f"over {span_s:.0f} s; chain acceptance {a:.3f}")
    for margin in args.margins:
        s = best_step(profile, classes, a, margin, args.max_batched_tokens)
        if s is None:
            print(f"margin {margin}: no step keeps every class on its SLO")
            continue
        wall_s = span_s * max(1.0, offered / s.prefill_tokens_per_s)
        gp = output / wall_s
        ratio = f" = {gp / args.baseline_goodput:.2f}x the baseline" if args.baseline_goodput else ""
        print(f"margin {margin}: {s.prefill_tokens_per_s:.0f} prefill tok/s with nodes {s.nodes_per_request}, "
              f"{s.step_tokens}-token steps of {s.step_s * 1e3:.0f} ms, {s.decoding_requests:.0f} decoding -> all on "
              f"their SLO by {wall_s:.0f} s, goodput <= {gp:.0f} tok/s{ratio}")


if __name__ == "__main__":
    main()
