"""Triton tree attention over the paged KV cache, plus the Triton store of new K/V by slot mapping.

One launch covers the whole flat varlen batch. A program owns (query block of one request, one KV head,
one KV split): its rows are BLOCK_Q query tokens x GROUP query heads that share the KV head (GQA), so every
K/V tile is loaded once for the whole group. Keys are walked in tiles of BLOCK_N logical indices with an
online softmax; each key's cache slot comes from the request's block table. Context keys are always visible;
a step key is visible by causality (chain requests) or by the query's ancestor bitmask (tree requests), so a
causal prefill or decode is just the chain special case of the same loop.

Split-K: with few programs and long contexts the KV range of each program is cut into NUM_SPLITS pieces
whose partial (acc, max, sum) are merged by a second small kernel.

Query blocks need no host sync: program `pid` belongs to the request r with
qsl[r] // BLOCK_Q + r <= pid < qsl[r+1] // BLOCK_Q + r + 1 (each request gets at least as many slots as it
has query blocks, and the grid is num_tokens // BLOCK_Q + num_reqs programs long).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.metadata import AttnMetadata

_LOG2E = 1.4426950408889634


def launchable(kernel, device: torch.device):
    """The kernel as it can run on `device`: compiled for CUDA tensors, interpreted for CPU tensors.

    `triton.jit` fixes compiled vs interpreted at decoration time, from TRITON_INTERPRET when the module is
    imported, and triton's own library (tl.sum, tl.max, ...) when triton is first imported - often by another
    library (transformers imports it). So CPU tensors need only TRITON_INTERPRET=1 *while the kernel runs*:
    a compiled kernel is wrapped in the interpreter here, whatever the import order.
    """
    if device.type == "cuda":
        return kernel
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("Triton kernels on CPU tensors run in Triton's interpreter: set TRITON_INTERPRET=1")
    _enable_late_interpreter()
    return _interpreted(kernel)


def _interpreted(fn):
    """`fn` (a JITFunction, or already interpreted) as an InterpretedFunction, cached."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(fn, triton.runtime.JITFunction):
        return fn
    if id(fn) not in _INTERPRETED:  # by id: hashing a JITFunction parses its source
        _INTERPRETED[id(fn)] = InterpretedFunction(fn.fn)
    return _INTERPRETED[id(fn)]


_INTERPRETED: dict[int, object] = {}  # id(JITFunction) -> InterpretedFunction; JITFunctions live for good


