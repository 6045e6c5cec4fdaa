"""Attention metadata shared by the model, the torch reference and the Triton kernels.

Every step runs one forward over a *flat* batch of new tokens from many requests. Before attention, each new
token's K/V is written to the paged cache at `slot_mapping`; attention then reads everything (the request's
committed context and the step's own tokens) from the cache through the request's block table.

Logical KV layout of request r in one step: indices [0, context_lens[r]) hold committed tokens; index
context_lens[r] + i holds the step's i-th new token (i = its order in the flat batch, *not* its depth). Rope
positions travel separately (`positions` in the model), so a tree node at depth d sits at kv index
context_len + i but rope position context_len + d. After acceptance, `kv_commit` moves the accepted path to
context_len + 0, 1, 2, ...

Masking of the step's tokens: a causal request (prefill chunk, plain decode) lets token i see step tokens
0..i. A tree request (`is_tree[r]`) lets token i see step token k iff bit k of `tree_bits[token]` is set
(ancestors and itself), so a tree holds at most MAX_TREE_TOKENS nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_TREE_TOKENS = 64


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat cache slot (block * block_size + offset); -1 = skip
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, request r's tokens are [qsl[r], qsl[r+1])
    context_lens: torch.Tensor  # [num_reqs] int32, committed tokens before this step's tokens
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, -1 padded
    is_tree: torch.Tensor  # [num_reqs] bool, True = mask step tokens by tree_bits, False = causal
    tree_bits: torch.Tensor  # [num_tokens] int64, ancestor-or-self bitmask over the request's step tokens
    max_query_len: int  # host copies so no kernel launch needs a device sync
    max_kv_len: int
    query_start_loc_host: list[int] | None = None  # python ints, for the CPU reference's slicing
    # Per-forward memo (e.g. the reference's gather indices and masks), built by the first layer, reused by the rest.
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_reqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def to(self, device: torch.device | str) -> "AttnMetadata":
        return AttnMetadata(
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            context_lens=self.context_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            is_tree=self.is_tree.to(device, non_blocking=True),
            tree_bits=self.tree_bits.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_kv_len=self.max_kv_len,
            query_start_loc_host=self.query_start_loc_host,
        )


def chain_bits(n: int) -> int:
    """Bitmask letting a chain token at index n-1 see tokens 0..n-1."""
    return (1 << n) - 1 if n < 64 else -1


def bits_from_parents(parents: list[int]) -> list[int]:
    """Ancestor-or-self bitmasks for nodes listed parents-first (parents[i] < i, root has -1).

    Returned as signed int64 values so bit 63 survives the trip into a torch int64 tensor.
    """
    if len(parents) > MAX_TREE_TOKENS:
        raise ValueError(f"a tree holds at most {MAX_TREE_TOKENS} tokens, got {len(parents)}")
    bits: list[int] = []
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"node {i} has parent {p}: parents must come first")
        b = (bits[p] if p >= 0 else 0) | (1 << i)
        bits.append(b)
    return [b - (1 << 64) if b >= (1 << 63) else b for b in bits]
