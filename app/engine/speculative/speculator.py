"""Per step: draft candidate trees, select nodes under the step's token budget, hand verify trees back."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from app.engine.speculative.source import CandidateTree, DraftRequest, DraftSource
from app.engine.request import Request
from app.engine.step import StepPlan
from app.engine.speculative.tree import VerifyTree, build_verify_trees, pad
from kernels.metadata import MAX_TREE_TOKENS
from policies.budget import throughput_cut_path_prob
from policies.tree_selection import PolicySpec, SLOState, cap_tree_size, draft_shape, parse_policy, select

logger = logging.getLogger(__name__)


@dataclass
class ProposeResult:
    trees: dict[str, VerifyTree] = field(default_factory=dict)
    candidates: dict[str, CandidateTree] = field(default_factory=dict)
    draft_s: float = 0.0
    select_s: float = 0.0
    num_candidates: int = 0


class Speculator:
    """Owns the drafter and the selection policy; the engine owns verify and accept."""

    def __init__(self, drafter: DraftSource, default_policy: str, *, max_tree_nodes: int, max_depth: int, max_width: int,
                 root_topk: int = 0, slo_triage: bool = False):
        self.drafter = drafter
        self.default_policy = parse_policy(default_policy)
        self.n_max = min(max_tree_nodes, MAX_TREE_TOKENS - 1)  # the root takes one of the 64 mask bits
        self.max_depth, self.max_width = max_depth, max_width
        self.root_topk = root_topk  # root children budgeted policies draft (the selection prices them)
        self.slo_triage = slo_triage  # adaserve: no SLO-phase nodes for requests that cannot make their SLO this step
        # Verify outcomes, for the depth gate: accepted draft tokens, and walks stopped by a rejection (the last
        # accepted node had children in the tree); a walk that reached a leaf tells nothing of the next level.
        self.num_trees, self.num_accepted, self.num_rejections = 0, 0, 0
        self.draft_forward_s: float | None = None  # EMA of one draft forward (a tree level) over the batch
        self.disabled: set[str] = set()  # requests whose draft failed: they decode without speculation

    def drafts(self, request_id: str) -> bool:
        """Whether the draft still serves this request (it is dropped for a request on which it failed)."""
        return request_id not in self.disabled

    def disable(self, request_id: str, exc: BaseException) -> None:
        """The draft failed on this request: it decodes without speculation from now on (output unchanged, since
        acceptance is lossless), and the others keep theirs."""
        logger.warning("draft failed for request %s; it continues without speculation: %r", request_id, exc)
        self.disabled.add(request_id)
        try:
            self.drafter.release(request_id)
        except Exception:  # noqa: BLE001 - its state is dropped either way
            logger.exception("releasing the failed draft state of %s", request_id)

    def acceptance_rate(self) -> float:
        """Per-token acceptance a, the geometric MLE with censored walks: accepted / (accepted + rejections)."""
        return self.num_accepted / max(self.num_accepted + self.num_rejections, 1)

    def depth_cap(self, min_level_gain: float = 0.1) -> int:
        """Deepest level still worth a draft forward: with per-token acceptance a, level l yields about a**l
        tokens; stop below min_level_gain. A guard against drafts whose probabilities overstate acceptance
        (the per-step cut-offs trust them). Until 32 trees were verified the adaptive shape alone decides."""
        if self.num_trees < 32:
            return self.max_depth
        a = self.acceptance_rate()
        if a <= min_level_gain:
            return 1
        if a >= 1.0:  # nothing rejected yet (a repetitive text the n-gram draft always gets): no level is too deep
            return self.max_depth
        return int(min(self.max_depth, max(1, math.floor(math.log(min_level_gain) / math.log(a)))))

    def policy_of(self, req: Request) -> PolicySpec:
        return parse_policy(req.policy) if req.policy else self.default_policy

    def propose(self, plan: StepPlan, now: float) -> ProposeResult:
        """Verify trees for the plan's decoding requests, within its node budget and priced by its
        ``NodePricing``: budgeted policies skip nodes less likely than ``min_path_prob`` (they cost more than they
        yield), draft the next level only if its frontiers' path probability could pay for the forward's time at
        the step's ``tokens_per_s``, and keep only the candidates whose f raises the step's token rate
        (``policies.budget.throughput_cut_path_prob``)."""
        reqs = [c.request for c in plan.decodes]
        pricing = plan.pricing
        min_path_prob = pricing.min_path_prob if pricing else 0.0
        tokens_per_s = pricing.tokens_per_s if pricing else 0.0
        t_step_s = plan.predicted_step_s
        result = ProposeResult()
        groups: dict[PolicySpec, list[Request]] = {}
        for r in reqs:
            spec = self.policy_of(r)
            if spec.kind != "none" and r.request_id not in self.disabled:
                groups.setdefault(spec, []).append(r)
        budget = max(plan.node_budget, 0)
        for spec, group in groups.items():
            if spec.budgeted and budget == 0:
                continue
            depth, beam, topk = draft_shape(spec, len(group), budget, d_max=self.max_depth, w_max=self.max_width)
            depth = min(depth, (MAX_TREE_TOKENS - 1) // max(beam, 1))  # frontier + ancestors fit the mask
            if spec.budgeted:
                depth = min(depth, self.depth_cap())
            if depth == 0:
                continue
            cut = {}
            if spec.budgeted:
                level_s = self.draft_forward_s or 0.0
                cut = {"min_path_prob": min_path_prob, "min_level_mass": tokens_per_s * level_s,
                       "root_topk": self.root_topk}
            forwards = self.drafter.num_forwards
            t0 = time.perf_counter()
            group, cands = self._draft(group, depth=depth, beam_width=beam, topk=topk,
                                       widths=spec.static_widths or None, **cut)
            t1 = time.perf_counter()
            if not group:
                continue
            if self.drafter.num_forwards > forwards:
                per = (t1 - t0) / (self.drafter.num_forwards - forwards)
                self.draft_forward_s = per if self.draft_forward_s is None else 0.9 * self.draft_forward_s + 0.1 * per
            padded = pad(cands)
            slo = SLOState(
                decode_time_s=np.array([r.decode_time_s(now) for r in group]),
                decoded_tokens=np.array([max(r.num_output_tokens - 1, 0) for r in group]),
                tpot_slo_s=np.array([r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else np.inf for r in group]))
            min_f, sel_budget = min_path_prob, budget
            if spec.budgeted and pricing is not None:
                # Nodes worth their verify time: the throughput phase keeps f >= the cut, and the SLO phase may
                # choose other (less likely) nodes for urgent requests but not more of them: past that size every
                # node slows the step for all requests, and buying it for requests already behind their SLO makes
                # more requests fall behind (measured: adaserve 38% vs dynamic-tree 75% attainment at 2 req/s).
                f_valid = padded.path_prob[padded.valid]
                cut = throughput_cut_path_prob(f_valid, pricing.latency_model, pricing.base_tokens,
                                               pricing.context_tokens, float(pricing.num_roots))
                min_f = max(min_f, cut)
                sel_budget = min(budget, int(np.count_nonzero(f_valid >= cut)))
            selected = select(spec, padded.path_prob, padded.parent, padded.valid, slo, sel_budget, t_step_s,
                              depth, self.n_max, min_path_prob=min_f, serve_unreachable=not self.slo_triage)
            selected = cap_tree_size(selected, self.n_max)
            trees = build_verify_trees([r.token_ids[-1] for r in group], padded, selected)
            result.select_s += time.perf_counter() - t1
            result.draft_s += t1 - t0
            result.num_candidates += int(padded.valid.sum())
            for r, tree, cand in zip(group, trees, cands):
                if tree.num_nodes:
                    result.trees[r.request_id] = tree
                    result.candidates[r.request_id] = cand
            if spec.budgeted:
                budget -= int(selected.sum())
        return result

    def _draft(self, group: list[Request], **kwargs) -> tuple[list[Request], list[CandidateTree]]:
        """The draft source's candidates for the group. If drafting the batch fails, each request is drafted alone
        and those that still fail are disabled: a draft fault costs only its own request's speculation."""
        try:
            return group, self.drafter.propose([_draft_request(r) for r in group], **kwargs)
        except Exception as exc:  # noqa: BLE001
            if len(group) == 1:
                self.disable(group[0].request_id, exc)
                return [], []
        kept, cands = [], []
        for r in group:
            try:
                cands += self.drafter.propose([_draft_request(r)], **kwargs)
                kept.append(r)
            except Exception as exc:  # noqa: BLE001
                self.disable(r.request_id, exc)
        return kept, cands

    def release(self, request_id: str) -> None:
        if request_id in self.disabled:
            self.disabled.discard(request_id)
            return
        self.drafter.release(request_id)

    def observe(self, request_id: str, candidates: CandidateTree, tree: VerifyTree, path: list[int]) -> None:
        """Tell a drafter that learns from verification (e.g. calibrated lookup sources) what was accepted."""
        self.num_trees += 1
        self.num_accepted += len(path) - 1
        self.num_rejections += int(path[-1] in tree.parents)
        try:
            self.drafter.observe(request_id, candidates, tree, path)
        except Exception as exc:  # noqa: BLE001 - a draft fault is this request's alone
            self.disable(request_id, exc)


def _draft_request(req: Request) -> DraftRequest:
    return DraftRequest(request_id=req.request_id, token_ids=req.token_ids)
