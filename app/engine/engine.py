"""The engine: add_request / step / abort.

One step reads top to bottom in ``LLMEngine.step``: the scheduler plans (``StepPlan``: roots, prefill chunks, every
budget), the speculator drafts and selects a tree per decoding request within it, one target forward verifies
everything, acceptance walks each tree with the target's own choices and commits the accepted KV (``StepResult``),
the new tokens are appended and streamed (``output.py``), and the scheduler updates from the result.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.errors import InvalidRequestError, SLOUnattainableError
from app.engine.kv_cache import KVCache
from app.engine.memory_plan import GIB, MemoryPlan, forward_workspace_bytes, plan_memory
from app.engine.model import LlamaModel, bound_cpu_kernel_caches, packing_available
from app.engine.output import append_tokens, make_output
from app.engine.request import Request, RequestOutput
from app.engine.runner import ForwardOutput, ModelRunner, SeqInput
from app.engine.sampling import NonFiniteLogitsError, finite_rows, sample_rows, token_logprobs
from app.engine.scheduler import Scheduler
from app.engine.speculative.accept import accept_tree
from app.engine.speculative.factory import DraftModels, load_draft_models
from app.engine.speculative.speculator import ProposeResult, Speculator
from app.engine.step import StepPlan, StepResult, TreeOutcome
from app.engine.weights import load_checkpoint, load_tokenizer
from policies.admission import idle_prefill_s, newcomer_fits
from policies.budget import choose_token_budget
from policies.tree_selection import parse_policy

logger = logging.getLogger(__name__)


def _default_cache() -> Path:
    from app.engine.weights import default_cache_dir

    return default_cache_dir()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16_matmul() -> bool:
    """A CPU that multiplies bf16 natively: AMX-BF16 (Sapphire Rapids and later) or AVX512-BF16 (Zen 4 and later,
    Cooper Lake). On AMX oneDNN's bf16 matmul runs ~2.4x fp32's throughput at 16 decoding requests on the embedded
    model; on AVX512-BF16 (a Zen 4 VM, 2 threads) a verify step of 8-256 tokens takes 0.70-0.75x fp32's time and a
    1-token step 0.93x (``bench.engine --step-shapes``). Without either, bf16 is emulated and slower than fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe and probe()) for probe in probes)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_matmul() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


