"""The ingress turns the replica's logprob entries into OpenAI's shapes: chat ``logprobs.content`` and the legacy
completions ``{tokens, token_logprobs, top_logprobs, text_offset}``, in whole responses and in stream chunks."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

from app.config import ResolvedSLO
from app.ingress import _Relay
from app.schemas import ChatCompletionRequest, CompletionRequest


def _entry(token: str, raw: bytes, logprob: float, top: list[tuple[str, float]]) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(raw),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}


# "a", then 🙂 split over two tokens: the offsets count characters of the text, not tokens' strings
ENTRIES = [_entry("a", b"a", -0.1, [("a", -0.1)]), _entry("bytes:\\xf0\\x9f", b"\xf0\x9f", -0.2, [("x", -0.05)]),
           _entry("bytes:\\x99\\x82", b"\x99\x82", -0.3, [("y", -0.01)]), _entry(" b", b" b", -0.4, [(" b", -0.4)])]
MESSAGES = [{"type": "delta", "text": "a", "token_ids": [1], "finished": False, "finish_reason": None,
             "metrics": None, "logprobs": ENTRIES[:2]},
            {"type": "delta", "text": "🙂 b", "token_ids": [2, 3, 4], "finished": True, "finish_reason": "length",
             "metrics": None, "logprobs": ENTRIES[2:]}]


class _Gen:
    def __init__(self):
        self._it = iter(MESSAGES)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        pass


def _relay(endpoint: str, body) -> _Relay:
    ingress = SimpleNamespace(settings=SimpleNamespace(served_model_name="m"), metrics=MagicMock(), _fail=None)
    slo = ResolvedSLO(slo_class="none", tpot_slo_ms=None, ttft_slo_ms=None)
    return _Relay(ingress, endpoint, body, slo, "id-1", _Gen(), prompt_tokens=3)


CHAT = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=1)
COMPLETION = CompletionRequest(model="m", prompt="x", logprobs=1)


def test_chat_whole_response():
    body = json.loads(asyncio.run(_relay("chat", CHAT).whole()).body)
    content = body["choices"][0]["logprobs"]["content"]
    assert content == ENTRIES


def test_completion_whole_response():
    body = json.loads(asyncio.run(_relay("completion", COMPLETION).whole()).body)
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [e["token"] for e in ENTRIES]
    assert lp["token_logprobs"] == [-0.1, -0.2, -0.3, -0.4]
    assert lp["top_logprobs"] == [{"a": -0.1}, {"x": -0.05}, {"y": -0.01}, {" b": -0.4}]
    assert lp["text_offset"] == [0, 1, 1, 2]  # "a" | 🙂 (two tokens, one character) | " b"


@pytest.mark.parametrize("endpoint, body", [("chat", CHAT), ("completion", COMPLETION)])
def test_streamed_chunks_carry_their_tokens_logprobs(endpoint, body):
    async def collect():
        return [c async for c in _relay(endpoint, body).sse()]

    chunks = [json.loads(c.removeprefix("data: ")) for c in asyncio.run(collect()) if "[DONE]" not in c]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    if endpoint == "chat":
        assert [e for lp in lps for e in lp["content"]] == ENTRIES
    else:
        assert [o for lp in lps for o in lp["text_offset"]] == [0, 1, 1, 2]
        assert [t for lp in lps for t in lp["tokens"]] == [e["token"] for e in ENTRIES]


def test_no_logprobs_unless_asked():
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert json.loads(asyncio.run(_relay("chat", plain).whole()).body)["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("fields", [{"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}])
def test_top_logprobs_limits(fields):
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)
    with pytest.raises(ValueError, match="logprobs"):
        CompletionRequest(model="m", prompt="x", logprobs=6)
