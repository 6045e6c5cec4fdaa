"""Metric functions on hand-made records: attainment, both goodputs, percentiles."""

from __future__ import annotations

import pytest

from bench.loadgen import RequestRecord, attained, percentiles, summarize, tpot_s, ttft_s


def rec(cls, slo_ms, first, last, n, scheduled=0.0, error=None, spec=None, acc=None, ttft_slo=None):
    return {"slo_class": cls, "tpot_slo_ms": slo_ms, "ttft_slo_ms": ttft_slo, "scheduled_s": scheduled,
            "first_token_s": first, "last_token_s": last, "num_tokens": n, "error": error,
            "spec_steps": spec, "accepted_draft_tokens": acc}


def test_tpot_ttft_and_attainment():
    r = rec("coding", 50, 1.0, 1.4, 9, scheduled=0.5)  # 8 gaps in 0.4 s = 50 ms: exactly on target
    assert tpot_s(r) == pytest.approx(0.05) and ttft_s(r) == pytest.approx(0.5)
    assert attained(r)
    assert not attained(rec("coding", 49, 1.0, 1.4, 9))
    assert not attained(rec("coding", 100, 1.0, 1.4, 9, error="timeout"))
    assert attained(rec("chat", 10, 1.0, 1.0, 1))  # one token: no decode phase
    assert not attained(rec("chat", 100, 1.0, 1.4, 9, ttft_slo=500))  # TTFT 1 s > 500 ms
    assert not attained(rec("chat", 100, None, None, 0))


def test_summary_goodput_both_ways():
    records = [
        rec("coding", 50, 1.0, 1.4, 9),  # attains, 9 tokens
        rec("coding", 50, 1.0, 2.0, 9),  # 125 ms: misses
        rec("chat", 200, 2.0, 3.0, 11, spec=5, acc=5),  # 100 ms: attains, 11 tokens
        rec("summarization", 500, 1.0, 10.0, 10, error="timeout"),
    ]
    s = summarize(records, wall_s=10.0)
    o = s["overall"]
    assert o["requests"] == 4 and o["attained"] == 2 and o["attainment"] == 0.5
    assert o["goodput_tok_s"] == pytest.approx((9 + 11) / 10)  # paper: tokens of attaining requests / wall
    assert o["goodput_req_s"] == pytest.approx(2 / 10)  # vLLM: attaining requests / wall
    assert o["throughput_tok_s"] == pytest.approx(39 / 10)
    assert o["accepted_tokens_per_step"] == pytest.approx(2.0)
    assert s["coding"]["attainment"] == 0.5 and s["chat"]["attainment"] == 1.0
    assert s["summarization"]["attainment"] == 0.0 and s["summarization"]["errors"] == 1
    assert summarize(records)["wall_s"] == 10.0  # default: to the last token


def test_percentiles_and_record_tokens():
    p = percentiles([1, 2, 3, 4, None, 5])
    assert p["p50"] == 3 and p["p90"] == pytest.approx(4.6) and p["p99"] == pytest.approx(4.96)
    assert percentiles([])["p50"] is None
    r = RequestRecord(0, "chat", "chat", "none", 100.0, scheduled_s=0.1)
    r.add_tokens(0.5, 1)
    r.add_tokens(0.7, 2)
    r.add_tokens(0.9, 0)
    assert (r.first_token_s, r.last_token_s, r.num_tokens) == (0.5, 0.7, 3)
    assert tpot_s(r) == pytest.approx(0.1) and attained(r)


def test_record_shift_moves_every_time():
    r = RequestRecord(0, "chat", "chat", "none", 100.0, scheduled_s=0.1)
    r.sent_s = 0.1
    r.add_tokens(0.5, 1)
    r.add_tokens(0.7, 2)
    before = (ttft_s(r), tpot_s(r))
    r.shift(10.0)
    assert (r.scheduled_s, r.sent_s, r.first_token_s, r.last_token_s) == pytest.approx((10.1, 10.1, 10.5, 10.7))
    assert [t for t, _ in r.token_times] == pytest.approx([10.5, 10.7])
    assert (ttft_s(r), tpot_s(r)) == pytest.approx(before)
    unsent = RequestRecord(1, "chat", "chat", "none", 100.0, scheduled_s=1.0)
    unsent.shift(2.0)
    assert unsent.scheduled_s == 3.0 and unsent.first_token_s is None


class _QueueRefusingEngine:
    """run_engine's view of an engine: request "1" is refused in the queue (after it was admitted), "0" decodes."""

    def __init__(self):
        self.requests, self.num_steps, self.step_history = {}, 0, []

    def add_request(self, prompt_ids, sampling, *, request_id, **kw):
        from types import SimpleNamespace

        self.requests[request_id] = SimpleNamespace(ttft_slo_ms=1000.0)

    def step(self):
        from app.engine.request import RequestOutput

        self.num_steps += 1
        if self.num_steps == 1:
            return [RequestOutput("0", [5], "x", False), RequestOutput("1", [], "", True, "slo_unattainable")]
        return [RequestOutput("0", [6], "y", True, "length")]


def test_run_engine_records_a_refusal_in_the_queue():
    from bench.loadgen import run_engine
    from bench.workloads import WorkloadRequest

    wl = [WorkloadRequest(i, "chat", "chat", [{"role": "user", "content": "hi"}], 2, 0.0, "test") for i in range(2)]
    recs, _ = run_engine(_QueueRefusingEngine(), wl, "adaserve", {"chat": 100.0}, progress=False,
                         prompt_ids=[[1, 2], [3, 4]], ttft=(10.0, 1000.0))
    assert recs[0].error is None and recs[0].num_tokens == 2
    assert recs[1].error == "slo_unattainable" and recs[1].refusal == "ttft_late" and recs[1].num_tokens == 0
    assert recs[0].refusal is None
    assert summarize(recs)["overall"]["rejected"] == 1


class _RefusingEngine(_QueueRefusingEngine):
    """Refuses request "1" at arrival, the last one sent."""

    def add_request(self, prompt_ids, sampling, *, request_id, **kw):
        from app.engine.engine import SLOUnattainableError

        if request_id == "1":
            raise SLOUnattainableError("overloaded", retry_after_s=1.0, reason="overloaded")
        super().add_request(prompt_ids, sampling, request_id=request_id, **kw)

    def idle_prefill_s(self, num_prompt_tokens):
        return 0.01

    def step(self):
        from app.engine.request import RequestOutput

        self.num_steps += 1
        return [RequestOutput("0", [5, 6], "xy", True, "length")]


def test_run_engine_ends_when_the_last_arrival_is_refused_and_nothing_runs():
    from bench.loadgen import run_engine
    from bench.workloads import WorkloadRequest

    wl = [WorkloadRequest(i, "chat", "chat", [{"role": "user", "content": "hi"}], 2, 0.05 * i, "test")
          for i in range(2)]
    recs, _ = run_engine(_RefusingEngine(), wl, "adaserve", {"chat": 100.0}, progress=False,
                         prompt_ids=[[1, 2], [3, 4]], ttft=(10.0, 1000.0))
    assert recs[0].error is None and recs[0].num_tokens == 2
    assert recs[1].error == "slo_unattainable" and recs[1].refusal == "overloaded"
    assert recs[1].ttft_slo_ms == pytest.approx(10.0 * 10 + 1000.0)
