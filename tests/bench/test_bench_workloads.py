"""Workloads from the real data packages, the class mix, SLO targets and the arrival processes."""

from __future__ import annotations

import numpy as np
import pytest

from bench import workloads
from bench.workloads import CATEGORIES, arrival_times, build_workload, slo_targets_ms


def test_loaders_return_real_data():
    coding = workloads.coding_items(32, 1200)
    chat = workloads.chat_items(32, 1200)
    summ = workloads.summarization_items(32, 1200)
    assert len(coding) == 164 and "def " in coding[0][0][0]["content"]
    assert any(src.startswith("mtbench:") for _, _, src in chat) and any(src.startswith("sharegpt:") for _, _, src in chat)
    assert len(summ) >= 20
    for msgs, length, _ in summ[:20]:
        assert msgs[0]["content"].startswith(workloads.SUMMARIZE_INSTRUCTION) and len(msgs[0]["content"]) > 1000
        assert length == 32
    assert all(1 <= n <= 32 for _, n, _ in coding + chat)


def test_class_mix_and_determinism():
    wl = build_workload(500, rate=2.0, seed=3, max_tokens_cap=16)
    counts = {c: sum(r.category == c for r in wl) for c in CATEGORIES}
    assert abs(counts["coding"] / 500 - 0.6) < 0.06
    assert abs(counts["chat"] / 500 - 0.2) < 0.05 and abs(counts["summarization"] / 500 - 0.2) < 0.05
    assert all(r.slo_class == r.category and 1 <= r.max_tokens <= 16 for r in wl)
    again = build_workload(500, rate=2.0, seed=3, max_tokens_cap=16)
    assert [r.source for r in again] == [r.source for r in wl]
    assert [r.arrival_s for r in again] == [r.arrival_s for r in wl]
    only_chat = build_workload(50, seed=1, mix=(0, 1, 0))
    assert {r.category for r in only_chat} == {"chat"}


def test_slo_targets():
    rel = slo_targets_ms(30.0)
    assert rel == pytest.approx({"coding": 36.0, "chat": 50.1, "summarization": 150.0})
    assert slo_targets_ms(absolute={"coding": 10.0}) == {"coding": 10.0}
    with pytest.raises(ValueError):
        slo_targets_ms(None)


@pytest.mark.parametrize("kind,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 3.0)])
def test_arrival_rate_and_cv(kind, cv):
    rng = np.random.default_rng(0)
    t = arrival_times(40000, 5.0, rng, kind, cv)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_arrival_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        arrival_times(3, 0.0, rng)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, rng, "uniform")
