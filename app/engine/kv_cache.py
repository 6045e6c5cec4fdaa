"""Paged KV cache: a reference-counted block allocator with prefix caching, plus the cache tensors; request block
tables live on the requests.

Prefix caching (vLLM's automatic prefix caching; nano-vllm's block manager): a full block whose tokens are final
(computed) is registered under a hash of (its parent block's hash, its token ids), chained from a root hash of the
model identity (model, load format, dtype, block size). A new request maps the longest run of registered blocks that
starts its tokens (full blocks only, and never its last token: the step must compute at least one token to yield
logits) and prefills only the rest. Blocks are reference-counted; a registered block whose count drops to zero keeps
its hash in an LRU of evictable blocks and is reused (its hash forgotten) only when the free list runs out.

Writes (prefill chunks, decode roots, speculation's tree tokens, ``keep_accepted``'s moves) always land after a
request's computed tokens, i.e. in its own partial last block or in fresh blocks, never in a registered block, which
is full and computed. ``ensure_capacity(write_from=...)`` checks it all the same: a shared block (another reference,
or registered) that a write would land in is copied to a block of the request's own first (copy on write).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Protocol

import torch

from kernels import dispatch


class BlockAllocator:
    """Fixed-size, reference-counted blocks. Running out is a normal event the scheduler handles.

    A block is in use (count > 0), free, or evictable (count 0 but registered under a hash: its K/V may serve a
    later request's prefix). ``num_free`` counts both of the last two: an evictable block is reused when the free
    list is empty, least recently released first.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # count 0 and registered; least recent first
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> registered block
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered blocks, in use or evictable."""
        return len(self.cached)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks with count 1: free ones first, then the least recently released evictable ones."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self.cached[self.block_hash[b]]
                self.block_hash[b] = None
                self.num_evictions += 1
            self.ref_count[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Walked from the tail, so that a released table's last blocks (the least
        shared part of a prefix) are evicted before its first ones."""
        for b in reversed(blocks):
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"KV block {b} freed more often than it was taken")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if self.block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def touch(self, block: int) -> None:
        """One more reference to a registered block (a request maps it as part of its prefix)."""
        if self.ref_count[block] == 0:
            del self._evictable[block]
        self.ref_count[block] += 1

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def register(self, block: int, block_hash: bytes) -> bool:
        """Register a full, computed block under its hash; False if it is registered already or another block holds
        the same tokens (two requests computed the same prefix at once: the first stays, this one is freed plainly)."""
        if self.block_hash[block] is not None or block_hash in self.cached:
            return False
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block
        return True

    def forget_cached(self) -> None:
        """Unregister every registered block; all must be idle (evictable), and they become plainly free."""
        if len(self._evictable) != len(self.cached):
            raise RuntimeError("cannot forget the prefix cache while requests hold cached blocks")
        for b in self._evictable:
            self.block_hash[b] = None
        self._free.extend(reversed(self._evictable))
        self._evictable.clear()
        self.cached.clear()

    def is_shared(self, block: int) -> bool:
        """Writing into this block would change what someone else reads: another reference holds it, or it is
        registered (a later request may map it)."""
        return self.ref_count[block] > 1 or self.block_hash[block] is not None


class CachedRequest(Protocol):
    """What prefix caching reads and writes on a request (``app.engine.request.Request``)."""

    token_ids: list[int]
    block_ids: list[int]
    block_hashes: list[bytes]  # chained hashes of its full blocks of tokens, computed as needed
    num_computed_tokens: int
    num_registered_blocks: int  # leading blocks registered in the prefix cache


