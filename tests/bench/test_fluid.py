import math

import pytest

from bench.fluid import ClassLoad, best_step
from bench.simulate import roofline_70b
from policies.budget import chain_tokens


def test_chain_tokens_geometric():
    assert chain_tokens(0, 0.5) == 1.0
    assert chain_tokens(2, 0.5) == pytest.approx(1.75)
    assert chain_tokens(200, 0.5) == pytest.approx(2.0)  # 1 + a / (1 - a)


CLASSES = {"tight": ClassLoad(4.0, 40, 0.050), "loose": ClassLoad(2.0, 120, 0.200)}


def test_best_step_keeps_every_class_on_its_slo():
    profile, a = roofline_70b(), 0.565
    step = best_step(profile, CLASSES, a, margin=0.9, max_nodes=3)
    assert step is not None and step.prefill_tokens_per_s > 0
    for name, c in CLASSES.items():
        g = chain_tokens(step.nodes_per_request[name], a)
        assert step.step_s / g <= 0.9 * c.tpot_slo_s + 1e-9
    # without nodes the tight class caps the step at 45 ms, next to the 42 ms floor: the best step buys it nodes
    assert step.nodes_per_request["tight"] >= 1


def test_tighter_margin_leaves_less_prefill_and_impossible_slo_none():
    profile, a = roofline_70b(), 0.565
    loose = best_step(profile, CLASSES, a, margin=1.0, max_nodes=3)
    tight = best_step(profile, CLASSES, a, margin=0.8, max_nodes=3)
    assert tight.prefill_tokens_per_s < loose.prefill_tokens_per_s
    # no step can be faster than the 40 ms floor, so a 10 ms TPOT SLO is out of reach even with 3 nodes
    assert best_step(profile, {"x": ClassLoad(1.0, 10, 0.010)}, a, max_nodes=3) is None
    assert math.isfinite(loose.step_s)
