"""TTFT deadlines in the engine: the idle-prefill floor (400), fail-fast admission, best effort, EDF service,
relative TTFT targets, and output unchanged by the order (float32, greedy)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import InvalidRequestError, LLMEngine, SLOUnattainableError
from app.engine.scheduler import LATENCY_EMA
from policies.latency_model import LatencyModel, PiecewiseLinear, update_knot_log_scales

# 10 ms a step plus 1 ms a token: a 16-token chunk takes 26 ms, a 40-token step 50 ms
LINEAR = LatencyModel(PiecewiseLinear((0.0, 1000.0), (0.01, 1.01)), 0.0)
LONG = "Summarize the following text in one sentence: " + "the quick brown fox jumps over the lazy dog " * 12


def _engine(**kw) -> LLMEngine:
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, block_size=16, prefill_chunk_tokens=16,
                                    max_num_batched_tokens=40, max_num_seqs=8, dtype="float32", **kw))
    engine.scheduler.latency_model = LINEAR  # the profile a speculating replica measures at start
    return engine


def test_the_profile_is_calibrated_to_the_measured_step_time():
    engine = _engine(calibrate_latency=True)
    assert engine.scheduler.latency_scale == 1.0 and engine.scheduler.model is LINEAR
    engine.add_request(LONG, SamplingParams(max_tokens=24), request_id="a")
    ratios, logs = [], np.zeros(2)
    while engine.has_unfinished():
        engine.step()
        r = engine.step_history[-1]
        ratios.append(min(max(r.verify_s / LINEAR.predict(r.num_tokens, 0), 0.25), 4.0))
        # the per-knot scales follow each step's error against the profile as rescaled so far
        now = LINEAR.rescaled(np.exp(logs)).predict(r.num_tokens, 0)
        logs = update_knot_log_scales(logs, LINEAR.tokens.knots, r.num_tokens,
                                      math.log(min(max(r.verify_s / now, 0.25), 4.0)), LATENCY_EMA)
    scale = engine.scheduler.latency_scale
    expected = 0.0  # the EMA of the log ratio, from 1 (LINEAR has no context term: the context does not matter)
    for ratio in ratios:
        expected = (1 - LATENCY_EMA) * expected + LATENCY_EMA * math.log(ratio)
    assert scale == pytest.approx(math.exp(expected)) and scale != 1.0
    assert engine.stats()["latency_scale"] == scale
    np.testing.assert_allclose(engine.scheduler.knot_log_scales, logs)
    model = engine.scheduler.model
    assert model.predict(40, 100) == pytest.approx(LINEAR.rescaled(np.exp(logs)).predict(40, 100))
    assert model.predict(40, 100) != pytest.approx(LINEAR.predict(40, 100))
    assert engine.scheduler.predicted_step_s(40, 100) == pytest.approx(model.predict(40, 100))
    assert engine.idle_prefill_s(100) == pytest.approx(sum(0.01 + 0.001 * min(16, 100 - s) for s in range(0, 100, 16))
                                                       + engine.scheduler.step_overhead_ema_s * 7)  # SLOs: the profile
    off = _engine()  # the default: the scale tracked (the replica exports it), nothing priced in
    off.add_request(LONG, SamplingParams(max_tokens=4))
    while off.has_unfinished():
        off.step()
    assert off.scheduler.latency_scale != 1.0 and off.scheduler.model is LINEAR
    assert off.scheduler.knot_log_scales is None
    assert off.scheduler.predicted_step_s(40, 100) == LINEAR.predict(40, 100)


@pytest.fixture
def engine():
    return _engine()


def test_a_ttft_target_below_the_idle_prefill_time_is_a_client_error(engine):
    n = len(engine.encode_prompt(LONG))
    idle_s = engine.idle_prefill_s(n)
    assert idle_s == pytest.approx(sum(0.01 + 0.001 * min(16, n - s) for s in range(0, n, 16)))
    with pytest.raises(InvalidRequestError, match="idle replica"):
        engine.add_request(LONG, SamplingParams(max_tokens=2), ttft_slo_ms=idle_s * 1e3 * 0.9)
    assert not engine.has_unfinished()


def test_relative_ttft_is_a_multiple_of_the_idle_prefill_plus_an_allowance(engine):
    rid = engine.add_request(LONG, SamplingParams(max_tokens=2), ttft_slo_x_prefill=3.0, ttft_allowance_ms=50.0)
    req = engine.requests[rid]
    assert req.ttft_slo_ms == pytest.approx(3.0 * engine.idle_prefill_s(req.num_prompt_tokens) * 1e3 + 50.0)


def test_an_unattainable_ttft_is_refused_at_once_and_the_next_feasible_one_is_served(engine):
    for i in range(4):  # ~0.6 s of prefill queued, with loose deadlines
        engine.add_request(LONG, SamplingParams(max_tokens=2), request_id=f"bulk{i}", ttft_slo_ms=60_000.0)
    n = len(engine.encode_prompt(LONG))
    tight_ms = engine.idle_prefill_s(n) * 1e3 * 1.5  # feasible alone
    # EDF puts the tight newcomer first; it is refused because that pushes an admitted prompt past its deadline
    for i in range(4):
        engine.requests[f"bulk{i}"].ttft_slo_ms = 400.0  # now the queue needs all its time
    with pytest.raises(SLOUnattainableError) as err:
        engine.add_request(LONG, SamplingParams(max_tokens=2), request_id="tight", ttft_slo_ms=tight_ms)
    assert err.value.retry_after_s > 0 and err.value.reason == "ttft" and "tight" not in engine.requests
    engine.add_request("Hi", SamplingParams(max_tokens=2), request_id="loose", ttft_slo_ms=60_000.0)  # feasible
    done = set()
    while engine.has_unfinished():
        done |= {o.request_id for o in engine.step() if o.finished}
    assert done == {"bulk0", "bulk1", "bulk2", "bulk3", "loose"}


def test_best_effort_serves_the_unattainable_request_after_the_protected_ones():
    engine = _engine(on_unattainable="best_effort")
    engine.config = engine.scheduler.config = dataclasses.replace(engine.config, prefill_chunk_tokens=32)
    late = time.perf_counter() - 10.0  # arrived 10 s ago with a 1 s TTFT SLO: it cannot make it any more
    engine.add_request(LONG, SamplingParams(max_tokens=1), request_id="late", ttft_slo_ms=1000.0, arrival_time=late)
    engine.add_request(LONG, SamplingParams(max_tokens=1), request_id="ok", ttft_slo_ms=60_000.0)
    assert engine.requests["late"].best_effort and not engine.requests["ok"].best_effort
    first = {}
    while engine.has_unfinished():
        for o in engine.step():
            first.setdefault(o.request_id, engine.num_steps)
    assert first["ok"] < first["late"]


def test_earliest_deadline_is_prefilled_first_and_output_is_unchanged():
    engine = _engine()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = {"a": LONG, "b": "Write a haiku about autumn leaves.", "c": "def add(a, b):"}
    slo = {"a": 30_000.0, "b": 20_000.0, "c": 10_000.0}  # arrival order a, b, c; deadlines c, b, a
    for rid, p in prompts.items():
        engine.add_request(p, params, request_id=rid, ttft_slo_ms=slo[rid])
    first, outs = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            first.setdefault(o.request_id, engine.num_steps)
            if o.finished:
                outs[o.request_id] = o.token_ids
    assert first["c"] <= first["b"] <= first["a"]
    plain = LLMEngine(EngineConfig(num_kv_blocks=256, dtype="float32"))
    ref = plain.generate(list(prompts.values()), params)
    assert [outs[k] for k in prompts] == [o.token_ids for o in ref]


@pytest.mark.parametrize("on_unattainable", ["reject", "best_effort"])
def test_a_prompt_that_became_late_is_refused_or_demoted_behind_the_ones_still_on_time(on_unattainable):
    engine = _engine(on_unattainable=on_unattainable)
    engine.config = engine.scheduler.config = dataclasses.replace(engine.config, prefill_chunk_tokens=32)
    engine.add_request(LONG, SamplingParams(max_tokens=1), request_id="late", ttft_slo_ms=60_000.0)
    engine.add_request(LONG, SamplingParams(max_tokens=1), request_id="ok", ttft_slo_ms=60_000.0)
    engine.requests["late"].ttft_slo_ms = 1.0  # its deadline has passed while it waited
    first, last = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            first.setdefault(o.request_id, engine.num_steps)
            last[o.request_id] = o
    assert not engine.requests and engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    if on_unattainable == "reject":  # refused before it started: the client hears at once, nothing computed
        assert last["late"].finish_reason == "slo_unattainable" and not last["late"].token_ids
        assert first["late"] <= first["ok"] and last["ok"].finish_reason == "length"
    else:
        assert first["ok"] < first["late"] and last["late"].finish_reason == "length"


def test_admission_keeps_headroom_for_load_that_arrives_later():
    n = len(_engine().encode_prompt(LONG))
    for headroom, admitted in ((0.0, True), (0.6, False)):
        engine = _engine(ttft_admission_headroom=headroom)
        # a deadline 1.5x what the prompt needs at full speed now: on time without headroom, not with 60% of it
        need_s = -(-n // 40) * (0.01 + 0.04)
        try:
            engine.add_request(LONG, SamplingParams(max_tokens=1), ttft_slo_ms=need_s * 1.5 * 1e3)
            ok = True
        except SLOUnattainableError:
            ok = False
        assert ok == admitted


def test_a_newcomer_that_would_break_the_tpot_pace_is_refused_where_the_pace_plan_runs():
    # no speculation: one token a step, so a 15 ms TPOT SLO needs steps of at most 15 ms = 5 tokens (10 + 1 ms each):
    # four requests leave one prompt token a step for the prompts' first tokens; a fifth leaves none
    def admitted(engine, n):
        ok = []
        for i in range(n):
            try:
                engine.add_request("Hi", SamplingParams(max_tokens=4), request_id=f"r{i}", tpot_slo_ms=15.0,
                                   ttft_slo_ms=60_000.0)
                ok.append(True)
            except SLOUnattainableError as err:
                assert "TPOT pace" in str(err) and err.reason == "tpot_pace" and err.retry_after_s >= 0
                ok.append(False)
        return ok

    assert admitted(_engine(slo_prefill=True), 5) == [True] * 4 + [False]
    assert admitted(_engine(slo_prefill=False), 5) == [True] * 5  # no pace plan: only the TTFT rule


def _overloaded(engine: LLMEngine, capacity_tok_s: float = 100.0, refusing: bool = True) -> None:
    """Nine 20-token prompts offered over the last 9 s (20 tok/s) against ``capacity_tok_s`` of prefill, and (if
    ``refusing``) a refusal by fail fast 5 s ago."""
    load = engine.scheduler.offered_prefill
    now = time.perf_counter()
    for i in range(9):
        load.observe_arrival(now - 9.0 + i, 20)
    load.capacity_tok_s = capacity_tok_s
    if refusing:
        load.observe_refusal(now - 5.0)


@pytest.mark.parametrize("on_unattainable", ["reject", "best_effort"])
def test_under_overload_the_longest_prompts_are_shed_first(on_unattainable):
    engine = _engine(slo_prefill=True, overload_shedding=True, on_unattainable=on_unattainable)
    _overloaded(engine, capacity_tok_s=25.0)
    n = len(engine.encode_prompt(LONG))
    # with the newcomer, 10 arrivals span 9 s stretched to 10: the short ones offer 18 tok/s and fit, the long one
    # on top does not
    assert 180 / 10.0 <= 25.0 < (180 + n) / 10.0
    if on_unattainable == "reject":
        with pytest.raises(SLOUnattainableError, match="overloaded and admits prompts of at most 20 tokens") as err:
            engine.add_request(LONG, SamplingParams(max_tokens=2), request_id="long", ttft_slo_ms=60_000.0)
        assert err.value.retry_after_s >= 0 and err.value.reason == "overloaded" and "long" not in engine.requests
    else:
        engine.add_request(LONG, SamplingParams(max_tokens=2), request_id="long", ttft_slo_ms=60_000.0)
        assert engine.requests["long"].best_effort
    engine.add_request("Hi", SamplingParams(max_tokens=2), request_id="short", ttft_slo_ms=60_000.0)
    assert not engine.requests["short"].best_effort
    assert engine.stats()["shed_cutoff_tokens"] == 20


def test_a_fail_fast_refusal_opens_overload_shedding():
    engine = _engine(slo_prefill=True, overload_shedding=True)
    _overloaded(engine, capacity_tok_s=25.0, refusing=False)
    assert engine.stats()["shed_cutoff_tokens"] is None
    for i in range(4):  # the scenario of test_an_unattainable_ttft_is_refused_at_once_and_the_next_feasible_one_...
        engine.add_request(LONG, SamplingParams(max_tokens=2), request_id=f"bulk{i}", ttft_slo_ms=60_000.0)
    for i in range(4):
        engine.requests[f"bulk{i}"].ttft_slo_ms = 400.0
    tight_ms = engine.idle_prefill_s(len(engine.encode_prompt(LONG))) * 1e3 * 1.5
    with pytest.raises(SLOUnattainableError, match="queued ahead"):
        engine.add_request(LONG, SamplingParams(max_tokens=2), ttft_slo_ms=tight_ms)
    assert engine.scheduler.offered_prefill.last_refusal_s is not None
    assert engine.stats()["shed_cutoff_tokens"] is not None


def test_no_shedding_without_overload_or_refusals_or_the_pace_plan_or_when_switched_off():
    on = {"slo_prefill": True, "overload_shedding": True}
    for kw, capacity, refusing in ((on, 10_000.0, True), (on, 25.0, False), ({**on, "slo_prefill": False}, 25.0, True),
                                   ({"slo_prefill": True}, 25.0, True)):  # the default: off
        engine = _engine(**kw)
        _overloaded(engine, capacity, refusing)
        engine.add_request(LONG, SamplingParams(max_tokens=2), request_id="long", ttft_slo_ms=60_000.0)
        assert not engine.requests["long"].best_effort
        assert engine.stats()["shed_cutoff_tokens"] is None


def test_steps_that_leave_prompts_waiting_measure_the_prefill_capacity():
    engine = _engine()
    engine.add_request(LONG, SamplingParams(max_tokens=2), ttft_slo_ms=60_000.0)
    n = engine.requests[next(iter(engine.requests))].num_prompt_tokens
    assert engine.scheduler.offered_prefill.capacity_tok_s is None
    while engine.has_unfinished():
        engine.step()
    # 16-token chunks: every prefill step but the last left prompt tokens waiting; decode steps had none queued
    saturated = [r.step_s for r in engine.step_history][: -(-n // 16) - 1]
    expected = 16 / saturated[0]
    for step_s in saturated[1:]:
        expected = 0.95 * expected + 0.05 * 16 / step_s
    assert engine.stats()["prefill_capacity_tok_s"] == pytest.approx(expected)

    short = _engine()
    short.add_request([1] * 10, SamplingParams(max_tokens=2))  # one chunk: nothing ever waited
    while short.has_unfinished():
        short.step()
    assert short.stats()["prefill_capacity_tok_s"] is None
