"""Builders of random flat varlen batches (paged cache + AttnMetadata) and a naive dense attention oracle."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.metadata import AttnMetadata, bits_from_parents, chain_bits


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ReqSpec:
    """One request's step: `ctx` committed tokens, then either a tree (`parents`) or `q_len` causal tokens."""

    ctx: int
    q_len: int = 1
    parents: tuple[int, ...] | None = None

    @property
    def num_new(self) -> int:
        return len(self.parents) if self.parents is not None else self.q_len


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    meta: AttnMetadata
    specs: list[ReqSpec]
    owned_blocks: list[list[int]]  # physical blocks of each request, in logical order

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Batch":
        cast = (lambda x: x.to(device, dtype)) if dtype is not None else (lambda x: x.to(device))
        return replace(self, q=cast(self.q), k_cache=cast(self.k_cache), v_cache=cast(self.v_cache),
                       meta=self.meta.to(device))


def make_batch(
    specs: list[ReqSpec],
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 2,
) -> Batch:
    """Random q and cache; each request owns shuffled physical blocks; block 0 is a zeroed null block and
    unowned blocks hold NaN, so any read outside a request's valid keys poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(s.ctx + s.num_new) // block_size) for s in specs]
    num_blocks = 1 + sum(need) + spare_blocks
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    owned, at = [], 0
    for n in need:
        owned.append(perm[at:at + n])
        at += n
    max_blocks = max([1, *need])
    tables = torch.full((len(specs), max_blocks), -1, dtype=torch.int32)
    for r, blocks in enumerate(owned):
        tables[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)

    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    k_cache[0] = 0
    v_cache[0] = 0
    for blocks in owned:
        for b in blocks:
            k_cache[b] = torch.randn(shape[1:], generator=gen).to(dtype)
            v_cache[b] = torch.randn(shape[1:], generator=gen).to(dtype)

    qsl, slots, bits = [0], [], []
    for s, blocks in zip(specs, owned):
        qsl.append(qsl[-1] + s.num_new)
        for i in range(s.num_new):
            j = s.ctx + i
            slots.append(blocks[j // block_size] * block_size + j % block_size)
        if s.parents is not None:
            bits += bits_from_parents(list(s.parents))
        else:
            bits += [chain_bits(min(i + 1, 64)) for i in range(s.num_new)]
    num_tokens = qsl[-1]
    q = torch.randn((num_tokens, heads, head_dim), generator=gen).to(dtype)
    meta = AttnMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        context_lens=torch.tensor([s.ctx for s in specs], dtype=torch.int32),
        block_tables=tables,
        is_tree=torch.tensor([s.parents is not None for s in specs], dtype=torch.bool),
        tree_bits=torch.tensor(bits, dtype=torch.int64),
        max_query_len=max([0, *(s.num_new for s in specs)]),
        max_kv_len=max([0, *(s.ctx + s.num_new for s in specs)]),
        query_start_loc_host=qsl,
    )
    return Batch(q, k_cache, v_cache, meta, list(specs), owned)


def _ancestors(parents: tuple[int, ...], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return sorted(out)


def naive_attention(batch: Batch, scale: float) -> torch.Tensor:
    """Dense float64 attention, one query at a time, keys listed explicitly (independent of bitmasks)."""
    q, kc, vc = batch.q.double(), batch.k_cache.double(), batch.v_cache.double()
    heads, kv_heads = q.shape[1], kc.shape[2]
    group = heads // kv_heads
    bs = kc.shape[1]
    out = torch.zeros_like(q)
    tok = 0
    for s, blocks in zip(batch.specs, batch.owned_blocks):
        for i in range(s.num_new):
            steps = _ancestors(s.parents, i) if s.parents is not None else list(range(i + 1))
            idx = list(range(s.ctx)) + [s.ctx + k for k in steps]
            b = torch.tensor([blocks[j // bs] for j in idx])
            o = torch.tensor([j % bs for j in idx])
            keys, vals = kc[b, o], vc[b, o]  # [n_keys, kv_heads, head_dim]
            for h in range(heads):
                w = torch.softmax(keys[:, h // group] @ q[tok, h] * scale, dim=0)
                out[tok, h] = w @ vals[:, h // group]
            tok += 1
    return out
