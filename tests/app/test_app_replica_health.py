"""The replica's own health verdict (what Serve's check_health acts on): a hung step, a streak of failed steps, or a
failure outside a step, with a fake engine whose step can hang or raise on demand."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from app.replica import EngineLoop


class ControlledEngine:
    """One request at a time; ``step`` blocks while ``hold`` is clear and raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.requests: dict[str, SimpleNamespace] = {}
        self.tokenizer = None
        self.max_model_len = 1024
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False
        self.stats_fail = False

    def add_request(self, prompt, sampling, request_id, **_):
        self.requests[request_id] = SimpleNamespace(num_prompt_tokens=len(prompt))

    def abort(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self):
        self.hold.wait()
        if self.fail:
            raise RuntimeError("injected step failure")
        outs = [SimpleNamespace(request_id=rid, new_token_ids=[1], new_text="x", finished=True, finish_reason="length",
                                metrics=None, error=None, logprobs=None) for rid in self.requests]
        self.requests.clear()
        return outs

    def stats(self) -> dict:
        if self.stats_fail:
            raise RuntimeError("injected stats failure")
        return {"running_requests": len(self.requests), "kv_free_blocks": 1, "kv_total_blocks": 1}


def _wait(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_step_that_hangs_past_the_stall_timeout_is_unhealthy_and_recovers_when_it_returns() -> None:
    engine = ControlledEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01, stall_timeout_s=0.2)
    loop.start()
    try:
        assert loop.health_problem() is None
        engine.hold.clear()
        done = threading.Event()
        loop.add("a", {"prompt": "hi", "sampling": {}}, lambda m: m.get("finished") and done.set())
        assert _wait(lambda: loop.step_started_at is not None)
        assert loop.health_problem() is None  # a step in progress is fine ...
        assert _wait(lambda: loop.health_problem() is not None)  # ... until it outlasts the stall timeout
        assert "no progress" in loop.health_problem()
        engine.hold.set()
        assert done.wait(5) and loop.health_problem() is None
    finally:
        engine.hold.set()
        loop.stop()


def test_consecutive_failed_steps_make_the_replica_unhealthy_and_one_success_resets_the_streak() -> None:
    engine = ControlledEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01, max_consecutive_step_errors=2)
    loop.start()
    try:
        engine.fail = True
        for i in range(2):
            failed = threading.Event()
            loop.add(f"r{i}", {"prompt": "hi", "sampling": {}}, lambda m, e=failed: m["type"] == "error" and e.set())
            assert failed.wait(5)
        assert _wait(lambda: loop.health_problem() is not None)
        assert "2 engine steps failed in a row" in loop.health_problem()
        engine.fail = False
        ok = threading.Event()
        loop.add("good", {"prompt": "hi", "sampling": {}}, lambda m: m.get("finished") and ok.set())
        assert ok.wait(5) and _wait(lambda: loop.health_problem() is None)
        assert loop.num_step_errors == 2
    finally:
        loop.stop()


def test_a_failure_outside_a_step_is_counted_and_the_loop_goes_on() -> None:
    engine = ControlledEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01)
    loop.start()
    try:
        engine.stats_fail = True
        assert _wait(lambda: loop.num_loop_errors > 0)
        engine.stats_fail = False
        done = threading.Event()
        loop.add("a", {"prompt": "hi", "sampling": {}}, lambda m: m.get("finished") and done.set())
        assert done.wait(5) and loop.alive and loop.health_problem() is None
    finally:
        loop.stop()


def test_an_output_that_cannot_be_delivered_fails_its_request_alone() -> None:
    engine = ControlledEngine()
    step = engine.step

    def step_with_a_broken_output():
        outs = step()
        for out in outs:
            if out.request_id == "broken":
                out.metrics = object()  # not a RequestMetrics: delivering it raises
        return outs

    engine.step = step_with_a_broken_output
    loop = EngineLoop(engine, idle_wait_s=0.01)
    loop.start()
    try:
        inboxes = {rid: [] for rid in ("ok-1", "broken", "ok-2")}
        done = {rid: threading.Event() for rid in inboxes}
        for rid in inboxes:
            loop.add(rid, {"prompt": "hi", "sampling": {}},
                     lambda m, r=rid: (inboxes[r].append(m), (m["type"] == "error" or m.get("finished"))
                                       and done[r].set()))
        assert all(e.wait(5) for e in done.values()), inboxes
        assert inboxes["broken"][-1]["type"] == "error" and inboxes["broken"][-1]["status"] == 500
        assert all(inboxes[r][-1]["type"] == "delta" and inboxes[r][-1]["finished"] for r in ("ok-1", "ok-2"))
        assert loop.alive and loop.num_loop_errors == 1
    finally:
        engine.hold.set()
        loop.stop()
