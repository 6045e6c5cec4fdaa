"""Decode throughput: this engine (oneDNN-packed weights, the CPU default) against itself unpacked and against
transformers `generate`, same prompts, same machine, one run; and a profile of one decode and one verify step.

    python -m bench.engine [--batch-sizes 1,8,32] [--new-tokens 32] [--repeats 3] [--threads N] [--model embedded]
    python -m bench.engine --profile [--context 200] [--tree-nodes 16]

Decode tokens/s counts tokens after the first one of each request over the time after prefill, for all of them.
The contenders take turns within each repeat (a shared 2-core VM drifts by 20-30% within minutes) and the median
over repeats is reported, with each engine's ratio to transformers and the packed engine's to the unpacked one.
Also prints KV bytes per token, the engine's peak KV use per request, and the batch-1 ceiling that the weights'
bytes and this machine's memory bandwidth set.

    python -m bench.engine --step-shapes [--context 256] [--repeats 7]

--step-shapes: float32 against bfloat16 on this machine, one target forward per shape (requests x tokens after
--context cached tokens), the two dtypes taking turns; best of --repeats per shape, and each shape's cost as a
multiple of its dtype's one-token step (how flat the verify cost is, which decides whether trees pay). This is what
``dtype: auto`` is chosen by on a CPU.

--profile: torch profiler over a decode step (one request, one token after --context) and a verify step (one
--tree-nodes chain tree), packed and unpacked: ms per step by operator, and by part of the model (each projection, the LM head, the
attention ops, the rest) from the operators' self times and weight shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine
from app.engine.runner import ModelRunner, SeqInput
from kernels.metadata import MAX_TREE_TOKENS

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


def read_bandwidth_gb_s(num_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """This machine's memory read bandwidth as torch sees it: the best of a few sums over a float32 tensor far
    larger than the caches."""
    data = torch.ones(num_bytes // 4)
    best_s = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        data.sum()
        best_s = min(best_s, time.perf_counter() - t)
    return num_bytes / best_s / 1e9


def weight_stream_ceiling(engine: LLMEngine) -> str:
    """Why single-stream decode cannot go past a figure here: every step reads every weight once (the tied
    embedding as the LM head), so at batch 1 tokens/s <= bandwidth / weight bytes, whatever the host overhead."""
    weight_bytes = engine.model_config.num_params() * engine.dtype.itemsize
    bandwidth = read_bandwidth_gb_s()
    return (f"weights read per decode step {weight_bytes / 2**20:.0f} MiB; memory read bandwidth {bandwidth:.1f} GB/s "
            f"({torch.get_num_threads()} threads) -> single-stream ceiling {bandwidth * 1e9 / weight_bytes:.1f} tok/s")


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


STEP_SHAPES = ((1, 1), (1, 8), (1, 16), (1, 32), (4, 16), (1, 256))  # (requests, tokens each)


def step_shape_inputs(runner: ModelRunner, num_requests: int, num_tokens: int, context: int) -> list[SeqInput]:
    """num_requests verify-shaped sequences of num_tokens after context cached tokens: a chain tree up to the tree
    attention's size limit (``MAX_TREE_TOKENS``), a causal prefill chunk beyond it. The caller releases the blocks."""
    seqs = []
    for _ in range(num_requests):
        blocks: list[int] = []
        if not runner.kv.ensure_capacity(blocks, context + num_tokens):
            raise RuntimeError("the KV cache cannot hold the timed shape")
        parents = [-1] + list(range(num_tokens - 1)) if num_tokens <= MAX_TREE_TOKENS else None
        seqs.append(SeqInput(blocks, context, [5] * num_tokens, parents, "all" if parents else "last"))
    return seqs


def step_fns(runner: ModelRunner, context: int, tree_nodes: int) -> dict:
    """A decode step and a chain-tree verify step of one request after `context` cached tokens."""
    verify = step_shape_inputs(runner, 1, tree_nodes, context)[0]
    decode = SeqInput(verify.block_ids, context, [5])
    return {"decode": lambda: runner.run([decode]), f"verify{tree_nodes}": lambda: runner.run([verify])}


def time_step_shapes(engines: dict[str, LLMEngine], context: int, repeats: int) -> None:
    print(f"context {context}, best of {repeats} (the dtypes take turns); "
          "x1: the shape's time / its dtype's 1-token step")
    names = list(engines)
    print(f"{'requests x tokens':>17} " + " ".join(f"{n + ' ms':>12} {'x1':>5}" for n in names)
          + f" {names[-1] + ' / ' + names[0]:>22}")
    one_token: dict[str, float] = {}
    for n, t in STEP_SHAPES:
        seqs = {name: step_shape_inputs(e.runner, n, t, context) for name, e in engines.items()}
        best = {name: float("inf") for name in names}
        for i in range(repeats + 1):  # the first turn warms up
            for name, e in engines.items():
                t0 = time.perf_counter()
                e.runner.run(seqs[name])
                if i:
                    best[name] = min(best[name], time.perf_counter() - t0)
        for name, e in engines.items():
            for s in seqs[name]:
                e.kv.release(s.block_ids)
        one_token = one_token or dict(best)
        print(f"{f'{n} x {t}':>17} " + " ".join(f"{best[k] * 1e3:>12.1f} {best[k] / one_token[k]:>5.2f}" for k in names)
              + f" {best[names[-1]] / best[names[0]]:>22.2f}", flush=True)


