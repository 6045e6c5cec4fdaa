"""After a step: append a request's new tokens, decide whether it finished, and build what it streams."""

from __future__ import annotations

from app.engine.request import Request, RequestOutput


def append_tokens(req: Request, tokens: list[int], now: float, max_model_len: int, tokenizer) -> str | None:
    """Append tokens one by one, stopping at EOS, a stop token id, ``max_tokens`` or the context window; then cut
    the text at a stop string. Returns the finish reason ("stop" | "length") or None while it runs on."""
    params = req.sampling
    reason = None
    for t in tokens:
        req.token_ids.append(t)
        req.token_times.append(now)
        if req.first_token_time is None:
            req.first_token_time = now
        if t in req.eos_token_ids or t in params.stop_token_ids:
            reason = "stop"
        elif req.num_output_tokens >= params.max_tokens or len(req.token_ids) >= max_model_len:
            reason = "length"
        if reason:
            break
    text = tokenizer.decode(req.output_token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for stop in params.stop:
        idx = text.find(stop, max(0, len(req.text) - len(stop)))
        if idx >= 0:
            text, reason = text[:idx], "stop"
    req.text = text
    return reason


def make_output(req: Request) -> RequestOutput:
    """The tokens and text not streamed yet. While the request runs, a trailing partial UTF-8 character and text
    that may be the start of a stop string are held back."""
    new_ids = req.output_token_ids[req.num_emitted_tokens:]
    text = req.text
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
    return out