def encode_prompt(tokenizer, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
    """Token ids of a prompt: ids as given, chat messages (dicts) through the chat template, text as is or, with
    ``chat``, as one user message. A free function so that the replica tokenizes off the engine thread."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    if isinstance(prompt, list):
        return list(prompt)
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    if chat:
        return encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt, add_special_tokens=False)


class LLMEngine:
    """One step is plan -> speculate -> run -> accept -> update (``step``): the scheduler plans every budget, the
    speculator drafts and selects trees within them, one target forward verifies, acceptance walks the trees and
    commits their KV, and the scheduler advances from the ``StepResult``."""

    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            bound_cpu_kernel_caches(config.cpu_kernel_cache_entries)
        self.dtype = resolve_dtype(config.dtype, self.device)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        gpu_free_at_start = self._gpu_free_bytes()  # before any weights load: the memory plan's budget
        allocated_at_start = self._allocated_bytes()
        ckpt = load_checkpoint(config.model, cache_dir, load_format=config.load_format, device=self.device,
                               dtype=self.dtype)
        ckpt_dir = ckpt.tokenizer_dir
        self.model_config = ckpt.config
        self.tokenizer = load_tokenizer(ckpt.tokenizer_dir)
        self.model = LlamaModel(ckpt.config, ckpt.state_dict, self.dtype, self.device,
                                pack_weights=config.cpu_weight_prepack and packing_available(self.device, self.dtype))
        del ckpt
        self.max_model_len = min(config.max_model_len or self.model_config.max_position,
                                 self.model_config.max_position)
        parse_policy(config.policy)  # a bad name fails at start, not at the first step
        allocated_target = self._allocated_bytes()
        drafts: DraftModels | None = None
        if config.draft:  # weights only: their KV caches are sized with the target's by the memory plan
            drafts = load_draft_models(config.draft, target=self.model, target_tokenizer=self.tokenizer,
                                       target_dir=ckpt_dir)
        elif parse_policy(config.policy).kind != "none":
            raise ValueError(f"policy {config.policy!r} needs a draft (--draft)")
        self.memory_plan = self._plan_memory(gpu_free_at_start, allocated_target - allocated_at_start,
                                             self._allocated_bytes() - allocated_target, drafts)
        self.kv = KVCache(*self.model.new_kv_cache(self.memory_plan.num_kv_blocks, config.block_size),
                          prefix_caching=config.enable_prefix_caching,
                          identity=f"{config.model}|{config.load_format}|{self.dtype}|{config.block_size}")
        if self.kv.allocator.num_blocks * config.block_size < self.max_model_len:  # num_kv_blocks given
            self.max_model_len = self.kv.allocator.num_blocks * config.block_size
        self.runner = ModelRunner(self.model, self.kv)
        self.requests: dict[str, Request] = {}
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._seed_counter = itertools.count()
        self.step_history: deque[StepResult] = deque(maxlen=1024)
        # Called after every step with its plan and result (traces, benchmarks); they must not change either.
        self.step_observers: list[Callable[[StepPlan, StepResult], None]] = []
        self.speculator: Speculator | None = None
        if drafts is not None:
            source = drafts.build(self.memory_plan.num_kv_blocks, config.block_size)  # the target's token capacity
            self.speculator = Speculator(source, config.policy, max_tree_nodes=config.max_tree_nodes,
                                         max_depth=config.max_draft_depth, max_width=config.max_draft_width,
                                         root_topk=config.root_topk, slo_triage=config.slo_triage)
            if config.enable_prefix_caching and source.uses_features:  # a cached prefix's hidden states, for the draft
                self.kv.hidden = torch.zeros((*self.kv.k.shape[1:3], self.model_config.hidden_size),
                                             dtype=self.dtype, device=self.device)
        latency_model, token_budget = None, config.token_budget
        if self.speculator is not None and config.profile_latency:
            from app.engine.profiler import profile_target

            latency_model = profile_target(self.runner, config.model, cache_dir or _default_cache())
            if token_budget is None:
                token_budget = choose_token_budget(latency_model, context_tokens=256,
                                                   tolerance=config.budget_tolerance,
                                                   max_tokens=config.max_num_batched_tokens)
        self.scheduler = Scheduler(config, self.kv, speculative=self.speculator is not None,
                                   latency_model=latency_model, token_budget=token_budget)

    @property
    def token_budget(self) -> int:
        return self.scheduler.token_budget

    @property
    def num_steps(self) -> int:
        return self.scheduler.totals.num_steps

    def _gpu_free_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.empty_cache()  # blocks this process cached but no longer uses count as free
        return torch.cuda.mem_get_info(self.device)[0]

    def _allocated_bytes(self) -> int:
        """Bytes of live tensors on this engine's GPU (0 on CPU): differences measure what the weights take."""
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _plan_memory(self, gpu_free_bytes: int | None, target_weight_bytes: int, draft_weight_bytes: int,
                     drafts: DraftModels | None) -> MemoryPlan:
        """The KV caches' size, the same token capacity for the target and every draft model (memory_plan.py):
        on CUDA weights + workspace + KV within gpu_memory_fraction x the GPU memory free at start, on CPU target and
        draft KV within kv_cache_memory_gb; num_kv_blocks, when given, as is."""
        cfg, elt = self.config, self.model.embed.element_size()
        draft_per_token = drafts.state_bytes_per_token() if drafts is not None else 0
        if drafts is not None and drafts.uses_features and cfg.enable_prefix_caching:
            draft_per_token += self.model_config.hidden_size * elt  # the target's cache keeps hidden states for it
        sizes = dict(target_kv_bytes_per_token=self.model.kv_bytes_per_token(), block_size=cfg.block_size,
                     draft_kv_bytes_per_token=draft_per_token, min_kv_tokens=self.max_model_len,
                     num_kv_blocks=cfg.num_kv_blocks)
        if gpu_free_bytes is None:
            return plan_memory(int(cfg.kv_cache_memory_gb * GIB), **sizes)
        configs = [self.model_config] + [m.model.config for m in (drafts.models if drafts is not None else [])]
        workspace = max(forward_workspace_bytes(
            cfg.max_num_batched_tokens, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            qkv_width=(c.num_heads + 2 * c.num_kv_heads) * c.head_dim, vocab_size=c.vocab_size, dtype_bytes=elt)
            for c in configs)  # the target's and the drafts' forwards never run at once
        return plan_memory(int(gpu_free_bytes * cfg.gpu_memory_fraction), target_weight_bytes=target_weight_bytes,
                           draft_weight_bytes=draft_weight_bytes, workspace_bytes=workspace, **sizes)

    # ---- requests -------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, *, chat: bool = False, tpot_slo_ms: float | None = None,
                    ttft_slo_ms: float | None = None, ttft_slo_x_prefill: float | None = None,
                    ttft_allowance_ms: float = 0.0, policy: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request. A TTFT SLO is ``ttft_slo_ms``, or relative: ``ttft_slo_x_prefill`` x this replica's idle
        prefill time for the prompt + ``ttft_allowance_ms``. Raises InvalidRequestError for bad input (a TTFT
        target below the idle prefill time included) and SLOUnattainableError when the TTFT SLO cannot be met
        here now and ``on_unattainable`` is "reject"."""
        sampling = sampling or SamplingParams()
        token_ids = self.encode_prompt(prompt, chat)
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if any(t < 0 or t >= self.model_config.vocab_size for t in token_ids):
            raise InvalidRequestError("prompt token id out of the vocabulary")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the context window is {self.max_model_len}")
        if len(token_ids) + sampling.max_tokens > self.max_model_len:  # OpenAI's wording, which clients parse
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(token_ids) + sampling.max_tokens} tokens ({len(token_ids)} in the messages, "
                f"{sampling.max_tokens} in the completion). Please reduce the length of the messages or completion.")
        for name, value in (("tpot_slo_ms", tpot_slo_ms), ("ttft_slo_ms", ttft_slo_ms),
                            ("ttft_slo_x_prefill", ttft_slo_x_prefill)):
            if value is not None and not value > 0:
                raise InvalidRequestError(f"{name} must be positive, got {value}")
        if ttft_slo_ms is None and ttft_slo_x_prefill is not None:
            ttft_slo_ms = ttft_slo_x_prefill * self.idle_prefill_s(len(token_ids)) * 1e3 + ttft_allowance_ms
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        seed = sampling.seed if sampling.seed is not None else self.config.seed * 1_000_003 + next(self._seed_counter)
        generator = None if sampling.greedy else torch.Generator().manual_seed(seed)
        req = Request(request_id=request_id, prompt_token_ids=token_ids, sampling=sampling,
                      eos_token_ids=frozenset() if sampling.ignore_eos else self.eos_token_ids,
                      generator=generator, tpot_slo_ms=tpot_slo_ms, ttft_slo_ms=ttft_slo_ms, policy=policy,
                      arrival_time=arrival_time if arrival_time is not None else time.perf_counter())
        if ttft_slo_ms is not None:
            self._admit_ttft(req)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def idle_prefill_s(self, num_prompt_tokens: int) -> float:
        """What an idle replica needs to prefill a prompt of this length (the latency profile's prediction)."""
        model = self.scheduler.latency_model
        if model is None:
            chunks = -(-num_prompt_tokens // self.config.prefill_chunk_tokens)
            return chunks * self.scheduler.predicted_step_s(self.config.prefill_chunk_tokens, 0)
        return idle_prefill_s(model, num_prompt_tokens, self.config.prefill_chunk_tokens,
                              self.scheduler.step_overhead_ema_s)

    def _admit_ttft(self, req: Request) -> None:
        """Fail fast: a TTFT target below the idle prefill time is a client error; one that the queue ahead makes
        unattainable (or that would push an admitted request past its own deadline), or, where the SLO pace plan
        runs, one that would break a TPOT pace (its own or a running request's: ``Scheduler.pace_admits``), is
        refused or served best effort (``on_unattainable``). Needs the latency profile; without it every request is
        admitted."""
        idle_s = self.idle_prefill_s(req.num_prompt_tokens)
        if req.ttft_slo_ms / 1e3 < idle_s:
            raise InvalidRequestError(
                f"ttft_slo_ms {req.ttft_slo_ms:.4g} is below what an idle replica needs to prefill this "
                f"{req.num_prompt_tokens}-token prompt ({idle_s * 1e3:.4g} ms)")
        if self.scheduler.latency_model is None or not self.config.ttft_admission:
            return
        now = time.perf_counter()
        cutoff = self.scheduler.shed_cutoff_tokens(now, req)
        if req.num_prompt_tokens > cutoff:
            self._unattainable(req, f"this replica is overloaded and admits prompts of at most {cutoff:.0f} tokens "
                                    f"now, the shortest first; this one has {req.num_prompt_tokens}", now, "overloaded")
            return
        before, queued_before = self.scheduler.ttft_feasible(now)
        # the newcomer must fit with headroom: a prediction made now misses the load that arrives after it
        after, queued = self.scheduler.ttft_feasible(now, extra=req, headroom=self.config.ttft_admission_headroom)
        ttft_fits = newcomer_fits([r.request_id for r in queued_before], before, [r.request_id for r in queued],
                                  after, req.request_id)
        if ttft_fits and self.scheduler.pace_admits(now, req, queued):
            self.scheduler.offered_prefill.observe_admission(now, req.num_prompt_tokens)
            return
        reason, why = (("ttft", "the prompts queued ahead of it take longer") if not ttft_fits else
                       ("tpot_pace", "the requests it already serves leave no room on their TPOT pace for it"))
        self.scheduler.offered_prefill.observe_refusal(now)  # overloaded: overload shedding may choose whom to refuse
        self._unattainable(req, f"this replica cannot meet ttft_slo_ms {req.ttft_slo_ms:.4g} and tpot_slo_ms "
                                f"{req.tpot_slo_ms} for a {req.num_prompt_tokens}-token prompt now: {why}", now, reason)

    def _unattainable(self, req: Request, message: str, now: float, reason: str) -> None:
        """``on_unattainable``: serve ``req`` best effort, or refuse it (HTTP 429, retry after the queue drains)."""
        if self.config.on_unattainable == "best_effort":
            req.best_effort = True
            return
        raise SLOUnattainableError(message, retry_after_s=self.scheduler.queue_drain_s(now), reason=reason)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return False
        self._finish(req, "abort", time.perf_counter())
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t_start = time.perf_counter()
        plan = self.scheduler.schedule(t_start)
        for req in plan.preempted:
            self._release_draft(req.request_id)
        refused = [self._refused_output(req, t_start) for req in plan.refused]
        if not plan:
            return refused
        proposal = self._speculate(plan, t_start)
        t_verify = time.perf_counter()
        out = self._run(plan, proposal.trees)
        t_accept = time.perf_counter()
        result = self._accept(plan, proposal, out)
        result.verify_s, result.accept_s = t_accept - t_verify, time.perf_counter() - t_accept
        outputs = self._postprocess(plan, result)
        result.step_s = time.perf_counter() - t_start
        self.scheduler.update(plan, result)
        self.step_history.append(result)
        for observe in self.step_observers:
            observe(plan, result)
        return refused + outputs

    def _refused_output(self, req: Request, now: float) -> RequestOutput:
        """A queued request the scheduler refused (finish reason "slo_unattainable"): its last output."""
        req.finish_time = now
        self._release_draft(req.request_id)
        self.requests.pop(req.request_id, None)
        return make_output(req)

    def _speculate(self, plan: StepPlan, t_start: float) -> ProposeResult:
        """Draft and select a tree per decoding request within the plan's node budget; a tree needs KV room (and
        context window) for its nodes, and without it the request decodes plainly this step."""
        if self.speculator is None or not plan.decodes:
            return ProposeResult()
        proposal = self.speculator.propose(plan, t_start)
        for c in plan.decodes:
            req = c.request
            tree = proposal.trees.get(req.request_id)
            if tree is None:
                continue
            end = req.num_computed_tokens + len(tree.tokens)
            if end > self.max_model_len or not self.kv.ensure_capacity(req.block_ids, end,
                                                                       write_from=req.num_computed_tokens):
                del proposal.trees[req.request_id]
        return proposal

    def _run(self, plan: StepPlan, trees: dict) -> ForwardOutput:
        """One target forward over the plan: tree tokens with tree attention, prefill chunks and plain roots causal."""
        seqs = []
        for c in plan.chunks:
            req = c.request
            tree = trees.get(req.request_id)
            if tree is not None:
                seqs.append(SeqInput(req.block_ids, req.num_computed_tokens, tree.tokens, tree.parents, "all"))
            else:
                seqs.append(SeqInput(req.block_ids, req.num_computed_tokens,
                                     req.token_ids[req.num_computed_tokens:req.num_computed_tokens + c.num_tokens],
                                     logits="last" if c.completes else "none"))
        return self.runner.run(seqs)

    def _accept(self, plan: StepPlan, proposal: ProposeResult, out: ForwardOutput) -> StepResult:
        """Sample each completing chunk's token, walk each verified tree with the target's own choices (lossless),
        keep the accepted paths' KV and release the rest. The requests advance in ``Scheduler.update``."""
        trees = proposal.trees
        source = self.speculator.drafter if self.speculator is not None else None
        result = StepResult(num_decodes=len(plan.decodes), draft_s=proposal.draft_s, select_s=proposal.select_s)
        logprob_rows: list[tuple[Request, list[int], list[int]]] = []  # (request, logit rows, its new tokens)
        chunks = plan.chunks
        plain = [(i, c) for i, c in enumerate(chunks) if c.completes and c.request.request_id not in trees]
        # one argmax and one finiteness check for every logits row of the step (plain samples and tree walks)
        greedy = torch.argmax(out.logits, dim=-1).tolist() if plain or trees else []
        finite = finite_rows(out.logits) if plain or trees else []
        if plain:
            rows = [out.logit_rows[i][0] for i, _ in plain]
            tokens = sample_rows(out.logits[rows], [c.request.sampling for _, c in plain],
                                 [c.request.generator for _, c in plain], [greedy[r] for r in rows],
                                 [finite[r] for r in rows])
            for (i, c), t in zip(plain, tokens):
                if isinstance(t, NonFiniteLogitsError):
                    result.failed[c.request.request_id] = str(t)
                else:
                    result.new_tokens[c.request.request_id] = [t]
                    logprob_rows.append((c.request, [out.logit_rows[i][0]], [t]))
        if source is not None and source.uses_features:  # feature drafts read the target's hidden states
            for i, c in enumerate(chunks):
                if c.request.request_id not in trees:
                    self._record_hidden(source, c.request, out.hidden[out.token_rows[i]])
        moves = []
        for i, c in enumerate(chunks):
            req = c.request
            tree = trees.get(req.request_id)
            if tree is None:
                continue
            rows = out.logit_rows[i]
            try:
                path, emitted = accept_tree(tree.tokens, tree.parents, out.logits[rows[0]:rows[-1] + 1],
                                            req.sampling, req.generator, [greedy[j] for j in rows],
                                            [finite[j] for j in rows])
            except NonFiniteLogitsError as exc:  # its KV stays unaccepted; the request fails in _postprocess
                result.failed[req.request_id] = str(exc)
                continue
            moves.append((req.block_ids, req.num_computed_tokens, path))
            if source.uses_features:
                self._record_hidden(source, req, out.hidden[[out.token_rows[i][j] for j in path]])
            outcome = TreeOutcome(req.request_id, proposal.candidates[req.request_id], tree, path)
            self.speculator.observe(req.request_id, outcome.candidates, tree, path)
            result.trees.append(outcome)
            result.new_tokens[req.request_id] = emitted
            logprob_rows.append((req, [rows[j] for j in path], emitted))
        if moves:
            self.kv.keep_accepted(moves)
            for block_ids, context_len, path in moves:
                self.kv.trim(block_ids, context_len + len(path))
        result.num_tokens = sum(len(trees[c.request.request_id].tokens) if c.request.request_id in trees
                                else c.num_tokens for c in chunks)
        self._logprobs(out, [r for r in logprob_rows if r[0].sampling.logprobs is not None], result)
        return result

    @staticmethod
    def _logprobs(out: ForwardOutput, wanted: list[tuple[Request, list[int], list[int]]], result: StepResult) -> None:
        """The target's log-probabilities of the emitted tokens, from the logits that chose them (the verify pass):
        one log_softmax over every such row of the step."""
        if not wanted:
            return
        rows = [j for _, rs, _ in wanted for j in rs]
        tokens = [t for _, _, ts in wanted for t in ts]
        num_top = [req.sampling.logprobs for req, rs, _ in wanted for _ in rs]
        flat = token_logprobs(out.logits[rows], tokens, num_top)
        at = 0
        for req, rs, _ in wanted:
            result.new_logprobs[req.request_id] = flat[at:at + len(rs)]
            at += len(rs)

    def _record_hidden(self, source, req: Request, hidden: torch.Tensor) -> None:
        """The target's hidden states of req's tokens from num_computed_tokens on, for a feature draft; kept beside
        their KV too, so that a request mapping a cached prefix hands the draft that prefix's states first. A draft
        that fails on one request stops speculating for it (``Speculator.disable``); its output is unchanged."""
        if not self.speculator.drafts(req.request_id):
            return
        try:
            self._record_hidden_states(source, req, hidden)
        except Exception as exc:  # noqa: BLE001 - a draft fault is this request's: it decodes without one
            self.speculator.disable(req.request_id, exc)

    def _record_hidden_states(self, source, req: Request, hidden: torch.Tensor) -> None:
        start = req.num_computed_tokens
        if self.kv.hidden is not None:
            if start and start == req.num_cached_tokens:  # its first computed chunk follows a cached prefix
                source.record_hidden(req.request_id, 0, self.kv.read_hidden(req.block_ids, 0, start))
            self.kv.write_hidden(req.block_ids, start, hidden)
        source.record_hidden(req.request_id, start, hidden)

    def _postprocess(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Append each request's new tokens and build its output. What fails here for one request (its numerics in
        ``result.failed``, its detokenization or stop handling) finishes that request alone, with finish reason
        "error" and the reason in ``RequestOutput.error``."""
        now = time.perf_counter()
        outputs = []
        for c in plan.chunks:
            req = c.request
            rid = req.request_id
            if req.finished:
                continue
            if rid in result.failed:
                outputs.append(self._fail(req, result.failed[rid], now))
                continue
            if rid not in result.new_tokens:
                continue
            try:
                reason = append_tokens(req, result.new_tokens[rid], now, self.max_model_len, self.tokenizer,
                                       result.new_logprobs.get(rid))
                if reason:
                    self._finish(req, reason, now)
                outputs.append(make_output(req))
            except Exception as exc:  # noqa: BLE001 - detokenizing or stop handling this request's output
                outputs.append(self._fail(req, f"could not turn the generated tokens into text: {exc!r}", now))
                continue
            if req.finished:
                self.requests.pop(rid, None)
        return outputs

    def _fail(self, req: Request, message: str, now: float) -> RequestOutput:
        """Finish one request with finish reason "error" (its own fault: the others run on) and return its output."""
        logger.warning("request %s failed: %s", req.request_id, message)
        req.error = message
        if not req.finished:
            self._finish(req, "error", now)
        self.requests.pop(req.request_id, None)
        req.unstreamed_text, req.unstreamed_logprobs = "", []
        return make_output(req)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        self.scheduler.finish(req, reason)
        req.finish_time = now
        self._release_draft(req.request_id)

    def _release_draft(self, request_id: str) -> None:
        if self.speculator is not None:
            self.speculator.release(request_id)

    # ---- convenience ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, **kwargs) -> list[RequestOutput]:
        """Run prompts to completion (continuous batching) and return final outputs in prompt order."""
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, s, chat=chat, **kwargs) for p, s in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def spare_token_budget(self) -> int:
        return self.scheduler.spare_token_budget(time.perf_counter())

    def stats(self) -> dict:
        t = self.scheduler.totals
        out = {
            "running_requests": self.scheduler.num_running,
            "waiting_requests": len(self.scheduler.waiting),
            "kv_free_blocks": self.kv.allocator.num_free,
            "kv_total_blocks": self.kv.allocator.num_blocks,
            "kv_token_capacity": self.memory_plan.kv_token_capacity,  # target and each draft alike
            "prefix_cache": self.kv.prefix_stats(),  # hit rate (tokens), cached blocks, evictions
            "num_steps": t.num_steps,
            "token_budget": self.token_budget,
            "spare_token_budget": self.spare_token_budget(),
            "accepted_tokens_per_step": t.tokens_per_tree_step,
            "selection_time_fraction": t.select_s / t.step_s if t.step_s else 0.0,
            "tree_nodes_verified": t.tree_nodes,
            "draft_tokens_accepted": t.accepted,
            "prefill_held_steps": t.prefill_held_steps,  # steps the TPOT SLOs kept prompts waiting
            "prefill_queue_s": self.scheduler.queue_drain_s(time.perf_counter()),  # queued prefill at full speed
            "latency_scale": self.scheduler.latency_scale,  # measured / profiled step time, recent steps
            # overload shedding: the prompt tok/s prefilled by steps that left prompts waiting (EMA; None before such a
            # step) and the longest prompt admitted now (None: no cutoff)
            "prefill_capacity_tok_s": self.scheduler.offered_prefill.capacity_tok_s,
            "shed_cutoff_tokens": _finite_or_none(self.scheduler.shed_cutoff_now(time.perf_counter())),
            # where the engine's time went, over all steps so far
            "step_time_split_s": {k: getattr(t, k) for k in ("draft_s", "select_s", "verify_s", "accept_s", "step_s")},
        }
        if self.speculator is not None and (source_stats := self.speculator.drafter.stats()):
            out["draft_sources"] = source_stats  # accepted tokens and calibration per source
        return out


def _finite_or_none(x: float) -> float | None:
    return x if x != float("inf") else None
