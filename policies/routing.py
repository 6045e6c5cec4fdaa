"""Replica choice for one request, as a full ranking (Ray Serve's ``RequestRouter.choose_replicas`` shape).

Pure: the router adapter (app/) turns ``replica.routing_stats`` plus its own in-flight counts into
``ReplicaStats`` and the returned replica ids back into replicas.

- Tight-SLO requests go where the reported spare token budget is largest: that replica can still give
  them the deep trees they need.
- Other requests use power of two choices on load (running + queued), which spreads load without herding
  onto the one replica with the freshest good-looking stats.
- Prefix affinity: a replica that holds a prefix of the request in its prefix cache saves that prefix's
  prefill. The SLO decision stays first: a tight request still goes by spare budget (the match only breaks
  ties); any other request goes to the replica with the longest match, unless that replica has no SLO
  headroom (no spare budget) or is loaded more than ``max_load_imbalance`` requests above the least loaded one;
  then, and when nothing matches, power of two choices as above.
- Stats older than ``max_stats_age_s``, or missing, are not trusted: such replicas are ranked by the
  router's local in-flight count instead, after the replicas with fresh stats for tight requests.
- Unhealthy replicas come last, as a final group, so a request still finds a replica if all report trouble.

Prefixes are matched on the prompt's TEXT, because the ingress does not tokenize (the replica does): both sides
cut the request's text (``routing_text``: role-tagged chat messages, or the prompt) into fixed-size character
chunks and hash them chained (``prefix_chunk_hashes``: chunk i's hash covers chunks 0..i), so one hash stands
for a whole prefix. A replica reports the hashes of the prompts it served most recently (``PrefixSummary``, a
bounded LRU sized to its KV cache), which approximates what its block cache still holds; the match length is
the number of the request's leading chunk hashes found there (``prefix_match``).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ReplicaStats:
    """What the router knows about one replica. ``None`` = not reported yet (``routing_stats`` is {})."""

    replica_id: str
    spare_budget: float | None = None  # draft nodes per step left after its requests' SLO needs
    running_requests: int | None = None
    queue_len: int | None = None
    measured_tpot_s: float | None = None  # unloaded TPOT the replica measured (baseline for relative SLOs)
    healthy: bool = True
    stats_age_s: float = math.inf  # seconds since the stats were recorded
    in_flight: int = 0  # requests this router sent there and has not seen finish (local, always fresh)
    prefix_hashes: frozenset[int] = field(default_factory=frozenset)  # its PrefixSummary: prompt-prefix chunks

    @classmethod
    def from_mapping(cls, replica_id: str, stats: Mapping[str, Any] | None, in_flight: int = 0,
                     stats_age_s: float | None = None) -> "ReplicaStats":
        """Build from a ``record_routing_stats()`` dict; unknown keys are ignored, missing ones stay None."""
        s = dict(stats or {})
        age = stats_age_s if stats_age_s is not None else s.get("stats_age_s", math.inf if not s else 0.0)
        return cls(
            replica_id=str(replica_id),
            spare_budget=_num(s.get("spare_budget")),
            running_requests=_int(s.get("running_requests")),
            queue_len=_int(s.get("queue_len")),
            measured_tpot_s=_num(s.get("measured_tpot_s")),
            healthy=bool(s.get("healthy", True)),
            stats_age_s=float(age),
            in_flight=int(in_flight),
            prefix_hashes=frozenset(s.get("prefix_hashes") or ()),
        )


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _int(v: Any) -> int | None:
    f = _num(v)
    return None if f is None or not math.isfinite(f) else int(f)


def is_tight(tpot_slo_s: float | None, baseline_tpot_s: float | None, tight_ratio: float = 2.0) -> bool:
    """A request is tight when its TPOT SLO is under ``tight_ratio`` x the replicas' unloaded TPOT: it then
    needs speculation (several tokens per step) to make its SLO under any load."""
    if tpot_slo_s is None or not math.isfinite(tpot_slo_s):
        return False
    if baseline_tpot_s is None or not math.isfinite(baseline_tpot_s) or baseline_tpot_s <= 0:
        return False
    return tpot_slo_s < tight_ratio * baseline_tpot_s


def baseline_tpot_s(replicas: Sequence[ReplicaStats], max_stats_age_s: float = 5.0) -> float | None:
    """Median measured unloaded TPOT over replicas with fresh stats (None if none reported)."""
    vals = [r.measured_tpot_s for r in replicas
            if r.measured_tpot_s is not None and r.measured_tpot_s > 0 and r.stats_age_s <= max_stats_age_s]
    return float(np.median(vals)) if vals else None


def _fresh(r: ReplicaStats, max_stats_age_s: float) -> bool:
    return r.stats_age_s <= max_stats_age_s and (r.running_requests is not None or r.spare_budget is not None)


def _load(r: ReplicaStats, max_stats_age_s: float) -> int:
    """Requests at the replica: its own count (running + queued) if fresh, but never below what this router
    has in flight there (the reported count lags the router's latest sends)."""
    if _fresh(r, max_stats_age_s) and r.running_requests is not None:
        return max(r.running_requests + (r.queue_len or 0), r.in_flight)
    return r.in_flight


def rank_replicas(
    replicas: Sequence[ReplicaStats | Mapping[str, Any]],
    tight: bool,
    *,
    rng: np.random.Generator | None = None,
    max_stats_age_s: float = 5.0,
    prefix_hashes: Sequence[int] = (),
    max_load_imbalance: int = 8,
) -> list[list[str]]:
    """Full ranking of replica ids, best first, as singleton groups (``[[best], [next], ...]``), with
    unhealthy replicas in one final group. Every replica appears exactly once. Dicts are read with
    ``ReplicaStats.from_mapping`` keys (``replica_id`` required). ``rng`` seeds the power-of-two draw.
    ``prefix_hashes``: the request's ``prefix_chunk_hashes`` (empty: no prefix affinity).
    """
    reps = [r if isinstance(r, ReplicaStats) else ReplicaStats.from_mapping(r["replica_id"], r,
                                                                           int(r.get("in_flight", 0)))
            for r in replicas]
    healthy = [r for r in reps if r.healthy]
    sick = sorted((r for r in reps if not r.healthy), key=lambda r: (_load(r, max_stats_age_s), r.replica_id))
    if tight:
        fresh = [r for r in healthy if _fresh(r, max_stats_age_s) and r.spare_budget is not None]
        stale = [r for r in healthy if not (_fresh(r, max_stats_age_s) and r.spare_budget is not None)]
        ranked = sorted(fresh, key=lambda r: (-r.spare_budget, -prefix_match(prefix_hashes, r.prefix_hashes),
                                              _load(r, max_stats_age_s), r.replica_id))
        ranked += sorted(stale, key=lambda r: (_load(r, max_stats_age_s), r.replica_id))
    else:
        best = prefix_choice(healthy, prefix_hashes, max_stats_age_s, max_load_imbalance)
        rest = [r for r in healthy if r is not best]
        ranked = ([best] if best is not None else []) + _power_of_two(rest, rng or np.random.default_rng(),
                                                                      max_stats_age_s)
    groups = [[r.replica_id] for r in ranked]
    if sick:
        groups.append([r.replica_id for r in sick])
    return groups


def _power_of_two(reps: list[ReplicaStats], rng: np.random.Generator, max_stats_age_s: float) -> list[ReplicaStats]:
    """Two random replicas, the less loaded first (ties: random order); then the rest by load."""
    if len(reps) <= 1:
        return list(reps)
    i, j = (int(x) for x in rng.choice(len(reps), size=2, replace=False))
    a, b = reps[i], reps[j]
    la, lb = _load(a, max_stats_age_s), _load(b, max_stats_age_s)
    first, second = (a, b) if la < lb else (b, a)  # equal load: the draw's order decides
    rest = sorted((r for k, r in enumerate(reps) if k not in (i, j)),
                  key=lambda r: (_load(r, max_stats_age_s), r.replica_id))
    return [first, second] + rest


def prefix_choice(replicas: Sequence[ReplicaStats], prefix_hashes: Sequence[int], max_stats_age_s: float = 5.0,
                  max_load_imbalance: int = 8) -> ReplicaStats | None:
    """The replica holding the longest prefix of the request (ties: the less loaded), among those whose stats are
    fresh, that have SLO headroom (spare budget above zero where reported) and carry at most
    ``max_load_imbalance`` requests more than the least loaded replica; None if none matches."""
    if not prefix_hashes or not replicas:
        return None
    least = min(_load(r, max_stats_age_s) for r in replicas)
    best, best_key = None, None
    for r in replicas:
        load = _load(r, max_stats_age_s)
        if (not _fresh(r, max_stats_age_s) or not r.prefix_hashes or load > least + max_load_imbalance
                or (r.spare_budget is not None and r.spare_budget <= 0)):
            continue
        match = prefix_match(prefix_hashes, r.prefix_hashes)
        key = (-match, load, r.replica_id)
        if match and (best_key is None or key < best_key):
            best, best_key = r, key
    return best


# ---- prompt prefixes as text chunks ---------------------------------------------------------------------------
PREFIX_CHUNK_CHARS = 256  # ~64 tokens of English: a few KV blocks
MAX_PREFIX_CHUNKS = 64  # a request's first 16k characters are matched


def routing_text(payload: Mapping[str, Any]) -> str | None:
    """What a request's prompt says, as the router (from the replica call's payload) and the replica both see it:
    chat messages as role-tagged text (a follow-up turn starts with the previous turn's text), a prompt string as
    is, token ids as decimals. None when there is nothing to match."""
    messages, prompt = payload.get("messages"), payload.get("prompt")
    if isinstance(messages, (list, tuple)):
        return "".join(f"\x1e{m.get('role')}\x1f{m.get('content')}" for m in messages if isinstance(m, Mapping))
    if isinstance(prompt, str):
        return "\x1etext\x1f" + prompt
    if isinstance(prompt, (list, tuple)):
        return "\x1eids\x1f" + ",".join(str(t) for t in prompt)
    return None


def prefix_chunk_hashes(text: str | None, chunk_chars: int = PREFIX_CHUNK_CHARS,
                        max_chunks: int = MAX_PREFIX_CHUNKS) -> list[int]:
    """Chained 64-bit hashes of the text's full chunks: hash i stands for characters [0, (i + 1) * chunk_chars).
    Stable across processes (blake2b, not Python's salted ``hash``)."""
    if not text:
        return []
    out: list[int] = []
    h = b""
    for i in range(min(len(text) // chunk_chars, max_chunks)):
        h = hashlib.blake2b(h + text[i * chunk_chars:(i + 1) * chunk_chars].encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "big"))
    return out


def prefix_match(prefix_hashes: Sequence[int], held: frozenset[int] | set[int]) -> int:
    """How many leading chunks of the request a replica holds."""
    n = 0
    for h in prefix_hashes:
        if h not in held:
            break
        n += 1
    return n


class PrefixSummary:
    """The bounded set of prefix-chunk hashes a replica reports: those of the prompts it served most recently (LRU).
    A prompt's hashes are refreshed deepest first, so a prefix's first chunks are the last to go."""

    def __init__(self, capacity: int = 1024):
        self.capacity = max(1, int(capacity))
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.version = 0  # bumped by every add

    def add(self, prefix_hashes: Sequence[int]) -> None:
        self.version += 1
        for h in reversed(prefix_hashes):
            self._lru.pop(h, None)
            self._lru[h] = None
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def hashes(self) -> list[int]:
        return list(self._lru)

    def __len__(self) -> int:
        return len(self._lru)
