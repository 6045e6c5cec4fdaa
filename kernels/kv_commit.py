"""Triton KV commit: move the accepted path's K/V entries to their final slots, in every layer at once.

Within a request the accepted node with step index i_k goes to logical index context_len + k with i_k >= k, so
sources and destinations of one request overlap (path [0, 2, 3] -> [0, 1, 2] reads slot 2 and writes it).
Parallel programs would race on such slots, so the copy is gather-then-scatter: one launch gathers every
source row into a small scratch buffer, a second launch scatters it. Both launches touch only the listed
slots, so other requests' blocks (and the rest of this request's) stay byte-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.tree_attention import launchable


@triton.jit
def _copy_rows_kernel(
    k_src_ptr, v_src_ptr, k_dst_ptr, v_dst_ptr, src_rows_ptr, dst_rows_ptr,
    num_rows, src_layer_stride, dst_layer_stride,
    ROW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Copy rows of ROW elements for one layer: src row src_rows[i] (GATHER) or i -> dst row i or dst_rows[i]."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    layer = tl.program_id(1).to(tl.int64)
    r_ok = offs_r < num_rows
    if GATHER:
        src = tl.load(src_rows_ptr + offs_r, mask=r_ok, other=0).to(tl.int64)
        dst = offs_r.to(tl.int64)
    else:
        src = offs_r.to(tl.int64)
        dst = tl.load(dst_rows_ptr + offs_r, mask=r_ok, other=0).to(tl.int64)
    src_base = layer * src_layer_stride + src * ROW  # [BLOCK_R]
    dst_base = layer * dst_layer_stride + dst * ROW
    for e0 in range(0, ROW, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask = r_ok[:, None] & (offs_e < ROW)[None, :]
        k = tl.load(k_src_ptr + src_base[:, None] + offs_e[None, :], mask=mask)
        v = tl.load(v_src_ptr + src_base[:, None] + offs_e[None, :], mask=mask)
        tl.store(k_dst_ptr + dst_base[:, None] + offs_e[None, :], k, mask=mask)
        tl.store(v_dst_ptr + dst_base[:, None] + offs_e[None, :], v, mask=mask)


def kv_commit(
    k_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,  # [n] int64 flat slots of accepted entries
    dst_slots: torch.Tensor,  # [n] int64 flat slots they must end up in (distinct)
) -> None:
    """Same contract as `kv_commit_reference`: cache[:, dst] = cache[:, src] as one simultaneous copy."""
    n = src_slots.numel()
    if n == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "kv_commit needs contiguous caches"
    num_layers = k_cache.shape[0]
    row = k_cache.shape[3] * k_cache.shape[4]  # kv_heads * head_dim elements per slot
    slots_per_layer = k_cache.shape[1] * k_cache.shape[2]
    k_tmp = torch.empty((num_layers, n, row), dtype=k_cache.dtype, device=k_cache.device)
    v_tmp = torch.empty_like(k_tmp)
    on_gpu = k_cache.device.type == "cuda"
    block_r = 16 if on_gpu else triton.next_power_of_2(n)
    block_e = min(triton.next_power_of_2(row), 256 if on_gpu else 1 << 20)
    grid = (triton.cdiv(n, block_r), num_layers)
    kernel = launchable(_copy_rows_kernel, k_cache.device)
    common = dict(ROW=row, BLOCK_R=block_r, BLOCK_E=block_e)
    kernel[grid](k_cache, v_cache, k_tmp, v_tmp, src_slots, src_slots, n,
                 slots_per_layer * row, n * row, GATHER=True, **common)
    kernel[grid](k_tmp, v_tmp, k_cache, v_cache, dst_slots, dst_slots, n,
                 n * row, slots_per_layer * row, GATHER=False, **common)
