"""Every draft source implements the whole DraftSource interface, so callers never ask what a source can do."""

from __future__ import annotations

import inspect

import pytest
import torch

from app.engine.speculative import (CandidateTree, Drafter, DraftRequest, DraftSource, FeatureDrafter,
                                    MultiSourceDrafter, NgramSource, load_draft_source)
from app.engine.speculative.tree import VerifyTree

SOURCES = [Drafter, FeatureDrafter, NgramSource, MultiSourceDrafter]
PROPOSE_PARAMS = ["self", "reqs", "depth", "beam_width", "topk", "widths", "min_path_prob", "min_level_mass",
                  "root_topk"]


@pytest.mark.parametrize("cls", SOURCES, ids=lambda c: c.__name__)
def test_every_source_class_implements_the_interface(cls):
    assert issubclass(cls, DraftSource) and not inspect.isabstract(cls)
    params = list(inspect.signature(cls.propose).parameters)
    assert params[: len(PROPOSE_PARAMS)] == PROPOSE_PARAMS  # a source may add keyword options after these


def test_the_interface_cannot_be_half_implemented():
    class ProposeOnly(DraftSource):
        def propose(self, reqs, depth, beam_width, topk, widths=None, min_path_prob=0.0, min_level_mass=0.0,
                    root_topk=0):
            return [CandidateTree.empty() for _ in reqs]

    with pytest.raises(TypeError):
        ProposeOnly()  # release is abstract


def _exercise(src: DraftSource, hidden_size: int = 576) -> None:
    """The calls the speculator and the engine make, in their order, starting with an id the source never saw."""
    assert isinstance(src.name, str) and isinstance(src.uses_features, bool)
    before = src.num_forwards
    assert isinstance(before, int) and before >= 0
    src.release("never-seen")  # an unknown id is fine
    assert isinstance(src.stats(), dict)
    req = DraftRequest("r", [5, 6, 7, 8, 5, 6, 7, 8, 5])
    if src.uses_features:
        src.record_hidden("r", 0, torch.zeros(len(req.token_ids) - 1, hidden_size))
    [tree] = src.propose([req], depth=2, beam_width=1, topk=2)
    assert isinstance(tree, CandidateTree) and tree.num_nodes > 0
    verify = VerifyTree(tokens=[req.token_ids[-1]] + tree.tokens.tolist(), parents=[-1] + (tree.parent + 1).tolist(),
                        path_prob=[1.0] + tree.path_prob.tolist(), slots=[-1] + list(range(tree.num_nodes)))
    src.observe("r", tree, verify, [0])  # the target rejected every node
    src.release("r")
    src.release("r")  # twice is fine too
    assert isinstance(src.stats(), dict)


def test_prompt_lookup_is_a_full_source():
    src = NgramSource()
    _exercise(src)
    assert src.num_forwards == 0 and not src.uses_features
    src.record_hidden("r", 0, torch.zeros(3, 4))  # ignored: a lookup reads no hidden states
    assert not src.indexes
    assert list(src.stats()) == ["lookup_stats"]


@pytest.mark.parametrize("spec", ["distilled", "feature", "distilled,ngram"])
def test_loaded_sources_are_full_sources(spec, embedded_checkpoint):
    src = load_draft_source(spec, target=embedded_checkpoint, num_blocks=8)
    _exercise(src, embedded_checkpoint.config.hidden_size)
    assert src.num_forwards >= 1  # a model draft ran its catch-up forward at least
    assert src.uses_features == ("feature" in spec)
    if isinstance(src, MultiSourceDrafter):
        assert src.num_forwards == sum(s.num_forwards for s in src.sources)
        assert set(src.stats()["lookup_stats"]) == {"ngram"}
    else:
        assert src.stats() == {} and not src.seqs and src.kv.allocator.num_free == src.kv.allocator.num_blocks
