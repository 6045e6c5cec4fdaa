"""latency_model: the fit recovers a known piecewise-linear step time, stays monotone, and round-trips JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policies.latency_model import DraftLatencyModel, LatencyModel, PiecewiseLinear, nnls, update_knot_log_scales


def true_step_s(n, ctx):
    """Flat 20 ms while memory-bound up to 64 tokens, 0.1 ms/token to 256, 0.2 ms/token beyond; 2 us per
    cached token read."""
    n = np.asarray(n, dtype=np.float64)
    g = 0.020 + 1e-4 * np.clip(n - 64, 0, 192) + 2e-4 * np.maximum(n - 256, 0)
    return g + 2e-6 * np.asarray(ctx, dtype=np.float64)


SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
CONTEXTS = [0, 1000, 5000]


def test_fit_recovers_known_function():
    samples = [(n, c, float(true_step_s(n, c))) for n in SIZES for c in CONTEXTS]
    model = LatencyModel.fit(samples)
    assert model.context_s_per_token == pytest.approx(2e-6, rel=1e-6)
    grid = np.array([1, 3, 50, 64, 100, 200, 256, 300, 512, 700])
    for ctx in [0, 2500, 10_000]:
        np.testing.assert_allclose(model.predict(grid, ctx), true_step_s(grid, ctx), rtol=1e-6, atol=1e-9)
    assert isinstance(model.predict(64, 0), float)


def test_fit_with_noise_is_monotone_and_close():
    rng = np.random.default_rng(0)
    samples = [(n, c, float(true_step_s(n, c)) * rng.normal(1.0, 0.03)) for n in SIZES for c in CONTEXTS
               for _ in range(5)]
    model = LatencyModel.fit(samples)
    assert np.all(np.diff(model.tokens.values) >= 0) and model.tokens.tail_slope >= 0
    grid = np.arange(1, 600)
    assert np.all(np.diff(model.predict(grid, 0)) >= -1e-15)
    np.testing.assert_allclose(model.predict(grid, 1000), true_step_s(grid, 1000), rtol=0.05)


def test_non_monotone_samples_fit_flat_not_decreasing():
    # a measurement dip at 8 tokens must not make the model predict a faster larger step
    samples = [(1, 0, 0.010), (4, 0, 0.012), (8, 0, 0.008), (16, 0, 0.012), (32, 0, 0.020)]
    model = LatencyModel.fit(samples)
    pred = model.predict(np.array([1, 4, 8, 16, 32]), 0)
    assert np.all(np.diff(pred) >= -1e-12)
    assert model.context_s_per_token == 0.0  # constant context: not identifiable, fixed to 0


def test_explicit_knots_and_extrapolation():
    samples = [(n, 0, float(true_step_s(n, 0))) for n in range(1, 300, 7)]
    model = LatencyModel.fit(samples, knots=[1, 64, 256])
    assert model.tokens.knots == (1.0, 64.0, 256.0)
    # beyond the last sampled size, the last segment's slope carries on
    assert model.predict(400, 0) == pytest.approx(model.predict(256, 0) + 144 * model.tokens.tail_slope)


def test_json_round_trip():
    samples = [(n, c, float(true_step_s(n, c))) for n in SIZES for c in CONTEXTS]
    model = LatencyModel.fit(samples)
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    with pytest.raises(ValueError):
        LatencyModel.from_dict({"kind": "table"})
    with pytest.raises(ValueError):
        LatencyModel.fit([])
    assert DraftLatencyModel is LatencyModel


def test_piecewise_linear_call():
    pw = PiecewiseLinear((1.0, 10.0), (2.0, 11.0), tail_slope=1.0)
    assert pw(0) == 2.0 and pw(5.5) == pytest.approx(6.5) and pw(12) == pytest.approx(13.0)


def test_nnls_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.normal(size=(30, 6))
        b = rng.normal(size=30)
        x = nnls(a, b)
        ref, _ = scipy_optimize.nnls(a, b)
        assert (x >= 0).all()
        assert np.linalg.norm(a @ x - b) == pytest.approx(np.linalg.norm(a @ ref - b), rel=1e-7, abs=1e-10)


def test_scaled_multiplies_every_prediction():
    model = LatencyModel(PiecewiseLinear((1.0, 16.0, 64.0), (0.01, 0.02, 0.05), 0.001), 1e-5)
    fast = model.scaled(0.5)
    sizes, ctx = np.array([1, 8, 16, 40, 64, 200]), np.array([0, 10, 500, 1000, 0, 4000])
    np.testing.assert_allclose(fast.predict(sizes, ctx), 0.5 * model.predict(sizes, ctx))
    assert model.scaled(1.0).predict(30, 7) == pytest.approx(model.predict(30, 7))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            model.scaled(bad)


def test_rescaled_multiplies_each_knot_by_its_own_factor_and_stays_non_decreasing():
    model = LatencyModel(PiecewiseLinear((1.0, 16.0, 64.0), (0.01, 0.02, 0.05), 0.001), 1e-5)
    slow_mid = model.rescaled([1.0, 2.0, 1.0])
    # knot 16 doubles to 0.04; halfway to 64 interpolates 0.04 -> 0.05; the context cost is the profile's
    assert slow_mid.predict(16, 0) == pytest.approx(0.04)
    assert slow_mid.predict(40, 1000) == pytest.approx(0.045 + 0.01)
    assert slow_mid.predict(1, 0) == pytest.approx(0.01) and slow_mid.predict(100, 0) == pytest.approx(0.05 + 0.036)
    sizes = np.arange(1, 300)
    np.testing.assert_allclose(model.rescaled([1.5] * 3).predict(sizes, 0), 1.5 * model.predict(sizes, 0))
    dip = model.rescaled([1.0, 3.0, 1.0])  # 0.06 at 16 would fall to 0.05 at 64: held at 0.06 instead
    assert np.all(np.diff(dip.predict(sizes, 0)) >= 0) and dip.predict(64, 0) == pytest.approx(0.06)
    assert dip.predict(100, 0) == pytest.approx(0.06 + 0.036)  # the tail slope takes the last knot's factor
    for bad in ([1.0, 1.0], [1.0, 0.0, 1.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="knot scales"):
            model.rescaled(bad)


def test_a_step_moves_the_two_knots_around_its_size_as_interpolation_shares_it():
    knots, zeros = (1.0, 16.0, 64.0), np.zeros(3)
    np.testing.assert_allclose(update_knot_log_scales(zeros, knots, 28, 0.4, 0.5), [0.0, 0.15, 0.05])  # 1/4 of the way
    np.testing.assert_allclose(update_knot_log_scales(zeros, knots, 16, 0.4, 0.5), [0.0, 0.2, 0.0])
    np.testing.assert_allclose(update_knot_log_scales(zeros, knots, 500, -0.4, 0.5), [0.0, 0.0, -0.2])
    np.testing.assert_allclose(update_knot_log_scales(zeros, knots, 1, 0.4, 0.5), [0.2, 0.0, 0.0])
    assert not zeros.any()  # a new array: the caller's is left as it was
    # repeated steps of one size converge on that size's ratio, and leave the far knot alone
    model = LatencyModel(PiecewiseLinear(knots, (0.01, 0.02, 0.05)))
    logs = zeros
    for _ in range(200):
        measured = 1.6 * model.predict(16)
        logs = update_knot_log_scales(logs, knots, 16, np.log(measured / model.rescaled(np.exp(logs)).predict(16)), 0.05)
    assert model.rescaled(np.exp(logs)).predict(16) == pytest.approx(1.6 * 0.02, rel=1e-3)
    assert logs[0] == 0.0 and logs[2] == 0.0
