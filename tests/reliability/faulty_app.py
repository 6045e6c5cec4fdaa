"""The real application with a replica whose engine fails on purpose when a prompt carries a marker: the faults a
reliability test injects into a running `serve run` (imported by the replica process through PYTHONPATH)."""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from app.config import AppSettings
from app.ingress import OpenAIIngress
from app.replica import LLMReplica

STEP_FAULT = "inject-step-fault"  # the next engine step raises (every request in it fails)
STATS_FAULT = "inject-stats-fault"  # the next stats snapshot raises (nothing may fail)
NAN_FAULT = "inject-nan-fault"  # this request's logits are NaN from its third token on (only it may fail)


@serve.deployment(name="LLMReplica")
class FaultyReplica(LLMReplica.func_or_class):
    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        engine = self.engine
        armed = {"step": False, "stats": False}
        nan_requests: set[str] = set()
        add_request, step, run, stats = engine.add_request, engine.step, engine._run, engine.stats

        def faulty_add_request(prompt, *args, **kwargs):
            request_id = add_request(prompt, *args, **kwargs)
            text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
            armed["step"] |= STEP_FAULT in text
            armed["stats"] |= STATS_FAULT in text
            if NAN_FAULT in text:
                nan_requests.add(request_id)
            return request_id

        def faulty_step():
            if armed["step"]:
                armed["step"] = False
                raise RuntimeError("injected step failure")
            return step()

        def faulty_stats():
            if armed["stats"]:
                armed["stats"] = False
                raise RuntimeError("injected stats failure")
            return stats()

        def faulty_run(plan, trees):
            out = run(plan, trees)
            for i, chunk in enumerate(plan.chunks):
                if chunk.request.request_id in nan_requests and chunk.request.num_output_tokens >= 2:
                    out.logits[out.logit_rows[i]] = float("nan")
            return out

        engine.add_request, engine.step, engine._run, engine.stats = (faulty_add_request, faulty_step, faulty_run,
                                                                      faulty_stats)

    def pid(self) -> int:
        return os.getpid()


def build_app(args: dict[str, Any]) -> serve.Application:
    settings = AppSettings.model_validate(args or {})
    return OpenAIIngress.bind(FaultyReplica.bind(settings.model_dump()), settings.model_dump())
