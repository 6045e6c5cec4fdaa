"""Step latency as a function of the step's size: fit from profiled samples, predict, cache as JSON.

``t(num_tokens, context_tokens) = g(num_tokens) + c * context_tokens`` where ``g`` is piecewise linear and
non-decreasing (flat while the step is memory-bound, then rising once compute-bound) and ``c >= 0`` is the
cost per cached token the step's attention reads (sum of the requests' context lengths). Running the model to
get the samples is the engine's job; this module only fits and predicts.

The fit is a non-negative least-squares problem: ``g`` is written as an intercept plus one slope per segment
between knots, so "non-decreasing" and "c >= 0" are just "all coefficients >= 0".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

ArrayLike = float | int | np.ndarray | Sequence[float]


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b||_2 subject to x >= 0 (Lawson-Hanson active set); small dense problems only."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * max(a.shape) * max(np.abs(a).sum(axis=0).max(initial=0.0), 1.0)
    for _ in range(max_iter or 3 * n + 10):
        w = a.T @ (b - a @ x)
        if passive.all() or np.where(passive, -np.inf, w).max() <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                break
    return x


@dataclass(frozen=True)
class PiecewiseLinear:
    """Non-decreasing piecewise-linear function through (knots, values); flat left of the first knot,
    continuing with the last segment's slope (``tail_slope``) right of the last one."""

    knots: tuple[float, ...]
    values: tuple[float, ...]
    tail_slope: float = 0.0

    def __call__(self, x: ArrayLike) -> np.ndarray | float:
        xs = np.asarray(x, dtype=np.float64)
        k = np.asarray(self.knots)
        y = np.interp(xs, k, np.asarray(self.values)) + self.tail_slope * np.maximum(xs - k[-1], 0.0)
        return float(y) if y.ndim == 0 else y

    @staticmethod
    def basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
        """Columns [1, seg_0(x), ..., seg_{K-2}(x)]: seg_j = clamp(x - k_j, 0, k_{j+1} - k_j), the last one
        unclamped on the right so the last slope extends past the last knot."""
        x = np.asarray(x, dtype=np.float64)[:, None]
        lo = knots[:-1][None, :]
        width = np.diff(knots)[None, :].copy()
        width[:, -1:] = np.inf
        seg = np.clip(x - lo, 0.0, width) if knots.size > 1 else np.zeros((x.shape[0], 0))
        return np.concatenate([np.ones((x.shape[0], 1)), seg], axis=1)

    @classmethod
    def from_coefficients(cls, knots: np.ndarray, coef: np.ndarray) -> "PiecewiseLinear":
        """Intercept + segment slopes (the ``basis`` coefficients) -> knot values."""
        slopes = coef[1:]
        values = coef[0] + np.concatenate([[0.0], np.cumsum(slopes * np.diff(knots))])
        return cls(tuple(map(float, knots)), tuple(map(float, values)), float(slopes[-1]) if slopes.size else 0.0)


def default_knots(num_tokens: np.ndarray, max_knots: int = 12) -> np.ndarray:
    """Knots at the distinct profiled sizes, thinned to ``max_knots`` geometrically spaced ones if more."""
    xs = np.unique(np.asarray(num_tokens, dtype=np.float64))
    if xs.size <= max_knots:
        return xs
    grid = np.geomspace(max(xs[0], 1.0), xs[-1], max_knots)
    picks = np.unique(xs[np.abs(xs[None, :] - grid[:, None]).argmin(axis=1)])
    return picks


