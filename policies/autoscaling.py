"""How many replicas a deployment needs, from the replicas' SLO headroom (issue 25).

Queue-length autoscaling (Ray Serve's default, ``target_ongoing_requests``) reacts after requests already wait and
knows nothing of SLOs. Each replica here knows how much of its step budget its running requests' SLOs need
(``spare_token_budget``), what its requests and arriving prompts need at their steady pace
(``steady_slo_load``), and how full its sequence slots are, queue included; their largest share is the replica's
*load* (``replica_load``), 1.0 meaning "no room for one more request at its SLO", more meaning demand beyond it.
The decision sizes the deployment so that every replica keeps ``target_headroom`` spare, and:

- scales up when the mean spare share drops below ``scale_up_headroom`` -- before attainment drops -- or, as
  a backstop, when requests queue, fail-fast admission refuses requests, or a class's recent attainment falls;
- scales down only when the fewer replicas would still keep ``scale_down_headroom`` spare at the look-back
  window's *peak* load, with little queued. The gap between the two thresholds and the peak (not the
  mean) make a flapping load hold its replica count instead of following it.

Time hysteresis (how long a wish must last before it is acted on) is Ray Serve's ``upscale_delay_s`` and
``downscale_delay_s``; the decision itself is stateless, so the simulator and Serve run the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from policies.budget import required_nodes

# Reason codes: a bounded set (a Prometheus label); the message says the numbers.
REASONS = ("no_reports", "headroom_low", "queueing", "slo_rejections", "attainment_low", "fits_fewer", "hold")


@dataclass(frozen=True)
class ScalingConfig:
    """Thresholds are shares of one replica's capacity (load 1.0 = full)."""

    min_replicas: int = 1
    max_replicas: int = 8
    scale_up_headroom: float = 0.2      # scale up when the mean spare share falls below this
    target_headroom: float = 0.3        # size the deployment for this spare share per replica
    scale_down_headroom: float = 0.45   # remove replicas only if the rest keep this spare share at the peak load
    max_waiting_per_replica: float = 2.0  # mean queued (not yet running) requests per replica that mean "short"
    min_attainment: float = 0.9         # a class below this recent attainment asks for one more replica
    min_finished_for_attainment: int = 5  # fewer finished requests in the window say nothing about attainment

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not 0.0 <= self.scale_up_headroom <= self.target_headroom <= self.scale_down_headroom < 1.0:
            raise ValueError("need 0 <= scale_up_headroom <= target_headroom <= scale_down_headroom < 1")


@dataclass(frozen=True)
class ReplicaWindow:
    """One replica over the look-back window."""

    load_mean: float          # time-mean of replica_load
    load_peak: float          # its largest sample
    waiting_mean: float = 0.0  # requests accepted but not yet running, time-mean
    slo_rejections: int = 0   # requests refused by fail-fast admission within the window
    # class -> (attained, finished) requests with an SLO that finished within the window
    attainment: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScalingDecision:
    desired_replicas: int
    reason: str   # one of REASONS
    message: str  # the numbers behind it, for the log


MAX_REPLICA_LOAD = 4.0  # a replica reports at most this much demand (its queue and SLO debt say "at least")


def replica_load(spare_token_budget: float, token_budget: float, running_requests: int, max_num_seqs: int,
                 waiting_requests: int = 0, steady_load: float = 0.0) -> float:
    """Demand on one replica in shares of its capacity: the larger of the step budget its running requests' SLOs
    need (over 1 when they need more than the budget: spare is negative) and its sequence slots, counting the
    requests waiting for one (a replica with budget left but no free slot cannot take another request). Not capped
    at 1, so that a saturated replica still says how many replicas its demand needs (up to MAX_REPLICA_LOAD).
    ``steady_load`` (``steady_slo_load``) is the share the same requests need at steady pace on a full replica."""
    token_share = 1.0 - float(spare_token_budget) / token_budget if token_budget > 0 else MAX_REPLICA_LOAD
    slot_share = (running_requests + waiting_requests) / max_num_seqs if max_num_seqs > 0 else MAX_REPLICA_LOAD
    return min(max(token_share, slot_share, float(steady_load), 0.0), MAX_REPLICA_LOAD)


