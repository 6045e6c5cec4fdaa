"""Acceptance model from a hand-made trace."""

from __future__ import annotations

import numpy as np

from bench.traces import AcceptanceModel


def test_from_trace_counts():
    # root -> 0 (q .8) -> 2 (q .5); root -> 1 (q .1). Verified 0, 1, 2; accepted 0 then 2.
    line = {"policy": "x", "parent": [-1, -1, 0], "q": [0.8, 0.1, 0.5], "sel": [0, 1, 2], "acc": [0, 2]}
    miss = {"policy": "x", "parent": [-1, -1, 0], "q": [0.8, 0.1, 0.5], "sel": [0, 1, 2], "acc": []}
    m = AcceptanceModel.from_trace([line, miss])
    assert m.mean_accepted_per_tree == 1.0
    assert m.fanout.shape == (4, 4)  # two parents (root, node 0) per tree
    np.testing.assert_allclose(m.fanout[0], [0.8, 0.1, 0, 0], rtol=1e-6)
    # node 0 (q .8): 1 of 2 accepted; node 2 (q .5) counted only when its parent was accepted: 1 of 1
    assert m.cond_accept(np.array([0.85]))[0] == 0.5
    assert m.cond_accept(np.array([0.55]))[0] == 1.0
    assert m.cond_accept(np.array([0.15]))[0] == 0.0
    assert m.scaled(2.0).cond_accept(np.array([0.3]))[0] == 0.0  # was q .15: rate 0 x 2
    assert m.scaled(2.0).cond_accept(np.array([1.0]))[0] == 1.0


def test_gzip_roundtrip(tmp_path):
    import json

    from bench.traces import gzip_file, load_trace

    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"parent": [-1], "q": [0.5], "sel": [0], "acc": [0]}) + "\n")
    gz = gzip_file(p)
    assert not p.exists() and gz.exists()
    assert load_trace(p) == load_trace(gz) == [{"parent": [-1], "q": [0.5], "sel": [0], "acc": [0]}]


def test_from_trace_separates_lookup_chains():
    # root -> 0 (model, q .6) -> 2 (model, q .5); root -> 1 (lookup only, q .4) -> 3 (lookup, q .9) -> 4 (q .8).
    # Second tree: the lookup's first node is the model's too (code 2), then lookup only.
    a = {"parent": [-1, -1, 0, 1, 3], "q": [0.6, 0.4, 0.5, 0.9, 0.8], "sel": [0, 1, 3], "acc": [1, 3],
         "lookup": [0, 1, 0, 1, 1]}
    b = {"parent": [-1, 0], "q": [0.7, 0.95], "sel": [0, 1], "acc": [0, 1], "lookup": [2, 1]}
    c = {"parent": [-1], "q": [0.3], "sel": [0], "acc": [], "lookup": [0]}  # no lookup chain
    m = AcceptanceModel.from_trace([a, b, c])
    assert m.lookup_share == 2 / 3
    np.testing.assert_allclose(m.lookup_chains[:, :3], [[0.4, 0.9, 0.8], [0.7, 0.95, 0.0]], rtol=1e-6)
    assert m.lookup_shared_first.tolist() == [False, True]
    # the model's fan-out leaves lookup-only nodes out: root rows [0.6], [0.7], [0.3]; node 0 of tree a: [0.5]
    np.testing.assert_allclose(sorted(m.fanout[:, 0].tolist()), [0.3, 0.5, 0.6, 0.7], rtol=1e-6)
    # bins with fewer than 5 lookup observations fall back to the bin centre
    assert m.lookup_accept(np.array([0.95]))[0] == np.float64(0.5 * (0.9 + 1.0 + 1e-9))
    plain = AcceptanceModel.from_trace([{k: v for k, v in a.items() if k != "lookup"}])
    assert plain.lookup_chains is None and plain.lookup_share == 0.0


def test_from_trace_keeps_each_category_s_rows_and_lookup_share():
    # coding: a confident tree with a lookup chain; chat: an unsure one without; "" (an old trace line): one more
    coding = {"category": "coding", "parent": [-1, -1, 0], "q": [0.9, 0.6, 0.8], "sel": [0, 1, 2], "acc": [1],
              "lookup": [0, 1, 0]}
    chat = {"category": "chat", "parent": [-1, -1], "q": [0.2, 0.1], "sel": [0], "acc": [], "lookup": [0, 0]}
    m = AcceptanceModel.from_trace([chat, coding, chat])
    assert m.category_lookup_share == {"chat": 0.0, "coding": 1.0}
    rows = m.category_rows
    assert rows["chat"][1] == 2 and rows["coding"][1] == 2  # a root row per chat tree; coding: root, node 0
    chat_rows = m.fanout[rows["chat"][0]:sum(rows["chat"])]
    np.testing.assert_allclose(chat_rows[:, :2], [[0.2, 0.1], [0.2, 0.1]], rtol=1e-6)
    coding_rows = m.fanout[rows["coding"][0]:sum(rows["coding"])]
    np.testing.assert_allclose(sorted(coding_rows[:, 0].tolist()), [0.8, 0.9], rtol=1e-6)
    start, count = m.category_chains["coding"]
    np.testing.assert_allclose(m.lookup_chains[start:start + count, 0], [0.6], rtol=1e-6)
    pools = m.pools_for(["coding", "chat", "summarization"])
    assert pools["fan_start"].tolist()[:2] == [rows["coding"][0], rows["chat"][0]]
    assert pools["fan_count"].tolist() == [2, 2, m.fanout.shape[0]]  # a class the trace lacks draws from all
    assert pools["chain_count"].tolist() == [1, 0, m.lookup_chains.shape[0]]
    np.testing.assert_allclose(pools["lookup_share"], [1.0, 0.0, m.lookup_share])
    old = AcceptanceModel.from_trace([{k: v for k, v in chat.items() if k != "category"}])
    assert old.category_rows is None and old.pools_for(["chat"])["fan_count"].tolist() == [old.fanout.shape[0]]
