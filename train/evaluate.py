"""Evaluate a draft against the embedded target on held-out prompts (MT-Bench, HumanEval; never trained on).

    python -m train.evaluate [--draft distilled] [--mtbench 16] [--humaneval 16] [--gen-tokens 64]

For the target's own greedy continuations (fp32, chat template; a HumanEval prompt is sent as "Complete this
Python function" + the code) it prints, per dataset:
- agreement: draft top-1 == the target's greedy token, teacher-forced over the continuation;
- ECE: expected calibration error of the draft's top-1 probability for that event (`--bins` equal-width bins);
- accepted@4: mean number of draft tokens a greedy chain of k = 4 gets accepted before the first mismatch,
  started at every `--stride`-th continuation position (the bonus token is NOT counted: add 1 for tokens/step);
- coverage: share of target tokens inside the draft's vocabulary subset (1.0 for a full head).
Then the cost of one draft step vs one target decode step at batch 1 and 32 (context `--context` tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel
from app.engine.runner import ModelRunner, SeqInput
from app.engine.speculative import Drafter, DraftRequest, load_draft_source
from app.engine.weights import load_checkpoint, load_tokenizer
from bench.datasets import humaneval_prompts, mtbench_questions


def heldout_prompts(n_mtbench: int, n_humaneval: int) -> dict[str, list[str]]:
    mt = [q["turns"][0] for q in mtbench_questions()][:n_mtbench]
    he = [f"Complete this Python function:\n```python\n{p}```" for p in humaneval_prompts()[:n_humaneval]]
    return {"mt-bench": mt, "humaneval": he}


def target_continuations(model: LlamaModel, tokenizer, prompts: list[str], gen_tokens: int,
                         eos: set[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the target's greedy continuation ids) per prompt (chat template, batches of 32)."""
    from train.distill import greedy_answers

    ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)) for p in prompts]
    pairs = []
    for i in range(0, len(ids), 32):
        batch = ids[i: i + 32]
        pairs += list(zip(batch, greedy_answers(model, batch, gen_tokens, eos)))
    return pairs


