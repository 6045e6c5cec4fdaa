"""Decode throughput: this engine vs transformers `generate`, same prompts, same machine, one run.

    python -m bench.engine [--batch-sizes 1,8,32] [--new-tokens 32] [--model embedded]

Decode tokens/s counts tokens after the first one of each request over the time after prefill, for both.
Also prints KV bytes per token and the engine's peak KV use per request.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine

PROMPTS = [
    "Explain how a transformer language model generates text, step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for learning a new language quickly.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a hash table handle collisions?",
    "Describe the water cycle to a ten-year-old.",
    "What is the difference between a process and a thread?",
]


def engine_decode_tps(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]
    while any(r.first_token_time is None for r in reqs):
        engine.step()
    peak_blocks = 0
    t0 = time.perf_counter()
    start_tokens = sum(r.num_output_tokens for r in reqs)
    while engine.has_unfinished():
        engine.step()
        peak_blocks = max(peak_blocks, engine.kv.allocator.num_blocks - engine.kv.allocator.num_free)
    dt = time.perf_counter() - t0
    decoded = len(prompts) * new_tokens - start_tokens
    return decoded / dt, peak_blocks * engine.config.block_size / len(prompts)


def hf_decode_tps(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=pad)
        return time.perf_counter() - t0

    run(2)  # warm-up
    prefill_s = run(1)
    total_s = run(new_tokens)
    return len(prompts) * (new_tokens - 1) / max(total_s - prefill_s, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, max_num_seqs=64,
                                    max_num_batched_tokens=2048, prefill_chunk_tokens=2048))
    tok = engine.tokenizer
    from app.engine.weights import resolve_model_dir

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(args.model)), dtype=engine.dtype).to(
        engine.device).eval()
    print(f"device={engine.device} dtype={engine.dtype} threads={torch.get_num_threads()} "
          f"KV bytes/token={engine.model.kv_bytes_per_token()}")
    print(f"{'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} {'KV bytes/request (peak)':>24}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [engine.encode_prompt(PROMPTS[i % len(PROMPTS)], chat=True) for i in range(b)]
        engine_decode_tps(engine, prompts[:1], 4)  # warm-up
        ours, tokens_per_req = engine_decode_tps(engine, prompts, args.new_tokens)
        theirs = hf_decode_tps(hf, tok, prompts, args.new_tokens)
        kv_bytes = tokens_per_req * engine.model.kv_bytes_per_token()
        print(f"{b:>5} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>6.2f} {kv_bytes / 2**20:>20.2f} MiB")


if __name__ == "__main__":
    main()