class KVCache:
    """Cache tensors [num_layers, num_blocks, block_size, kv_heads, head_dim] for K and V, plus the allocator.

    ``hidden`` [num_blocks, block_size, H], when set (prefix caching with a feature draft), keeps the target's
    final-normed hidden state beside each token's K/V: a request that maps a cached prefix hands them to the draft,
    which reads the target's hidden state of every token.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, *, prefix_caching: bool = False, identity: str = ""):
        self.k, self.v = k, v
        self.allocator = BlockAllocator(k.shape[1], k.shape[2])
        self.prefix_caching = prefix_caching
        self.root_hash = hashlib.blake2b(f"adaserve-kv|{identity}".encode(), digest_size=16).digest()
        self.hidden: torch.Tensor | None = None
        self.num_queried_tokens = 0  # tokens of admitted requests looked up in the prefix cache
        self.num_hit_tokens = 0  # of which the cache supplied
        self.num_cow_blocks = 0  # shared blocks copied before a write

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

    def ensure_capacity(self, block_ids: list[int], num_tokens: int, write_from: int | None = None) -> bool:
        """Grow a block table in place to hold num_tokens; False (and nothing taken) if blocks ran out.

        write_from: the first kv index the coming step writes; a shared block at or after it is first replaced by a
        private copy (copy on write), so that a write never changes a block another request or the prefix cache
        reads."""
        bs = self.block_size
        shared = []
        if write_from is not None:
            shared = [j for j in range(write_from // bs, min(len(block_ids), -(-num_tokens // bs)))
                      if self.allocator.is_shared(block_ids[j])]
        need = self.allocator.blocks_needed(num_tokens, len(block_ids)) + len(shared)
        if need == 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        if shared:
            self._copy_on_write(block_ids, shared)
        block_ids.extend(self.allocator.allocate(need - len(shared)))
        return True

    def _copy_on_write(self, block_ids: list[int], indices: list[int]) -> None:
        old = [block_ids[j] for j in indices]
        new = self.allocator.allocate(len(indices))
        src = torch.tensor(old, device=self.k.device)
        dst = torch.tensor(new, device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        if self.hidden is not None:
            self.hidden[dst] = self.hidden[src]
        for j, b in zip(indices, new):
            block_ids[j] = b
        self.allocator.free(old)
        self.num_cow_blocks += len(indices)

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
        logical kv index context_len + i and must end up at context_len + depth. Both lie at or after context_len,
        in blocks the tree's ``ensure_capacity(write_from=context_len)`` made the request's own.
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

    # ---- prefix caching --------------------------------------------------------------------------------------
    def block_hashes(self, req: CachedRequest, num_blocks: int) -> list[bytes]:
        """req.block_hashes extended to its first num_blocks full blocks: hash(parent hash, the block's token ids)."""
        bs, hashes, tokens = self.block_size, req.block_hashes, req.token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.root_hash
            hashes.append(hashlib.blake2b(parent + array("q", tokens[i * bs:(i + 1) * bs]).tobytes(),
                                          digest_size=16).digest())
        return hashes

    def match_prefix(self, req: CachedRequest) -> list[int]:
        """The registered blocks that hold req's longest cached prefix (full blocks, never its last token)."""
        if not self.prefix_caching:
            return []
        blocks: list[int] = []
        for i in range((len(req.token_ids) - 1) // self.block_size):
            b = self.allocator.lookup(self.block_hashes(req, i + 1)[i])
            if b is None:
                break
            blocks.append(b)
        return blocks

    def num_cached_prefix_tokens(self, req: CachedRequest) -> int:
        """Tokens of req the prefix cache would supply now (takes nothing)."""
        return len(self.match_prefix(req)) * self.block_size

    def acquire_prefix(self, req: CachedRequest) -> int:
        """Map req's longest cached prefix into its empty block table and count it computed; returns its length."""
        if req.block_ids:
            raise RuntimeError("acquire_prefix needs an empty block table")
        blocks = self.match_prefix(req)
        for b in blocks:
            self.allocator.touch(b)
        req.block_ids.extend(blocks)
        req.num_registered_blocks = len(blocks)
        req.num_computed_tokens = len(blocks) * self.block_size
        return req.num_computed_tokens

    def count_admission(self, num_tokens: int, num_cached_tokens: int) -> None:
        """A request was admitted with num_tokens tokens, num_cached_tokens of them from the prefix cache."""
        if self.prefix_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_cached_tokens

    def cache_full_blocks(self, req: CachedRequest, num_final_tokens: int | None = None) -> None:
        """Register req's full blocks whose tokens are all computed (their K/V is final) in the prefix cache;
        num_final_tokens, when given, says how many are (default: num_computed_tokens)."""
        if not self.prefix_caching:
            return
        final = req.num_computed_tokens if num_final_tokens is None else num_final_tokens
        n = min(final, len(req.token_ids)) // self.block_size
        n = min(n, len(req.block_ids))
        if n <= req.num_registered_blocks:
            return
        hashes = self.block_hashes(req, n)
        for i in range(req.num_registered_blocks, n):
            self.allocator.register(req.block_ids[i], hashes[i])
        req.num_registered_blocks = n

    def release_request(self, req: CachedRequest) -> None:
        """Drop req's references to its blocks (finished, preempted or sent back to wait); registered blocks stay
        in the cache as evictable. Its computed count is the caller's to reset."""
        self.release(req.block_ids)
        req.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (none may be in use): the next requests start from a cold cache."""
        self.allocator.forget_cached()

    def write_hidden(self, block_ids: list[int], start: int, hidden: torch.Tensor) -> None:
        """Keep the target's hidden states of kv indices start.. beside their K/V (when ``hidden`` is set)."""
        if self.hidden is not None and hidden.shape[0]:
            flat = self.hidden.view(-1, self.hidden.shape[-1])
            flat[torch.tensor(self.slots(block_ids, start, hidden.shape[0]), device=flat.device)] = hidden.to(flat.dtype)

    def read_hidden(self, block_ids: list[int], start: int, count: int) -> torch.Tensor:
        flat = self.hidden.view(-1, self.hidden.shape[-1])
        return flat[torch.tensor(self.slots(block_ids, start, count), device=flat.device)]

    def prefix_stats(self) -> dict:
        a = self.allocator
        return {
            "enabled": self.prefix_caching,
            "hit_tokens": self.num_hit_tokens,
            "queried_tokens": self.num_queried_tokens,
            "hit_rate": self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0,
            "cached_blocks": a.num_cached,
            "evictable_blocks": a.num_evictable,
            "evictions": a.num_evictions,
            "cow_blocks": self.num_cow_blocks,
        }
