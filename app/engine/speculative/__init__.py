"""Speculative decoding: draft sources (source.py: the DraftSource interface and the tree types; drafter.py: a
draft model's KV catch-up and batched tree drafting, feature.py / distilled.py: the shipped drafts; ngram.py:
prompt lookup; multi.py: their merge), the speculator that drafts and selects, verify trees and acceptance.
`load_draft_source` builds whichever source a spec names."""

from app.engine.speculative.drafter import Drafter
from app.engine.speculative.factory import check_same_vocabulary, load_draft_source
from app.engine.speculative.feature import FeatureDrafter
from app.engine.speculative.multi import MultiSourceDrafter
from app.engine.speculative.ngram import NgramSource
from app.engine.speculative.source import CandidateTree, DraftRequest, DraftSource

__all__ = ["CandidateTree", "DraftRequest", "DraftSource", "Drafter", "FeatureDrafter", "MultiSourceDrafter",
           "NgramSource", "check_same_vocabulary", "load_draft_source"]
