"""OpenAI schemas: what is accepted, what is refused, and how the SLO extension serialises."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.engine.config import SamplingParams
from app.replica import merge_deltas
from app.schemas import (ChatCompletionRequest, CompletionRequest, CompletionChoice, CompletionResponse, SLOReport,
                         Usage, dump)


def test_chat_request_maps_to_sampling_params() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0.5, "top_p": 0.9, "seed": 3,
        "stop": "END", "tpot_slo_ms": 40, "slo_class": "chat", "store": True, "presence_penalty": 0})
    assert req.chat_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    params = SamplingParams(**req.sampling_kwargs())
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (7, 0.5, 0.9, 3, ("END",))
    assert (req.tpot_slo_ms, req.slo_class) == (40, "chat")
    assert req.unsupported_field() is None  # store is bookkeeping; a zero penalty asks for nothing


def test_completion_prompt_forms() -> None:
    assert CompletionRequest(model="m", prompt=["one"]).prompt == "one"
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompt == [1, 2, 3]
    for bad in ("", ["a", "b"], []):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt=bad)


@pytest.mark.parametrize("field, value", [("n", 2), ("temperature", -0.1), ("top_p", 0.0), ("max_tokens", 0),
                                          ("tpot_slo_ms", 0), ("ttft_slo_ms", -3), ("stop", [""]),
                                          ("temperature", float("nan")), ("tpot_slo_ms", float("inf")),
                                          ("max_tokens", 2**70), ("seed", 2**64), ("model", "m" * 1000)])
def test_bad_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("field, value, message", [
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tools is not supported"),
    ("response_format", {"type": "json_object"}, "response_format is not supported"),
    ("logit_bias", {"50256": -100}, "logit_bias is not supported"),
    ("frequency_penalty", 0.5, "frequency_penalty is not supported"),
    ("min_p", 0.1, "Unrecognized request argument supplied: min_p"),
])
def test_fields_the_server_does_not_implement_are_named_not_ignored(field: str, value: object, message: str) -> None:
    for cls, extra in ((CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest,
                                                              {"messages": [{"role": "user", "content": "x"}]})):
        req = cls.model_validate({"model": "m", **extra, field: value})
        name, text = req.unsupported_field()
        assert name == field and text.startswith(message)
    noop = CompletionRequest.model_validate({"model": "m", "prompt": "x", "tools": [], "response_format": {"type": "text"},
                                             "logit_bias": {}, field: None})
    assert noop.unsupported_field() is None


def test_non_text_content_is_refused() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(ValueError, match="image_url"):
        req.chat_messages()


def test_slo_extension_serialises_as_class() -> None:
    resp = CompletionResponse(id="x", model="m", choices=[CompletionChoice(text="t", finish_reason="stop")],
                              usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
                              slo=SLOReport(slo_class="coding", tpot_slo_ms=36, ttft_ms=10, tpot_ms=30, attained=True))
    body = dump(resp)
    assert body["slo"]["class"] == "coding" and body["slo"]["attained"] is True
    assert body["object"] == "text_completion"


def test_deltas_that_arrive_together_become_one_message() -> None:
    d = lambda text, ids, fin=False: {"type": "delta", "text": text, "token_ids": ids, "finished": fin,  # noqa: E731
                                      "finish_reason": "stop" if fin else None, "metrics": None}
    merged = merge_deltas([{"type": "accepted", "prompt_tokens": 3}, d("a", [1]), d("b", [2]), d("c", [3], True)])
    assert [m["type"] for m in merged] == ["accepted", "delta"]
    assert merged[1]["text"] == "abc" and merged[1]["token_ids"] == [1, 2, 3] and merged[1]["finished"]


def test_slo_report_says_which_target_was_missed():
    from app.config import ResolvedSLO
    from app.ingress import _Relay

    relay = _Relay.__new__(_Relay)  # only the SLO it ran under matters here
    relay.slo = ResolvedSLO(tpot_slo_ms=50.0, ttft_slo_ms=None, slo_class="chat", ttft_slo_x_prefill=10.0)
    base = {"ttft_s": 0.2, "tpot_s": 0.04, "ttft_slo_ms": 900.0}
    cases = [((True, True, True), []), ((False, False, True), ["ttft"]), ((False, True, False), ["tpot"]),
             ((False, False, False), ["ttft", "tpot"])]
    for (attained, ttft_ok, tpot_ok), missed in cases:
        report = relay.slo_report({**base, "slo_attained": attained, "ttft_attained": ttft_ok,
                                   "tpot_attained": tpot_ok})
        assert (report.attained, report.missed) == (attained, missed)
        assert report.ttft_slo_ms == 900.0  # the replica resolved the relative TTFT for this prompt
    assert relay.slo_report(None).missed is None  # no SLO: nothing to miss
