"""Faults attributable to one request fail that request alone: the others finish token-identical to a run without
it (float32, greedy), and every KV block comes back."""

from __future__ import annotations

import pytest

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine

PROMPTS = {"a": "def fibonacci(n):", "b": "Write a poem about the sea.", "c": "1, 2, 3, 4, 5, 6,",
           "bad": "The quick brown fox"}
NEW_TOKENS = 14


def _engine(**kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=256, dtype="float32", prefill_chunk_tokens=16, max_num_batched_tokens=96)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def plain():
    return _engine()


@pytest.fixture(scope="module")
def speculative():
    return _engine(draft="feature,ngram", policy="adaserve", profile_latency=False, token_budget=48)


def _run(engine: LLMEngine, ids: list[str], sampling: dict[str, SamplingParams] | None = None) -> dict:
    """Run the prompts to the end (the bad one, if there, starts with the others); final outputs by id."""
    sampling = sampling or {}
    for rid in ids:
        engine.add_request(PROMPTS[rid], sampling.get(rid, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)),
                           request_id=rid)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    return outs


def _assert_others_unchanged(engine: LLMEngine, outs: dict) -> None:
    reference = _run(engine, ["a", "b", "c"])
    for rid in ("a", "b", "c"):
        assert outs[rid].finish_reason == "length" and outs[rid].error is None
        assert outs[rid].token_ids == reference[rid].token_ids


def _nan_logits_after(engine: LLMEngine, monkeypatch, request_id: str, num_good_tokens: int) -> None:
    """From the step after it has num_good_tokens, the request's logits are NaN (its own numerics blew up)."""
    run = engine._run

    def faulty_run(plan, trees):
        out = run(plan, trees)
        for i, c in enumerate(plan.chunks):
            if c.request.request_id == request_id and c.request.num_output_tokens >= num_good_tokens:
                out.logits[out.logit_rows[i]] = float("nan")
        return out

    monkeypatch.setattr(engine, "_run", faulty_run)


@pytest.mark.parametrize("which", ["plain", "speculative"])
def test_nan_logits_fail_only_their_request(which, request, monkeypatch):
    engine = request.getfixturevalue(which)
    _nan_logits_after(engine, monkeypatch, "bad", 3)
    outs = _run(engine, ["a", "bad", "b", "c"])
    assert outs["bad"].finish_reason == "error" and "not finite" in outs["bad"].error
    assert 3 <= len(outs["bad"].token_ids) < NEW_TOKENS
    monkeypatch.undo()
    _assert_others_unchanged(engine, outs)


def test_nan_logits_fail_a_sampled_request_too(plain, monkeypatch):
    _nan_logits_after(plain, monkeypatch, "bad", 1)
    outs = _run(plain, ["a", "bad", "b", "c"],
                {"bad": SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=3)})
    assert outs["bad"].finish_reason == "error"
    monkeypatch.undo()
    _assert_others_unchanged(plain, outs)


def test_a_tiny_temperature_is_greedy(plain):
    greedy = _run(plain, ["bad"])["bad"].token_ids
    tiny = _run(plain, ["bad"], {"bad": SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=1e-40)})
    assert tiny["bad"].finish_reason == "length" and tiny["bad"].token_ids == greedy


def test_a_detokenization_failure_fails_only_its_request(plain, monkeypatch):
    alone = _run(plain, ["a", "b", "c", "bad"])
    others = {t for rid in ("a", "b", "c") for t in alone[rid].token_ids}
    marker = next(t for t in alone["bad"].token_ids[2:] if t not in others)  # a token only "bad" generates
    decode = plain.tokenizer.decode

    def faulty_decode(ids, **kw):
        if marker in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return decode(ids, **kw)

    monkeypatch.setattr(plain.tokenizer, "decode", faulty_decode)
    outs = _run(plain, ["a", "bad", "b", "c"])
    assert outs["bad"].finish_reason == "error" and "injected" in outs["bad"].error
    monkeypatch.undo()
    _assert_others_unchanged(plain, outs)


def test_a_draft_failure_drops_only_that_requests_speculation(speculative, monkeypatch):
    drafter = speculative.speculator.drafter
    propose = drafter.propose

    def faulty_propose(requests, **kw):
        if any(r.request_id == "bad" for r in requests):
            raise RuntimeError("injected draft fault")
        return propose(requests, **kw)

    monkeypatch.setattr(drafter, "propose", faulty_propose)
    trees_before = speculative.speculator.num_trees
    outs = _run(speculative, ["a", "bad", "b", "c"])
    assert speculative.speculator.num_trees > trees_before  # the others kept speculating
    assert outs["bad"].metrics.num_spec_steps == 0 and outs["bad"].finish_reason == "length"
    assert not speculative.speculator.disabled  # forgotten once the request finished
    monkeypatch.undo()
    plain_engine = _engine()
    reference = _run(plain_engine, ["a", "bad", "b", "c"])  # lossless: everyone equals plain decoding
    assert {rid: o.token_ids for rid, o in outs.items()} == {rid: o.token_ids for rid, o in reference.items()}
