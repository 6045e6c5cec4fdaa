"""routing: full rankings; tight requests by spare budget, others by prefix affinity within headroom, else power of
two choices; stale stats; prompt prefixes as chained text-chunk hashes."""

from __future__ import annotations

import numpy as np

from policies.routing import (PREFIX_CHUNK_CHARS, PrefixSummary, ReplicaStats, baseline_tpot_s, is_tight,
                              prefix_chunk_hashes, prefix_choice, prefix_match, rank_replicas, routing_text)


def rep(rid, spare=None, running=None, queue=0, age=0.1, healthy=True, in_flight=0, tpot=0.03, prefix=()):
    return ReplicaStats(rid, spare, running, queue, tpot, healthy, age, in_flight, frozenset(prefix))


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


# ---- prefix affinity --------------------------------------------------------------------------------------------
SYSTEM = "You are a meticulous assistant. " * 40  # ~1.3k characters: 5 chunks
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Plan a trip to Lisbon."}]


def _hashes(messages):
    return prefix_chunk_hashes(routing_text({"messages": messages}))


def test_chunk_hashes_chain_so_a_follow_up_turn_shares_the_first_turns_hashes():
    turn1 = _hashes(CHAT)
    turn2 = _hashes(CHAT + [{"role": "assistant", "content": "Sure. " * 100}, {"role": "user", "content": "More?"}])
    text = routing_text({"messages": CHAT})
    assert len(turn1) == len(text) // PREFIX_CHUNK_CHARS >= 5 and turn2[:len(turn1)] == turn1
    assert len(turn2) > len(turn1)
    other = _hashes([{"role": "system", "content": "x" + SYSTEM}, CHAT[1]])
    assert not set(other) & set(turn1)  # chained: one early difference changes every later hash
    assert prefix_chunk_hashes(routing_text({"prompt": SYSTEM})) == prefix_chunk_hashes("\x1etext\x1f" + SYSTEM)
    assert prefix_chunk_hashes(routing_text({"prompt": [1, 2, 3] * 200}))
    assert routing_text({}) is None and prefix_chunk_hashes(None) == [] and prefix_chunk_hashes("short") == []
    assert len(prefix_chunk_hashes("y" * 10**6)) == 64  # a request's first 16k characters at most


def test_prefix_match_counts_leading_chunks():
    h = [1, 2, 3, 4]
    assert prefix_match(h, frozenset({1, 2, 4})) == 2 and prefix_match(h, frozenset({2, 3})) == 0
    assert prefix_match([], frozenset({1})) == 0


def test_loose_request_goes_to_the_longest_prefix_match_within_headroom():
    h = _hashes(CHAT)
    reps = [rep("idle", spare=40, running=0), rep("some", spare=30, running=3, prefix=h[:2]),
            rep("most", spare=20, running=5, prefix=h)]
    for seed in range(20):  # power of two would put "idle" first; the cache wins within 8 requests of it
        assert flat(rank_replicas(reps, tight=False, rng=np.random.default_rng(seed), prefix_hashes=h))[0] == "most"
    # ... and the rest keep their power-of-two order
    rest = flat(rank_replicas(reps, tight=False, rng=np.random.default_rng(3), prefix_hashes=h))[1:]
    assert sorted(rest) == ["idle", "some"]


def test_an_overloaded_or_slo_bound_replica_is_not_chosen_for_its_cache():
    h = _hashes(CHAT)
    busy = [rep("idle", spare=40, running=0), rep("cached", spare=20, running=9, prefix=h)]
    assert prefix_choice(busy, h, max_load_imbalance=8) is None  # 9 > 0 + 8
    assert prefix_choice(busy, h, max_load_imbalance=9).replica_id == "cached"
    no_headroom = [rep("idle", spare=40, running=0), rep("cached", spare=0, running=1, prefix=h)]
    assert prefix_choice(no_headroom, h) is None
    stale = [rep("idle", spare=40, running=0), rep("cached", spare=9, running=1, prefix=h, age=60.0)]
    assert prefix_choice(stale, h) is None
    sick = [rep("idle", spare=40, running=0), rep("cached", spare=9, running=0, prefix=h, healthy=False)]
    assert flat(rank_replicas(sick, tight=False, prefix_hashes=h))[-1] == "cached"
    # without a match the ranking is exactly power of two choices
    for seed in range(10):
        plain = rank_replicas(busy, tight=False, rng=np.random.default_rng(seed))
        assert rank_replicas(busy, tight=False, rng=np.random.default_rng(seed), prefix_hashes=h) == plain


def test_tight_request_still_goes_by_spare_budget_and_the_match_breaks_ties():
    h = _hashes(CHAT)
    reps = [rep("spare", spare=50, running=4), rep("cached", spare=20, running=0, prefix=h)]
    assert flat(rank_replicas(reps, tight=True, prefix_hashes=h)) == ["spare", "cached"]
    tie = [rep("a", spare=20, running=0), rep("b", spare=20, running=3, prefix=h)]
    assert flat(rank_replicas(tie, tight=True, prefix_hashes=h)) == ["b", "a"]
    assert flat(rank_replicas(tie, tight=True)) == ["a", "b"]


def test_prefix_summary_is_a_bounded_lru_that_drops_a_prefix_from_its_end():
    summary = PrefixSummary(capacity=6)
    a, b = [1, 2, 3, 4], [10, 11, 12]
    summary.add(a)
    summary.add(b)
    assert len(summary) == 6 and prefix_match(a, frozenset(summary.hashes())) == 3  # a's deepest chunk went first
    summary.add(a[:1])  # served again: refreshed
    summary.add([20, 21])
    held = frozenset(summary.hashes())
    assert prefix_match(a, held) == 1 and prefix_match(b, held) == 3
    assert ReplicaStats.from_mapping("r", {"prefix_hashes": [1, 2]}).prefix_hashes == frozenset({1, 2})