@dataclass(frozen=True)
class LatencyModel:
    """Predicted step time in seconds: ``tokens(num_tokens) + context_s_per_token * context_tokens``."""

    tokens: PiecewiseLinear
    context_s_per_token: float = 0.0

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[float, float, float]],
        knots: Sequence[float] | None = None,
        max_knots: int = 12,
    ) -> "LatencyModel":
        """Fit (num_tokens, context_tokens, seconds) samples; monotone in tokens, non-negative context cost.

        If every sample has the same context size, the context cost cannot be told apart from the intercept
        and is fixed to 0 (predictions then hold for that context size).
        """
        arr = np.asarray(list(samples), dtype=np.float64).reshape(-1, 3)
        if arr.shape[0] == 0:
            raise ValueError("LatencyModel.fit needs at least one (num_tokens, context_tokens, seconds) sample")
        n, ctx, t = arr[:, 0], arr[:, 1], arr[:, 2]
        k = np.unique(np.asarray(knots, dtype=np.float64)) if knots is not None else default_knots(n, max_knots)
        basis = PiecewiseLinear.basis(n, k)
        with_ctx = bool(np.ptp(ctx) > 0)
        if with_ctx:
            basis = np.concatenate([basis, ctx[:, None]], axis=1)
        scale = np.abs(basis).max(axis=0)
        scale[scale == 0] = 1.0
        coef = nnls(basis / scale, t) / scale
        c = float(coef[-1]) if with_ctx else 0.0
        return cls(PiecewiseLinear.from_coefficients(k, coef[: k.size]), c)

    def predict(self, num_tokens: ArrayLike, context_tokens: ArrayLike = 0) -> np.ndarray | float:
        """Seconds for a step of ``num_tokens`` new tokens reading ``context_tokens`` cached tokens."""
        ctx = np.asarray(context_tokens, dtype=np.float64)
        y = np.asarray(self.tokens(num_tokens)) + self.context_s_per_token * ctx
        return float(y) if y.ndim == 0 else y

    def scaled(self, factor: float) -> "LatencyModel":
        """This model with every prediction multiplied by ``factor`` (> 0): the profile recalibrated to the speed
        the steps are measured at now."""
        f = float(factor)
        if not f > 0:
            raise ValueError(f"a latency model's scale must be > 0, got {factor}")
        pw = self.tokens
        return LatencyModel(PiecewiseLinear(pw.knots, tuple(v * f for v in pw.values), pw.tail_slope * f),
                            self.context_s_per_token * f)

    def rescaled(self, knot_factors: ArrayLike) -> "LatencyModel":
        """This model with each token knot's time multiplied by its own factor ([K] > 0, one per knot; the tail
        slope takes the last one), kept non-decreasing; the context cost stays as profiled.

        Why per size: under load a step departs from the idle profile by different ratios at different sizes (the
        2-core CPU, one run: 1.20x for 1-16-token steps, 1.66x for 40-100, 1.19x past 300), so one factor for every
        size overprices the small decode steps whenever a few large prefill steps ran slow, and refuses load the
        replica could serve."""
        pw = self.tokens
        f = np.asarray(knot_factors, dtype=np.float64).ravel()
        if f.size != len(pw.knots) or not np.all(f > 0):
            raise ValueError(f"a latency model's knot scales must be {len(pw.knots)} values > 0, got {knot_factors!r}")
        values = np.maximum.accumulate(np.asarray(pw.values) * f)
        return LatencyModel(PiecewiseLinear(pw.knots, tuple(map(float, values)), pw.tail_slope * float(f[-1])),
                            self.context_s_per_token)

    def to_dict(self) -> dict:
        """JSON-ready dict; ``from_dict`` inverts it."""
        return {
            "kind": "piecewise_linear",
            "version": 1,
            "knots_tokens": list(self.tokens.knots),
            "values_s": list(self.tokens.values),
            "tail_slope_s_per_token": self.tokens.tail_slope,
            "context_s_per_token": self.context_s_per_token,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        if d.get("kind") != "piecewise_linear" or d.get("version") != 1:
            raise ValueError(f"not a cached piecewise_linear v1 latency model: kind={d.get('kind')!r}")
        knots, values = tuple(map(float, d["knots_tokens"])), tuple(map(float, d["values_s"]))
        if not knots or len(knots) != len(values):
            raise ValueError("latency model needs as many knot values as knots (and at least one)")
        pw = PiecewiseLinear(knots, values, float(d.get("tail_slope_s_per_token", 0.0)))
        return cls(pw, float(d.get("context_s_per_token", 0.0)))


# The draft step has the same shape (tokens drafted this step, context the draft reads); one class serves both.
DraftLatencyModel = LatencyModel


def update_knot_log_scales(log_scales: np.ndarray, knots: Sequence[float], num_tokens: float, log_ratio: float,
                           weight: float) -> np.ndarray:
    """Per-knot log factors (``LatencyModel.rescaled``) after one step of ``num_tokens`` tokens that took
    ``exp(log_ratio)`` times what the rescaled model predicted: the two knots around that size move by ``weight`` x
    ``log_ratio``, shared as linear interpolation shares the prediction between them (a size at or beyond the first
    or the last knot moves that knot alone). An EMA of each size's error, in log space so that a step twice as slow
    and one half as slow cancel."""
    out = np.array(log_scales, dtype=np.float64)
    k = np.asarray(knots, dtype=np.float64)
    n = float(num_tokens)
    if n <= k[0]:
        share = {0: 1.0}
    elif n >= k[-1]:
        share = {k.size - 1: 1.0}
    else:
        i = int(np.searchsorted(k, n, side="right")) - 1
        w = (n - k[i]) / (k[i + 1] - k[i])
        share = {i: 1.0 - w, i + 1: w}
    for j, s in share.items():
        out[j] += float(weight) * s * float(log_ratio)
    return out
