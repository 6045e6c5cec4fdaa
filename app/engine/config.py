"""Frozen configuration dataclasses; the CLI takes its defaults from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The draft a speculative policy uses when none is named: the shipped feature draft merged with prompt lookup (best
# tokens/step measured). serve_config.yaml's `draft:` says the same (tests/engine/test_cli.py keeps them equal);
# EngineConfig.draft itself stays None so a config without a draft cannot speculate by accident.
DEFAULT_DRAFT = "feature,ngram"

# Temperatures below this decode greedily: logits / 1e-40 overflow to inf and the softmax to NaN, and well before
# that the distribution is one-hot in float32 anyway (a logit gap of 1e-3 at T = 1e-5 is a factor e^100).
GREEDY_TEMPERATURE_FLOOR = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (completions allow 5)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "embedded"  # "embedded", a Hugging Face id, a local directory or a .gguf file
    load_format: str = "auto"  # auto | dummy: seeded random weights; model is then a preset (llama-1b, llama-8b,
    # llama-70b-tp4, smollm2-135m) or a directory holding a config.json (app/engine/dummy.py); a draft: "dummy:<model>"
    draft: str | None = None  # draft sources: "feature", "distilled", "ngram", a model id/path, or a comma list to merge
    policy: str = "none"  # speculation policy: none | chain:k | static-tree | dynamic-tree | adaserve
    device: str = "auto"  # cpu | cuda | auto
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bfloat16 on CUDA and on CPUs with native bf16
    # matmul, AMX or AVX512-BF16; else float32)
    block_size: int = 16
    num_kv_blocks: int | None = None  # KV blocks of the target and of each draft model; None: the memory plan sizes
    # them (app/engine/memory_plan.py), the same token capacity for all
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of a prompt prefix computed before (kv_cache.py)
    kv_cache_memory_gb: float = 2.0  # CPU: the KV caches of the target and the drafts together
    gpu_memory_fraction: float = 0.85  # CUDA: the share of the GPU memory free when the engine starts (before the
    # target's weights load) that target and draft weights, one forward's workspace and their KV caches fill together
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # target tokens in one forward (prefill chunks + decode + tree tokens)
    prefill_chunk_tokens: int = 256
    max_model_len: int | None = None  # None: the model's max_position
    cache_dir: str | None = None
    seed: int = 0
    # Speculation (policy != "none"): the step's token budget B and the draft tree's limits.
    token_budget: int | None = None  # None: profiled at start-up (largest step within budget_tolerance x floor)
    budget_tolerance: float = 2.0
    max_tree_nodes: int = 32  # n_max: most tree nodes one request verifies in a step
    max_draft_depth: int = 8
    max_draft_width: int = 4
    slo_triage: bool = True  # adaserve's SLO phase skips requests it cannot bring onto their SLO this step (flexflow
    # gives them their best nodes up to its cap): under overload they all are, and the cap's even split lost to
    # dynamic-tree (70B simulation, 10 req/s: 34.9% vs 37.8% attainment; with triage 38.4%)
    root_topk: int = 16  # root children a budgeted policy's draft proposes: free (the catch-up forward's logits), and
    # the selection keeps only those worth their verify time (bench.ngram: +8% tokens per step at 16 per request)
    slo_prefill: bool | None = None  # prefill takes only what the decoding requests' TPOT SLO pace leaves each step,
    # with their SLO nodes reserved (policies.budget.slo_step_plan; needs the latency profile). None: in steps running
    # adaserve. Trades TTFT for TPOT attainment under overload (70B simulation, 10 req/s: 91% vs 30% attainment,
    # 1.43x goodput, TTFT p50 34 s vs 0.2 s); bound the wait with ttft_slo_ms or max_prefill_wait_s
    max_prefill_wait_s: float | None = None  # a prompt queued this long is prefilled whatever the SLO pace
    slo_prefill_confidence_z: float = 2.0  # the pace plan's cushion, in standard deviations of a request's remaining
    # gain: headroom for unlucky acceptance (70B simulation, 10 req/s: z = 1 / 2 / 3 gives 83% / 91% / 96% attainment,
    # 475 / 436 / 350 tok/s goodput)
    gain_prior_tokens_per_step: float = 2.0  # the gain per step the pace plan and fail fast assume before the
    # replica has measured its own: a prior worth gain_prior_steps verified trees (policies.budget.gain_per_step).
    # Without it a cold replica prices every pace at 1 token per step and admits a burst unprotected
    gain_prior_steps: float = 16.0  # 0: the measured gain alone
    profile_latency: bool = True  # profile the target's step latency at start-up (cached per model+device)
    calibrate_latency: bool = False  # price planning and admission with the profile rescaled, step size by step
    # size, to the measured / predicted time of recent steps (``Scheduler.knot_log_scales``; ``latency_scale``, one
    # factor for all sizes, is tracked and exported either way): under load the CPU's steps run 1.2-1.7x the idle
    # profile depending on their size. On in the CPU YAMLs (2-core CPU, 3 seeds: +9 / +4 / +7 / -2 points of attainment
    # at 1 / 1.5 / 2 / 3 req/s); off here and in the GPU YAML, where it is unmeasured (docs/design.md, calibration)
    ttft_admission: bool = True  # serve prompts earliest TTFT deadline first, never let the SLO pace plan hold back
    # what feasible deadlines need, and act on unattainable ones (on_unattainable); False: FIFO, as before TTFT SLOs
    ttft_admission_headroom: float = 0.2  # a newcomer is admitted only if predicted to get its first token within
    # (1 - this) x its TTFT SLO: predictions made at arrival miss the load that arrives after it
    on_unattainable: str = "reject"  # a request whose TTFT SLO the latency model says this replica cannot meet:
    # "reject" refuses it at once (HTTP 429, code slo_unattainable: the router tries another replica), "best_effort"
    # serves it after every protected request
    overload_shedding: bool = False  # where the SLO pace plan runs and fail fast is refusing anyway: when the prompts
    # offered over the last 30 s ask for more prefill per second than the replica serves, refuse the longest first
    # (policies.admission.shed_cutoff_tokens; refused or best effort as on_unattainable says). It serves more requests
    # within their SLOs under overload (docs/results.md) and costs the long prompts, so the shipped YAMLs turn it on
    # and a bare EngineConfig keeps the neutral rule: refuse only what cannot be served on time, whatever its length
    cpu_weight_prepack: bool = True  # CPU: the matmul weights packed for oneDNN at load (app/engine/layers.py), where
    # ATen's MKL GEMMs stream them at a third of the bandwidth; same float32 maths, summed in another order
    cpu_kernel_cache_entries: int = 128  # CPU: shapes oneDNN (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep
    # (LRU_CACHE_CAPACITY) keep a compiled kernel for, each, unless those variables are set; their default, 1024,
    # lets a serving process's RSS grow for hours as new token counts arrive (app/engine/model.py)

    def __post_init__(self) -> None:
        if isinstance(self.draft, (list, tuple)):  # YAML `draft: [distilled, ngram]` -> "distilled,ngram"
            object.__setattr__(self, "draft", ",".join(str(d) for d in self.draft) or None)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk_tokens",
                     "cpu_kernel_cache_entries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if not self.slo_prefill_confidence_z >= 0:
            raise ValueError(f"slo_prefill_confidence_z must be >= 0, got {self.slo_prefill_confidence_z}")
        if not 0 <= self.ttft_admission_headroom < 1:
            raise ValueError(f"ttft_admission_headroom must be in [0, 1), got {self.ttft_admission_headroom}")
        if self.on_unattainable not in ("reject", "best_effort"):
            raise ValueError(f"on_unattainable must be reject or best_effort, got {self.on_unattainable!r}")
        if not (self.gain_prior_tokens_per_step >= 1 and self.gain_prior_steps >= 0):
            raise ValueError(f"gain_prior_tokens_per_step must be >= 1 and gain_prior_steps >= 0, got "
                             f"{self.gain_prior_tokens_per_step} and {self.gain_prior_steps}")
        if self.max_prefill_wait_s is not None and not self.max_prefill_wait_s >= 0:
            raise ValueError(f"max_prefill_wait_s must be >= 0, got {self.max_prefill_wait_s}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: each emitted token's logprob and the k most likely tokens'

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it that sampling would only overflow (GREEDY_TEMPERATURE_FLOOR)."""
        return self.temperature < GREEDY_TEMPERATURE_FLOOR