def _enable_late_interpreter() -> None:
    """Two small patches of triton 3.6, applied once and only on the interpreted CPU path.

    1. Calls from an interpreted kernel into compiled-mode @jit helpers (triton's own tl.sum, tl.max, ...
       when triton was imported without TRITON_INTERPRET, and our helpers) run them interpreted too;
       JITFunction.__call__ otherwise always raises, so compiled kernels are unaffected.
    2. Interpreter scalars are 1-element arrays and loop bounds go through int(array), which numpy >= 2.4
       rejects (triton-lang/triton#9171; fixed upstream by squeezing first).
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_adaserve_patched", False):
        return
    raise_outside_kernel = triton.runtime.JITFunction.__call__

    def call_jit(self, *args, **kwargs):
        if not triton.knobs.runtime.interpret:
            return raise_outside_kernel(self, *args, **kwargs)
        return _interpreted(self)(*args, **kwargs)

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_index(tensor, scope) -> None:
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    triton.runtime.JITFunction.__call__ = call_jit
    interpreter._patch_lang_tensor = patch_lang_tensor_index
    interpreter._adaserve_patched = True


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, bits, step_q, tile_lo, tile_hi, kv_end, ctx, is_tree,
    k_cache_ptr, v_cache_ptr, block_row_ptr, block_size, kv_head, scale_log2,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online-softmax update over KV tiles [tile_lo, tile_hi) of one request (log2 domain).

    Unmasked tiles lie wholly in the committed context; masked tiles apply length, causal and tree masks.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        blk = tl.load(block_row_ptr + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
        in_blk = offs_n % block_size
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + (blk * stride_kb + in_blk * stride_ks + kv_head * stride_kh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + (blk * stride_vb + in_blk * stride_vs + kv_head * stride_vh)[:, None]
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            step_k = offs_n - ctx  # negative = committed context, always visible
            causal_ok = step_k[None, :] <= step_q[:, None]
            shift = tl.minimum(tl.maximum(step_k, 0), 63).to(tl.int64)
            tree_ok = ((bits[:, None] >> shift[None, :]) & 1) != 0
            visible = (step_k < 0)[None, :] | tl.where(is_tree, tree_ok, causal_ok)
            s = tl.where(visible & n_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tree_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, m_ptr, l_ptr,
    qsl_ptr, ctx_ptr, block_table_ptr, is_tree_ptr, bits_ptr,
    num_reqs, block_size, scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_os, stride_ot, stride_oh,  # output, or fp32 partials [split, token, head, dim] when split
    stride_ms, stride_mt,  # partial max / sum [split, token, head], contiguous over heads
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which request owns this query block (branch-free count over the monotone block starts).
    offs_r = tl.arange(0, BLOCK_R)
    starts = tl.load(qsl_ptr + offs_r, mask=offs_r < num_reqs, other=0)
    first_blk = starts // BLOCK_Q + offs_r
    req = tl.sum(((first_blk <= pid) & (offs_r < num_reqs)).to(tl.int32), axis=0) - 1
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    q_first = (pid - (q_start // BLOCK_Q + req)) * BLOCK_Q  # first step index of this block
    ctx = tl.load(ctx_ptr + req)
    is_tree = tl.load(is_tree_ptr + req) != 0

    # Rows: query token (step index) x query head of this KV head's group.
    offs_m = tl.arange(0, BLOCK_M)
    step_q = q_first + offs_m // GROUP  # [BLOCK_M]
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (step_q < q_len)
    tok = q_start + step_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    bits = tl.load(bits_ptr + tok, mask=row_ok, other=0)  # [BLOCK_M] int64 ancestor-or-self mask

    # Keys this block may see: the context plus step tokens up to its last query (all, for a tree).
    q_hi = tl.minimum(q_len, q_first + BLOCK_Q)
    kv_end = ctx + tl.where(is_tree, q_len, q_hi)
    num_tiles = tl.where(q_first < q_len, tl.cdiv(kv_end, BLOCK_N), 0)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    # Tiles wholly inside the context need no mask; the rest (context tail + step tokens) do.
    full_tiles = ctx // BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, bits, step_q, tile_lo, tl.minimum(tile_hi, full_tiles), kv_end, ctx, is_tree,
        k_cache_ptr, v_cache_ptr, block_table_ptr + req * stride_bt, block_size, kv_head, scale_log2,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, MASKED=False)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, bits, step_q, tl.maximum(tile_lo, full_tiles), tile_hi, kv_end, ctx, is_tree,
        k_cache_ptr, v_cache_ptr, block_table_ptr + req * stride_bt, block_size, kv_head, scale_log2,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, MASKED=True)

    o_ptrs = out_ptr + split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, acc, mask=o_mask)
        ml_off = split * stride_ms + tok * stride_mt + head
        tl.store(m_ptr + ml_off, m_i, mask=row_ok)
        tl.store(l_ptr + ml_off, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, num_splits, num_tokens,
    HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s (log2 domain).

    All buffers are contiguous; a program merges BLOCK_E of one token's ROW = heads * head_dim elements.
    """
    tok = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_s < num_splits)[:, None] & (offs_e < ROW)[None, :]
    row = offs_s[:, None] * num_tokens + tok  # [BLOCK_S, 1] (split, token) row index
    ml = row * (ROW // HEAD_DIM) + (offs_e // HEAD_DIM)[None, :]  # each element's (split, token, head)
    m = tl.load(m_ptr + ml, mask=mask, other=float("-inf"))  # [BLOCK_S, BLOCK_E]
    l = tl.load(l_ptr + ml, mask=mask, other=0.0)
    part = tl.load(part_ptr + row * ROW + offs_e[None, :], mask=mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max[None, :]))
    den = tl.sum(l * w, axis=0)
    out = tl.sum(part * w, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + tok * ROW + offs_e, out.to(out_ptr.dtype.element_ty), mask=offs_e < ROW)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    blk = tl.maximum(slot, 0) // block_size
    in_blk = tl.maximum(slot, 0) % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :] & (slot >= 0)
    k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + blk * stride_kcb + in_blk * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + in_blk * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_programs: int, max_kv_len: int, device: torch.device) -> int:
    """Split the KV range only when the grid cannot fill the GPU and each split still reads >= 512 keys."""
    if device.type != "cuda" or max_kv_len < 1024:
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if num_programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, num_programs), max_kv_len // 512, 16))


