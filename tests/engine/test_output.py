"""Incremental detokenization and stop strings: the streamed text equals a full decode, cut where a full decode
checked after every step would cut it, for random token sequences of the real tokenizer (multi-byte characters
split across tokens and steps, special tokens, stop strings spanning steps)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.engine.config import SamplingParams
from app.engine.output import append_tokens, make_output
from app.engine.request import Request, RequestStatus

_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
# Text whose tokens split UTF-8 characters (CJK, emoji, accents), so windows end mid-character.
_MULTIBYTE = "héllo wörld € 日本語のテキスト 🙂🚀 naïve café ✓ Ω ąę 한국어 "


@pytest.fixture(scope="module")
def tokenizer():
    from app.engine.weights import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir("embedded"))


def _reference(tokenizer, chunks: list[list[int]], stops: tuple[str, ...]) -> tuple[str, int]:
    """What the engine did before incremental detokenization: after each step decode the whole output and cut it
    at the earliest stop string. Returns (text, steps taken)."""
    ids: list[int] = []
    for n, chunk in enumerate(chunks, 1):
        ids += chunk
        text = tokenizer.decode(ids, **_DECODE)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return text[:min(found)], n
    return tokenizer.decode(ids, **_DECODE), len(chunks)


def _stream(tokenizer, chunks: list[list[int]], stops: tuple[str, ...]) -> tuple[list[str], str, int]:
    """Feed the chunks as steps; max_tokens ends the request with the last chunk unless a stop string does."""
    total = sum(len(c) for c in chunks)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=total, stop=stops, ignore_eos=True),
                  eos_token_ids=frozenset())
    pieces = []
    for n, chunk in enumerate(chunks, 1):
        reason = append_tokens(req, chunk, 0.0, 1 << 30, tokenizer)
        if reason:
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
        out = make_output(req)
        pieces.append(out.new_text)
        if out.finished:
            return pieces, out.text, n
    raise AssertionError("never finished")


def _token_ids(tokenizer):
    multibyte = sorted(set(tokenizer.encode(_MULTIBYTE, add_special_tokens=False)))
    return st.one_of(st.integers(0, len(tokenizer) - 1), st.sampled_from(multibyte))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_text_equals_a_full_decode_cut_at_the_first_stop(tokenizer, data):
    ids = data.draw(st.lists(_token_ids(tokenizer), min_size=1, max_size=40))
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=len(ids), max_size=len(ids)))
    chunks, i = [], 0
    for size in sizes:
        if i >= len(ids):
            break
        chunks.append(ids[i:i + size])
        i += size
    full = tokenizer.decode(ids, **_DECODE).replace("\ufffd", "")
    stops: tuple[str, ...] = ()
    if full and data.draw(st.booleans()):  # stop strings taken from the text so that they do occur
        for _ in range(data.draw(st.integers(1, 3))):
            a = data.draw(st.integers(0, len(full) - 1))
            stops += (full[a:a + data.draw(st.integers(1, 6))],)
    pieces, text, steps = _stream(tokenizer, chunks, stops)
    ref_text, ref_steps = _reference(tokenizer, chunks, stops)
    assert "".join(pieces) == text == ref_text
    assert steps == ref_steps


def test_a_stop_string_spanning_steps_is_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("Hello world, this is the END of it", add_special_tokens=False)
    chunks = [[t] for t in ids]
    pieces, text, _ = _stream(tokenizer, chunks, ("the END",))
    assert text == "Hello world, this is " and "".join(pieces) == text
    assert not any("the" in p for p in pieces)  # "the" waited: it could have started the stop string


def test_a_character_split_across_steps_streams_only_when_complete(tokenizer):
    ids = tokenizer.encode("a🙂b", add_special_tokens=False)
    pieces, text, _ = _stream(tokenizer, [[t] for t in ids], ())
    assert text == "a🙂b" and "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_work_per_step_does_not_grow_with_the_output(tokenizer, monkeypatch):
    """Each step decodes a window of the latest tokens, not the whole output."""
    decoded: list[int] = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    ids = tokenizer.encode("word " * 400, add_special_tokens=False)
    _stream(tokenizer, [ids[i:i + 2] for i in range(0, len(ids), 2)], ("zzz",))
    assert len(ids) >= 400 and max(decoded) <= 4
