"""Multi-source drafts in one run: the model draft alone, prompt lookup alone and both merged, per workload class
of the multi-SLO benchmark (bench/workloads.py: summarization, coding, chat); the calibration tables; and the
lookup's cost at 64 requests with 8k-token prompts as a fraction of a measured target step.

    OMP_NUM_THREADS=1 python -m bench.ngram [--requests 4] [--new-tokens 40] [--budget-per-request 16 32]

Each class's requests run together (one batch, greedy, a token budget of 16 per request by default, policy
adaserve without SLOs). The batch's prompts are prefilled in one step: with the serving default (a step of at
most 512 tokens, prefill before speculation) the first requests would decode for several steps with no budget
left for a tree while the others prefill (a third of the decode steps at 16 summarization requests), which
measures the scheduler, not the draft, and pulls every source towards 1. Accepted tokens per step = tokens decoded / decode steps, over every decode step of every request
(a step where a source had nothing to propose counts with its one token). The engine's own
accepted_tokens_per_step counts only steps that verified a tree, which flatters a source that often proposes
nothing (lookup alone); it is printed too ("per tree"). One engine per draft configuration serves the classes
in turn (chat, coding, summarization), so the lookup statistics carry over between classes as on a replica.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from app.engine.config import EngineConfig, SamplingParams
from app.engine.speculative import CandidateTree, DraftRequest, DraftSource, MultiSourceDrafter, NgramSource
from app.engine.speculative.ngram import NgramConfig
from app.engine.engine import LLMEngine
from app.engine.runner import SeqInput

CLASSES = ("chat", "coding", "summarization")
LONG = "summ-long"
SELF_REPEAT_MAX = 0.25  # answers whose output 4-grams repeat their own earlier text more than this are "looping"  # summarization of longer texts (--long-summary-chars), not a workload class of its own


def draft_configs(model_draft: str) -> dict[str, str | None]:
    """Engine configurations side by side: plain decoding, the model draft alone, lookup alone, both merged, and
    merged with lookups also anchored under the model draft's 3 best nodes (`ngram:anchors=3`, off by default)."""
    return {"none": None, model_draft: model_draft, "ngram": "ngram", "merged": f"{model_draft},ngram",
            "merged, anchored": f"{model_draft},ngram:anchors=3"}


def class_prompts(n: int, seed: int, prompt_char_cap: int, long_chars: int) -> dict[str, list[str]]:
    from bench.workloads import chat_items, coding_items, summarization_items

    rng = np.random.default_rng(seed)
    pools = {"chat": chat_items(64, prompt_char_cap), "coding": coding_items(64, prompt_char_cap),
             "summarization": summarization_items(64, prompt_char_cap)}
    if long_chars > 0:
        pools[LONG] = summarization_items(64, long_chars, min_summary_chars=long_chars)
    out = {}
    for c in pools:
        pool = pools[c]
        out[c] = [pool[i][0][0]["content"] for i in rng.permutation(len(pool))[:n]]
    return out


def _counters(drafter) -> np.ndarray | None:
    if not isinstance(drafter, MultiSourceDrafter):
        return None
    return np.concatenate([[drafter.num_steps, drafter.accepted_shared], drafter.accepted_by, drafter.accepted_only])


def run_class(engine: LLMEngine, prompts: list[str], new_tokens: int) -> dict:
    drafter = engine.speculator.drafter if engine.speculator else None
    before = _counters(drafter)
    params = SamplingParams(max_tokens=new_tokens)
    ids = [engine.add_request(p, params, chat=True) for p in prompts]
    steps_with_tokens = dict.fromkeys(ids, 0)
    done = {}
    while len(done) < len(ids):
        for o in engine.step():
            steps_with_tokens[o.request_id] += 1
            if o.finished:
                done[o.request_id] = o
    outs = [done[i] for i in ids]
    ms = [o.metrics for o in outs]
    spec_steps = sum(m.num_spec_steps for m in ms)
    acc = sum(m.num_accepted_draft_tokens for m in ms)
    decoded = sum(m.num_output_tokens - 1 for m in ms)  # tokens after the first (prefill) one
    decode_steps = sum(steps_with_tokens.values()) - len(ids)  # the first output is the prefill's token
    row = {"prompt_tokens": float(np.mean([len(engine.encode_prompt(p, chat=True)) for p in prompts])),
           "output_tokens": sum(m.num_output_tokens for m in ms),
           "acc_per_step": decoded / decode_steps if decode_steps else 1.0,
           "acc_per_spec_step": (acc + spec_steps) / spec_steps if spec_steps else 1.0,
           "spec_step_share": spec_steps / decode_steps if decode_steps else 0.0,
           "tpot_ms": 1e3 * float(np.mean([m.tpot_s for m in ms if m.num_output_tokens > 1])),
           "token_ids": [o.token_ids for o in outs],
           # per request, for the summary without self-repeating answers (same requests in every configuration:
           # the outputs are identical)
           "decoded": [m.num_output_tokens - 1 for m in ms],
           "decode_steps": [steps_with_tokens[i] - 1 for i in ids],
           "self_repeat": [self_repeat_share(o.token_ids) for o in outs]}
    if before is not None:
        d = _counters(drafter) - before
        s = len(drafter.sources)
        n = max(d[0], 1)
        row["by_source"] = {name: d[2 + i] / n for i, name in enumerate(drafter.names)}
        row["only"] = {name: d[2 + s + i] / n for i, name in enumerate(drafter.names)}
        row["shared"] = d[1] / n
    return row


