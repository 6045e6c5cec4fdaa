"""The step contract: ``StepPlan`` (what the scheduler decided) and ``StepResult`` (what the step did).

They are the only things the scheduler, the engine, metrics, traces and benchmarks exchange about a step:
the scheduler owns every budget and writes them into the plan; the engine drafts, verifies and accepts within
it and returns a result; the scheduler updates its statistics from the result (``Scheduler.update``), and
observers (``LLMEngine.step_observers``: traces, benchmarks) read the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.engine.request import Request
    from app.engine.sampling import TokenLogprob
    from policies.latency_model import LatencyModel
    from app.engine.speculative import CandidateTree
    from app.engine.speculative.tree import VerifyTree


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens token_ids[num_computed : num_computed + num_tokens] run this step

    @property
    def completes(self) -> bool:
        """This chunk reaches the end of the request's tokens, so its last logits yield a new token."""
        return self.request.num_computed_tokens + self.num_tokens == len(self.request.token_ids)


@dataclass(frozen=True)
class NodePricing:
    """What a draft node costs this step, from the latency profile (``policies.budget``): the selection keeps a
    node only if it raises the step's token rate, and a draft level only if its frontier can pay its forward."""

    latency_model: LatencyModel  # the target's step time by (tokens, context)
    base_tokens: int  # roots + prefill tokens: the step's size before any tree node
    context_tokens: int  # summed context of the decoding requests
    num_roots: int  # decoding requests, each sure of one token
    min_path_prob: float  # smallest f worth one more node at the step's base size
    tokens_per_s: float  # the step's expected output rate, which prices a draft level


@dataclass
class StepPlan:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # one root token each; may grow a tree
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    refused: list[Request] = field(default_factory=list)  # finished unstarted: their TTFT SLO became unattainable
    node_budget: int = 0  # draft nodes (roots excluded) the step may verify
    slo_node_budget: int = 0  # of which the SLO pace plan reserved this many for the decoding requests' SLOs
    prefill_held: bool = False  # the SLO pace plan, not the step's limits, kept prompt tokens out of this step
    prompts_left_waiting: bool = False  # prompt tokens were queued that this step did not prefill (it was saturated)
    predicted_step_s: float = 0.0  # the target's predicted time for the planned step (t_step of A(r))
    pricing: NodePricing | None = None  # None without a latency profile: no priced cut-offs

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


@dataclass
class TreeOutcome:
    """One request's verified tree: the draft's candidates, the selected tree and the accepted path."""

    request_id: str
    candidates: CandidateTree  # what the draft source proposed (a merged tree records each node's sources)
    tree: VerifyTree  # index 0 is the root token, then the selected nodes
    path: list[int]  # accepted indices into tree.tokens, root first

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


@dataclass
class StepResult:
    """What one step did. ``new_tokens`` holds every request that gained tokens (a prefill chunk that completes a
    prompt gains its first token; a tree gains its accepted path plus the bonus token). A request whose own
    numerics failed (non-finite logits) is in ``failed`` instead, with the reason."""

    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    new_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # requests that asked for them
    failed: dict[str, str] = field(default_factory=dict)
    trees: list[TreeOutcome] = field(default_factory=list)
    num_tokens: int = 0  # target tokens in the step (roots + prefill + tree nodes)
    num_decodes: int = 0
    draft_s: float = 0.0
    select_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    step_s: float = 0.0

    @property
    def num_trees(self) -> int:
        return len(self.trees)

    @property
    def num_tree_nodes(self) -> int:
        return sum(t.tree.num_nodes for t in self.trees)

    @property
    def num_accepted(self) -> int:
        return sum(t.num_accepted for t in self.trees)

    @property
    def tree_gain_sq(self) -> int:
        """Sum over the trees of (tokens the request gained)^2, for the gain's spread."""
        return sum(len(t.path) ** 2 for t in self.trees)


@dataclass
class StepTotals:
    """Running sums over every step so far (the scheduler's pricing and the replica's metrics read them)."""

    num_steps: int = 0
    tree_requests: int = 0  # verified trees
    tree_nodes: int = 0
    accepted: int = 0
    tree_gain_sq: int = 0
    prefill_held_steps: int = 0
    draft_s: float = 0.0
    select_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    step_s: float = 0.0

    def add(self, plan: StepPlan, result: StepResult) -> None:
        self.num_steps += 1
        self.tree_requests += result.num_trees
        self.tree_nodes += result.num_tree_nodes
        self.accepted += result.num_accepted
        self.tree_gain_sq += result.tree_gain_sq
        self.prefill_held_steps += plan.prefill_held
        for k in ("draft_s", "select_s", "verify_s", "accept_s", "step_s"):
            setattr(self, k, getattr(self, k) + getattr(result, k))

    @property
    def tokens_per_tree_step(self) -> float:
        """Tokens a speculating request gains per step so far (accepted draft tokens + the bonus token)."""
        return 1.0 + (self.accepted / self.tree_requests if self.tree_requests else 0.0)
