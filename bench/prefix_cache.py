"""Prefix caching, on vs off in one run: TTFT and prefill tokens computed for two chat workloads.

    python -m bench.prefix_cache [--conversations 8] [--turns 3] [--system-requests 8] [--max-tokens 16]

1. Multi-turn ShareGPT: conversations whose first user turn is long (1-3k characters) and whose next turns are short,
   replayed turn by turn as a chat client does (each turn resends the whole conversation, the engine's own earlier
   replies included). Turn-major order: all conversations' turn 1, then turn 2, ..., so the cache must hold them all.
2. Shared system prompt: one long system prompt (a ShareGPT document, --system-chars) in front of short, different
   user questions.

Two engines (float32, policy none, same settings but enable_prefix_caching) serve every request one at a time, so
TTFT is the prefill as the client sees it; they take turns on each request, the first alternating, so drift in a
shared machine's speed falls on both alike. Greedy outputs must agree (float32), and the on-engine's reply is the
history of the next turn for both. Reports TTFT p50/p90, prefill tokens computed and the prefix hit rate per
workload, and the goal check: a follow-up turn with >= 90% of its prompt cached should see TTFT <= 0.2x off.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine
from bench.paths import run_dir


def multi_turn_conversations(n: int, turns: int, min_first: int = 1000, max_first: int = 3000,
                             max_next: int = 400, scan: int = 5000) -> list[list[str]]:
    """User turns of n ShareGPT conversations with a long first user turn and `turns` - 1 short next ones."""
    from bench.datasets import iter_sharegpt_conversations

    out = []
    for conv in iter_sharegpt_conversations(limit=scan):
        users = [m["content"] for m in conv["messages"] if m["role"] == "user"]
        if conv["messages"][0]["role"] != "user" or len(users) < turns:
            continue
        if min_first <= len(users[0]) <= max_first and all(len(u) <= max_next for u in users[1:turns]):
            out.append(users[:turns])
            if len(out) == n:
                break
    return out


def system_prompt_workload(n: int, system_chars: int) -> tuple[str, list[str]]:
    """A long ShareGPT document as the shared system prompt, and n short first user turns of other conversations."""
    from bench.datasets import iter_sharegpt_conversations

    system, questions = None, []
    for conv in iter_sharegpt_conversations(limit=5000, skip=2000):
        first = conv["messages"][0]["content"]
        if system is None and len(first) >= system_chars:
            system = "Use this document to answer.\n\n" + first[:system_chars]
        elif 20 <= len(first) <= 300:
            questions.append(first)
        if system is not None and len(questions) >= n:
            break
    return system, questions[:n]


def serve(engine: LLMEngine, messages: list[dict], max_tokens: int) -> dict:
    ids = list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
    out = engine.generate([ids], SamplingParams(max_tokens=max_tokens))[0]
    m = out.metrics
    return {"ttft_s": m.ttft_s, "prompt_tokens": m.num_prompt_tokens, "cached_tokens": m.num_cached_tokens,
            "prefill_tokens": m.num_prompt_tokens - m.num_cached_tokens, "text": out.text, "token_ids": out.token_ids}


def side_by_side(engines: dict[str, LLMEngine], messages: list[dict], max_tokens: int, first: str) -> dict:
    """Both engines serve the request, `first` first; the outputs must agree."""
    order = [first] + [k for k in engines if k != first]
    res = {k: serve(engines[k], messages, max_tokens) for k in order}
    res["identical"] = res["on"]["token_ids"] == res["off"]["token_ids"]
    return res


def summarize(rows: list[dict]) -> dict:
    out = {}
    for mode in ("on", "off"):
        ttft = np.array([r[mode]["ttft_s"] for r in rows])
        out[mode] = {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
                     "prefill_tokens": int(sum(r[mode]["prefill_tokens"] for r in rows)),
                     "prompt_tokens": int(sum(r[mode]["prompt_tokens"] for r in rows)),
                     "cached_tokens": int(sum(r[mode]["cached_tokens"] for r in rows))}
    out["n"] = len(rows)
    out["hit_rate"] = out["on"]["cached_tokens"] / max(out["on"]["prompt_tokens"], 1)
    out["ttft_p50_ratio"] = out["on"]["ttft_p50_s"] / out["off"]["ttft_p50_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system-requests", type=int, default=8)
    ap.add_argument("--system-chars", type=int, default=3000, help="length of the shared system prompt's document")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=1024, help="per engine, 16 tokens each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help="default: a fresh bench/runs/prefix_cache-<time>/")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads)
    out_dir = args.out or run_dir("prefix_cache")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(dtype="float32", device="cpu", num_kv_blocks=args.num_kv_blocks, profile_latency=False)
    engines = {"on": LLMEngine(EngineConfig(enable_prefix_caching=True, **cfg)),
               "off": LLMEngine(EngineConfig(enable_prefix_caching=False, **cfg))}
    for e in engines.values():  # warm-up: one-off allocation costs out of the first TTFT
        e.generate(["Hello there, how are you?"], SamplingParams(max_tokens=4))
        e.kv.reset_prefix_cache()
    print(f"device=cpu dtype=float32 threads={torch.get_num_threads()} policy=none max_tokens={args.max_tokens} "
          f"kv_blocks={args.num_kv_blocks}x16 per engine")
    rows: list[dict] = []
    t0 = time.perf_counter()

    # 1. multi-turn ShareGPT, turn-major
    convs = multi_turn_conversations(args.conversations, args.turns)
    history: list[list[dict]] = [[] for _ in convs]
    for turn in range(args.turns):
        for c, users in enumerate(convs):
            history[c].append({"role": "user", "content": users[turn]})
            res = side_by_side(engines, history[c], args.max_tokens, first="on" if (c + turn) % 2 == 0 else "off")
            history[c].append({"role": "assistant", "content": res["on"]["text"]})
            rows.append({"workload": "multi_turn", "conversation": c, "turn": turn + 1, **res})
    # 2. shared system prompt
    system, questions = system_prompt_workload(args.system_requests, args.system_chars)
    for i, q in enumerate(questions):
        res = side_by_side(engines, [{"role": "system", "content": system}, {"role": "user", "content": q}],
                           args.max_tokens, first="on" if i % 2 == 0 else "off")
        rows.append({"workload": "system_prompt", "request": i, **res})
    wall_s = time.perf_counter() - t0

    with open(out_dir / "requests.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: {x: y for x, y in v.items() if x != "token_ids"} if k in ("on", "off") else v
                                for k, v in r.items()}) + "\n")
    groups = {
        "multi_turn: first turns": [r for r in rows if r["workload"] == "multi_turn" and r["turn"] == 1],
        "multi_turn: follow-up turns": [r for r in rows if r["workload"] == "multi_turn" and r["turn"] > 1],
        "system_prompt: all": [r for r in rows if r["workload"] == "system_prompt"],
        "system_prompt: after the first": [r for r in rows if r["workload"] == "system_prompt" and r["request"] > 0],
    }
    summary = {name: summarize(g) for name, g in groups.items() if g}
    mostly_cached = [r for r in rows if r["workload"] == "multi_turn" and r["turn"] > 1
                     and r["on"]["cached_tokens"] >= 0.9 * r["on"]["prompt_tokens"]]
    ratios = [r["on"]["ttft_s"] / r["off"]["ttft_s"] for r in mostly_cached]
    summary["goal"] = {"follow_ups_90pct_cached": len(mostly_cached),
                       "ttft_ratio_median": float(np.median(ratios)) if ratios else None,
                       "ttft_ratio_max": float(max(ratios)) if ratios else None,
                       "met": bool(ratios) and max(ratios) <= 0.2}
    summary["identical_outputs"] = all(r["identical"] for r in rows)
    summary["engine_prefix_stats"] = engines["on"].stats()["prefix_cache"]
    summary["wall_s"] = wall_s
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\n{'group':<32} {'n':>3} {'TTFT p50 on/off s':>18} {'p90 on/off s':>14} {'p50 x':>6} "
          f"{'prefill tok on/off':>19} {'hit':>5}")
    for name, s in summary.items():
        if not isinstance(s, dict) or "on" not in s:
            continue
        on, off = s["on"], s["off"]
        print(f"{name:<32} {s['n']:>3} {on['ttft_p50_s']:>8.3f}/{off['ttft_p50_s']:<9.3f} "
              f"{on['ttft_p90_s']:>6.3f}/{off['ttft_p90_s']:<7.3f} {s['ttft_p50_ratio']:>6.2f} "
              f"{on['prefill_tokens']:>9}/{off['prefill_tokens']:<9} {s['hit_rate']:>5.0%}")
    g = summary["goal"]
    if g["follow_ups_90pct_cached"]:
        print(f"goal: {g['follow_ups_90pct_cached']} follow-up turns with >= 90% of the prompt cached: TTFT on/off "
              f"median {g['ttft_ratio_median']:.3f}, max {g['ttft_ratio_max']:.3f} (target <= 0.2): "
              f"{'met' if g['met'] else 'NOT met'}")
    print(f"outputs identical on/off: {summary['identical_outputs']}; evictions {summary['engine_prefix_stats']['evictions']}; "
          f"wall {wall_s:.0f} s; written to {out_dir}")


if __name__ == "__main__":
    main()
