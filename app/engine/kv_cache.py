"""Paged KV cache: a block allocator plus the cache tensors; request block tables live on the requests."""

from __future__ import annotations

import torch

from kernels import dispatch


class BlockAllocator:
    """Fixed-size blocks from a free list. Running out is a normal event the scheduler handles."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """Cache tensors [num_layers, num_blocks, block_size, kv_heads, head_dim] for K and V, plus the allocator."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.allocator = BlockAllocator(k.shape[1], k.shape[2])

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def slots(self, block_ids: list[int], start: int, count: int) -> list[int]:
        """Flat cache slots of logical kv indices [start, start + count) of one request."""
        bs = self.block_size
        return [block_ids[j // bs] * bs + j % bs for j in range(start, start + count)]

    def ensure_capacity(self, block_ids: list[int], num_tokens: int) -> bool:
        """Grow a block table in place to hold num_tokens; False (and nothing taken) if blocks ran out."""
        need = self.allocator.blocks_needed(num_tokens, len(block_ids))
        if need == 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        block_ids.extend(self.allocator.allocate(need))
        return True

    def trim(self, block_ids: list[int], num_tokens: int) -> None:
        """Release the blocks past the first num_tokens entries (e.g. rejected speculative tokens)."""
        keep = -(-num_tokens // self.block_size)
        if len(block_ids) > keep:
            self.allocator.free(block_ids[keep:])
            del block_ids[keep:]

    def release(self, block_ids: list[int]) -> None:
        self.allocator.free(block_ids)
        block_ids.clear()

    def keep_accepted(self, moves: list[tuple[list[int], int, list[int]]]) -> None:
        """Make each request's cache hold exactly its accepted path.

        moves: (block_ids, context_len, accepted step indices in path order) per request; step index i lives at
        logical kv index context_len + i and must end up at context_len + depth.
        """
        src: list[int] = []
        dst: list[int] = []
        for block_ids, context_len, path in moves:
            for depth, i in enumerate(path):
                if i != depth:
                    src.extend(self.slots(block_ids, context_len + i, 1))
                    dst.extend(self.slots(block_ids, context_len + depth, 1))
        if src:
            dev = self.k.device
            dispatch.kv_commit(self.k, self.v, torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
