"""Continuous batching end to end: equivalence with transformers' greedy decoding, sampling, KV accounting."""

from __future__ import annotations

import time

import pytest

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import InvalidRequestError, LLMEngine
from tests.conftest import hf_greedy

PROMPTS = [
    "Hi",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "def add(a, b):",
    "List three prime numbers:",
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city and "
    "continuing through the republic, the empire, and eventually the fall of the western half in 476 AD. Summarize:",
    "Translate to French: good morning",
    "Q: What is the boiling point of water?\nA:",
    "Once upon a time",
]
MAX_NEW = [12, 9, 14, 7, 10, 12, 8, 11]


@pytest.fixture(scope="module")
def engine():
    # Small chunks and step budget force chunked prefill and steps mixing prefill with decode.
    return LLMEngine(EngineConfig(num_kv_blocks=256, block_size=16, prefill_chunk_tokens=16,
                                  max_num_batched_tokens=40, max_num_seqs=8, dtype="float32"))  # vs transformers fp32


def _drain(engine: LLMEngine, outs: dict) -> None:
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o


def _assert_matches_reference(got: list[int], ref: list[int], eos: frozenset[int]) -> None:
    """Identical tokens; where one side stopped at an end token the other side's prefix must agree."""
    n = min(len(got), len(ref))
    assert got[:n] == ref[:n]
    if len(got) != len(ref):
        assert (got and got[-1] in eos) or (ref and ref[-1] in eos)


def test_staggered_greedy_batch_equals_transformers(engine, hf_embedded):
    ids = [engine.encode_prompt(p) for p in PROMPTS]
    outs: dict = {}
    pending = list(range(len(PROMPTS)))
    step = 0
    mixed_steps = 0
    while pending or engine.has_unfinished():
        # Two new arrivals every third step.
        if step % 3 == 0:
            for i in pending[:2]:
                engine.add_request(ids[i], SamplingParams(max_tokens=MAX_NEW[i]), request_id=str(i))
            pending = pending[2:]
        plan_running = engine.scheduler.num_running
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        mixed_steps += plan_running > 0 and len(engine.scheduler.waiting) == 0 and step > 0
        step += 1
    for i in range(len(PROMPTS)):
        ref = hf_greedy(hf_embedded, ids[i], MAX_NEW[i])
        _assert_matches_reference(outs[str(i)].token_ids, ref, engine.eos_token_ids)
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks


def test_chunked_prefill_and_decode_share_steps(engine):
    engine.kv.reset_prefix_cache()  # the chunk sizes below are a cold cache's
    long_ids = engine.encode_prompt(PROMPTS[4])
    engine.add_request(engine.encode_prompt("Hello there"), SamplingParams(max_tokens=30), request_id="short")
    engine.step()  # short request prefilled
    engine.add_request(long_ids, SamplingParams(max_tokens=2), request_id="long")
    plan = engine.scheduler.schedule(time.perf_counter())
    assert [c.request.request_id for c in plan.decodes] == ["short"]
    assert plan.prefills and plan.prefills[0].num_tokens == 16 < len(long_ids)  # a chunk, beside the decode
    engine.abort("short")
    engine.abort("long")
    engine.scheduler.running.clear()
    engine.kv.allocator.__init__(engine.kv.allocator.num_blocks, engine.kv.block_size)


def test_prefill_cap_bounds_the_steps_prefill_and_its_tree_nodes(engine, monkeypatch):
    sched = engine.scheduler
    engine.kv.reset_prefix_cache()  # the chunk sizes below are a cold cache's
    long_ids = engine.encode_prompt(PROMPTS[4])
    engine.add_request(engine.encode_prompt("Hello there"), SamplingParams(max_tokens=30), request_id="short")
    seen = []

    def cap_with(value):
        monkeypatch.setattr(sched, "prefill_cap", lambda d, now: seen.append([r.request_id for r in d]) or value)

    cap_with((0, 0))
    assert sched.schedule(time.perf_counter()).prefills  # no decodes yet: the cap is not asked
    assert not seen
    sched.running[0].num_computed_tokens = len(sched.running[0].token_ids)
    sched.running[0].token_ids.append(0)  # as if its first token were sampled: now decoding
    engine.add_request(long_ids, SamplingParams(max_tokens=2), request_id="long")
    monkeypatch.setattr(sched.totals, "tree_requests", 0)
    plan = sched.schedule(time.perf_counter())
    assert seen == [["short"]] and [c.request.request_id for c in plan.decodes] == ["short"]
    assert not plan.prefills and plan.node_budget == 40 - 1  # no tree verified yet: the plan cannot price nodes
    monkeypatch.setattr(sched.totals, "tree_requests", 1)
    plan = sched.schedule(time.perf_counter())
    # the prompt waits so that the step stays as small as the plan made it: no nodes past the reserved ones
    assert not plan.prefills and plan.node_budget == 0
    assert plan.prefill_held
    assert [r.request_id for r in sched.waiting] == ["long"]
    cap_with((5, 7))
    plan = sched.schedule(time.perf_counter())
    assert [(c.request.request_id, c.num_tokens) for c in plan.prefills] == [("long", 5)]
    assert plan.prefill_held  # the rest of its chunk waits
    assert plan.node_budget == plan.slo_node_budget == 7  # the nodes the cap reserved, not B's 40 - 1 - 5
    cap_with((10_000, 0))
    plan = sched.schedule(time.perf_counter())  # never above the step's own limits
    assert [(c.request.request_id, c.num_tokens) for c in plan.prefills] == [("long", 16)]
    assert not plan.prefill_held
    engine.abort("short")
    engine.abort("long")
    sched.running.clear()
    engine.kv.allocator.__init__(engine.kv.allocator.num_blocks, engine.kv.block_size)


