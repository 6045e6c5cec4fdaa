"""The engine: add_request / step / abort. One step = schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path

import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel
from app.engine.request import Request, RequestOutput, RequestStatus
from app.engine.runner import ModelRunner, SeqInput
from app.engine.sampling import sample_rows
from app.engine.scheduler import Scheduler, StepPlan
from app.engine.weights import load_checkpoint, load_tokenizer


class InvalidRequestError(ValueError):
    """The client's request cannot be served as given (empty prompt, too long, bad parameters)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


class LLMEngine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        ckpt = load_checkpoint(config.model, cache_dir)
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
        self.scheduler.finish(req, "abort")
        req.finish_time = time.perf_counter()
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            return []
        new_tokens = self._execute(plan)
        self.num_steps += 1
        return self._postprocess(plan, new_tokens)

    def _execute(self, plan: StepPlan) -> dict[str, list[int]]:
        """Run the target over the plan; return the tokens each request gains this step."""
        chunks = plan.chunks
        seqs = [SeqInput(block_ids=c.request.block_ids, context_len=c.request.num_computed_tokens,
                         token_ids=c.request.token_ids[c.request.num_computed_tokens:
                                                       c.request.num_computed_tokens + c.num_tokens],
                         logits="last" if c.completes else "none") for c in chunks]
        out = self.runner.run(seqs)
        sampling = [c for c in chunks if c.completes]
        rows = [out.logit_rows[i][0] for i, c in enumerate(chunks) if c.completes]
        tokens = sample_rows(out.logits[rows], [c.request.sampling for c in sampling],
                             [c.request.generator for c in sampling]) if rows else []
        for c in chunks:
            c.request.num_computed_tokens += c.num_tokens
        return {c.request.request_id: [t] for c, t in zip(sampling, tokens)}

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
            self.scheduler.finish(req, reason)
            req.finish_time = now

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

    def stats(self) -> dict:
        return {
            "running_requests": self.scheduler.num_running,
            "waiting_requests": len(self.scheduler.waiting),
            "kv_free_blocks": self.kv.allocator.num_free,
            "kv_total_blocks": self.kv.allocator.num_blocks,
            "num_steps": self.num_steps,
        }
