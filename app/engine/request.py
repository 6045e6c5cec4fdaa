"""One request's state: tokens, KV blocks, sampling, SLO fields and timings."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from app.engine.config import SamplingParams
from app.engine.sampling import TokenLogprob


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float | None
    tpot_s: float | None  # mean time per output token over the decode phase (first to last token)
    tpot_slo_ms: float | None
    ttft_slo_ms: float | None
    slo_attained: bool | None  # both targets met (a missing target counts as met)
    ttft_attained: bool | None  # None: no TTFT SLO
    tpot_attained: bool | None  # None: no TPOT SLO
    num_preemptions: int
    num_spec_steps: int
    num_accepted_draft_tokens: int
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (at its last admission)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "slo_unattainable" | "error"
    error: str | None = None  # why it failed (finish_reason "error"): a fault of this request alone
    logprobs: list[TokenLogprob] | None = None  # one per new token when the request asked for logprobs
    token_ids: list[int] | None = None  # all output tokens, filled when finished
    text: str | None = None  # all output text, filled when finished
    metrics: RequestMetrics | None = None  # filled when finished


@dataclass
class DetokenizerState:
    """Incremental detokenization offsets into the output tokens (``output.detokenize``): ``output[prefix:read]``
    is already streamed and decodes cleanly (context for the next window), and ``num_partial_chars`` characters of
    ``output[read:]`` were streamed before an unfinished trailing UTF-8 character."""

    prefix_offset: int = 0
    read_offset: int = 0
    num_partial_chars: int = 0


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None
    policy: str | None = None  # per-request speculation policy override (experiments)
    arrival_time: float = field(default_factory=time.perf_counter)
    best_effort: bool = False  # its TTFT SLO could not be met when it arrived: served after every protected request

    token_ids: list[int] = field(init=False)  # prompt, then output
    num_computed_tokens: int = 0  # tokens whose K/V sits in the cache
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # of those, what the prefix cache supplied at its (last) admission
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its full blocks, as needed
    num_registered_blocks: int = 0  # leading blocks registered in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    error: str | None = None  # finish reason "error": what failed
    detokenizer: DetokenizerState = field(default_factory=DetokenizerState)
    text_parts: list[str] = field(default_factory=list)  # the output text so far (stop strings checked), in pieces
    pending_text: str = ""  # decoded text held back: it may be the start of a stop string
    unstreamed_text: str = ""  # of text_parts, what the next output streams
    unstreamed_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_emitted_tokens: int = 0
    num_preemptions: int = 0
    num_spec_steps: int = 0
    num_accepted_draft_tokens: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def text(self) -> str:
        """The output text so far (joined on demand: streaming reads only the new pieces)."""
        return "".join(self.text_parts)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing from the cache: the next step yields new tokens."""
        return self.num_output_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def ttft_deadline(self) -> float:
        """When its first token is due (``perf_counter`` time); inf without a TTFT SLO."""
        return self.arrival_time + self.ttft_slo_ms / 1e3 if self.ttft_slo_ms is not None else math.inf

    def decode_time_s(self, now: float) -> float:
        """l_r of the SLO maths: time spent since the first output token."""
        return 0.0 if self.first_token_time is None else now - self.first_token_time

    def metrics(self) -> RequestMetrics:
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival_time
        tpot = None
        if len(self.token_times) > 1:
            tpot = (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)
        tpot_ok = None if self.tpot_slo_ms is None else (tpot is None or tpot * 1e3 <= self.tpot_slo_ms)
        ttft_ok = None if self.ttft_slo_ms is None else (ttft is not None and ttft * 1e3 <= self.ttft_slo_ms)
        attained = None if tpot_ok is None and ttft_ok is None else tpot_ok is not False and ttft_ok is not False
        return RequestMetrics(
            arrival_time=self.arrival_time, first_token_time=self.first_token_time, finish_time=self.finish_time,
            num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self.num_output_tokens, ttft_s=ttft,
            tpot_s=tpot, tpot_slo_ms=self.tpot_slo_ms, ttft_slo_ms=self.ttft_slo_ms, slo_attained=attained,
            ttft_attained=ttft_ok, tpot_attained=tpot_ok,
            num_preemptions=self.num_preemptions, num_spec_steps=self.num_spec_steps,
            num_accepted_draft_tokens=self.num_accepted_draft_tokens, num_cached_tokens=self.num_cached_tokens)