@torch.inference_mode()
def target_hidden_states(model: LlamaModel, pairs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """The target's final-normed hidden state of every prompt + continuation token (what feature drafts read)."""
    block = 16
    kv = KVCache(*model.new_kv_cache(max(-(-(len(p) + len(c)) // block) for p, c in pairs), block))
    runner = ModelRunner(model, kv)
    out = []
    for prompt, cont in pairs:
        blocks: list[int] = []
        kv.ensure_capacity(blocks, len(prompt) + len(cont))
        out.append(runner.run([SeqInput(block_ids=blocks, context_len=0, token_ids=prompt + cont,
                                        logits="none")]).hidden.clone())
        kv.release(blocks)
    return out


def teacher_forced(drafter: Drafter, pairs: list[tuple[list[int], list[int]]],
                   hidden: list[torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draft top-1 token and prob at every continuation position, and the target's token there.
    hidden: the target's hidden states per pair (target_hidden_states), needed by feature drafts."""
    top_tok, top_prob, truth = [], [], []
    kv, runner = drafter.kv, drafter.runner
    # A token draft's position i predicts ids[i + 1]; a feature draft's position i (pair F_i, ids[i + 1]) ids[i + 2].
    shift = 1 if drafter.uses_features else 0
    for n, (prompt, cont) in enumerate(pairs):
        ids = prompt + cont
        if shift and len(prompt) < 2:
            continue
        blocks: list[int] = []
        if not kv.ensure_capacity(blocks, len(ids)):
            raise RuntimeError("draft KV cache too small for the evaluation")
        with torch.inference_mode():
            embeds = None
            if shift:
                embeds = drafter.model.input_embeds(hidden[n][:-1], torch.tensor(ids[1:], dtype=torch.int64))
            out = runner.run([SeqInput(block_ids=blocks, context_len=0, token_ids=ids[shift:], logits="all")],
                             embeds)
        kv.release(blocks)
        logits = out.logits[len(prompt) - 1 - shift: len(ids) - 1 - shift]  # predicts cont[0], cont[1], ...
        p, i = torch.softmax(logits, -1).max(-1)
        if drafter.vocab_ids is not None:
            i = drafter.vocab_ids[i]
        top_tok.append(i.numpy())
        top_prob.append(p.numpy())
        truth.append(np.asarray(cont))
    return np.concatenate(top_tok), np.concatenate(top_prob), np.concatenate(truth)


def expected_calibration_error(prob: np.ndarray, correct: np.ndarray, bins: int) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(prob[m].mean() - correct[m].mean())
    return float(ece)


def chain_acceptance(drafter: Drafter, pairs: list[tuple[list[int], list[int]]], k: int, stride: int,
                     hidden: list[torch.Tensor] | None = None) -> float:
    """Mean accepted draft tokens (bonus excluded) of greedy k-chains, all requests batched per start offset."""
    accepted = []
    if drafter.uses_features:
        kept = [(pc, h) for pc, h in zip(pairs, hidden) if len(pc[0]) >= 2]
        pairs = [pc for pc, _ in kept]
        for j, (_, h) in enumerate(kept):
            drafter.record_hidden(f"eval{j}", 0, h)
    max_cont = max(len(c) for _, c in pairs)
    for t in range(0, max_cont - k + 1, stride):
        live = [(j, p, c) for j, (p, c) in enumerate(pairs) if t + k <= len(c)]
        if not live:
            break
        reqs = [DraftRequest(f"eval{j}", p + c[:t]) for j, p, c in live]
        trees = drafter.propose(reqs, depth=k, beam_width=1, topk=1)
        for (j, p, c), tree in zip(live, trees):
            n = 0
            for d in range(min(k, tree.num_nodes)):  # a chain: node d is at depth d + 1
                if int(tree.tokens[d]) != c[t + d]:
                    break
                n += 1
            accepted.append(n)
    for j in range(len(pairs)):
        drafter.release(f"eval{j}")
    return float(np.mean(accepted)) if accepted else float("nan")


def step_cost(model: LlamaModel, batch: int, context: int, reps: int, seed: int = 0) -> float:
    """Median seconds of one decode forward (one token per request after `context` cached tokens)."""
    block = 16
    need = batch * (-(-(context + 1) // block))
    kv = KVCache(*model.new_kv_cache(need + 1, block))
    runner = ModelRunner(model, kv)
    g = torch.Generator().manual_seed(seed)
    tables = []
    for _ in range(batch):
        blocks: list[int] = []
        kv.ensure_capacity(blocks, context + 1)
        tables.append(blocks)
    with torch.inference_mode():
        for b in tables:  # prefill one at a time to keep memory low
            ids = torch.randint(0, 1000, (context,), generator=g).tolist()
            runner.run([SeqInput(block_ids=b, context_len=0, token_ids=ids, logits="none")])
        seqs = [SeqInput(block_ids=b, context_len=context, token_ids=[42], logits="last") for b in tables]
        step = lambda: runner.run(seqs)  # noqa: E731
        if hasattr(model, "input_embeds"):  # a feature draft also runs its fc over (feature, token) pairs
            feats = torch.randn(batch, model.config.hidden_size, generator=g).to(model.dtype)
            ids = torch.full((batch,), 42, dtype=torch.int64)
            step = lambda: runner.run(seqs, model.input_embeds(feats, ids))  # noqa: E731
        step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="feature",
                    help="feature | distilled | path to a draft .safetensors | model id")
    ap.add_argument("--target", default="embedded")
    ap.add_argument("--mtbench", type=int, default=16, help="MT-Bench first turns to use (of 80)")
    ap.add_argument("--humaneval", type=int, default=16, help="HumanEval prompts to use (of 164)")
    ap.add_argument("--gen-tokens", type=int, default=64, help="target greedy tokens per prompt")
    ap.add_argument("--k", type=int, default=4, help="greedy chain length")
    ap.add_argument("--stride", type=int, default=2, help="chain start every STRIDE continuation tokens")
    ap.add_argument("--bins", type=int, default=10, help="ECE bins")
    ap.add_argument("--context", type=int, default=256, help="context length for the step-cost timing")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per cost point")
    ap.add_argument("--no-cost", action="store_true", help="skip the step-cost timing")
    ap.add_argument("--full-head", action="store_true", help="ignore the draft's vocabulary subset")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    ckpt = load_checkpoint(args.target)
    drafter = load_draft_source(args.draft, target=ckpt, use_vocab_subset=not args.full_head, kv_cache_memory_gb=0.5)
    if not isinstance(drafter, Drafter):
        ap.error(f"--draft must name one draft model, not {args.draft!r}")
    subset = None if drafter.vocab_ids is None else set(drafter.vocab_ids.tolist())
    results: dict = {"draft": args.draft, "datasets": {}}
    tokenizer = load_tokenizer(ckpt.tokenizer_dir)
    target_model = LlamaModel(ckpt.config, ckpt.state_dict, torch.float32, torch.device("cpu"))
    eos = set(ckpt.config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    for name, prompts in heldout_prompts(args.mtbench, args.humaneval).items():
        if not prompts:
            continue
        pairs = [(p, c) for p, c in target_continuations(target_model, tokenizer, prompts, args.gen_tokens, eos) if c]
        hidden = target_hidden_states(target_model, pairs) if drafter.uses_features else None
        tok, prob, truth = teacher_forced(drafter, pairs, hidden)
        correct = (tok == truth).astype(np.float64)
        results["datasets"][name] = {
            "prompts": len(pairs), "tokens": int(truth.size), "agreement": float(correct.mean()),
            "ece": expected_calibration_error(prob.astype(np.float64), correct, args.bins),
            "mean_top1_prob": float(prob.mean()),
            f"accepted@{args.k}": chain_acceptance(drafter, pairs, args.k, args.stride, hidden),
            "coverage": 1.0 if subset is None else float(np.mean([t in subset for t in truth.tolist()])),
        }
    if not args.no_cost:
        results["cost"] = {}
        for batch in (1, 32):
            tt = step_cost(target_model, batch, args.context, args.reps)
            td = step_cost(drafter.model, batch, args.context, args.reps)
            results["cost"][batch] = {"target_ms": tt * 1e3, "draft_ms": td * 1e3, "ratio": td / tt}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)

    print(f"draft: {args.draft}   layers: {drafter.model.config.num_layers}   head rows: "
          f"{drafter.model.lm_head.shape[0]}   (accepted@{args.k} excludes the bonus token)")
    print(f"{'dataset':<11}{'prompts':>8}{'tokens':>8}{'agree':>8}{'ECE':>8}{'acc@' + str(args.k):>8}"
          f"{'cover':>8}")
    for name, r in results["datasets"].items():
        print(f"{name:<11}{r['prompts']:>8}{r['tokens']:>8}{r['agreement']:>8.3f}{r['ece']:>8.3f}"
              f"{r[f'accepted@{args.k}']:>8.2f}{r['coverage']:>8.3f}")
    if "cost" in results:
        print(f"{'batch':<7}{'target ms':>11}{'draft ms':>10}{'ratio':>8}   (one decode step, context {args.context})")
        for batch, r in results["cost"].items():
            print(f"{batch:<7}{r['target_ms']:>11.1f}{r['draft_ms']:>10.1f}{r['ratio']:>8.3f}")
    print(f"wall time {results['wall_s']} s")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
