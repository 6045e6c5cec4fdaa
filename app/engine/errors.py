"""Errors a request can meet at admission (torch-free, so the replica's Ray code can catch them by type)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The client's request cannot be served as given (empty prompt, too long, bad parameters)."""


class SLOUnattainableError(Exception):
    """This replica cannot meet the request's TTFT SLO now (``on_unattainable: reject``); another replica, or this
    one after ``retry_after_s``, may. ``reason`` says which rule refused it, for benchmarks and logs: "overloaded"
    (overload shedding's prompt-length cutoff), "ttft" (the prompts queued ahead take too long), "tpot_pace" (the
    running requests' TPOT pace leaves no room)."""

    def __init__(self, message: str, retry_after_s: float, reason: str = "ttft"):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason
