"""Draft sources for speculative decoding: the model drafter (KV catch-up + batched tree drafting), prompt
lookup (n-gram), and the multi-source composite that merges them; `load_drafter` builds whichever a spec names."""

from app.engine.speculative.drafter import CandidateTree, Drafter, DraftRequest, check_same_vocabulary
from app.engine.speculative.multi import MultiSourceDrafter, load_sources
from app.engine.speculative.ngram import NgramSource

# A single model spec goes to drafter.load_drafter unchanged; comma lists and "ngram" give a MultiSourceDrafter.
load_drafter = load_sources

__all__ = ["CandidateTree", "DraftRequest", "Drafter", "MultiSourceDrafter", "NgramSource", "check_same_vocabulary",
           "load_drafter", "load_sources"]