def steady_slo_load(tpot_slo_s: np.ndarray, num_waiting: int, full_step_s: float, acceptance_rate: float,
                    token_budget: int, max_nodes: int, max_depth: int, prefill_tokens_per_s: float = 0.0) -> float:
    """Share of the step budget the replica's requests need to hold their TPOT SLOs at their steady pace, with the
    replica's steps at full budget (``full_step_s``): each running request must gain ``full_step_s / slo`` tokens a
    step (``A`` with the request exactly on pace), costing its root plus the draft nodes that yield it
    (``policies.budget.required_nodes``); each waiting request costs the running ones' mean; and the prompts
    arriving take ``prefill_tokens_per_s`` x ``full_step_s`` tokens of every step.

    Why not the spare budget: that need is the SLO *debt* of this step, near zero for requests ahead of their pace
    on a lightly loaded replica, so it says nothing about how the same requests would fare on fewer replicas. This
    one grows with the number of requests, which is what sizing a deployment needs."""
    slo = np.asarray(tpot_slo_s, dtype=np.float64)
    slo = np.where(slo > 0, slo, np.inf)
    accept = np.clip(float(full_step_s) / slo, 1.0, float(max_depth) + 1.0)
    cost = 1.0 + required_nodes(accept, acceptance_rate, max_nodes)
    mean_cost = float(cost.mean()) if cost.size else 1.0
    prefill = float(prefill_tokens_per_s) * float(full_step_s)
    return ((float(cost.sum()) + num_waiting * mean_cost + prefill) / token_budget if token_budget > 0
            else MAX_REPLICA_LOAD)


def replicas_for_load(total_load: float, headroom: float) -> int:
    """Fewest replicas that carry ``total_load`` (in replica capacities) with ``headroom`` spare each."""
    return max(1, math.ceil(total_load / (1.0 - headroom) - 1e-9))


def decide_replicas(replicas: Sequence[ReplicaWindow], config: ScalingConfig, current_replicas: int | None = None,
                    peak_total_load: float | None = None) -> ScalingDecision:
    """The desired replica count, given the running replicas' windows. ``current_replicas`` defaults to how many
    reported; a replica that is running but has not reported yet counts as idle capacity. ``peak_total_load`` is
    the window's peak of the replicas' summed load when the caller can align their samples in time; without it,
    the sum of each replica's peak (an upper bound: peaks at different times add up)."""
    n = len(replicas) if current_replicas is None else max(int(current_replicas), len(replicas))
    if not replicas or n == 0:
        return ScalingDecision(_clamp(max(n, config.min_replicas), config), "no_reports",
                               "no replica has reported its load yet")
    load = sum(r.load_mean for r in replicas)
    peak = sum(r.load_peak for r in replicas) if peak_total_load is None else peak_total_load
    headroom = 1.0 - load / n
    waiting = sum(r.waiting_mean for r in replicas)
    rejections = sum(r.slo_rejections for r in replicas)
    worst_class, worst_attainment = _worst_attainment(replicas, config.min_finished_for_attainment)
    sized = replicas_for_load(load, config.target_headroom)

    if headroom < config.scale_up_headroom:
        desired, reason = max(sized, n + 1), "headroom_low"
        message = f"spare share {headroom:.2f} < {config.scale_up_headroom:.2f} (load {load:.2f} on {n})"
    elif waiting / n > config.max_waiting_per_replica:
        desired, reason = max(sized, n + 1), "queueing"
        message = f"{waiting / n:.1f} requests waiting per replica > {config.max_waiting_per_replica:.1f}"
    elif rejections > 0:
        desired, reason = max(sized, n + 1), "slo_rejections"
        message = f"{rejections} requests refused by fail-fast admission in the window"
    elif worst_attainment < config.min_attainment:
        desired, reason = max(sized, n + 1), "attainment_low"
        message = f"class {worst_class} attainment {worst_attainment:.2f} < {config.min_attainment:.2f}"
    else:
        fewer = replicas_for_load(peak, config.scale_down_headroom)
        # the queue has a band too: the fewer replicas must see under half the per-replica queue that scales up;
        # and a replica that has not reported yet is waited for
        if fewer < n and waiting / fewer < 0.5 * config.max_waiting_per_replica and len(replicas) == n:
            desired, reason = fewer, "fits_fewer"
            message = (f"peak load {peak:.2f} fits {fewer} replica(s) with spare share "
                       f">= {config.scale_down_headroom:.2f}")
        else:
            desired, reason = n, "hold"
            message = f"spare share {headroom:.2f}, peak load {peak:.2f}, {waiting:.1f} waiting on {n}"
    clamped = _clamp(desired, config)
    if clamped != desired:
        message += f" (wanted {desired}, bounds {config.min_replicas}..{config.max_replicas})"
    return ScalingDecision(clamped, reason, message)


def _worst_attainment(replicas: Sequence[ReplicaWindow], min_finished: int) -> tuple[str | None, float]:
    totals: dict[str, list[int]] = {}
    for r in replicas:
        for slo_class, (attained, finished) in r.attainment.items():
            t = totals.setdefault(slo_class, [0, 0])
            t[0] += attained
            t[1] += finished
    rated = [(attained / finished, name) for name, (attained, finished) in totals.items() if finished >= min_finished]
    if not rated:
        return None, 1.0
    value, name = min(rated)
    return name, value


def _clamp(n: int, config: ScalingConfig) -> int:
    return min(max(n, config.min_replicas), config.max_replicas)
