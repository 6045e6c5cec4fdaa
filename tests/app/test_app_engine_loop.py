"""The replica's engine thread with a fake engine: commands in, messages out, aborts free the request."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from app.engine.errors import SLOUnattainableError
from app.replica import EngineLoop


class FakeEngine:
    """Each step gives every running request one token; a request finishes after ``max_tokens``."""

    def __init__(self) -> None:
        self.requests: dict[str, SimpleNamespace] = {}
        self.aborted: list[str] = []
        self.tokenizer = None
        self.max_model_len = 1024

    def add_request(self, prompt, sampling, request_id, **_):
        if not prompt:
            raise ValueError("prompt is empty")
        if prompt == "too late":
            raise SLOUnattainableError("this replica cannot meet ttft_slo_ms 5 now", retry_after_s=2.5,
                                       reason="tpot_pace")
        self.requests[request_id] = SimpleNamespace(num_prompt_tokens=len(prompt), n=0, max=sampling.max_tokens)

    def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.requests.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self):
        time.sleep(0.01)
        outs = []
        for rid, r in list(self.requests.items()):
            r.n += 1
            done = r.n >= r.max
            outs.append(SimpleNamespace(request_id=rid, new_token_ids=[r.n], new_text=f"t{r.n}", finished=done,
                                        finish_reason="length" if done else None, metrics=None, error=None,
                                        logprobs=None))
            if done:
                del self.requests[rid]
        return outs

    def stats(self) -> dict:
        return {"running_requests": len(self.requests), "waiting_requests": 0, "kv_free_blocks": 10,
                "kv_total_blocks": 10, "num_steps": 0}


class Inbox:
    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.done = threading.Event()

    def __call__(self, msg: dict) -> None:
        self.messages.append(msg)
        if msg["type"] == "error" or msg.get("finished"):
            self.done.set()


def test_requests_stream_and_errors_come_back_as_messages() -> None:
    engine = FakeEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01)
    loop.start()
    try:
        good, bad = Inbox(), Inbox()
        loop.add("a", {"prompt": "hi", "sampling": {"max_tokens": 3}}, good)
        loop.add("b", {"prompt": "", "sampling": {}}, bad)
        assert good.done.wait(5) and bad.done.wait(5)
        assert good.messages[0] == {"type": "accepted", "prompt_tokens": 2}
        assert "".join(m["text"] for m in good.messages[1:]) == "t1t2t3"
        assert bad.messages == [{"type": "error", "status": 400, "message": "prompt is empty", "param": "prompt",
                                 "code": None, "retry_after_s": None, "reason": None}]
        bad_params = Inbox()
        loop.add("c", {"prompt": "hi", "sampling": {"temperature": -1}}, bad_params)
        assert bad_params.done.wait(5) and bad_params.messages[0]["param"] == "temperature"
        deadline = time.monotonic() + 5
        while loop.stats.get("accepted_tokens_per_step") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.stats["accepted_tokens_per_step"] == 1.0
    finally:
        loop.stop()


def test_abort_stops_delivery_and_frees_the_request() -> None:
    engine = FakeEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01)
    loop.start()
    try:
        inbox = Inbox()
        loop.add("long", {"prompt": "hi", "sampling": {"max_tokens": 10_000}}, inbox)
        deadline = time.monotonic() + 5
        while len(inbox.messages) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.abort("long")
        while engine.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.requests and engine.aborted == ["long"]
        n = len(inbox.messages)
        time.sleep(0.1)
        assert len(inbox.messages) == n and not inbox.done.is_set()
    finally:
        loop.stop()


def test_idle_reprobes_keep_the_smallest_baseline_and_stop() -> None:
    engine = FakeEngine()
    values = iter([0.20, 0.05, 0.08, 0.01])  # a noisy start-up measured 0.13; the 4th probe must not run
    probes: list[float] = []

    def probe() -> float:
        probes.append(next(values))
        return probes[-1]

    loop = EngineLoop(engine, idle_wait_s=0.01, unloaded_tpot_s=0.13, probe=probe, reprobe_idle_s=0.05,
                      max_reprobes=3)
    loop.start()
    try:
        deadline = time.monotonic() + 5
        while len(probes) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # several idle periods more: no further probe
        assert probes == [0.20, 0.05, 0.08]
        assert loop.unloaded_tpot_s == 0.05
        # requests are still served after the probes
        inbox = Inbox()
        loop.add("a", {"prompt": "hi", "sampling": {"max_tokens": 2}}, inbox)
        assert inbox.done.wait(5)
    finally:
        loop.stop()


def test_no_reprobe_while_busy() -> None:
    engine = FakeEngine()
    probes: list[float] = []
    loop = EngineLoop(engine, idle_wait_s=0.01, unloaded_tpot_s=0.1, probe=lambda: probes.append(0.05) or 0.05,
                      reprobe_idle_s=0.2)
    loop.start()
    try:
        inbox = Inbox()
        loop.add("a", {"prompt": "hi", "sampling": {"max_tokens": 15}}, inbox)  # ~0.15 s of steps
        assert inbox.done.wait(5)
        assert probes == []  # busy, then not yet idle for 0.2 s
        deadline = time.monotonic() + 5
        while loop.unloaded_tpot_s != 0.05 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert probes == [0.05] and loop.unloaded_tpot_s == 0.05
    finally:
        loop.stop()


def test_an_unattainable_ttft_is_refused_with_429_and_the_next_request_is_served() -> None:
    engine = FakeEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01)
    loop.start()
    try:
        refused, served = Inbox(), Inbox()
        loop.add("late", {"prompt": "too late", "sampling": {"max_tokens": 2}, "ttft_slo_ms": 5.0}, refused)
        loop.add("ok", {"prompt": "hi", "sampling": {"max_tokens": 2}}, served)
        assert refused.done.wait(5) and served.done.wait(5)
        assert refused.messages == [{"type": "error", "status": 429, "message": "this replica cannot meet ttft_slo_ms 5 now",
                                     "param": "ttft_slo_ms", "code": "slo_unattainable", "retry_after_s": 2.5,
                                     "reason": "tpot_pace"}]
        assert served.messages[0]["type"] == "accepted" and served.messages[-1]["finished"]
        assert loop.num_slo_rejections == 1
    finally:
        loop.stop()


class CachingEngine(FakeEngine):
    """A fake engine with prefix caching on, a chat template and a long final text."""

    config = SimpleNamespace(enable_prefix_caching=True, block_size=16)

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = SimpleNamespace(apply_chat_template=lambda messages, **_: [1] * len(messages))

    def step(self):
        outs = super().step()
        for o in outs:
            o.text = "Arr, matey. " * 40 if o.finished else None
        return outs


def test_the_prefix_summary_holds_served_prompts_and_finished_chats_with_their_reply() -> None:
    from policies.routing import prefix_chunk_hashes, prefix_match, routing_text

    loop = EngineLoop(CachingEngine(), idle_wait_s=0.01)
    assert loop.prefix_caching and loop.prefix_summary.capacity == 64  # 10 blocks: the floor
    loop.start()
    try:
        messages = [{"role": "system", "content": "Answer like a pirate. " * 30}, {"role": "user", "content": "Hi"}]
        inbox = Inbox()
        loop.add("chat", {"messages": messages, "sampling": {"max_tokens": 2}}, inbox)
        assert inbox.done.wait(5)
        deadline = time.monotonic() + 5
        follow_up = messages + [{"role": "assistant", "content": "Arr, matey. " * 40}, {"role": "user", "content": "?"}]
        want = prefix_chunk_hashes(routing_text({"messages": follow_up}))
        while prefix_match(want, frozenset(loop.prefix_hashes)) < len(want) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefix_match(want, frozenset(loop.prefix_hashes)) >= len(want) - 1 > 2  # all but the new turn
        assert not loop._chats
    finally:
        loop.stop()
    assert not EngineLoop(FakeEngine()).prefix_caching  # an engine without prefix caching reports no prefixes


class OneFailingEngine(FakeEngine):
    """Request "bad" fails on its second step (as the engine reports a fault of one request: finish reason
    "error"); the others run on."""

    def step(self):
        outs = super().step()
        for o in outs:
            if o.request_id == "bad" and o.new_token_ids == [2]:
                o.finished, o.finish_reason, o.error, o.new_text = True, "error", "logits not finite", ""
                self.requests.pop("bad", None)
        return outs


def test_a_request_failure_fails_only_that_request() -> None:
    loop = EngineLoop(OneFailingEngine(), idle_wait_s=0.01)
    loop.start()
    try:
        good, bad = Inbox(), Inbox()
        loop.add("good", {"prompt_token_ids": [5, 6, 7], "sampling": {"max_tokens": 4}}, good)
        loop.add("bad", {"prompt_token_ids": [5, 6], "sampling": {"max_tokens": 4}}, bad)
        assert good.done.wait(5) and bad.done.wait(5)
        assert good.messages[0] == {"type": "accepted", "prompt_tokens": 3}  # the ids were used as given
        assert "".join(m["text"] for m in good.messages[1:]) == "t1t2t3t4"
        assert bad.messages[-1]["type"] == "error" and bad.messages[-1]["status"] == 500
        assert "logits not finite" in bad.messages[-1]["message"]
        assert loop.num_step_errors == 0
    finally:
        loop.stop()


def test_deltas_merge_their_logprobs_and_entries_take_openai_shape() -> None:
    from app.replica import logprob_entries, merge_deltas

    def delta(text, ids, lps):
        return {"type": "delta", "text": text, "token_ids": ids, "finished": False, "finish_reason": None,
                "metrics": None, "logprobs": lps}

    merged = merge_deltas([delta("a", [1], [(1, -0.5, [(1, -0.5)])]), delta("b", [2], [(2, -1.0, [(3, -0.1)])])])
    assert len(merged) == 1 and merged[0]["logprobs"] == [(1, -0.5, [(1, -0.5)]), (2, -1.0, [(3, -0.1)])]
    texts = {1: ("a", [97]), 2: ("b", [98]), 3: ("c", [99])}
    assert logprob_entries(texts.__getitem__, merged[0]["logprobs"])[1] == {
        "token": "b", "logprob": -1.0, "bytes": [98], "top_logprobs": [{"token": "c", "logprob": -0.1, "bytes": [99]}]}


def test_prompts_are_tokenized_with_the_chat_template_or_as_text() -> None:
    from app.engine.weights import load_tokenizer, resolve_model_dir
    from app.replica import prompt_token_ids

    tok = load_tokenizer(resolve_model_dir("embedded"))
    messages = [{"role": "user", "content": "Hi"}]
    assert prompt_token_ids(tok, {"messages": messages}) == list(tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert prompt_token_ids(tok, {"prompt": "Hi there"}) == tok.encode("Hi there", add_special_tokens=False)
    assert prompt_token_ids(tok, {"prompt": [4, 5]}) == [4, 5]
    assert prompt_token_ids(tok, {"prompt": "Hi", "chat": True}) == prompt_token_ids(tok, {"messages": messages})


def test_free_heap_goes_back_to_the_os_every_interval_while_busy_and_idle() -> None:
    """A loop serving a long request and then idling trims at its interval, between steps; a failing trim is
    counted as a loop error and the stream goes on."""
    engine, trims = FakeEngine(), []

    def trim() -> None:
        trims.append(time.monotonic())
        if len(trims) == 2:
            raise OSError("trim failed")

    loop = EngineLoop(engine, idle_wait_s=0.01, heap_trim_interval_s=0.1, trim_heap=trim)
    loop.start()
    try:
        inbox = Inbox()
        loop.add("long", {"prompt": "hi", "sampling": {"max_tokens": 40}}, inbox)  # ~0.4 s of 10 ms steps
        assert inbox.done.wait(5) and inbox.messages[-1]["finished"]
        busy = len(trims)
        time.sleep(0.35)
    finally:
        loop.stop()
    assert busy >= 2 and len(trims) >= busy + 2
    assert all(b - a >= 0.1 for a, b in zip(trims, trims[1:]))
    assert loop.num_heap_trims == len(trims) - 1 and loop.num_loop_errors == 1


def test_no_trimming_when_the_interval_is_zero_and_glibc_trim_is_callable() -> None:
    from app.replica import release_free_heap

    trims = []
    loop = EngineLoop(FakeEngine(), idle_wait_s=0.01, heap_trim_interval_s=0.0, trim_heap=lambda: trims.append(1))
    loop.start()
    time.sleep(0.1)
    loop.stop()
    assert trims == []
    assert release_free_heap is not None  # Linux with glibc, as on every machine this project runs on
    release_free_heap()
