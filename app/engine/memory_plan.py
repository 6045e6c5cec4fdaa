"""The memory plan: how a replica divides memory between the target's and the drafts' weights, their KV caches and
one forward's workspace, decided once at start, before any KV cache is allocated. Numbers in, a plan out (no torch).

On CUDA the budget is `gpu_memory_fraction` x the GPU memory free when the engine starts, before the target's
weights load (vLLM's gpu_memory_utilization takes a fraction of the total; free-at-start also leaves alone whatever
else already holds the card). Weights and workspace come off the budget first; what is left is KV, split so that the
target and every draft hold the same number of tokens: each running sequence has KV in all of them, so a token
the target could cache and a draft could not is capacity no request can use. On CPU the plan covers only the KV
caches: `kv_cache_memory_gb` for target and drafts together (host memory holds the weights anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# The float32 copies the engine makes of a logits row: model.logits' upcast and one working copy (a gather of the
# rows to sample, a log-softmax for logprobs).
_FLOAT32_LOGIT_COPIES = 2


class MemoryPlanError(ValueError):
    """The memory budget cannot hold the weights, the workspace and one max_model_len sequence of KV."""


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int | None  # what the plan may fill; None: num_kv_blocks was given, not sized from a budget
    target_weight_bytes: int
    draft_weight_bytes: int
    workspace_bytes: int  # one forward's transient activations and logits (forward_workspace_bytes)
    target_kv_bytes_per_token: int
    draft_kv_bytes_per_token: int  # every draft model's KV (and a feature draft's hidden states) per token
    block_size: int
    num_kv_blocks: int  # of the target and of each draft model alike

    @property
    def kv_token_capacity(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def target_kv_bytes(self) -> int:
        return self.kv_token_capacity * self.target_kv_bytes_per_token

    @property
    def draft_kv_bytes(self) -> int:
        return self.kv_token_capacity * self.draft_kv_bytes_per_token

    @property
    def total_bytes(self) -> int:
        return (self.target_weight_bytes + self.draft_weight_bytes + self.workspace_bytes + self.target_kv_bytes
                + self.draft_kv_bytes)

    def describe(self) -> str:
        """One line for the start-up log: each part in GiB (parts that are zero left out) and the KV capacity."""
        parts = [("target weights", self.target_weight_bytes), ("draft weights", self.draft_weight_bytes),
                 ("workspace", self.workspace_bytes), ("target KV", self.target_kv_bytes),
                 ("draft KV", self.draft_kv_bytes)]
        used = " + ".join(f"{name} {n / GIB:.2f}" for name, n in parts if n)
        if self.budget_bytes is None:
            head = f"memory plan (num_kv_blocks given): {used} = {self.total_bytes / GIB:.2f} GiB"
        else:
            head = (f"memory plan: budget {self.budget_bytes / GIB:.2f} GiB = {used} "
                    f"+ unused {(self.budget_bytes - self.total_bytes) / GIB:.2f}")
        return (f"{head}; KV capacity {self.kv_token_capacity} tokens ({self.num_kv_blocks} blocks of "
                f"{self.block_size}) at {self.target_kv_bytes_per_token + self.draft_kv_bytes_per_token} bytes/token "
                f"(target {self.target_kv_bytes_per_token}, draft {self.draft_kv_bytes_per_token})")


def plan_memory(budget_bytes: int | None, *, target_kv_bytes_per_token: int, block_size: int, min_kv_tokens: int,
                draft_kv_bytes_per_token: int = 0, target_weight_bytes: int = 0, draft_weight_bytes: int = 0,
                workspace_bytes: int = 0, num_kv_blocks: int | None = None) -> MemoryPlan:
    """The largest whole number of KV blocks, the same for target and drafts, whose bytes fit in `budget_bytes`
    beside the weights and the workspace. Raises MemoryPlanError (naming every number) when that holds fewer than
    `min_kv_tokens` (max_model_len: one longest sequence must fit). `num_kv_blocks` given: the plan takes it as
    is (the caller chose the cache size; no budget and no minimum apply)."""
    if target_kv_bytes_per_token <= 0 or draft_kv_bytes_per_token < 0 or block_size <= 0:
        raise ValueError("KV bytes per token and block_size must be positive")
    if num_kv_blocks is not None:
        return MemoryPlan(None, target_weight_bytes, draft_weight_bytes, workspace_bytes, target_kv_bytes_per_token,
                          draft_kv_bytes_per_token, block_size, num_kv_blocks)
    if budget_bytes is None:
        raise ValueError("plan_memory needs budget_bytes or num_kv_blocks")
    kv_bytes = budget_bytes - target_weight_bytes - draft_weight_bytes - workspace_bytes
    bytes_per_block = (target_kv_bytes_per_token + draft_kv_bytes_per_token) * block_size
    blocks = max(0, kv_bytes // bytes_per_block)
    plan = MemoryPlan(budget_bytes, target_weight_bytes, draft_weight_bytes, workspace_bytes,
                      target_kv_bytes_per_token, draft_kv_bytes_per_token, block_size, blocks)
    if plan.kv_token_capacity < min_kv_tokens:
        need = target_weight_bytes + draft_weight_bytes + workspace_bytes + min_kv_tokens * (
            target_kv_bytes_per_token + draft_kv_bytes_per_token)
        raise MemoryPlanError(
            f"the memory budget of {budget_bytes / GIB:.2f} GiB holds KV for {plan.kv_token_capacity} tokens, fewer "
            f"than one {min_kv_tokens}-token sequence (max_model_len): target weights "
            f"{target_weight_bytes / GIB:.2f} GiB + draft weights {draft_weight_bytes / GIB:.2f} GiB + workspace "
            f"{workspace_bytes / GIB:.2f} GiB leave {max(kv_bytes, 0) / GIB:.2f} GiB for KV at "
            f"{target_kv_bytes_per_token} (target) + {draft_kv_bytes_per_token} (draft) bytes per token; one sequence "
            f"needs {need / GIB:.2f} GiB in all. Lower max_model_len, raise gpu_memory_fraction (CUDA) or "
            f"kv_cache_memory_gb (CPU), or use a smaller draft")
    return plan


def forward_workspace_bytes(num_tokens: int, *, hidden_size: int, intermediate_size: int, qkv_width: int,
                            vocab_size: int, dtype_bytes: int) -> int:
    """Transient memory of one forward over `num_tokens` tokens (max_num_batched_tokens), all of them with logits:
    a verify step asks for the logits of every tree node, and a step can be all tree nodes.

    Per token: one layer's live activations, (4 x hidden + 4 x intermediate + 2 x qkv_width) x dtype bytes (the
    residual stream, the normed input, the attention and o-proj outputs; q/k/v and their rotated copies; the fused
    gate/up output, the activation and the product, app/engine/layers.py), plus 8 x hidden for the float32 pair
    RMSNorm makes; and its logits row, vocab x (dtype bytes + 2 x 4): the matmul output and two float32 copies
    (model.logits' upcast, one working copy in sampling or logprobs). Layers run one after another, so one layer's
    activations count once. For Llama-3.1-8B at 2048 tokens in bf16 the logits are 2.4 of the 2.8 GiB.
    """
    layer = dtype_bytes * (4 * hidden_size + 4 * intermediate_size + 2 * qkv_width) + 8 * hidden_size
    logits = vocab_size * (dtype_bytes + 4 * _FLOAT32_LOGIT_COPIES)
    return num_tokens * (layer + logits)
