"""The sweep's policy options and its interleaved blocks (the engine runs themselves: bench.sweep on the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.simulate import POLICY_OPTIONS
from bench.sweep import _policy_options, arrival_blocks, cell_requests


def test_policy_options_are_the_simulators():
    assert _policy_options("adaserve") == {}
    assert _policy_options("dynamic-tree+slochunk") == POLICY_OPTIONS["slochunk"] == {"slo_prefill": True}
    assert _policy_options("none+noadmission+noslochunk") == {"ttft_admission": False, "slo_prefill": False}
    with pytest.raises(SystemExit, match="unknown policy options"):
        _policy_options("adaserve+fast")


def test_arrival_blocks_cover_every_request_once_in_arrival_order():
    arrival = [3.0, 0.5, 2.0, 0.1, 5.0, 4.0, 1.0]
    blocks = arrival_blocks(arrival, 3)
    assert [len(b) for b in blocks] == [3, 2, 2]
    flat = np.concatenate(blocks)
    assert sorted(flat.tolist()) == list(range(len(arrival)))
    assert np.all(np.diff(np.asarray(arrival)[flat]) >= 0)  # consecutive arrivals, blocks in order
    assert [b.tolist() for b in arrival_blocks(arrival, 1)] == [np.argsort(arrival).tolist()]
    assert len(arrival_blocks(arrival[:2], 5)) == 2  # never an empty block


def test_cell_requests_span_the_cell_duration_never_fewer_than_asked():
    assert cell_requests(64, 3.0, None) == 64
    assert cell_requests(64, 3.0, 60.0) == 180  # 60 s of arrivals at 3 req/s
    assert cell_requests(64, 1.0, 60.0) == 64  # the floor -n
    assert cell_requests(10, 2.5, 9.9) == 25  # rounded up: never shorter than the duration
    assert cell_requests(10, 0.7, 60.0) == 42  # not 43 from 0.7 x 60's rounding error


def test_each_run_starts_with_its_policy_options_a_cold_prefix_cache_and_no_measured_gain():
    from app.engine.config import EngineConfig, SamplingParams
    from app.engine.engine import LLMEngine
    from bench.sweep import start_run

    engine = LLMEngine(EngineConfig(num_kv_blocks=64, dtype="float32", profile_latency=False))
    base = engine.config
    engine.generate(["The same prompt that the previous policy's run prefilled. " * 4],
                    SamplingParams(max_tokens=2, ignore_eos=True))
    assert engine.kv.allocator.num_cached > 0  # the previous run left its prompt's blocks cached
    engine.scheduler.totals.tree_requests, engine.scheduler.totals.accepted = 10, 25  # another policy's trees
    engine.scheduler.offered_prefill.observe_arrival(0.0, 100)
    start_run(engine, base, "adaserve+shed")
    assert engine.kv.allocator.num_cached == 0
    assert engine.scheduler.totals.tree_requests == 0 and engine.scheduler.totals.tokens_per_tree_step == 1.0
    assert engine.config.overload_shedding and engine.scheduler.config is engine.config
    assert not engine.scheduler.offered_prefill.arrivals
    start_run(engine, base, "none")
    assert engine.config == base
