"""routing: full rankings; tight requests by spare budget, others by power of two choices; stale stats."""

from __future__ import annotations

import numpy as np

from policies.routing import ReplicaStats, baseline_tpot_s, is_tight, rank_replicas


def rep(rid, spare=None, running=None, queue=0, age=0.1, healthy=True, in_flight=0, tpot=0.03):
    return ReplicaStats(rid, spare, running, queue, tpot, healthy, age, in_flight)


def flat(groups):
    return [rid for g in groups for rid in g]


def test_tight_requests_go_to_most_spare_budget():
    reps = [rep("a", spare=10, running=1), rep("b", spare=50, running=9), rep("c", spare=30, running=2)]
    groups = rank_replicas(reps, tight=True, rng=np.random.default_rng(0))
    assert groups == [["b"], ["c"], ["a"]]


def test_tight_ties_broken_by_load():
    reps = [rep("a", spare=20, running=5), rep("b", spare=20, running=2, in_flight=3), rep("c", spare=20, running=1)]
    assert flat(rank_replicas(reps, tight=True)) == ["c", "b", "a"]


def test_stale_or_missing_stats_rank_after_fresh_ones_by_in_flight():
    reps = [rep("old", spare=1000, running=0, age=60.0, in_flight=4), rep("fresh", spare=5, running=3),
            rep("new", in_flight=1, age=float("inf")), rep("idle", in_flight=0, age=float("inf"))]
    assert flat(rank_replicas(reps, tight=True, max_stats_age_s=5.0)) == ["fresh", "idle", "new", "old"]
    # all stale: in-flight counts alone
    stale = [rep("x", spare=99, age=10, in_flight=2), rep("y", spare=1, age=10, in_flight=0)]
    assert flat(rank_replicas(stale, tight=True, max_stats_age_s=5.0)) == ["y", "x"]


def test_unhealthy_replicas_come_last_in_one_group():
    reps = [rep("sick1", spare=100, running=0, healthy=False), rep("ok", spare=1, running=8),
            rep("sick2", spare=100, running=3, healthy=False)]
    for tight in (True, False):
        groups = rank_replicas(reps, tight=tight, rng=np.random.default_rng(1))
        assert groups[0] == ["ok"] and sorted(groups[-1]) == ["sick1", "sick2"] and len(groups) == 2


def test_power_of_two_choices():
    reps = [rep(str(i), spare=0, running=i) for i in range(6)]  # replica i has load i
    firsts = []
    for seed in range(400):
        groups = rank_replicas(reps, tight=False, rng=np.random.default_rng(seed))
        order = flat(groups)
        assert sorted(order) == sorted(r.replica_id for r in reps) and all(len(g) == 1 for g in groups)
        assert int(order[0]) < int(order[1])  # the less loaded of the two draws goes first
        assert [int(x) for x in order[2:]] == sorted(int(x) for x in order[2:])
        firsts.append(int(order[0]))
    counts = np.bincount(firsts, minlength=6)
    assert counts[5] == 0  # the most loaded replica never wins a draw
    assert counts[0] > counts[1] > counts[2]  # P(first = k) = (5 - k) / 15
    # seeded: reproducible
    a = rank_replicas(reps, tight=False, rng=np.random.default_rng(7))
    assert a == rank_replicas(reps, tight=False, rng=np.random.default_rng(7))


def test_load_uses_local_in_flight_when_it_exceeds_reported():
    reps = [rep("a", running=1, in_flight=9), rep("b", running=5, in_flight=0)]
    for seed in range(10):
        assert flat(rank_replicas(reps, tight=False, rng=np.random.default_rng(seed)))[0] == "b"


def test_dict_input_and_empty():
    stats = [
        {"replica_id": "r1", "spare_budget": 7, "running_requests": 2, "queue_len": 0, "stats_age_s": 0.2},
        {"replica_id": "r2", "spare_budget": "12", "running_requests": 1, "stats_age_s": 0.2, "extra": 1},
        {"replica_id": "r3"},  # routing_stats still {}: stale, in-flight 0
    ]
    assert flat(rank_replicas(stats, tight=True)) == ["r2", "r1", "r3"]
    assert rank_replicas([], tight=True) == []
    assert rank_replicas([rep("only")], tight=False) == [["only"]]
    assert ReplicaStats.from_mapping("z", {}).stats_age_s == float("inf")


def test_is_tight_and_baseline():
    reps = [rep("a", tpot=0.03), rep("b", tpot=0.05), rep("c", tpot=0.04, age=100.0)]
    assert baseline_tpot_s(reps) == 0.04  # median of fresh a, b
    assert is_tight(0.05, 0.04) and not is_tight(0.2, 0.04)
    assert not is_tight(None, 0.04) and not is_tight(float("inf"), 0.04) and not is_tight(0.01, None)
    assert baseline_tpot_s([rep("x", tpot=None)]) is None
