"""Torch reference implementations of the attention-side kernels (the CPU path, and the tests' oracle)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.metadata import AttnMetadata

# Requests with more step tokens than this get their own SDPA call instead of padding the others' queries.
_PAD_QUERY_LIMIT = 64


def write_kv_reference(
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping
    if not bool(keep.all()):
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def kv_commit_reference(
    k_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,  # [n] int64 flat slots of accepted entries
    dst_slots: torch.Tensor,  # [n] int64 flat slots they must end up in
) -> None:
    """Gather-then-scatter, so overlapping source and destination ranges are safe."""
    if src_slots.numel() == 0:
        return
    for cache in (k_cache, v_cache):
        flat = cache.view(cache.shape[0], -1, *cache.shape[3:])
        flat[:, dst_slots] = flat[:, src_slots]


def tree_attention_reference(
    q: torch.Tensor,  # [num_tokens, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every step token over its request's committed context plus its visible step tokens.

    Gather indices and masks depend only on the metadata, so they are built once per forward (first layer) and
    kept in ``meta.scratch`` for the other layers.
    """
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    key = ("reference_groups", k_cache.shape[1])
    groups = meta.scratch.get(key)
    if groups is None:
        groups = meta.scratch[key] = _plan_groups(meta, k_cache.shape[1], q.shape[0])
    enable_gqa = k_cache.shape[2] != q.shape[1]
    for g in groups:
        # Whole blocks are gathered (contiguous rows, far cheaper than token-granular indexing), then trimmed.
        kp = k_cache[g.tables].flatten(1, 2)[:, :g.max_kv]  # [n, max_kv, KVH, D]
        vp = v_cache[g.tables].flatten(1, 2)[:, :g.max_kv]
        q_in = q.view(g.tok.shape[0], -1, *q.shape[1:]) if g.whole else q[g.tok]  # [n, max_q, H, D]
        o = F.scaled_dot_product_attention(
            q_in.transpose(1, 2),  # [n, H, max_q, D]
            kp.transpose(1, 2).to(q.dtype),  # [n, KVH, max_kv, D]
            vp.transpose(1, 2).to(q.dtype),
            attn_mask=g.mask, scale=scale, enable_gqa=enable_gqa,
        ).transpose(1, 2)  # [n, max_q, H, D]
        if g.whole:
            return o.reshape(q.shape)
        out[g.dst] = o.flatten(0, 1)[g.src]
    return out


class _Group(NamedTuple):
    """One SDPA call's plan: requests padded to [n, max_q] queries and [n, max_kv] keys."""
    tok: torch.Tensor  # [n, max_q] flat token of each padded query (clamped where padding)
    tables: torch.Tensor  # [n, num_blocks] blocks to gather
    mask: torch.Tensor | None  # [n, 1, max_q, max_kv] bool; None when every query sees every key
    max_kv: int
    whole: bool  # the group is the whole batch in order, unpadded: q is a view, o is the output
    src: torch.Tensor  # [num_valid] rows of the flattened [n * max_q] output that are real queries
    dst: torch.Tensor  # [num_valid] their flat tokens


def _plan_groups(meta: AttnMetadata, block_size: int, num_tokens: int) -> list[_Group]:
    """Requests with short queries share one padded SDPA call; long ones (prefill chunks) get their own."""
    qsl = meta.query_start_loc_host or meta.query_start_loc.tolist()
    q_lens = [qsl[r + 1] - qsl[r] for r in range(meta.num_reqs)]
    ctx = meta.context_lens.tolist()
    small = [r for r in range(meta.num_reqs) if 0 < q_lens[r] <= _PAD_QUERY_LIMIT]
    large = [r for r in range(meta.num_reqs) if q_lens[r] > _PAD_QUERY_LIMIT]
    groups = ([small] if small else []) + [[r] for r in large]
    return [_plan_group(meta, block_size, num_tokens, g, qsl, q_lens, ctx) for g in groups]


def _plan_group(meta, block_size, num_tokens, reqs, qsl, q_lens, ctx) -> _Group:
    device = meta.slot_mapping.device
    max_q = max(q_lens[r] for r in reqs)
    kv_lens = [ctx[r] + q_lens[r] for r in reqs]
    max_kv = max(kv_lens)

    # Queries, padded to [n, max_q].
    starts = torch.tensor([qsl[r] for r in reqs], device=device)
    lens = torch.tensor([q_lens[r] for r in reqs], device=device)
    qi = torch.arange(max_q, device=device)
    q_valid = qi[None, :] < lens[:, None]  # [n, max_q]
    tok = (starts[:, None] + qi[None, :]).clamp_max(num_tokens - 1)  # [n, max_q]

    # Blocks holding the whole logical range.
    num_blocks = -(-max_kv // block_size)
    tables = meta.block_tables[reqs][:, :num_blocks].long().clamp_min(0)  # [n, num_blocks]

    # Mask: context always visible; step token k visible to step token i by causality or tree bits.
    ctx_t = torch.tensor([ctx[r] for r in reqs], device=device)
    kj = torch.arange(max_kv, device=device)
    step_k = kj[None, :] - ctx_t[:, None]  # [n, max_kv], step index of each key (negative = context)
    kv_valid = kj[None, :] < torch.tensor(kv_lens, device=device)[:, None]
    causal = step_k[:, None, :] <= qi[None, :, None]  # [n, max_q, max_kv]
    bits = meta.tree_bits[tok]  # [n, max_q]
    shift = step_k.clamp(0, 63)
    tree_vis = ((bits[:, :, None] >> shift[:, None, :]) & 1).bool()
    is_tree = meta.is_tree[reqs].to(device)[:, None, None]
    step_vis = torch.where(is_tree, tree_vis, causal)
    mask = kv_valid[:, None, :] & ((step_k < 0)[:, None, :] | step_vis)
    mask = mask & q_valid[:, :, None]
    mask[:, :, 0] |= ~q_valid  # padded query rows see one key so softmax stays finite
    whole = len(reqs) * max_q == num_tokens and bool(q_valid.all())  # then tok is 0..num_tokens-1 in order
    src = q_valid.flatten().nonzero().flatten()
    return _Group(tok=tok, tables=tables, mask=None if bool(mask.all()) else mask[:, None], max_kv=max_kv,
                  whole=whole, src=src, dst=tok.flatten()[src])
