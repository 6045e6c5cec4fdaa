"""Speculative decoding: draft -> select -> verify -> accept, as separate, testable steps."""
