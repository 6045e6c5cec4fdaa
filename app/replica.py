"""Replica deployment: one LLMEngine, driven by one background thread, streaming tokens to the ingress.

Why a thread: ``engine.step()`` is blocking torch work (torch releases the GIL), so the replica's asyncio
loop stays free to accept requests, stream tokens and answer Serve's control calls while a step runs. The
thread is the only code that touches the engine; the asyncio side talks to it through a queue of add/abort
commands and receives outputs through per-request asyncio queues (``call_soon_threadsafe``).

Messages yielded to the ingress are plain dicts (the ingress must not import torch):
- ``{"type": "accepted", "prompt_tokens": n}`` once the engine has validated and queued the request;
- ``{"type": "delta", "text", "token_ids", "finished", "finish_reason", "metrics", "logprobs"}``, several tokens
  merged when they arrived together (one SSE chunk each: Ray's per-message cost is ~2 ms of CPU); ``logprobs`` is
  None or one OpenAI chat entry per token, ``{"token", "logprob", "bytes", "top_logprobs": [...]}``;
- ``{"type": "error", "status", "message", "param"}`` for bad input (400), admission full (429), engine
  failure (500, every running request) or a failure of this request alone (500, e.g. its logits went NaN);
  nothing follows an error.

Prompts are tokenized (chat template + encode) on the replica's own tokenizer thread, not the engine thread: the
engine thread receives token ids and spends its time on steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import ctypes
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import psutil
from ray import serve
from ray.serve.config import RequestRouterConfig

from app.autoscaling import PrefillRate, autoscaling_stats, engine_steady_load
from app.config import AppSettings
from app.engine.errors import SLOUnattainableError
from app.schemas import param_from_message
from policies.autoscaling import replica_load
from policies.routing import PREFIX_CHUNK_CHARS, PrefixSummary, prefix_chunk_hashes, routing_text

logger = logging.getLogger("ray.serve")

ROUTER_CLASS_PATH = "app.router.SLORequestRouter"
Sink = Callable[[dict[str, Any]], None]


def _load_malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``: returns the free pages of every malloc arena to the OS. None elsewhere (musl,
    macOS), where there is nothing to call."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_free_heap = _load_malloc_trim()


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           retry_after_s: float | None = None, reason: str | None = None) -> dict[str, Any]:
    """A replica's error message. ``reason``: for a 429 ``slo_unattainable``, which rule refused the request
    (``SLOUnattainableError.reason``, or "ttft_late" for a prompt refused later, in the queue); /metrics counts
    rejections by it."""
    return {"type": "error", "status": status, "message": message, "param": param, "code": code,
            "retry_after_s": retry_after_s, "reason": reason}


class EngineLoop:
    """Owns the engine: applies queued commands between steps, steps while work exists, publishes stats.

    It also owns the SLO baseline (``unloaded_tpot_s``): a start-up probe can run while other actors start or
    stop on the same cores, which inflates the baseline (by 2.4x once on this CPU), loosening every relative SLO
    class and rejecting valid tight targets. So after ``reprobe_idle_s`` without work it measures again with
    ``probe`` (at most ``max_reprobes`` times) and keeps the smallest value: idle probes only err upwards.
    """

    def __init__(self, engine: Any, idle_wait_s: float = 0.05, unloaded_tpot_s: float | None = None,
                 probe: Callable[[], float] | None = None, reprobe_idle_s: float = 2.0, max_reprobes: int = 3,
                 stall_timeout_s: float = 120.0, max_consecutive_step_errors: int = 3,
                 heap_trim_interval_s: float = 0.0, trim_heap: Callable[[], Any] | None = release_free_heap):
        self.engine = engine
        # Between steps, every heap_trim_interval_s (0: never), trim_heap hands the heap's free pages back to the OS:
        # torch frees activations of every shape to malloc, which keeps the pages, so RSS creeps up under traffic.
        self._heap_trim_interval_s = heap_trim_interval_s if trim_heap is not None else 0.0
        self._trim_heap = trim_heap
        self._last_heap_trim = time.monotonic()
        self.num_heap_trims = 0
        # Liveness (``health_problem``): a step running longer than stall_timeout_s, or that many failed steps in a
        # row, make Serve's health check fail and restart the replica rather than leave clients waiting on it.
        self.stall_timeout_s = stall_timeout_s
        self.max_consecutive_step_errors = max_consecutive_step_errors
        self.step_started_at: float | None = None  # monotonic; set while a step runs
        self.num_consecutive_step_errors = 0
        self.num_loop_errors = 0  # failures outside a step (commands, stats): logged, counted, the loop goes on
        self.unloaded_tpot_s = unloaded_tpot_s
        self._probe = probe
        self._reprobes_left = max_reprobes if probe is not None else 0
        self._reprobe_idle_s = reprobe_idle_s
        self._last_busy = time.monotonic()
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # loop thread only
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self.stats: dict[str, Any] = dict(engine.stats())  # replaced whole, read from other threads
        self.num_step_errors = 0
        self.num_slo_rejections = 0  # requests refused because their TTFT SLO was unattainable here
        self._tokens_per_step_ewma: float | None = None
        self._tpot_ewma_s: float | None = None
        # What the router matches prompts against (policies.routing): text-chunk hashes of the prompts served here,
        # bounded by about as many characters as the KV cache holds tokens x 4. Empty without prefix caching.
        config = getattr(engine, "config", None)
        self.prefix_caching = bool(getattr(config, "enable_prefix_caching", False))
        kv_chars = 4 * int(self.stats.get("kv_total_blocks", 0)) * int(getattr(config, "block_size", 16))
        self.prefix_summary = PrefixSummary(min(max(kv_chars // PREFIX_CHUNK_CHARS, 64), 2048))
        self.prefix_hashes: list[int] = []  # its copy for other threads, replaced whole (like stats)
        self._prefix_version = 0
        self._chats: dict[str, list] = {}  # running chat requests' messages: the reply extends their prefix
        # For the autoscaler (app.autoscaling): finished requests with an SLO per class, (attained, finished), since
        # start; replaced whole, read from other threads. _classes: each held request's class.
        self.slo_outcomes: dict[str, tuple[int, int]] = {}
        self._classes: dict[str, str] = {}
        self.prefill_rate = PrefillRate()
        if isinstance(getattr(engine, "step_observers", None), list):  # the real engine (test doubles have none)
            engine.step_observers.append(self.prefill_rate.observe)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, request_id: str, payload: dict[str, Any], sink: Sink) -> None:
        self._commands.put(("add", request_id, payload, sink))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None))

    # ---- loop thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._apply_commands(block=not self.engine.has_unfinished())
            except Exception:
                self.num_loop_errors += 1
                logger.exception("applying queued commands failed; the loop goes on")
            if self.engine.has_unfinished():
                errors_before = self.num_step_errors
                self.step_started_at = time.monotonic()
                try:
                    self._step()
                except Exception:  # outside any one request (e.g. failing the requests of a failed step)
                    self.num_step_errors += 1
                    logger.exception("engine step handling failed; the loop goes on")
                finally:
                    self.step_started_at = None
                self.num_consecutive_step_errors = (
                    self.num_consecutive_step_errors + 1 if self.num_step_errors > errors_before else 0)
                self._last_busy = time.monotonic()
            elif self._reprobes_left and time.monotonic() - self._last_busy >= self._reprobe_idle_s:
                self._reprobe()
            if self._heap_trim_interval_s and time.monotonic() - self._last_heap_trim >= self._heap_trim_interval_s:
                self._trim()
            try:
                self._publish_stats()
            except Exception:
                self.num_loop_errors += 1
                if self.num_loop_errors & (self.num_loop_errors - 1) == 0:  # 1st, 2nd, 4th, ...: a stuck fault
                    logger.exception("publishing replica stats failed (%d times); the loop goes on",  # cannot flood
                                     self.num_loop_errors)

    def health_problem(self, now: float | None = None) -> str | None:
        """Why this replica should be restarted, or None: its loop thread died, one step has run for longer than
        ``stall_timeout_s`` (a hung forward), or ``max_consecutive_step_errors`` steps failed in a row."""
        if not self.alive:
            return "the engine loop thread has stopped"
        started = self.step_started_at
        now = time.monotonic() if now is None else now
        if started is not None and now - started > self.stall_timeout_s:
            return f"an engine step has made no progress for {now - started:.0f} s"
        if self.num_consecutive_step_errors >= self.max_consecutive_step_errors:
            return f"{self.num_consecutive_step_errors} engine steps failed in a row"
        return None

    def _trim(self) -> None:
        self._last_heap_trim = time.monotonic()
        try:
            self._trim_heap()
            self.num_heap_trims += 1
        except Exception:
            self.num_loop_errors += 1
            logger.exception("returning free heap pages to the OS failed; the loop goes on")

    def _reprobe(self) -> None:
        self._reprobes_left -= 1
        try:
            value = float(self._probe())
        except Exception:
            logger.exception("unloaded TPOT re-probe failed; keeping %s", self.unloaded_tpot_s)
            return
        finally:
            self._last_busy = time.monotonic()  # the next probe waits for another idle period
        if self.unloaded_tpot_s is None or value < self.unloaded_tpot_s:
            logger.info("unloaded TPOT re-probed: %.1f ms (was %s)", value * 1e3,
                        f"{self.unloaded_tpot_s * 1e3:.1f} ms" if self.unloaded_tpot_s else "unknown")
            self.unloaded_tpot_s = value

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, request_id, payload, sink = cmd
            if kind == "add":
                self._add(request_id, payload, sink)
            else:
                self.engine.abort(request_id)
                self._sinks.pop(request_id, None)
                self._chats.pop(request_id, None)
                self._classes.pop(request_id, None)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, request_id: str, payload: dict[str, Any], sink: Sink) -> None:
        from app.engine.config import SamplingParams

        try:
            sampling = SamplingParams(**payload.get("sampling", {}))
            prompt = payload.get("prompt_token_ids")  # LLMReplica.generate tokenized it off this thread
            chat = False
            if prompt is None and payload.get("messages") is not None:
                prompt = prompt_token_ids(self.engine.tokenizer, payload)
            elif prompt is None:
                prompt, chat = payload.get("prompt"), bool(payload.get("chat"))
            room = self.engine.max_model_len - len(prompt) if isinstance(prompt, list) else None
            if "max_tokens" not in payload.get("sampling", {}) and room is not None and 0 < room < sampling.max_tokens:
                sampling = dataclasses.replace(sampling, max_tokens=room)  # no max_tokens: what the window leaves
            self.engine.add_request(prompt, sampling, request_id, chat=chat,
                                    tpot_slo_ms=payload.get("tpot_slo_ms"), ttft_slo_ms=payload.get("ttft_slo_ms"),
                                    ttft_slo_x_prefill=payload.get("ttft_slo_x_prefill"),
                                    ttft_allowance_ms=payload.get("ttft_allowance_ms") or 0.0,
                                    policy=payload.get("policy"), arrival_time=payload.get("arrival_time"))
        except SLOUnattainableError as exc:  # fail fast: the ingress tries another replica, else answers 429
            self.num_slo_rejections += 1
            sink(_error(429, str(exc), "ttft_slo_ms", "slo_unattainable", exc.retry_after_s, exc.reason))
            return
        except ValueError as exc:  # InvalidRequestError is a ValueError; so are SamplingParams' checks
            sink(_error(400, str(exc), param_from_message(str(exc))))
            return
        except Exception as exc:  # a template or tokenizer failure on odd input is still the client's input
            logger.exception("could not add request %s", request_id)
            sink(_error(400, f"could not process the prompt: {exc}"))
            return
        self._sinks[request_id] = sink
        self._classes[request_id] = str(payload.get("slo_class") or "none")
        if self.prefix_caching:
            self.prefix_summary.add(prefix_chunk_hashes(routing_text(payload)))
            if isinstance(payload.get("messages"), list):
                self._chats[request_id] = payload["messages"]
        sink({"type": "accepted", "prompt_tokens": self.engine.requests[request_id].num_prompt_tokens})

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; failing its requests")
            self.num_step_errors += 1
            for request_id, sink in list(self._sinks.items()):
                self.engine.abort(request_id)
                sink(_error(500, "the engine failed while serving this request"))
            self._sinks.clear()
            self._chats.clear()
            self._classes.clear()
            return
        emitted = 0
        for out in outputs:
            emitted += len(out.new_token_ids)
            sink = self._sinks.get(out.request_id)  # _deliver drops it at the finish, possibly before it fails
            try:
                self._deliver(out)
            except Exception:  # handling one request's output must not take the others (or the loop) down
                logger.exception("delivering the output of %s failed; failing that request", out.request_id)
                self.num_loop_errors += 1
                self.engine.abort(out.request_id)
                self._classes.pop(out.request_id, None)
                self._chats.pop(out.request_id, None)
                self._sinks.pop(out.request_id, None)
                if sink is not None:
                    sink(_error(500, "the server failed while delivering this request's output",
                                code="request_failed"))
        if outputs:
            self._tokens_per_step_ewma = _ewma(self._tokens_per_step_ewma, emitted / len(outputs), 0.1)

    def _deliver(self, out: Any) -> None:
        """One request's step output to its sink; at its finish, update the routing summary and SLO counts."""
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
            messages = self._chats.pop(out.request_id, None)
            if messages is not None and out.text:  # the next turn resends this conversation with the reply
                self.prefix_summary.add(prefix_chunk_hashes(routing_text(
                    {"messages": [*messages, {"role": "assistant", "content": out.text}]})))
            if out.metrics is not None and out.metrics.tpot_s is not None:
                self._tpot_ewma_s = _ewma(self._tpot_ewma_s, out.metrics.tpot_s, 0.2)
            slo_class = self._classes.pop(out.request_id, "none")
            if out.metrics is not None and out.metrics.slo_attained is not None:
                attained, finished = self.slo_outcomes.get(slo_class, (0, 0))
                self.slo_outcomes = {**self.slo_outcomes,
                                     slo_class: (attained + int(out.metrics.slo_attained), finished + 1)}
        if sink is None:
            return
        if out.finish_reason == "error":  # a fault of this request alone (its numerics, detokenization, ...)
            sink(_error(500, f"the engine failed on this request: {out.error}", code="request_failed"))
            return
        if out.finish_reason == "slo_unattainable":  # refused in the queue: its TTFT SLO can no longer be met
            self.num_slo_rejections += 1
            sink(_error(429, "this replica can no longer meet the request's TTFT SLO", "ttft_slo_ms",
                        "slo_unattainable", self.engine.scheduler.queue_drain_s(time.perf_counter()), "ttft_late"))
            return
        sink({"type": "delta", "text": out.new_text, "token_ids": list(out.new_token_ids),
              "finished": out.finished, "finish_reason": out.finish_reason,
              "metrics": dataclasses.asdict(out.metrics) if out.metrics is not None else None,
              # token ids and numbers here; LLMReplica.generate adds their texts off this thread
              "logprobs": None if out.logprobs is None else
              [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs]})

    def _publish_stats(self) -> None:
        if self.prefix_summary.version != self._prefix_version:
            self._prefix_version = self.prefix_summary.version
            self.prefix_hashes = self.prefix_summary.hashes()
        stats = dict(self.engine.stats())
        stats.setdefault("accepted_tokens_per_step", self._tokens_per_step_ewma)
        stats.setdefault("measured_tpot_s", self._tpot_ewma_s)
        if getattr(self.engine, "scheduler", None) is not None:  # the real engine (test doubles have none)
            stats["steady_load"] = engine_steady_load(self.engine, self.prefill_rate.tokens_per_s())
        self.stats = stats


