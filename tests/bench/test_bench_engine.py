"""bench.engine --step-shapes: every shape is timed in both dtypes on the same inputs, and the KV it took is given
back (a leak would make the later shapes time a fuller cache)."""

from __future__ import annotations

from bench.engine import STEP_SHAPES, step_shape_inputs, time_step_shapes
from tests.engine.test_dummy import engine, write_config


def tiny_engine(tmp_path, dtype: str):
    return engine(str(write_config(tmp_path / "tiny")), dtype=dtype, num_kv_blocks=256)


def test_step_shape_inputs_are_chain_trees_up_to_the_tree_limit_then_prefill_chunks(tmp_path):
    eng = tiny_engine(tmp_path, "float32")
    tree = step_shape_inputs(eng.runner, 2, 16, context=8)
    assert len(tree) == 2 and all(s.parents == [-1] + list(range(15)) and s.logits == "all" for s in tree)
    chunk = step_shape_inputs(eng.runner, 1, 256, context=8)[0]
    assert chunk.parents is None and chunk.logits == "last" and len(chunk.token_ids) == 256
    assert eng.runner.run(tree).logits.shape[0] == 32  # what the benchmark times runs


def test_time_step_shapes_prints_every_shape_and_releases_its_kv(tmp_path, capsys):
    engines = {d: tiny_engine(tmp_path, d) for d in ("float32", "bfloat16")}
    free = {d: e.kv.allocator.num_free for d, e in engines.items()}
    time_step_shapes(engines, context=16, repeats=1)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(int(r[0]), int(r[2])) for r in rows] == list(STEP_SHAPES)
    assert all(float(r[4]) == 1.0 and float(r[6]) == 1.0 for r in rows[:1])  # x1 of the 1-token step itself
    assert {d: e.kv.allocator.num_free for d, e in engines.items()} == free
