"""The local datasets (bench/datasets.py) load offline, in the shapes training and the workloads expect."""

from __future__ import annotations


def test_datasets_load_offline():
    from bench.datasets import humaneval_prompts, mtbench_questions, sharegpt_conversations

    convs = sharegpt_conversations(limit=3, skip=2)
    assert len(convs) == 3 and all(c["messages"][0]["role"] in ("user", "system") for c in convs)
    for c in convs:
        roles = [m["role"] for m in c["messages"] if m["role"] != "system"]
        assert all(r != s for r, s in zip(roles, roles[1:]))
    assert sharegpt_conversations(limit=1, skip=4)[0] == sharegpt_conversations(limit=7)[4]
    assert len(mtbench_questions()) == 80 and len(humaneval_prompts()) == 164