def self_repeat_share(token_ids: list[int], n: int = 4) -> float:
    """Share of an output's n-grams that already occurred earlier in the same output: a looping answer (a small
    model's greedy failure mode) is easy for prompt lookup and says little about copying from the prompt."""
    seen, repeats, total = set(), 0, 0
    for i in range(len(token_ids) - n + 1):
        g = tuple(token_ids[i:i + n])
        repeats += g in seen
        total += 1
        seen.add(g)
    return repeats / total if total else 0.0


def print_calibration(name: str, summary: dict) -> None:
    print(f"  {name}: {summary['count']} verified nodes, mean f {summary['mean_predicted']:.3f}, "
          f"accepted {summary['mean_observed']:.3f}, ECE {summary['ece']:.3f}")
    print("    f bin       nodes  mean f  accepted")
    for b in summary["bins"]:
        print(f"    {b['lo']:.1f}-{b['hi']:.1f}  {b['count']:8d}  {b['predicted']:6.3f}  {b['observed']:8.3f}")


# ---- lookup cost -------------------------------------------------------------------------------------------

def text_stream(tokenizer, num_tokens: int) -> list[int]:
    """ShareGPT conversations, concatenated and tokenised, until num_tokens."""
    from bench.datasets import iter_sharegpt_conversations

    out: list[int] = []
    for conv in iter_sharegpt_conversations(limit=5000):
        for m in conv["messages"]:
            out.extend(tokenizer.encode(m["content"] + "\n", add_special_tokens=False))
        if len(out) >= num_tokens:
            return out[:num_tokens]
    return out


class _StreamDraft(DraftSource):
    """A stand-in model draft for timing the lookup merged with one: per request, the text's next token (f 0.6),
    a wrong sibling (0.2) and the true second token (0.4), so the lookup has model nodes to anchor under."""

    name = "stream"

    def __init__(self, stream: list[int], cursor: list[int]):
        self.stream, self.cursor = stream, cursor

    def propose(self, reqs, depth, beam_width, topk, **kw) -> list[CandidateTree]:
        out = []
        for i in range(len(reqs)):
            k = self.cursor[i]
            t1, t2 = self.stream[k], self.stream[k + 1]
            out.append(CandidateTree(np.array([t1, t1 + 1, t2]), np.array([-1, -1, 0]),
                                     np.array([0.6, 0.2, 0.67], np.float32), np.array([0.6, 0.2, 0.4], np.float32)))
        return out

    def release(self, request_id: str) -> None:
        pass


