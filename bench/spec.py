"""Speculative decoding, side by side in one run: single-request decode speed and acceptance per policy, against
the engine without speculation and transformers' assisted generation with the same draft; then the selection
overhead for 256 requests x 64 candidates as a fraction of a measured target step.

    python -m bench.spec [--draft feature,ngram] [--hf-draft distilled] [--new-tokens 64] [--prompts 6] [--rounds 1]

transformers' assisted generation needs a stand-alone causal LM, so it runs with `--hf-draft` (a token-only
draft: the shipped distilled one by default); the feature draft reads the target's hidden states, which
`assistant_model` cannot feed. Its prompt-lookup mode (`prompt_lookup_num_tokens`) is the other baseline.
"""

from __future__ import annotations

import argparse
import os
import time
from argparse import Namespace

import numpy as np
import torch
from tqdm import tqdm

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine

POLICIES = ["none", "chain:4", "static-tree", "dynamic-tree", "adaserve"]
FP32_NONE = "none, float32"
HF_PLAIN, HF_ASSISTED, HF_LOOKUP = "transformers generate", "transformers assisted", "transformers prompt lookup"


def held_out_prompts(n: int) -> list[str]:
    """MT-Bench and HumanEval prompts (never used to train the draft), alternating."""
    from bench.datasets import humaneval_prompts, mtbench_questions

    mt = [q["turns"][0] if isinstance(q, dict) else q for q in mtbench_questions()]
    he = [p["prompt"] if isinstance(p, dict) else p for p in humaneval_prompts()]
    out = []
    for i in range(n):
        out.append(mt[i // 2] if i % 2 == 0 else he[i // 2])
    return out


def engine_run(engine: LLMEngine, policy: str, new_tokens: int):
    """One request decoded by the engine under `policy`: (decode seconds, decoded tokens, spec steps, accepted)."""
    def run(ids: list[int]) -> tuple[float, int, int, int]:
        out = engine.generate([ids], SamplingParams(max_tokens=new_tokens, ignore_eos=True), policy=policy)[0]
        m = out.metrics
        return m.tpot_s * (m.num_output_tokens - 1), m.num_output_tokens - 1, m.num_spec_steps, \
            m.num_accepted_draft_tokens
    return run


def side_by_side(contenders: dict, prompts: list[list[int]], rounds: int = 1) -> dict[str, dict]:
    """Decode tok/s (and tokens per step) of each contender, one request at a time. Contenders take turns on
    each prompt (round-robin), so drift in the machine's speed (a shared 2-core VM drifts by 20-30% within
    minutes) falls on all of them alike instead of on whichever ran last."""
    acc = {name: np.zeros(4) for name in contenders}
    for _ in range(rounds):
        for ids in tqdm(prompts, desc="prompts", leave=False):
            for name, run in contenders.items():
                acc[name] += np.asarray(run(ids), dtype=np.float64)
    return {name: {"tok_s": a[1] / a[0], "accepted_per_step": (a[3] + a[2]) / a[2] if a[2] else 1.0}
            for name, a in acc.items()}


def hf_draft_model(draft, target_hf):
    """A token-only draft LlamaModel (e.g. the distilled one) as a transformers model (full vocabulary head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**target_hf.config.to_dict(), "num_hidden_layers": draft.config.num_layers})
    hf = LlamaForCausalLM(cfg).to(target_hf.dtype).eval()
    c = draft.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    state = {"model.embed_tokens.weight": target_hf.model.embed_tokens.weight.data,
             "model.norm.weight": target_hf.model.norm.weight.data, "lm_head.weight": target_hf.lm_head.weight.data}
    for i, layer in enumerate(draft.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer["wqkv"].split([q, kv, kv])
        gate, up = layer["w13"].chunk(2)
        state.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                      p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer["wo"],
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": layer["w2"], p + "input_layernorm.weight": layer["in_norm"],
                      p + "post_attention_layernorm.weight": layer["post_norm"]})
    hf.load_state_dict({k: v.to(target_hf.dtype) for k, v in state.items()}, strict=False)
    hf.tie_weights()
    return hf


def hf_run(target_hf, new_tokens: int, assistant=None, prompt_lookup: int = 0):
    """One request decoded by transformers' generate: decode seconds (total minus a 1-token generate, i.e.
    the prefill) and decoded tokens."""
    def run(ids: list[int]) -> tuple[float, int, int, int]:
        x = torch.tensor([ids])
        kw = {"do_sample": False, "attention_mask": torch.ones_like(x), "pad_token_id": 0}
        if assistant is not None:
            kw["assistant_model"] = assistant
        if prompt_lookup:
            kw["prompt_lookup_num_tokens"] = prompt_lookup
        with torch.no_grad():
            t0 = time.perf_counter()
            target_hf.generate(x, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            target_hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            t2 = time.perf_counter()
        return (t2 - t1) - (t1 - t0), new_tokens - 1, 0, 0
    return run


def selection_overhead(engine: LLMEngine, num_requests: int = 256, nodes: int = 64) -> tuple[float, float]:
    """(median adaserve selection ms, measured target step ms: num_requests x 4 tree tokens at context 64)."""
    from app.engine.runner import SeqInput
    from bench.selection_overhead import time_select

    blocks = [[] for _ in range(num_requests)]
    ctx = 64
    for b in blocks:
        if not engine.kv.ensure_capacity(b, ctx + 4):
            raise RuntimeError('not enough KV blocks for the selection-overhead step')
    seqs = [SeqInput(b, ctx, [1, 2, 3, 4], parents=[-1, 0, 0, 1], logits="all") for b in blocks]
    engine.runner.run(seqs)
    t0 = time.perf_counter()
    engine.runner.run(seqs)
    step_ms = (time.perf_counter() - t0) * 1e3
    for b in blocks:
        engine.kv.release(b)
    args = Namespace(requests=num_requests, nodes=nodes, depth=8, budget=4 * num_requests, n_max=32,
                     step_ms=step_ms, runs=200, warmup=20)
    wall_s, _ = time_select("adaserve", args, np.random.default_rng(0))
    return float(np.median(wall_s)) * 1e3, step_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default="feature,ngram", help="the engine's draft sources (default: serve_config's)")
    ap.add_argument("--hf-draft", default="distilled", help="token-only draft for transformers' assisted generation")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the prompts (contenders take turns on each prompt)")
    ap.add_argument("--token-budget", type=int, default=None, help="default: profiled at start-up")
    ap.add_argument("--dtype", default="auto", help="engine and transformers dtype (auto: the engine's default)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-fp32-baseline", action="store_true", help="skip plain fp32 decoding next to bf16")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    engine = LLMEngine(EngineConfig(draft=args.draft, policy="adaserve", token_budget=args.token_budget,
                                    num_kv_blocks=2048, dtype=args.dtype))
    prompts = [engine.encode_prompt(p, chat=True) for p in held_out_prompts(args.prompts)]
    engine.generate([prompts[0]], SamplingParams(max_tokens=8))  # warm-up
    print(f"device={engine.device} dtype={engine.dtype} threads={torch.get_num_threads()} draft={args.draft} "
          f"token_budget={engine.token_budget} prompts={len(prompts)} new_tokens={args.new_tokens}")
    contenders = {policy: engine_run(engine, policy, args.new_tokens) for policy in POLICIES}
    if engine.dtype != torch.float32 and not args.no_fp32_baseline:
        # bf16 (the default on AMX CPUs) is slower than fp32 for one token at a time: the honest baseline is
        # the faster of the two, so plain fp32 decoding runs side by side.
        fp32 = LLMEngine(EngineConfig(num_kv_blocks=2048, dtype="float32"))
        fp32.generate([prompts[0]], SamplingParams(max_tokens=8))
        contenders[FP32_NONE] = engine_run(fp32, "none", args.new_tokens)
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        from app.engine.speculative import load_draft_source
        from app.engine.weights import resolve_model_dir

        target_hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("embedded")),
                                                         dtype=engine.dtype).eval()
        token_draft = load_draft_source(args.hf_draft, target=engine.model, target_tokenizer=engine.tokenizer,
                                        num_blocks=1, use_vocab_subset=False).model
        assistant = hf_draft_model(token_draft, target_hf)
        contenders[HF_PLAIN] = hf_run(target_hf, args.new_tokens)
        contenders[HF_ASSISTED] = hf_run(target_hf, args.new_tokens, assistant)
        contenders[HF_LOOKUP] = hf_run(target_hf, args.new_tokens, prompt_lookup=10)
    rows = side_by_side(contenders, prompts, args.rounds)
    nan = {"tok_s": float("nan")}
    hf_assisted, hf_lookup = (rows.get(k, nan)["tok_s"] for k in (HF_ASSISTED, HF_LOOKUP))
    base = rows["none"]["tok_s"]
    best = max((p for p in POLICIES if p != "none"), key=lambda p: rows[p]["tok_s"])
    print(f"\n{'contender':<26} {'decode tok/s':>12} {'x none':>7} {'tokens/step':>12}")
    for name, r in rows.items():
        label = f"engine {name}" if name in POLICIES else name
        steps = f"{r['accepted_per_step']:>12.2f}" if name in POLICIES else ""
        print(f"{label:<26} {r['tok_s']:>12.2f} {r['tok_s'] / base:>7.2f} {steps}")
    best_tok_s = rows[best]["tok_s"]
    fastest_none = max(base, rows.get(FP32_NONE, nan)["tok_s"])
    best_hf = max(hf_assisted, hf_lookup)
    print(f"best speculative policy: {best}: {best_tok_s / base:.2f}x engine none ({engine.dtype}), "
          f"{best_tok_s / fastest_none:.2f}x the fastest plain decoding, "
          f"{best_tok_s / hf_assisted:.2f}x transformers assisted, "
          f"{best_tok_s / best_hf:.2f}x transformers' best speculative mode")
    sel_ms, step_ms = selection_overhead(engine)
    print(f"adaserve selection, 256 requests x 64 candidates: {sel_ms:.3f} ms; target step at 256 requests: "
          f"{step_ms:.1f} ms; fraction {100 * sel_ms / step_ms:.3f}%")


if __name__ == "__main__":
    main()
