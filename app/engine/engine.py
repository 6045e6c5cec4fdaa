"""The engine: add_request / step / abort. One step = schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel
from app.engine.request import Request, RequestOutput
from app.engine.runner import ModelRunner, SeqInput
from app.engine.sampling import sample_rows
from app.engine.scheduler import Scheduler, StepPlan
from app.engine.speculative.accept import accept_tree
from app.engine.speculative.speculator import ProposeResult, Speculator
from app.engine.speculative.tree import VerifyTree
from app.engine.weights import load_checkpoint, load_tokenizer
import numpy as np

from policies.budget import (choose_token_budget, min_worthwhile_path_prob, required_nodes, slo_step_plan,
                             spare_budget, throughput_cut_path_prob)
from policies.latency_model import LatencyModel
from policies.tree_selection import SLOState, parse_policy, required_acceptance


class InvalidRequestError(ValueError):
    """The client's request cannot be served as given (empty prompt, too long, bad parameters)."""


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
    """AMX-BF16 (Sapphire Rapids and later): oneDNN's bf16 matmul then runs ~2.4x fp32's throughput at 16
    decoding requests on the embedded model, and stays flat up to ~32 tokens, where fp32 grows ~3x."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_matmul() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


@dataclass
class StepStats:
    """One engine step, for metrics and benchmarks."""

    num_tokens: int  # target tokens in the step (prefill + roots + tree nodes)
    num_decodes: int
    num_trees: int  # requests that verified a tree
    num_tree_nodes: int  # draft nodes verified
    num_accepted: int  # draft nodes accepted
    tree_gain_sq: int  # sum over the trees of (tokens the request gained)^2, for the gain's spread
    draft_s: float
    select_s: float
    verify_s: float
    accept_s: float
    step_s: float


class LLMEngine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        ckpt = load_checkpoint(config.model, cache_dir)
        ckpt_dir = ckpt.tokenizer_dir
        self.model_config = ckpt.config
        self.tokenizer = load_tokenizer(ckpt.tokenizer_dir)
        self.model = LlamaModel(ckpt.config, ckpt.state_dict, self.dtype, self.device)
        del ckpt
        self.max_model_len = min(config.max_model_len or self.model_config.max_position,
                                 self.model_config.max_position)
        self.kv = KVCache(*self.model.new_kv_cache(self._num_kv_blocks(), config.block_size))
        if self.kv.allocator.num_blocks * config.block_size < self.max_model_len:
            self.max_model_len = self.kv.allocator.num_blocks * config.block_size
        self.runner = ModelRunner(self.model, self.kv)
        self.scheduler = Scheduler(config, self.kv)
        self.requests: dict[str, Request] = {}
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._seed_counter = itertools.count()
        self.num_steps = 0
        self.step_history: deque[StepStats] = deque(maxlen=1024)
        self.totals = {"tree_nodes": 0, "accepted": 0, "tree_gain_sq": 0, "spec_steps": 0, "tree_requests": 0,
                       "draft_s": 0.0, "select_s": 0.0,
                       "step_s": 0.0, "verify_s": 0.0, "accept_s": 0.0, "prefill_held_steps": 0}
        self._step_ema_s: float | None = None
        self._step_overhead_ema_s = 0.0  # a decoding step's time outside the target forward (draft, select, host)
        parse_policy(config.policy)  # a bad name fails at start, not at the first step
        self.speculator: Speculator | None = None
        self.latency_model: LatencyModel | None = None
        self.token_budget = config.token_budget or config.max_num_batched_tokens
        if config.draft:
            from app.engine.speculative import load_drafter

            drafter = load_drafter(config.draft, target=self.model, target_tokenizer=self.tokenizer,
                                   target_dir=ckpt_dir, num_blocks=self.kv.allocator.num_blocks,
                                   block_size=config.block_size)
            self.speculator = Speculator(drafter, config.policy, max_tree_nodes=config.max_tree_nodes,
                                         max_depth=config.max_draft_depth, max_width=config.max_draft_width,
                                         root_topk=config.root_topk, slo_triage=config.slo_triage)
        elif parse_policy(config.policy).kind != "none":
            raise ValueError(f"policy {config.policy!r} needs a draft (--draft)")
        if self.speculator is not None and config.profile_latency:
            from app.engine.profiler import profile_target

            self.latency_model = profile_target(self.runner, config.model, cache_dir or _default_cache())
            if config.token_budget is None:
                self.token_budget = choose_token_budget(
                    self.latency_model, context_tokens=256, tolerance=config.budget_tolerance,
                    max_tokens=config.max_num_batched_tokens)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = self.model.kv_bytes_per_token() * cfg.block_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * cfg.gpu_memory_fraction) // per_block)
        return max(1, int(cfg.kv_cache_memory_gb * 2**30) // per_block)

    # ---- requests -------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        if chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False))
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, *, chat: bool = False, tpot_slo_ms: float | None = None,
                    ttft_slo_ms: float | None = None, policy: str | None = None,
                    arrival_time: float | None = None) -> str:
        sampling = sampling or SamplingParams()
        token_ids = self.encode_prompt(prompt, chat)
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if any(t < 0 or t >= self.model_config.vocab_size for t in token_ids):
            raise InvalidRequestError("prompt token id out of the vocabulary")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the context window is {self.max_model_len}")
        for name, value in (("tpot_slo_ms", tpot_slo_ms), ("ttft_slo_ms", ttft_slo_ms)):
            if value is not None and not value > 0:
                raise InvalidRequestError(f"{name} must be positive, got {value}")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        seed = sampling.seed if sampling.seed is not None else self.config.seed * 1_000_003 + next(self._seed_counter)
        generator = None if sampling.greedy else torch.Generator().manual_seed(seed)
        req = Request(request_id=request_id, prompt_token_ids=token_ids, sampling=sampling,
                      eos_token_ids=frozenset() if sampling.ignore_eos else self.eos_token_ids,
                      generator=generator, tpot_slo_ms=tpot_slo_ms, ttft_slo_ms=ttft_slo_ms, policy=policy,
                      arrival_time=arrival_time if arrival_time is not None else time.perf_counter())
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

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
        # pricing a chunk needs the latency profile; without it (profile_latency=False) prefill is not bounded
        slo_prefill = self.config.slo_prefill is not False and self.latency_model is not None
        plan = self.scheduler.schedule(self._slo_prefill_cap if slo_prefill else None)
        self.totals["prefill_held_steps"] += plan.prefill_held
        if self.speculator is not None:
            for req in plan.preempted:
                self.speculator.release(req.request_id)
        if not plan:
            return []
        new_tokens, stats = self._execute(plan, t_start)
        self.num_steps += 1
        outputs = self._postprocess(plan, new_tokens)
        stats.step_s = time.perf_counter() - t_start
        self._record(stats)
        return outputs

    def _slo_prefill_cap(self, decodes: list[Request]) -> tuple[int, int]:
        """(prefill tokens, reserved SLO nodes): what the decoding requests' TPOT SLO pace leaves this step
        (policies.budget.slo_step_plan); a queued prompt whose TTFT SLO (or ``max_prefill_wait_s``) is due lifts
        the bound. ``slo_prefill=None`` bounds only steps where a decoding request runs adaserve (the engine's
        policy or its own)."""
        now = time.perf_counter()
        limit = self.config.max_num_batched_tokens
        if self.config.slo_prefill is None and (self.speculator is None or not any(
                self.speculator.policy_of(r).kind == "adaserve" for r in decodes)):
            return limit, 0
        queued = list(self.scheduler.waiting) + [r for r in self.scheduler.running if r.num_output_tokens == 0]
        for r in queued:
            waited_s = now - r.arrival_time
            if self.config.max_prefill_wait_s is not None and waited_s >= self.config.max_prefill_wait_s:
                return limit, 0
            if r.ttft_slo_ms is not None and (waited_s + self.predicted_step_s(r.num_uncomputed_tokens, 0)
                                              >= r.ttft_slo_ms / 1e3):
                return limit, 0
        gain = self.tokens_per_tree_step
        t = self.totals
        gain_sd = math.sqrt(max(t["tree_gain_sq"] / t["tree_requests"] - gain**2, 0.0)) if t["tree_requests"] else 0.0
        return slo_step_plan(
            self.latency_model, root_tokens=len(decodes), context_tokens=sum(r.num_computed_tokens for r in decodes),
            decode_time_s=np.array([r.decode_time_s(now) for r in decodes]),
            decoded_tokens=np.array([max(r.num_output_tokens - 1, 0) for r in decodes]),
            tpot_slo_s=np.array([r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else np.inf for r in decodes]),
            remaining_tokens=np.array([r.sampling.max_tokens - r.num_output_tokens for r in decodes]),
            acceptance_rate=(gain - 1.0) / gain, tokens_per_step=gain, tokens_per_step_sd=gain_sd,
            max_nodes_per_request=self.speculator.n_max if self.speculator else 0,
            max_tokens=limit, max_prefill_tokens=limit, overhead_s=self._step_overhead_ema_s,
            confidence_z=self.config.slo_prefill_confidence_z)

    @property
    def tokens_per_tree_step(self) -> float:
        """Tokens a speculating request gains per step so far (accepted draft tokens + the bonus token)."""
        t = self.totals
        return 1.0 + (t["accepted"] / t["tree_requests"] if t["tree_requests"] else 0.0)

    def predicted_step_s(self, num_tokens: int, context_tokens: int) -> float:
        if self.latency_model is not None:
            return float(self.latency_model.predict(num_tokens, context_tokens))
        return self._step_ema_s or 0.05

    def _execute(self, plan: StepPlan, t_start: float) -> tuple[dict[str, list[int]], StepStats]:
        """Draft + select trees, one target pass over the plan, accept; return the tokens each request gains."""
        decodes = [c.request for c in plan.decodes]
        proposal = None
        trees: dict[str, VerifyTree] = {}
        if self.speculator is not None and decodes:
            proposal = self._propose(plan, decodes, t_start)
            trees = self._fit_trees(decodes, proposal.trees)
        t_verify = time.perf_counter()
        chunks = plan.chunks
        seqs = []
        for c in chunks:
            req = c.request
            tree = trees.get(req.request_id)
            if tree is not None:
                seqs.append(SeqInput(req.block_ids, req.num_computed_tokens, tree.tokens, tree.parents, "all"))
            else:
                seqs.append(SeqInput(req.block_ids, req.num_computed_tokens,
                                     req.token_ids[req.num_computed_tokens:req.num_computed_tokens + c.num_tokens],
                                     logits="last" if c.completes else "none"))
        out = self.runner.run(seqs)
        t_accept = time.perf_counter()
        record = self._hidden_recorder()
        if record is not None:  # feature drafts read the target's hidden state of every computed token
            for i, c in enumerate(chunks):
                if c.request.request_id not in trees:
                    record(c.request.request_id, c.request.num_computed_tokens, out.hidden[out.token_rows[i]])

        new_tokens: dict[str, list[int]] = {}
        plain = [(i, c) for i, c in enumerate(chunks) if c.completes and c.request.request_id not in trees]
        if plain:
            rows = [out.logit_rows[i][0] for i, _ in plain]
            tokens = sample_rows(out.logits[rows], [c.request.sampling for _, c in plain],
                                 [c.request.generator for _, c in plain])
            for (_, c), t in zip(plain, tokens):
                new_tokens[c.request.request_id] = [t]
        for c in chunks:
            if c.request.request_id not in trees:
                c.request.num_computed_tokens += c.num_tokens
        num_nodes = num_accepted = gain_sq = 0
        if trees:
            num_nodes, num_accepted, gain_sq = self._accept(chunks, trees, out, proposal, new_tokens)
        stats = StepStats(num_tokens=sum(len(s.token_ids) for s in seqs), num_decodes=len(decodes),
                          num_trees=len(trees), num_tree_nodes=num_nodes, num_accepted=num_accepted,
                          tree_gain_sq=gain_sq,
                          draft_s=proposal.draft_s if proposal else 0.0,
                          select_s=proposal.select_s if proposal else 0.0,
                          verify_s=t_accept - t_verify, accept_s=time.perf_counter() - t_accept, step_s=0.0)
        return new_tokens, stats

    def _hidden_recorder(self):
        if self.speculator is None or not getattr(self.speculator.drafter, "uses_features", False):
            return None
        return self.speculator.drafter.record_hidden

    def _propose(self, plan: StepPlan, decodes: list[Request], t_start: float) -> ProposeResult:
        """Draft and select under what the step's budget leaves after roots and prefill chunks."""
        prefill_tokens = sum(c.num_tokens for c in plan.prefills)
        node_budget = min(plan.spec_token_budget,
                          max(self.token_budget - len(decodes) - prefill_tokens, plan.slo_node_budget))
        context = sum(r.num_computed_tokens for r in decodes)
        t_step_s = self.predicted_step_s(len(decodes) + prefill_tokens + max(node_budget, 0), context)
        min_f = tokens_per_s = 0.0
        node_cut = None
        if self.latency_model is not None:  # priced cut-offs need the profile (profile_latency=False: none)
            mean_gain = self.tokens_per_tree_step
            base_tokens = len(decodes) + prefill_tokens
            min_f = min_worthwhile_path_prob(self.latency_model, base_tokens, context, len(decodes) * mean_gain)
            tokens_per_s = len(decodes) * mean_gain / max(t_step_s, 1e-6)
            model, roots = self.latency_model, float(len(decodes))

            def node_cut(path_probs):
                return throughput_cut_path_prob(path_probs, model, base_tokens, context, roots)
        return self.speculator.propose(decodes, node_budget, t_step_s, t_start, min_path_prob=min_f,
                                       tokens_per_s=tokens_per_s, node_cut=node_cut)

    def _fit_trees(self, decodes: list[Request], trees: dict[str, VerifyTree]) -> dict[str, VerifyTree]:
        """Trees need KV room (and context window) for their nodes; without it a request decodes plainly."""
        fitted = {}
        for req in decodes:
            tree = trees.get(req.request_id)
            if tree is None:
                continue
            end = req.num_computed_tokens + len(tree.tokens)
            if end <= self.max_model_len and self.kv.ensure_capacity(req.block_ids, end):
                fitted[req.request_id] = tree
        return fitted

    def _accept(self, chunks, trees: dict[str, VerifyTree], out, proposal: ProposeResult,
                new_tokens: dict[str, list[int]]) -> tuple[int, int, int]:
        """Walk each verified tree, keep the accepted path's KV, release the rest; returns (nodes, accepted, the sum
        of squared gains)."""
        greedy = torch.argmax(out.logits, dim=-1).tolist()  # one vectorised argmax for every greedy walk
        moves = []
        num_nodes = num_accepted = gain_sq = 0
        tree_chunks = [(i, c.request) for i, c in enumerate(chunks) if c.request.request_id in trees]
        record = self._hidden_recorder()
        for i, req in tree_chunks:
            tree = trees[req.request_id]
            rows = out.logit_rows[i]
            path, emitted = accept_tree(tree.tokens, tree.parents, out.logits[rows[0]:rows[-1] + 1],
                                        req.sampling, req.generator, [greedy[j] for j in rows])
            moves.append((req.block_ids, req.num_computed_tokens, path))
            if record is not None:
                record(req.request_id, req.num_computed_tokens,
                       out.hidden[[out.token_rows[i][j] for j in path]])
            self.speculator.observe(req.request_id, proposal.candidates[req.request_id], tree, path)
            req.num_computed_tokens += len(path)
            req.num_spec_steps += 1
            req.num_accepted_draft_tokens += len(path) - 1
            num_nodes += tree.num_nodes
            num_accepted += len(path) - 1
            gain_sq += len(path) ** 2
            new_tokens[req.request_id] = emitted
        self.kv.keep_accepted(moves)
        for _, req in tree_chunks:
            self.kv.trim(req.block_ids, req.num_computed_tokens)
        return num_nodes, num_accepted, gain_sq

    def _record(self, stats: StepStats) -> None:
        self.step_history.append(stats)
        t = self.totals
        t["tree_nodes"] += stats.num_tree_nodes
        t["accepted"] += stats.num_accepted
        t["tree_gain_sq"] += stats.tree_gain_sq
        t["spec_steps"] += 1 if stats.num_tree_nodes else 0
        t["tree_requests"] += stats.num_trees
        for k in ("draft_s", "select_s", "step_s", "verify_s", "accept_s"):
            t[k] += getattr(stats, k)
        self._step_ema_s = stats.step_s if self._step_ema_s is None else 0.8 * self._step_ema_s + 0.2 * stats.step_s
        if stats.num_decodes:
            self._step_overhead_ema_s = 0.9 * self._step_overhead_ema_s + 0.1 * max(stats.step_s - stats.verify_s, 0.0)

    def _postprocess(self, plan: StepPlan, new_tokens: dict[str, list[int]]) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for c in plan.chunks:
            req = c.request
            if req.finished or req.request_id not in new_tokens:
                continue
            self._append_tokens(req, new_tokens[req.request_id], now)
            outputs.append(self._output(req))
        return outputs

    def _append_tokens(self, req: Request, tokens: list[int], now: float) -> None:
        """Append tokens one by one, finishing at EOS, a stop token id or max_tokens; then check stop strings."""
        params = req.sampling
        reason = None
        for t in tokens:
            req.token_ids.append(t)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            if t in req.eos_token_ids or t in params.stop_token_ids:
                reason = "stop"
            elif req.num_output_tokens >= params.max_tokens or len(req.token_ids) >= self.max_model_len:
                reason = "length"
            if reason:
                break
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        for stop in params.stop:
            idx = text.find(stop, max(0, len(req.text) - len(stop)))
            if idx >= 0:
                text, reason = text[:idx], "stop"
        req.text = text
        if reason:
            self._finish(req, reason, now)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        self.scheduler.finish(req, reason)
        req.finish_time = now
        if self.speculator is not None:
            self.speculator.release(req.request_id)

    def _output(self, req: Request) -> RequestOutput:
        new_ids = req.output_token_ids[req.num_emitted_tokens:]
        text = req.text
        # Hold back a trailing partial UTF-8 character, and text that may be the start of a stop string.
        emit_to = len(text)
        if not req.finished:
            if text.endswith("\ufffd"):
                emit_to = len(text.rstrip("\ufffd"))
            for stop in req.sampling.stop:
                for k in range(min(len(stop) - 1, emit_to), 0, -1):
                    if text[:emit_to].endswith(stop[:k]):
                        emit_to -= k
                        break
        new_text = text[req.num_emitted_chars:emit_to] if emit_to > req.num_emitted_chars else ""
        req.num_emitted_chars = max(req.num_emitted_chars, emit_to)
        req.num_emitted_tokens = req.num_output_tokens
        out = RequestOutput(request_id=req.request_id, new_token_ids=new_ids, new_text=new_text,
                            finished=req.finished, finish_reason=req.finish_reason)
        if req.finished:
            out.token_ids, out.text, out.metrics = req.output_token_ids, req.text, req.metrics()
            self.requests.pop(req.request_id, None)
        return out

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
        """Step budget left after every running request's SLO need (the router's signal for tight requests).

        Need per request: its root token plus the draft nodes a chain with the measured per-token acceptance
        needs to reach A(r) this step (policies.budget.required_nodes).
        """
        running = self.scheduler.running
        now = time.perf_counter()
        decoding = [r for r in running if r.first_token_time is not None]
        expected = self.tokens_per_tree_step - 1.0
        need = np.zeros(0, dtype=np.int64)
        if decoding and self.speculator is not None:
            slo = SLOState(
                decode_time_s=np.array([r.decode_time_s(now) for r in decoding]),
                decoded_tokens=np.array([r.num_output_tokens - 1 for r in decoding]),
                tpot_slo_s=np.array([r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else np.inf for r in decoding]))
            a = required_acceptance(slo, self._step_ema_s or 0.05, self.config.max_draft_depth)
            need = required_nodes(a, expected / (1.0 + expected), self.config.max_tree_nodes)
        return spare_budget(self.token_budget - len(running), need)

    def stats(self) -> dict:
        out = self._stats()
        source_stats = getattr(self.speculator.drafter, "stats", None) if self.speculator else None
        if source_stats is not None:
            out["draft_sources"] = source_stats()  # accepted tokens and calibration per draft source
        return out

    def _stats(self) -> dict:
        return {
            "running_requests": self.scheduler.num_running,
            "waiting_requests": len(self.scheduler.waiting),
            "kv_free_blocks": self.kv.allocator.num_free,
            "kv_total_blocks": self.kv.allocator.num_blocks,
            "num_steps": self.num_steps,
            "token_budget": self.token_budget,
            "spare_token_budget": self.spare_token_budget(),
            "accepted_tokens_per_step": self.tokens_per_tree_step,
            "selection_time_fraction": self.totals["select_s"] / self.totals["step_s"] if self.totals["step_s"] else 0.0,
            "tree_nodes_verified": self.totals["tree_nodes"],
            "draft_tokens_accepted": self.totals["accepted"],
            "prefill_held_steps": self.totals["prefill_held_steps"],  # steps the TPOT SLOs kept prompts waiting
            # where the engine's time went, over all steps so far
            "step_time_split_s": {k: self.totals[k] for k in ("draft_s", "select_s", "verify_s", "accept_s", "step_s")},
        }