def model_part(name: str, shapes: list, config) -> str:
    """Which part of the model an operator belongs to: matmuls by their weight's shape, attention ops by name."""
    if name in ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm") and len(shapes) > 1 and shapes[1]:
        c = config
        out, inner = (shapes[1][0], shapes[1][-1]) if name != "aten::mm" else (shapes[1][-1], shapes[1][0])
        parts = {(c.vocab_size, c.hidden_size): "LM head",
                 ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size): "q/k/v projection",
                 (c.hidden_size, c.num_heads * c.head_dim): "o projection",
                 (2 * c.intermediate_size, c.hidden_size): "gate/up projection",
                 (c.hidden_size, c.intermediate_size): "down projection"}
        return parts.get((out, inner), "other matmul")
    if any(k in name for k in ("scaled_dot_product", "index", "nonzero", "_softmax", "bmm")):
        return "attention (KV write, gather, SDPA)"
    return "other ops (norms, rope, residuals, silu, views)"


def profile_steps(engine: LLMEngine, context: int, tree_nodes: int, repeats: int = 10) -> None:
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    for name, fn in step_fns(runner, context, tree_nodes).items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(repeats):
                fn()
        wall_ms = statistics.median(times) * 1e3
        by_part: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages(group_by_input_shape=True):
            by_part[model_part(ev.key, ev.input_shapes, engine.model_config)] += ev.self_cpu_time_total / 1e3 / repeats
        ops_ms = sum(by_part.values())
        print(f"\n{name}: {wall_ms:.1f} ms per step (median of {repeats}), context {context}")
        print(f"{'part':<48} {'ms/step':>8}")
        for part, ms in sorted(by_part.items(), key=lambda kv: -kv[1]):
            print(f"{part:<48} {ms:>8.2f}")
        print(f"{'(profiled op total; wall minus it is host time)':<48} {ops_ms:>8.2f}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="turns of every contender per batch size (median kept)")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--no-unpacked", action="store_true", help="skip the engine without oneDNN weight packing")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers generate")
    ap.add_argument("--profile", action="store_true", help="profile a decode and a verify step instead")
    ap.add_argument("--step-shapes", action="store_true", help="time float32 against bfloat16 steps instead")
    ap.add_argument("--context", type=int, default=200, help="--profile, --step-shapes: cached tokens before the step")
    ap.add_argument("--tree-nodes", type=int, default=16, help="--profile: nodes of the verify step's tree")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        torch.set_num_threads(args.threads)

    def make(prepack: bool, dtype: str = args.dtype) -> LLMEngine:
        return LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=dtype, max_num_seqs=64,
                                      max_num_batched_tokens=2048, prefill_chunk_tokens=2048,
                                      kv_cache_memory_gb=0.5, cpu_weight_prepack=prepack))

    if args.step_shapes:
        time_step_shapes({d: make(True, d) for d in ("float32", "bfloat16")}, args.context, args.repeats)
        return
    engine = make(True)
    print(f"device={engine.device} dtype={engine.dtype} threads={torch.get_num_threads()} "
          f"packed={engine.model.packed} KV bytes/token={engine.model.kv_bytes_per_token()}")
    engines = {"engine": engine}
    if engine.model.packed and not args.no_unpacked:
        engines["engine unpacked"] = make(False)
    if args.profile:
        for name, e in engines.items():
            print(f"\n=== {name}")
            profile_steps(e, args.context, args.tree_nodes)
        return
    tok = engine.tokenizer
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        from app.engine.weights import resolve_model_dir

        hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(args.model)), dtype=engine.dtype).to(
            engine.device).eval()
    print(weight_stream_ceiling(engine))
    names = list(engines) + (["transformers"] if hf is not None else [])
    print(f"{'batch':>5} " + " ".join(f"{n + ' tok/s':>22}" for n in names) + f" {'x unpacked':>10} "
          f"{'x transformers':>14} {'KV bytes/request (peak)':>24}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [engine.encode_prompt(PROMPTS[i % len(PROMPTS)], chat=True) for i in range(b)]
        for e in engines.values():
            engine_decode_tps(e, prompts[:1], 4)  # warm-up
        tps: dict[str, list[float]] = defaultdict(list)
        tokens_per_req = 0.0
        for _ in range(args.repeats):
            for name, e in engines.items():
                t, tokens_per_req = engine_decode_tps(e, prompts, args.new_tokens)
                tps[name].append(t)
            if hf is not None:
                tps["transformers"].append(hf_decode_tps(hf, tok, prompts, args.new_tokens))
        med = {n: statistics.median(v) for n, v in tps.items()}
        kv_bytes = tokens_per_req * engine.model.kv_bytes_per_token()
        x_unpacked = f"{med['engine'] / med['engine unpacked']:.2f}" if "engine unpacked" in med else "-"
        x_hf = f"{med['engine'] / med['transformers']:.2f}" if "transformers" in med else "-"
        print(f"{b:>5} " + " ".join(f"{med[n]:>22.1f}" for n in names) + f" {x_unpacked:>10} {x_hf:>14} "
              f"{kv_bytes / 2**20:>20.2f} MiB", flush=True)


if __name__ == "__main__":
    main()
