"""Draft models for speculative decoding: the drafter (KV catch-up + batched tree drafting) and its loaders."""

from app.engine.draft.drafter import CandidateTree, Drafter, DraftRequest, check_same_vocabulary, load_drafter

__all__ = ["CandidateTree", "DraftRequest", "Drafter", "check_same_vocabulary", "load_drafter"]