def attn_constexprs(dtype: torch.dtype, group: int, head_dim: int, max_query_len: int, num_reqs: int, *,
                    num_splits: int = 1, on_gpu: bool = True, block_m: int | None = None,
                    block_n: int | None = None) -> dict:
    """`_tree_attn_kernel`'s compile-time parameters for one launch (tests/kernels/sm90_compile.py compiles these)."""
    # Rows per program: up to 64 (query tokens x group heads); fewer when queries are short (decode).
    if block_m is None:
        block_m = min(64, triton.next_power_of_2(max(1, max_query_len) * group))
    block_m = max(16, block_m, triton.next_power_of_2(group))
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_m // group,
                BLOCK_M=block_m, BLOCK_N=block_n or (64 if on_gpu else 32),
                BLOCK_R=triton.next_power_of_2(max(16, num_reqs)), NUM_SPLITS=num_splits,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def merge_constexprs(num_heads: int, head_dim: int, num_splits: int, on_gpu: bool = True) -> dict:
    """`_merge_splits_kernel`'s compile-time parameters."""
    row = num_heads * head_dim
    return dict(HEAD_DIM=head_dim, ROW=row, BLOCK_E=min(triton.next_power_of_2(row), 1024 if on_gpu else 1 << 20),
                BLOCK_S=triton.next_power_of_2(num_splits))


def tree_attention(
    q: torch.Tensor,  # [num_tokens, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [num_tokens, heads, head_dim]
    """Triton tree attention; same contract as `tree_attention_reference` (the keyword knobs are for tests)."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or meta.num_reqs == 0:
        return out
    assert num_heads % kv_heads == 0, "query heads must be a multiple of KV heads"
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    group = num_heads // kv_heads
    on_gpu = q.device.type == "cuda"

    c = attn_constexprs(q.dtype, group, head_dim, meta.max_query_len, meta.num_reqs, on_gpu=on_gpu,
                        block_m=block_m, block_n=block_n)
    num_qblocks = num_tokens // c["BLOCK_Q"] + meta.num_reqs
    if num_splits is None:
        num_splits = choose_num_splits(num_qblocks * kv_heads, meta.max_kv_len, q.device)
    c["NUM_SPLITS"] = num_splits

    if num_splits == 1:
        dst, m_buf, l_buf = out, out, out  # m/l unused
        s_os, s_ot, s_oh = 0, out.stride(0), out.stride(1)
        s_ms = s_mt = 0
    else:
        dst = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
        m_buf = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
        l_buf = torch.empty_like(m_buf)
        s_os, s_ot, s_oh = dst.stride(0), dst.stride(1), dst.stride(2)
        s_ms, s_mt = m_buf.stride(0), m_buf.stride(1)

    grid = (num_qblocks, kv_heads, num_splits)
    kernel = launchable(_tree_attn_kernel, q.device)
    kernel[grid](
        q, k_cache, v_cache, dst, m_buf, l_buf,
        meta.query_start_loc, meta.context_lens, meta.block_tables, meta.is_tree, meta.tree_bits,
        meta.num_reqs, k_cache.shape[1], scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        s_os, s_ot, s_oh, s_ms, s_mt,
        meta.block_tables.stride(0), **c,
    )
    if num_splits > 1:
        mc = merge_constexprs(num_heads, head_dim, num_splits, on_gpu)
        merge = launchable(_merge_splits_kernel, q.device)
        merge[(num_tokens, triton.cdiv(mc["ROW"], mc["BLOCK_E"]))](dst, m_buf, l_buf, out, num_splits, num_tokens, **mc)
    return out


def write_kv(
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Store each token's K/V at its flat cache slot; one program per token."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache must be contiguous in head_dim"
    kernel = launchable(_write_kv_kernel, k.device)
    kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        **write_kv_constexprs(kv_heads, head_dim),
    )


def write_kv_constexprs(kv_heads: int, head_dim: int) -> dict:
    """`_write_kv_kernel`'s compile-time parameters."""
    return dict(KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
                BLOCK_D=triton.next_power_of_2(head_dim))
