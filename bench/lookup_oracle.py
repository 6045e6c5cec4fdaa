"""How many tokens per step could prompt lookup give at best on a workload class? Decodes the class's prompts
greedily (plain decoding), then replays each output with an oracle lookup: at every step it proposes, among the
earlier positions of (prompt + output so far) that follow an exact match of the last `n` committed tokens, the one
whose continuation agrees longest with the true output (up to `depth` tokens); the step gains that run + 1.

    python -m bench.lookup_oracle [--class summarization] [--requests 16] [--new-tokens 40]

n = 0 (any earlier position, no match needed) bounds every lookup source; n = 1 with depth 8 is the bound for
this engine's `ngram` source (it matches 1-4 tokens and chains up to the tree depth).
"""

from __future__ import annotations

import argparse

import numpy as np

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine
from bench.ngram import class_prompts


def _best_run(ctx: list[int], output: list[int], i: int, match_len: int, depth: int) -> int:
    """Longest prefix of output[i:] (<= depth) that follows some earlier position of ctx after a match."""
    arr = np.asarray(ctx)
    starts = [j for j in np.flatnonzero(arr == output[i]).tolist()
              if match_len == 0 or (j >= match_len and ctx[j - match_len:j] == ctx[-match_len:])]
    best = 0
    for length in range(1, min(len(output) - i, depth) + 1):
        if not any(ctx[j:j + length] == output[i:i + length] for j in starts):
            break
        best = length
    return best


def oracle_tokens_per_step(prompt: list[int], output: list[int], match_len: int, depth: int,
                           anchored: bool = False) -> tuple[int, int]:
    """(tokens, steps) of the oracle replay of one output. `anchored`: the lookup may also start one token
    later, under the true next token (as a model draft's level-1 node would supply it), when that goes further."""
    ctx = list(prompt)
    i = steps = 0
    while i < len(output):
        best = _best_run(ctx, output, i, match_len, depth)
        if anchored and i + 1 < len(output):
            best = max(best, 1 + _best_run(ctx + [output[i]], output, i + 1, match_len, depth - 1))
        gain = min(best + 1, len(output) - i)
        ctx.extend(output[i:i + gain])
        i += gain
        steps += 1
    return len(output), steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--class", dest="cls", default="summarization",
                    help="chat, coding, summarization or summ-long (bench.ngram's classes)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(num_kv_blocks=2048, dtype="float32"))
    prompts = class_prompts(args.requests, args.seed, 1200, 4000)[args.cls]
    ids = [engine.encode_prompt(p, chat=True) for p in prompts]
    outs = [o.token_ids for o in engine.generate(ids, SamplingParams(max_tokens=args.new_tokens))]
    print(f"{args.cls}: {len(ids)} requests, {sum(map(len, outs))} greedy tokens")
    for match_len, depth, anchored in [(0, 10**6, False), (1, 10**6, False), (1, 16, False), (1, 8, False),
                                       (2, 8, False), (1, 8, True), (1, 16, True)]:
        tok = steps = 0
        for p, o in zip(ids, outs):
            t, s = oracle_tokens_per_step(p, o, match_len, depth, anchored)
            tok, steps = tok + t, steps + s
        print(f"  match {match_len} token(s), depth {'any' if depth > 1000 else depth}"
              f"{', anchored under the next token' if anchored else ''}: {tok / steps:.2f} tokens per step")


if __name__ == "__main__":
    main()