def prompt_token_ids(tokenizer: Any, payload: dict[str, Any]) -> list[int]:
    """The payload's prompt as token ids: chat ``messages`` through the chat template, ``prompt`` text encoded (as
    one user message with ``chat``), ids as given (``app.engine.engine.encode_prompt``)."""
    from app.engine.engine import encode_prompt

    if payload.get("messages") is not None:
        return encode_prompt(tokenizer, list(payload["messages"]))
    return encode_prompt(tokenizer, payload.get("prompt"), chat=bool(payload.get("chat")))


def logprob_entries(token_texts: Callable[[int], tuple[str, list[int]]],
                    logprobs: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict[str, Any]]:
    """OpenAI chat logprob entries from the engine's (token id, logprob, top [(id, logprob)]) triples."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = token_texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in logprobs]


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


def measure_unloaded_tpot_s(engine: Any, num_tokens: int, num_probes: int = 3) -> float:
    """TPOT of one short greedy request on the idle engine: the baseline for relative SLO classes.

    A 2-token warm-up runs first so that one-off allocation costs do not inflate the figure, and the best
    of a few probes is kept: at replica start the other Serve actors are still starting on the same cores."""
    from app.engine.config import SamplingParams

    # Plain autoregressive decoding (policy "none"): the paper's baseline is the target's own unloaded TPOT.
    engine.generate(["Hello"], SamplingParams(max_tokens=2, ignore_eos=True), policy="none")
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    return min(float(engine.generate(["Hello"], params, policy="none")[0].metrics.tpot_s)
               for _ in range(num_probes))


@serve.deployment(
    name="LLMReplica",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=5,
    request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS_PATH,
                                              request_routing_stats_period_s=0.3),
)
class LLMReplica:
    """One engine per replica (one per GPU, or per CPU replica)."""

    def __init__(self, settings: dict[str, Any] | AppSettings):
        self.settings = settings if isinstance(settings, AppSettings) else AppSettings.model_validate(settings)
        if self.settings.replica_torch_threads:
            import torch

            torch.set_num_threads(self.settings.replica_torch_threads)
        from app.engine.engine import LLMEngine
        from app.engine.output import TokenTexts

        self.engine = LLMEngine(self.settings.engine_config())
        logger.info("%s", self.engine.memory_plan.describe())
        # Prompts are tokenized here, on one thread with its own tokenizer (a Rust tokenizer is not meant to be
        # shared across threads), so that the engine thread receives token ids only.
        self._tokenizer = copy.deepcopy(self.engine.tokenizer)
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._token_texts = TokenTexts(self._tokenizer)
        probe_tokens = self.settings.unloaded_tpot_probe_tokens
        unloaded_tpot_s = measure_unloaded_tpot_s(self.engine, probe_tokens)
        self.capacity = self.engine.config.max_num_seqs + self.settings.max_waiting
        self._process = psutil.Process()  # this replica's process, for its RSS in the routing stats
        self._active: set[str] = set()  # requests this replica holds: queued commands, waiting, running
        self.loop = EngineLoop(self.engine, unloaded_tpot_s=unloaded_tpot_s,
                               probe=lambda: measure_unloaded_tpot_s(self.engine, probe_tokens, num_probes=1),
                               max_reprobes=self.settings.unloaded_tpot_reprobes,
                               stall_timeout_s=self.settings.replica_stall_timeout_s,
                               max_consecutive_step_errors=self.settings.max_consecutive_step_errors,
                               heap_trim_interval_s=self.settings.heap_trim_interval_s)
        self.loop.start()
        logger.info("replica ready: unloaded TPOT %.1f ms, capacity %d", unloaded_tpot_s * 1e3, self.capacity)

    async def generate(self, request: dict[str, Any], tpot_slo_ms: float | None = None,
                       avoid_replicas: tuple[str, ...] = ()) -> AsyncIterator[dict]:
        """Stream one request's messages. ``tpot_slo_ms`` and ``avoid_replicas`` (replicas that already refused it)
        are read by the router (the SLO itself travels in ``request``); cancellation (client gone) aborts the
        request so its KV blocks are freed at once. A refusal for an unattainable TTFT names this replica."""
        if len(self._active) >= self.capacity:
            yield _error(429, f"the replica is full ({self.capacity} requests queued or running); retry later")
            return
        # TTFT counts from here, not from when the loop thread gets to the command (after the current step).
        arrival_time = time.perf_counter()
        event_loop = asyncio.get_running_loop()
        try:
            token_ids = await event_loop.run_in_executor(self._tokenize_pool, prompt_token_ids, self._tokenizer,
                                                         request)
        except ValueError as exc:  # an empty prompt
            yield _error(400, str(exc), param_from_message(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a template or tokenizer failure on odd input is the client's input
            logger.warning("could not tokenize a prompt: %r", exc)
            yield _error(400, f"could not process the prompt: {exc}")
            return
        request = {**request, "prompt_token_ids": token_ids, "arrival_time": arrival_time}
        request_id = f"{request.get('request_id') or 'req'}-{uuid.uuid4().hex[:8]}"
        self._active.add(request_id)
        messages: asyncio.Queue[dict] = asyncio.Queue()
        self.loop.add(request_id, request, lambda m: event_loop.call_soon_threadsafe(messages.put_nowait, m))
        done = False
        try:
            while not done:
                batch = [await messages.get()]
                while not messages.empty():
                    batch.append(messages.get_nowait())
                for msg in merge_deltas(batch):
                    done = msg["type"] == "error" or bool(msg.get("finished"))
                    if msg["type"] == "error" and msg.get("code") == "slo_unattainable":
                        msg = {**msg, "replica_id": serve.get_replica_context().replica_id.unique_id}
                    if msg.get("logprobs") is not None:
                        msg = {**msg, "logprobs": logprob_entries(self._token_texts, msg["logprobs"])}
                    yield msg
        except asyncio.CancelledError:
            self.loop.abort(request_id)
            done = True
            raise
        finally:
            self._active.discard(request_id)
            if not done:  # the consumer closed the stream early (GeneratorExit)
                self.loop.abort(request_id)

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every ``request_routing_stats_period_s``; the router reads it as ``routing_stats``."""
        return self.state()

    def state(self) -> dict[str, Any]:
        s = self.loop.stats
        running = int(s.get("running_requests", 0))
        spare = s.get("spare_token_budget")
        prefix = s.get("prefix_cache") or {}
        token_budget = int(s.get("token_budget") or self.engine.config.max_num_batched_tokens)
        if spare is None:  # until the engine reports SLO-aware spare budget: step budget left after one token each
            spare = token_budget - running
        return {
            "spare_token_budget": int(spare),
            "token_budget": token_budget,
            "load": replica_load(spare, token_budget, running, self.engine.config.max_num_seqs,
                                 waiting_requests=max(0, len(self._active) - running),
                                 steady_load=float(s.get("steady_load", 0.0))),
            "slo_outcomes": self.loop.slo_outcomes,  # class -> (attained, finished) since start
            "running_requests": running,
            "queue_len": max(0, len(self._active) - running),
            "waiting_requests": int(s.get("waiting_requests", 0)),
            "kv_free_blocks": int(s.get("kv_free_blocks", 0)),
            "kv_total_blocks": int(s.get("kv_total_blocks", 0)),
            "measured_tpot_s": s.get("measured_tpot_s"),
            "unloaded_tpot_s": self.loop.unloaded_tpot_s,
            "accepted_tokens_per_step": s.get("accepted_tokens_per_step"),
            "num_steps": int(s.get("num_steps", 0)),
            "prefill_held_steps": int(s.get("prefill_held_steps", 0)),
            "prefill_queue_s": float(s.get("prefill_queue_s", 0.0)),
            "latency_scale": float(s.get("latency_scale", 1.0)),
            "prefill_capacity_tok_s": s.get("prefill_capacity_tok_s"),
            "shed_cutoff_tokens": s.get("shed_cutoff_tokens"),  # None: every prompt length is admitted
            "slo_rejections": self.loop.num_slo_rejections,
            "prefix_cache_hit_rate": float(prefix.get("hit_rate", 0.0)),  # of admitted prompt tokens, so far
            "prefix_cache_hit_tokens": int(prefix.get("hit_tokens", 0)),
            "prefix_cache_blocks": int(prefix.get("cached_blocks", 0)),
            "prefix_cache_evictions": int(prefix.get("evictions", 0)),
            "prefix_hashes": self.loop.prefix_hashes,  # what the router matches prompts against
            "accepted_per_step_by_source": dict((s.get("draft_sources") or {}).get("accepted_per_step_by_source") or {}),
            "calibration_ece_by_source": {
                name: table.get("ece") for name, table in
                ((s.get("draft_sources") or {}).get("calibration") or {}).items() if isinstance(table, dict)},
            "healthy": self.loop.health_problem() is None,
            "step_errors": self.loop.num_step_errors,
            "loop_errors": self.loop.num_loop_errors,
            "rss_bytes": self._process.memory_info().rss,  # the soak benchmark watches it for leaks
            "recorded_at": time.time(),
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Polled by Serve's autoscaler when the deployment has an ``autoscaling_config`` (app.autoscaling)."""
        return autoscaling_stats(self.state())

    def get_unloaded_tpot_s(self) -> float:
        return self.loop.unloaded_tpot_s

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes it replace the replica."""
        problem = self.loop.health_problem()
        if problem is not None:
            logger.error("replica unhealthy: %s", problem)
            raise RuntimeError(problem)

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()


def merge_deltas(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive token deltas into one message (fewer Ray messages, fewer SSE chunks)."""
    merged: list[dict[str, Any]] = []
    for msg in batch:
        prev = merged[-1] if merged else None
        if msg["type"] == "delta" and prev is not None and prev["type"] == "delta" and not prev["finished"]:
            merged[-1] = {**msg, "text": prev["text"] + msg["text"], "token_ids": prev["token_ids"] + msg["token_ids"]}
            if msg.get("logprobs") is not None:
                merged[-1]["logprobs"] = prev["logprobs"] + msg["logprobs"]
        else:
            merged.append(msg)
    return merged
