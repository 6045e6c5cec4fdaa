"""TTFT deadlines: the order queued prompts are served in, the prefill a step owes them, and fail-fast admission.

A request's TTFT SLO is a deadline ``arrival + ttft_slo``. Prompts are served earliest deadline first (EDF) among
those that can still make it; a prompt that cannot is either refused at once (fail fast: the client can go to
another replica instead of waiting for a miss) or served best effort, after every protected prompt.

The trade with TPOT is explicit: the SLO pace plan (``policies.budget.slo_step_plan``) may hold prompts back to
keep running requests on their TPOT pace, but never below ``ttft_prefill_floor``: the smallest prefill per step
that still brings every feasible queued prompt to its first token by its deadline. TTFT deadlines that can be met
come first; the TPOT pace takes what is left.

Under overload some requests must be refused; ``shed_cutoff_tokens`` chooses which: the longest prompts, so that the
prefill a replica can give serves the most requests (``OfferedPrefill`` keeps the window of arrivals and the
prefill rate it is judged against).

The service model: queued prompts are prefilled in order, ``P`` prompt tokens per step, each step taking
``predict(roots + P) + overhead`` seconds; prompt k (with ``C_k`` tokens up to and including its own in the
order) gets its first token at the end of step ``ceil(C_k / P)``, and no earlier than its own tokens take after a
sequence slot frees for it (a full replica admits a prompt only as running requests finish). It ignores the tree
nodes a step may add (bounded by the step's token limit) and new arrivals with earlier deadlines (fail fast
re-checks on arrival).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from policies.budget import slo_pace_plan
from policies.latency_model import LatencyModel


def deadline_order(deadline_s: np.ndarray, arrival_s: np.ndarray, best_effort: np.ndarray) -> np.ndarray:
    """Indices of queued prompts in service order: protected ones by deadline (none = inf), ties and prompts
    without a deadline by arrival, then the best-effort ones by arrival."""
    deadline = np.where(np.asarray(best_effort, bool), np.inf, np.asarray(deadline_s, np.float64))
    return np.lexsort((np.asarray(arrival_s, np.float64), deadline, np.asarray(best_effort, bool)))


def slot_ready_times_s(now_s: float, running_finish_s: np.ndarray, free_slots: int, num_queued: int) -> np.ndarray:
    """[Q] the earliest time the k-th queued prompt can hold a sequence slot: at once for the first ``free_slots``,
    then as running requests finish (``running_finish_s``, predicted); past those, when the last one does."""
    finish = np.sort(np.asarray(running_finish_s, np.float64))
    k = np.arange(int(num_queued)) - max(int(free_slots), 0)
    if finish.size == 0:
        return np.full(int(num_queued), float(now_s))
    return np.where(k < 0, float(now_s), finish[np.clip(k, 0, finish.size - 1)])


def running_finish_times_s(now_s: float, remaining_tokens: np.ndarray, tokens_per_step: float,
                           step_s: float) -> np.ndarray:
    """[R] when each running request is predicted to finish: its remaining output tokens at ``tokens_per_step``
    a step of ``step_s``."""
    steps = np.ceil(np.maximum(np.asarray(remaining_tokens, np.float64), 0.0) / max(float(tokens_per_step), 1.0))
    return float(now_s) + steps * float(step_s)


def first_token_times_s(model: LatencyModel, *, now_s: float, remaining_tokens: np.ndarray, prefill_tokens: np.ndarray,
                        num_roots: int, context_tokens: float, overhead_s: float = 0.0,
                        served: np.ndarray | None = None, ready_s: np.ndarray | None = None) -> np.ndarray:
    """[S, Q] when each queued prompt (in service order) gets its first token if every step prefills
    ``prefill_tokens[s]`` tokens. ``served`` ([Q] bool, default all): the prompts that are prefilled ahead of those
    after them; an unserved prompt's own time is what it would be if it were served in its place. ``ready_s``
    ([Q], default now): when each prompt can start at all (``slot_ready_times_s``); from then its own tokens take
    their steps."""
    r = np.asarray(remaining_tokens, np.float64)
    counted = r if served is None else r * np.asarray(served, bool)
    c = np.cumsum(counted) - counted + r  # [Q] tokens ahead of and including each prompt
    p = np.maximum(np.asarray(prefill_tokens, np.float64), 1.0)  # [S]
    t = np.asarray(model.predict(num_roots + p, context_tokens), np.float64) + float(overhead_s)  # [S]
    done = now_s + np.ceil(c[None, :] / p[:, None] - 1e-9) * t[:, None]
    if ready_s is None:
        return done
    own = np.asarray(ready_s, np.float64)[None, :] + np.ceil(r[None, :] / p[:, None] - 1e-9) * t[:, None]
    return np.maximum(done, own)


def ttft_feasible(model: LatencyModel, *, now_s: float, deadline_s: np.ndarray, remaining_tokens: np.ndarray,
                  num_roots: int, context_tokens: float, max_prefill_tokens: int, overhead_s: float = 0.0,
                  ready_s: np.ndarray | None = None) -> np.ndarray:
    """[Q] which queued prompts (in service order, ``deadline_s`` inf for none) get their first token by their
    deadline at full speed, after the other feasible ones ahead of them. Full speed is what an unbounded step takes:
    every queued token up to ``max_prefill_tokens`` (a lone short prompt in one small step). Prompts that miss even
    then are dropped from the queue ahead of the others (they wait), and feasibility is checked again without them;
    two passes settle it (dropping prompts only makes the rest earlier)."""
    deadline = np.asarray(deadline_s, np.float64)
    remaining = np.asarray(remaining_tokens, np.float64)
    limit = max(int(max_prefill_tokens), 1)
    feasible = np.ones(deadline.size, bool)
    if deadline.size == 0:
        return feasible
    for _ in range(2):
        full = int(min(limit, max(remaining[feasible].sum(), 1.0)))
        finish = first_token_times_s(model, now_s=now_s, remaining_tokens=remaining, prefill_tokens=[full],
                                     num_roots=num_roots, context_tokens=context_tokens, overhead_s=overhead_s,
                                     served=feasible, ready_s=ready_s)[0]
        feasible = finish <= deadline
    return feasible


def ttft_prefill_floor(model: LatencyModel, *, now_s: float, deadline_s: np.ndarray, remaining_tokens: np.ndarray,
                       num_roots: int, context_tokens: float, max_prefill_tokens: int,
                       overhead_s: float = 0.0, ready_s: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """(P, feasible): the fewest prefill tokens per step that bring every feasible queued prompt (``ttft_feasible``)
    to its first token by its deadline. Infeasible prompts do not raise P: they are refused or served best effort.
    No feasible deadline: P = 0."""
    kw = dict(now_s=now_s, remaining_tokens=remaining_tokens, num_roots=num_roots, context_tokens=context_tokens,
              overhead_s=overhead_s, ready_s=ready_s)
    deadline = np.asarray(deadline_s, np.float64)
    feasible = ttft_feasible(model, deadline_s=deadline, max_prefill_tokens=max_prefill_tokens, **kw)
    bound = feasible & np.isfinite(deadline)
    if not bound.any():
        return 0, feasible
    sizes = np.arange(1, max(int(max_prefill_tokens), 1) + 1)
    finish = first_token_times_s(model, prefill_tokens=sizes, served=feasible, **kw)  # [S, Q]
    on_time = finish[:, bound] <= deadline[bound]  # [S, K]
    ok = on_time.all(axis=1)
    if ok.any():
        return int(sizes[np.argmax(ok)]), feasible
    return int(sizes[np.argmax(on_time.sum(axis=1))]), feasible  # no one size for all: the one most keep


def newcomer_fits(keys_before: list, feasible_before: np.ndarray, keys_after: list, feasible_after: np.ndarray,
                  newcomer) -> bool:
    """Fail fast's rule: the newcomer is on time in its place (checked with headroom by the caller), and no prompt
    that was on time before it came is late after. Keys identify the queued prompts on both sides."""
    was_on_time = {k for k, ok in zip(keys_before, feasible_before) if ok}
    after = dict(zip(keys_after, feasible_after))
    return bool(after[newcomer]) and all(after.get(k, True) for k in was_on_time)


def idle_prefill_s(model: LatencyModel, num_prompt_tokens: int, chunk_tokens: int, overhead_s: float = 0.0) -> float:
    """Time an idle replica needs to prefill a prompt (chunk by chunk, each chunk over the context before it):
    the floor under any TTFT target, and the unit of relative TTFT classes."""
    n, chunk = int(num_prompt_tokens), max(int(chunk_tokens), 1)
    starts = np.arange(0, max(n, 1), chunk)
    sizes = np.minimum(chunk, n - starts)
    return float(np.sum(np.asarray(model.predict(sizes, starts), np.float64) + float(overhead_s)))


def tpot_pace_admits(model: LatencyModel, *, newcomer: int, tpot_slo_s: np.ndarray, remaining_tokens: np.ndarray,
                     decode_time_s: np.ndarray, decoded_tokens: np.ndarray, prefill_floor_tokens: int,
                     **pace_kw) -> bool:
    """Fail fast's TPOT rule: may the newcomer join without breaking the TPOT pace of the requests already here?

    The requests ([R]) are every decoding request, then every admitted prompt still queued or in prefill and the
    newcomer (index ``newcomer``), each counted as if it already decoded (its first token out, every output token
    to come): the load the replica has taken on once their prompts are in. The SLO pace plan
    (``policies.budget.slo_pace_plan``, ``pace_kw`` its other inputs, their context included) is made with and
    without the newcomer, and the newcomer is admitted only if, with it, one step size still keeps every protected
    request on pace, every request protected without it stays protected, the newcomer is protected if it has a
    TPOT SLO, and the step still leaves at least ``prefill_floor_tokens`` (the TTFT floor with the newcomer queued,
    ``ttft_prefill_floor``) for the prompts. Otherwise admitting it buys a TPOT miss (its own, or another's) or a
    TTFT miss, and under overload the replica that refuses early serves more requests within both SLOs than one
    that admits everyone and misses most of them. A newcomer whose pace even an idle replica could not keep (the
    measured gain per step and step overhead are worse than its SLO allows) is judged as if it had no TPOT SLO:
    refusing it would blame a load that is not the cause, and every retry would get the same answer. Nor does an
    idle replica refuse on pace: there is no load to protect.

    The plan here has no cushion (``confidence_z`` 0): admission asks whether the load fits at the expected gain per
    step; the cushion is the step-by-step plan's headroom for the running requests' unlucky acceptance, and
    refusing on it turns away requests that fit (docs/results.md, 2026-12-07)."""
    pace_kw = {**pace_kw, "confidence_z": 0.0}
    slo = np.asarray(tpot_slo_s, np.float64)
    arrays = dict(tpot_slo_s=slo, remaining_tokens=np.asarray(remaining_tokens, np.float64),
                  decode_time_s=np.asarray(decode_time_s, np.float64),
                  decoded_tokens=np.asarray(decoded_tokens, np.float64))
    others = np.arange(slo.size) != int(newcomer)
    if not others.any():
        return True  # an idle replica: nothing to protect, and its own TTFT is ttft_feasible's to judge
    own_pace = bool(np.isfinite(slo[newcomer]) and slo[newcomer] > 0)
    if own_pace:
        alone = slo_pace_plan(model, root_tokens=1, **{k: v[~others] for k, v in arrays.items()}, **pace_kw)
        if not (alone.feasible and alone.protected[0]):  # no replica could keep it: judged as having no TPOT SLO
            own_pace = False
            arrays["tpot_slo_s"] = np.where(others, slo, np.inf)
    after = slo_pace_plan(model, root_tokens=slo.size, **arrays, **pace_kw)
    before = slo_pace_plan(model, root_tokens=slo.size - 1, **{k: v[others] for k, v in arrays.items()}, **pace_kw)
    if not after.feasible or after.prefill_tokens < int(prefill_floor_tokens):
        return False
    if own_pace and not after.protected[newcomer]:
        return False
    return bool(np.all(after.protected[others] | ~before.protected))


def pace_tpot_slo_s(tpot_slo_s: np.ndarray, first_token_s: np.ndarray, ttft_deadline_s: np.ndarray,
                    best_effort: np.ndarray) -> np.ndarray:
    """[R] the TPOT SLO the pace plan protects each request by: none (inf) for a best-effort request (served after
    the protected ones, as promised) and for one whose first token came after its TTFT deadline (nan: not yet
    out). Such a request has missed already; holding prompts back for its pace would only make attainable
    newcomers late."""
    first = np.asarray(first_token_s, np.float64)
    with np.errstate(invalid="ignore"):
        late = first > np.asarray(ttft_deadline_s, np.float64)
    return np.where(np.asarray(best_effort, bool) | late, np.inf, np.asarray(tpot_slo_s, np.float64))


def shed_cutoff_tokens(prompt_tokens: np.ndarray, span_s: float, prefill_capacity_tok_s: float) -> float:
    """Overload shedding: the longest prompt a replica still admits, given the prompts offered to it over the last
    ``span_s`` seconds (``prompt_tokens``) and the prefill tokens per second it can give (``prefill_capacity_tok_s``).

    When the offered prefill fits the capacity, every prompt is welcome (inf). When it does not, some requests will
    miss whatever the replica does, and which ones is a choice: admitting the shortest prompts first serves the most
    requests within their SLOs (a knapsack filled smallest first), whereas refusing whoever arrives when the queue
    happens to be full lets one long prompt take the prefill of several short ones (70B simulation, 3 seeds, 10 /
    16 req/s: 67.0% / 54.2% against 52.8% / 33.2% attainment). The cutoff is the longest prompt L such that all
    offered prompts of at most L tokens fit; 0 when not even the shortest does. Equal lengths are admitted or shed
    together."""
    tokens = np.sort(np.asarray(prompt_tokens, np.float64))
    capacity = float(prefill_capacity_tok_s)
    if tokens.size == 0 or not span_s > 0 or not np.isfinite(capacity):
        return float("inf")
    load = np.cumsum(tokens) / float(span_s)  # tok/s offered by the k shortest prompts
    if load[-1] <= capacity:
        return float("inf")
    lengths, first = np.unique(tokens, return_index=True)
    ok = load[np.append(first[1:], tokens.size) - 1] <= capacity  # all prompts of each length or none; a prefix
    return float(lengths[ok][-1]) if ok.any() else 0.0


class OfferedPrefill:
    """A replica's offered prefill load and its prefill capacity, the inputs of ``shed_cutoff_tokens``.

    Arrivals (time, prompt tokens) are kept for ``window_s`` seconds; the offered rate is their tokens over the time
    from the first to now, stretched by n / (n - 1) (the first arrival opens the span, it does not fall inside it).
    The capacity is an EMA (weight ``capacity_ema`` per step) of the prompt tokens per second prefilled by steps that
    left prompt tokens waiting: what the replica serves when prompts queue, with the TPOT pace, the TTFT floor, the
    sequence slots and the real step times all in it. Steps that prefilled every queued token are not counted, since
    they say how much was asked, not how much could be served. No cutoff before ``min_arrivals`` arrivals are in the
    window or before such a step: a few arrivals are no estimate of a rate, and a replica whose queue always
    empties is not overloaded.

    The capacity is never taken below the prompt tokens per second admitted over the window: the replica has been
    serving those. Nor is there a cutoff unless fail fast itself refused a request (its TTFT or TPOT pace,
    ``observe_refusal``) within the window: a replica that refuses some arrivals anyway chooses which ones, one that
    refuses none keeps serving every length. Both guard against a capacity that reads low at moderate load: where
    the pace plan meters prefill out at the TTFT floor, saturated steps prefill what the deadlines ask, not what the
    replica could (the 2-core CPU at 1 req/s, without them, shed 25 of 64 requests that adaserve without shedding
    served; results.md, session 13)."""

    def __init__(self, window_s: float = 30.0, min_arrivals: int = 8, capacity_ema: float = 0.05):
        self.window_s, self.min_arrivals, self.capacity_ema = float(window_s), int(min_arrivals), float(capacity_ema)
        self.arrivals: deque[tuple[float, int]] = deque()
        self.admitted: deque[tuple[float, int]] = deque()
        self.capacity_tok_s: float | None = None
        self.last_refusal_s: float | None = None

    def observe_arrival(self, now_s: float, prompt_tokens: int) -> None:
        self.arrivals.append((float(now_s), int(prompt_tokens)))
        self._expire(now_s)

    def observe_admission(self, now_s: float, prompt_tokens: int) -> None:
        """An arrival that was admitted (after ``observe_arrival`` for it)."""
        self.admitted.append((float(now_s), int(prompt_tokens)))
        self._expire(now_s)

    def _expire(self, now_s: float) -> None:
        for window in (self.arrivals, self.admitted):
            while window and window[0][0] < now_s - self.window_s:
                window.popleft()

    def observe_refusal(self, now_s: float) -> None:
        """Fail fast refused (or served best effort) a request because of its TTFT or TPOT pace, not its length."""
        self.last_refusal_s = float(now_s)

    def observe_saturated_step(self, prefill_tokens: int, step_s: float) -> None:
        """A step that prefilled ``prefill_tokens`` in ``step_s`` seconds and left prompt tokens waiting."""
        rate = max(float(prefill_tokens), 0.0) / max(float(step_s), 1e-9)
        c = self.capacity_tok_s
        self.capacity_tok_s = rate if c is None else (1.0 - self.capacity_ema) * c + self.capacity_ema * rate

    def cutoff_tokens(self, now_s: float) -> float:
        """The longest prompt admitted now (inf: no shedding)."""
        n = len(self.arrivals)
        refusing = self.last_refusal_s is not None and now_s - self.last_refusal_s <= self.window_s
        if not refusing or self.capacity_tok_s is None or n < max(self.min_arrivals, 2):
            return float("inf")
        span_s = (float(now_s) - self.arrivals[0][0]) * n / (n - 1)
        # it can serve at least what it has been admitting: a floor under a capacity that metered steps understate
        admitted_tok_s = sum(t for _, t in self.admitted) / span_s
        return shed_cutoff_tokens(np.array([t for _, t in self.arrivals]), span_s,
                                  max(self.capacity_tok_s, admitted_tok_s))
