"""After a step: append a request's new tokens, decide whether it finished, and build what it streams.

Work per step is bounded by the step's new tokens, not the output's length: detokenization decodes only a window
of recent tokens (``detokenize``, the prefix/read offsets of vLLM's incremental detokenizer), and stop strings are
matched over the text held back so far plus the new text (``append_tokens``). The streamed pieces add up to the full
decode of the output tokens, cut at the first stop string (tests/engine/test_output.py checks it with hypothesis).
"""

from __future__ import annotations

from app.engine.request import Request, RequestOutput
from app.engine.sampling import TokenLogprob

_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def detokenize(req: Request, tokenizer, final: bool) -> str:
    """The text the output tokens added since the last call.

    Decodes ``output[prefix_offset:]`` and the already streamed ``output[prefix_offset:read_offset]`` before it
    (the tokens before ``read_offset`` give the decoder its context, e.g. a leading space), and returns the
    difference. While the window ends in an unfinished UTF-8 character (U+FFFD) the text before it is returned and
    the window stays open; once it decodes cleanly the offsets move up. ``final`` flushes whatever is left, as a
    full decode would show it."""
    state, base, ids = req.detokenizer, req.num_prompt_tokens, req.token_ids
    start, read = base + state.prefix_offset, base + state.read_offset
    prefix_text = tokenizer.decode(ids[start:read], **_DECODE) if read > start else ""
    window_text = tokenizer.decode(ids[start:], **_DECODE)
    done = len(prefix_text) + state.num_partial_chars
    if final or not window_text.endswith("\ufffd"):
        state.prefix_offset, state.read_offset, state.num_partial_chars = state.read_offset, len(ids) - base, 0
        return window_text[done:]
    stable = len(window_text.rstrip("\ufffd"))
    if stable <= done:
        return ""
    state.num_partial_chars += stable - done
    return window_text[done:stable]


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in text, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (it may yet become one)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def append_tokens(req: Request, tokens: list[int], now: float, max_model_len: int, tokenizer,
                  logprobs: list[TokenLogprob] | None = None) -> str | None:
    """Append tokens one by one, stopping at EOS, a stop token id, ``max_tokens`` or the context window; then cut
    the text at a stop string. Returns the finish reason ("stop" | "length") or None while it runs on.

    The text is checked only where a stop string can newly appear: text streamed before never ends with the start
    of a stop string (that part is held back in ``pending_text``), so a new match lies in pending + new text."""
    params = req.sampling
    reason = None
    num_appended = 0
    for t in tokens:
        req.token_ids.append(t)
        req.token_times.append(now)
        num_appended += 1
        if req.first_token_time is None:
            req.first_token_time = now
        if t in req.eos_token_ids or t in params.stop_token_ids:
            reason = "stop"
        elif req.num_output_tokens >= params.max_tokens or len(req.token_ids) >= max_model_len:
            reason = "length"
        if reason:
            break
    if logprobs is not None:
        req.unstreamed_logprobs.extend(logprobs[:num_appended])
    text = req.pending_text + detokenize(req, tokenizer, final=reason is not None)
    keep = len(text)
    if params.stop:
        idx = _first_stop(text, params.stop)
        if idx >= 0:
            keep, reason = idx, "stop"
        elif reason is None:
            keep = len(text) - _stop_prefix_len(text, params.stop)
    req.pending_text = "" if reason else text[keep:]
    if keep:
        req.text_parts.append(text[:keep])
        req.unstreamed_text += text[:keep]
    return reason


def make_output(req: Request) -> RequestOutput:
    """The tokens, text and logprobs not streamed yet; the whole output too once the request finished."""
    new_ids = req.token_ids[req.num_prompt_tokens + req.num_emitted_tokens:]
    req.num_emitted_tokens = req.num_output_tokens
    new_text, req.unstreamed_text = req.unstreamed_text, ""
    logprobs = None
    if req.sampling.logprobs is not None:
        logprobs, req.unstreamed_logprobs = req.unstreamed_logprobs, []
    out = RequestOutput(request_id=req.request_id, new_token_ids=new_ids, new_text=new_text,
                        finished=req.finished, finish_reason=req.finish_reason, error=req.error, logprobs=logprobs)
    if req.finished:
        out.token_ids, out.text, out.metrics = req.output_token_ids, req.text, req.metrics()
    return out


class TokenTexts:
    """A token's text and UTF-8 bytes, as OpenAI's logprobs report them (cached per token id).

    A token that is part of a multi-byte character has no text of its own: its bytes come from the tokenizer's
    byte-level alphabet (GPT-2 style) or its ``<0xNN>`` byte-fallback name, and its text is "bytes:" and the bytes
    escaped, the form OpenAI uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_of = {ch: b for b, ch in _byte_level_alphabet().items()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._text_and_bytes(token_id)
        return hit

    def _text_and_bytes(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" not in text:
            return text, list(text.encode())
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])
        elif all(ch in self._byte_of for ch in piece):
            raw = bytes(self._byte_of[ch] for ch in piece)
        else:
            raw = text.encode()
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the printable character standing for it in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet
