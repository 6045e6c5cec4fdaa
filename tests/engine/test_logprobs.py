"""Logprobs: the target's raw log-probabilities of the emitted tokens, taken from the pass that chose them (the
prefill/decode row, or the verified tree's accepted path), equal transformers' log_softmax within 1e-4 (float32)."""

from __future__ import annotations

import pytest
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine

PROMPTS = ["def fibonacci(n):", "Write a poem about the sea.", "1, 2, 3, 4, 5, 6,"]
TOP = 5


def _generate_with_logprobs(engine: LLMEngine, sampling: SamplingParams, **kw) -> dict:
    ids = {p: engine.add_request(p, sampling, **kw) for p in PROMPTS}
    streamed: dict[str, list] = {rid: [] for rid in ids.values()}
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.logprobs is not None and len(o.logprobs) == len(o.new_token_ids)
            streamed[o.request_id] += o.logprobs
            if o.finished:
                finals[o.request_id] = o
    return {p: (engine.encode_prompt(p), finals[rid].token_ids, streamed[rid]) for p, rid in ids.items()}


def _assert_equals_transformers(hf_model, results: dict, num_top: int) -> None:
    for prompt_ids, out_ids, logprobs in results.values():
        assert [lp.token_id for lp in logprobs] == out_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt_ids + out_ids])).logits[0].float()
        ref = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)  # the distribution each token came from
        for k, lp in enumerate(logprobs):
            assert lp.logprob == pytest.approx(float(ref[k, lp.token_id]), abs=1e-4)
            assert len(lp.top) == num_top
            top_vals = ref[k].topk(num_top).values.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_vals, abs=1e-4)
            assert all(float(ref[k, i]) == pytest.approx(v, abs=1e-4) for i, v in lp.top)


@pytest.fixture(scope="module")
def plain():
    return LLMEngine(EngineConfig(num_kv_blocks=256, dtype="float32", prefill_chunk_tokens=16,
                                  max_num_batched_tokens=64))


def test_greedy_logprobs_equal_transformers(plain, hf_embedded):
    results = _generate_with_logprobs(plain, SamplingParams(max_tokens=10, ignore_eos=True, logprobs=TOP))
    _assert_equals_transformers(hf_embedded, results, TOP)


def test_sampled_logprobs_are_the_raw_distribution(plain, hf_embedded):
    """With temperature and top-p the reported logprob is still the model's own (unprocessed) distribution."""
    params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, top_p=0.8, seed=7, logprobs=0)
    _assert_equals_transformers(hf_embedded, _generate_with_logprobs(plain, params), 0)


def test_speculative_logprobs_come_from_the_verified_tree(hf_embedded):
    """Draft = target accepts whole chains: several tokens a step, each with its logprob from its tree node."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, dtype="float32", draft="embedded", policy="adaserve",
                                    profile_latency=False, token_budget=64, prefill_chunk_tokens=16,
                                    max_num_batched_tokens=96))
    results = _generate_with_logprobs(engine, SamplingParams(max_tokens=16, ignore_eos=True, logprobs=3),
                                      policy="chain:4")
    assert engine.scheduler.totals.accepted > 0
    _assert_equals_transformers(hf_embedded, results, 3)


def test_no_logprobs_unless_asked(plain):
    out = plain.generate(["Hi"], SamplingParams(max_tokens=3))[0]
    assert out.logprobs is None