def lookup_cost(engine: LLMEngine, num_requests: int, prompt_tokens: int, steps: int, depth: int,
                anchors: int = 3) -> dict:
    """Time prompt lookup merged with a stand-in model draft (index update + matching + tree + lookups anchored
    under `anchors` of the draft's nodes (`ngram:anchors=N`; 3 is the most expensive setting) + merging + verify
    feedback) for num_requests requests whose
    prompts are prompt_tokens of real text; each step commits what a greedy target would accept (the text's true
    continuation walked down the merged tree) plus one bonus token. The stand-in draft's own proposal is timed too (a few microseconds per request)."""
    stride = 997
    stream = text_stream(engine.tokenizer, prompt_tokens + stride * num_requests + 64 * steps)
    reqs = [DraftRequest(str(i), stream[i * stride:i * stride + prompt_tokens]) for i in range(num_requests)]
    cursor = [i * stride + prompt_tokens for i in range(num_requests)]
    drafter = MultiSourceDrafter([_StreamDraft(stream, cursor), NgramSource(NgramConfig(max_anchors=anchors))],
                                 names=["stream", "ngram"])
    t0 = time.perf_counter()
    drafter.propose(reqs, depth=depth, beam_width=4, topk=4)  # first propose: builds every index
    build_s = time.perf_counter() - t0
    from app.engine.speculative.tree import VerifyTree

    times, accepted, nodes = [], 0, 0
    for _ in range(steps):
        t0 = time.perf_counter()
        cands = drafter.propose(reqs, depth=depth, beam_width=4, topk=4)
        elapsed = time.perf_counter() - t0
        feedback = []
        for i, (r, c) in enumerate(zip(reqs, cands)):  # the target's greedy acceptance, simulated (untimed)
            m = c.num_nodes
            nodes += m
            kids = {(p, t): j for j, (p, t) in enumerate(zip(c.parent.tolist(), c.tokens.tolist()))}
            path, node, k = [0], -1, cursor[i]
            while (node, stream[k]) in kids:  # the text's true continuation decides acceptance
                node = kids[(node, stream[k])]
                path.append(node + 1)
                k += 1
            tree = VerifyTree(tokens=[r.token_ids[-1]] + c.tokens.tolist(), parents=[-1] + (c.parent + 1).tolist(),
                              path_prob=[1.0] + c.path_prob.tolist(), slots=[-1] + list(range(m)))
            feedback.append((r.request_id, c, tree, path))
            accepted += len(path) - 1
        t0 = time.perf_counter()
        for fb in feedback:
            drafter.observe(*fb)
        times.append(elapsed + time.perf_counter() - t0)
        for i, (r, fb) in enumerate(zip(reqs, feedback)):  # commit accepted + bonus tokens (the engine's work)
            n = len(fb[3])
            r.token_ids = r.token_ids + stream[cursor[i]:cursor[i] + n]
            cursor[i] += n
    return {"build_s_per_request": build_s / num_requests, "step_s": float(np.median(times)),
            "step_s_p90": float(np.percentile(times, 90)), "nodes_per_request": nodes / (steps * num_requests),
            "accepted_per_step": 1 + accepted / (steps * num_requests)}


def target_step_s(engine: LLMEngine, batch: int, context: int, repeats: int = 2) -> float:
    """One decode step of `batch` requests at `context` tokens each. The requests share one block table (the KV
    values do not change the work), so a batch of 8k contexts fits in memory."""
    blocks: list[int] = []
    if not engine.kv.ensure_capacity(blocks, context + 1):
        raise RuntimeError(f"not enough KV blocks for a {context}-token context")
    seqs = [SeqInput(blocks, context, [1], logits="last") for _ in range(batch)]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.runner.run(seqs)
        best = min(best, time.perf_counter() - t0)
    engine.kv.release(blocks)
    return best