def test_sampling_with_seed_is_reproducible(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = engine.generate(["Tell me a story"], params)[0].token_ids
    b = engine.generate(["Tell me a story"] * 3, params)  # batch composition must not matter
    assert all(o.token_ids == a for o in b)
    c = engine.generate(["Tell me a story"], SamplingParams(max_tokens=12, temperature=1.0, seed=99))[0].token_ids
    assert c != a


def test_blocks_return_after_finish_and_abort(engine):
    free = engine.kv.allocator.num_free
    rid = engine.add_request("Count to ten:", SamplingParams(max_tokens=50))
    engine.add_request("Say hi", SamplingParams(max_tokens=3), request_id="done-soon")
    for _ in range(4):
        engine.step()
    assert engine.kv.allocator.num_free < free
    assert engine.abort(rid)
    assert not engine.abort(rid)
    _drain(engine, {})
    assert engine.kv.allocator.num_free == free


def test_kv_exhaustion_preempts_and_output_stays_correct(hf_embedded):
    small = LLMEngine(EngineConfig(num_kv_blocks=10, block_size=8, prefill_chunk_tokens=32,
                                   max_num_batched_tokens=64, dtype="float32"))
    prompts = [small.encode_prompt(p) for p in PROMPTS[1:5]]
    outs = small.generate(prompts, SamplingParams(max_tokens=14, ignore_eos=True))
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for ids, o in zip(prompts, outs):
        assert len(o.token_ids) == 14
        _assert_matches_reference(o.token_ids, hf_greedy(hf_embedded, ids, 14), small.eos_token_ids)
    assert small.kv.allocator.num_free == small.kv.allocator.num_blocks


def test_stop_strings_and_stop_tokens(engine):
    base = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=12))[0]
    stop = base.text.strip()[:3]
    cut = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and base.text.startswith(cut.text)
    tok = base.token_ids[3]
    by_id = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=12, stop_token_ids=(tok,)))[0]
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]
    assert engine.generate(["def add(a, b):"], SamplingParams(max_tokens=5))[0].finish_reason == "length"


def test_streaming_deltas_add_up_to_the_final_text(engine):
    rid = engine.add_request("Write a short sentence about cats.", SamplingParams(max_tokens=20))
    pieces, final = [], None
    while final is None:
        for o in engine.step():
            if o.request_id == rid:
                pieces.append(o.new_text)
                final = o if o.finished else None
    assert "".join(pieces) == final.text
    m = final.metrics
    assert m.ttft_s > 0 and m.num_output_tokens == len(final.token_ids)
    assert m.tpot_s is None or m.tpot_s > 0


def test_slo_fields_and_attainment(engine):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    out = engine.generate(["Hello"], params, tpot_slo_ms=1e6, ttft_slo_ms=1e6)[0]
    m = out.metrics
    assert (m.slo_attained, m.ttft_attained, m.tpot_attained, m.tpot_slo_ms) == (True, True, True, 1e6)
    # arrived 100 s ago with a 10 s TTFT SLO: the first token is late, the pace is fine
    late = time.perf_counter() - 100.0
    m = engine.generate(["Hello"], params, tpot_slo_ms=1e6, ttft_slo_ms=1e4, arrival_time=late)[0].metrics
    assert (m.slo_attained, m.ttft_attained, m.tpot_attained) == (False, False, True)
    m = engine.generate(["Hello"], params, tpot_slo_ms=1e-3, ttft_slo_ms=1e6)[0].metrics  # 1 us a token: missed
    assert (m.slo_attained, m.ttft_attained, m.tpot_attained) == (False, True, False)
    with pytest.raises(InvalidRequestError, match="idle replica"):  # below what an idle replica can do
        engine.add_request("Hello", params, ttft_slo_ms=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "hi " * 9000}, "context window"),
    ({"prompt": "hi", "tpot_slo_ms": -1.0}, "positive"),
    ({"prompt": "hi", "sampling": SamplingParams(max_tokens=10**9)}, "maximum context length is .* However, you "
                                                                      "requested 1000000001 tokens"),
])
def test_bad_requests_raise_clear_errors(engine, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(**kwargs)


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
