"""The sweep's policy options and its interleaved blocks (the engine runs themselves: bench.sweep on the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.simulate import POLICY_OPTIONS
from bench.sweep import _policy_options, arrival_blocks


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