def print_tokens_per_step(results: dict, engines: dict, configs: dict, classes: tuple, md: str, requests: int,
                          new_tokens: int, per_request: int) -> None:
    for c in classes:  # losslessness, as a check on the whole run
        for cfg in configs:
            if results[cfg][c]["token_ids"] != results["none"][c]["token_ids"]:
                print(f"WARNING: {cfg} output differs from plain decoding on {c}")

    print(f"\n## Accepted tokens per step and TPOT ({requests} requests per class, greedy, "
          f"<= {new_tokens} new tokens, adaserve, token budget {engines['merged'].token_budget} = {per_request} "
          f"per request)")
    print(f"{'class':14s} {'prompt tok':>10s} | " + " | ".join(f"{cfg:>28s}" for cfg in configs))
    print(f"{'':14s} {'':>10s} | " + " | ".join(f"{'acc/step':>8s} {'per tree':>8s} {'TPOT ms':>10s}"
                                                  for _ in configs))
    for c in classes:
        r = results
        print(f"{c:14s} {r['none'][c]['prompt_tokens']:10.0f} | " + " | ".join(
            f"{r[cfg][c]['acc_per_step']:8.2f} {r[cfg][c]['acc_per_spec_step']:8.2f} {r[cfg][c]['tpot_ms']:10.1f}"
            for cfg in configs))
    print("  share of decode steps with a tree: " + ", ".join(
        f"{cfg} " + "/".join(f"{results[cfg][c]['spec_step_share']:.2f}" for c in classes) for cfg in configs
        if cfg != "none") + f" ({'/'.join(classes)})")

    print("\n## Targets")
    for c in classes:
        best = max(results[md][c]["acc_per_step"], results["ngram"][c]["acc_per_step"])
        m = results["merged"][c]["acc_per_step"]
        print(f"  {c:14s} merged {m:.2f} vs better single {best:.2f}: {'ok' if m >= best - 1e-9 else 'MISSED'}"
              f"   | TPOT merged {results['merged'][c]['tpot_ms']:.1f} ms vs best single "
              f"{min(results[md][c]['tpot_ms'], results['ngram'][c]['tpot_ms']):.1f} ms")
    for c in [x for x in ("summarization", LONG) if x in classes]:
        s_m, s_d = results["merged"][c]["acc_per_step"], results[md][c]["acc_per_step"]
        print(f"  {c} merged / model draft alone: {s_m / s_d:.2f}x (target >= 2x): "
              f"{'ok' if s_m >= 2 * s_d else 'MISSED'}")
        keep = [i for i, x in enumerate(results["none"][c]["self_repeat"]) if x <= SELF_REPEAT_MAX]
        if keep and len(keep) < len(results["none"][c]["self_repeat"]):
            def per_step(cfg: str) -> float:
                r = results[cfg][c]
                return sum(r["decoded"][i] for i in keep) / max(sum(r["decode_steps"][i] for i in keep), 1)
            print(f"  {c} without the {len(results['none'][c]['self_repeat']) - len(keep)} self-repeating answers "
                  f"(> {SELF_REPEAT_MAX:.0%} of output 4-grams repeat the answer's own text): "
                  f"{md} {per_step(md):.2f}, ngram {per_step('ngram'):.2f}, merged {per_step('merged'):.2f} "
                  f"= {per_step('merged') / per_step(md):.2f}x the model draft alone")
    if "merged, anchored" not in results:
        return
    print("  anchored lookups (merged, anchored vs merged): " + ", ".join(
        f"{c} {results['merged, anchored'][c]['acc_per_step']:.2f} vs {results['merged'][c]['acc_per_step']:.2f}"
        for c in classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-draft", default="feature", help="the model draft source (feature, distilled, ...)")
    ap.add_argument("--requests", type=int, default=4, help="requests per class")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--prompt-char-cap", type=int, default=1200, help="as bench.workloads' default")
    ap.add_argument("--long-summary-chars", type=int, default=4000,
                    help="also summarise texts of this many characters (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-per-request", type=int, nargs="+", default=[16],
                    help="token budget per step = this x requests, one table per value (the CPU profile's budget "
                         "is a few tokens: too small to compare drafts, and a fixed budget would compare them at a "
                         "load-dependent size). Calibration and lookup tables are from the first value's run.")
    ap.add_argument("--classes", nargs="+", default=None, help="only these classes (default: all)")
    ap.add_argument("--no-anchored", action="store_true", help="skip the 'merged, anchored' configuration")
    ap.add_argument("--cost-requests", type=int, default=64)
    ap.add_argument("--cost-prompt-tokens", type=int, default=8192)
    ap.add_argument("--cost-steps", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    md = args.model_draft
    configs = draft_configs(md)
    if args.no_anchored:
        del configs["merged, anchored"]
    print(f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    prompts = class_prompts(args.requests, args.seed, args.prompt_char_cap, args.long_summary_chars)
    if args.classes:
        unknown = set(args.classes) - set(prompts)
        if unknown:
            ap.error(f"unknown classes {sorted(unknown)}; choose from {sorted(prompts)}")
        prompts = {c: prompts[c] for c in args.classes}
    classes = tuple(prompts)
    probe = LLMEngine(EngineConfig(num_kv_blocks=16, profile_latency=False))
    prompt_tokens = max(sum(len(probe.encode_prompt(p, chat=True)) for p in prompts[c]) for c in classes)
    del probe
    t_start = time.perf_counter()
    first: tuple[dict, dict] | None = None
    plain: dict | None = None
    for per_request in args.budget_per_request:
        budget = per_request * args.requests
        results: dict[str, dict[str, dict]] = {}
        engines = {}
        for cfg, draft in configs.items():
            if draft is None and plain is not None:  # plain decoding does not depend on the budget
                results[cfg], engines[cfg] = plain
                continue
            engine = LLMEngine(EngineConfig(
                draft=draft, policy="adaserve" if draft else "none", token_budget=budget, profile_latency=False,
                max_num_batched_tokens=prompt_tokens + budget + 512, prefill_chunk_tokens=prompt_tokens,
                num_kv_blocks=2 * (prompt_tokens + args.requests * (args.new_tokens + 64)) // 16 + 64,
                dtype="float32"))  # exact losslessness check below (bf16 near-ties)
            results[cfg] = {c: run_class(engine, prompts[c], args.new_tokens) for c in classes}
            engines[cfg] = engine
            if draft is None:
                plain = results[cfg], engine
            print(f"  budget {per_request}/request, {cfg}: {time.perf_counter() - t_start:.0f} s", flush=True)
        first = first or (results, engines)
        print_tokens_per_step(results, engines, configs, classes, md, args.requests, args.new_tokens, per_request)
    results, engines = first
    print("\n## Merged: accepted draft tokens per verified tree by source (shared = proposed by both)")
    print(f"{'class':14s} {md:>10s} {'ngram':>10s} | "
          f"{'only ' + md:>14s} {'only ngram':>10s} {'shared':>8s}")
    for c in classes:
        r = results["merged"][c]
        print(f"{c:14s} {r['by_source'][md]:10.2f} {r['by_source']['ngram']:10.2f} | "
              f"{r['only'][md]:14.2f} {r['only']['ngram']:10.2f} {r['shared']:8.2f}")

    print("\n## Calibration: predicted f vs accepted (verified nodes, all classes)")
    for cfg in ("ngram", "merged"):
        st = engines[cfg].speculator.drafter.stats()
        print(f" engine {cfg}:")
        for name, summary in st["calibration"].items():
            print_calibration(name, summary)
    st = engines["merged"].speculator.drafter.stats()
    print("\n## Lookup statistics after the run (merged engine): P(accept | parent accepted) by cell")
    print("  (match len = the occurrence's measured length + depth - 1, bucketed)")
    print(f"  {'match len':>9s} {'depth':>5s} {'branch':>6s} {'obs':>6s} {'mean':>6s}")
    for row in sorted(st["lookup_stats"]["ngram"], key=lambda x: (-x["observations"]))[:24]:
        print(f"  {row['match_len']:>8d}+ {row['depth']:5d} {'alt' if row['branch'] else 'main':>6s} "
              f"{row['observations']:6.0f} {row['mean']:6.3f}")
    print("\n## Agreement (merged engine): P(accept | parent accepted) of tokens the lookup and the model draft both "
          "proposed")
    print(f"  {'depth':>5s} {'model q':>11s} {'obs':>6s} {'mean':>6s}")
    for row in st["agreement"]:
        print(f"  {row['depth']:>4d}{'+' if row['depth'] == 3 else ' '} {row['model_q_min']:.2f}-{row['model_q_max']:.2f}"
              f"  {row['observations']:6.0f} {row['mean']:6.3f}")

    if args.cost_requests <= 0:
        return
    print(f"\n## Lookup cost: {args.cost_requests} requests x {args.cost_prompt_tokens}-token prompts (ShareGPT text)")
    depth = engines["merged"].config.max_draft_depth
    step_short = target_step_s(engines["none"], args.cost_requests, 256)
    step_long = target_step_s(engines["none"], args.cost_requests, args.cost_prompt_tokens - 1, repeats=1)
    print(f"  target decode step, batch {args.cost_requests}: {1e3 * step_long:.0f} ms at "
          f"{args.cost_prompt_tokens}-token contexts, {1e3 * step_short:.0f} ms at 256-token contexts")
    for anchors in (0, 3):
        cost = lookup_cost(engines["none"], args.cost_requests, args.cost_prompt_tokens, args.cost_steps, depth,
                           anchors=anchors)
        print(f"  ngram:anchors={anchors}, merged with a stand-in draft (propose, merge, verify feedback; "
              f"{args.cost_requests} requests): {1e3 * cost['step_s']:.2f} ms median, "
              f"{1e3 * cost['step_s_p90']:.2f} ms p90 per step ({1e6 * cost['step_s'] / args.cost_requests:.0f} us "
              f"per request; {cost['nodes_per_request']:.1f} nodes/request, {cost['accepted_per_step']:.2f} "
              f"tokens/step); index build at the first propose {1e3 * cost['build_s_per_request']:.1f} ms per "
              f"request")
        print(f"    lookup / step: {100 * cost['step_s'] / step_long:.2f}% at 8k contexts (target < 2%: "
              f"{'ok' if cost['step_s'] < 0.02 * step_long else 'MISSED'}); "
              f"{100 * cost['step_s'] / step_short:.2f}% against the 256-context step")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
