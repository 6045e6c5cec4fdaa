"""Verify-pass attention benchmark (CUDA only): Triton tree attention vs SDPA with a dense mask vs the reference.

Each case is `requests` requests, each with a `ctx`-token paged context and a random `tree`-token draft tree
(tree = 1 is plain decode). Columns:
  triton  the paged tree-attention kernel (split-K chosen by its heuristic)
  sdpa    torch SDPA over K/V already gathered into dense [R, KVH, kv, D] tensors with a prebuilt dense mask
          (gathering and mask building excluded: a lower bound for the dense approach)
  ref     `tree_attention_reference` as the CPU path runs it (gather + mask + SDPA, every call)
Bandwidth counts the K/V bytes each request must read plus q and out, over the Triton time, as a fraction of
the HBM peak (--peak-gbps, default by device name: `PEAK_BYTES_PER_S`, e.g. H100 SXM 3350, H200 4800 GB/s).
`measure_case` is the one measurement; `python -m bench.gpu_check` reuses it.

    python -m bench.kernels                       # default grid
    python -m bench.kernels --requests 1 8 --tree 1 64 --ctx 8192 --dtype fp16
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from kernels.metadata import AttnMetadata, bits_from_parents
from kernels.reference import tree_attention_reference

# HBM peak by device name, first match wins (H100 SXM is "NVIDIA H100 80GB HBM3"); unknown devices: absolute only
PEAK_BYTES_PER_S = [("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H200", 4.8e12), ("H100", 3.35e12)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--tree", type=int, nargs="+", default=[1, 16, 64], help="tree tokens per request (<= 64)")
    p.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192], help="context tokens per request")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM peak; default from the device name")
    p.add_argument("--no-ref", action="store_true", help="skip the (slow) reference column")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def peak_bytes_per_s(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BYTES_PER_S if key in device_name), None)


def random_parents(n: int, rng: random.Random) -> list[int]:
    """A random tree listed parents-first, biased towards shallow bushy trees like beam drafts."""
    return [-1] + [rng.randint(max(0, i // 2 - 2), i - 1) for i in range(1, n)]


def make_case(num_reqs: int, tree: int, ctx: int, *, kv_heads: int, heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random q, paged caches with shuffled blocks, and tree metadata for one benchmark case."""
    rng = random.Random(seed)
    bs = block_size
    per_req = -(-(ctx + tree) // bs)
    perm = torch.randperm(num_reqs * per_req, device=device).to(torch.int32)
    tables = perm.view(num_reqs, per_req)
    cache_shape = (num_reqs * per_req, bs, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    bits = []
    for _ in range(num_reqs):
        bits += bits_from_parents(random_parents(tree, rng))
    qsl = [r * tree for r in range(num_reqs + 1)]
    j = torch.arange(ctx, ctx + tree, device=device)
    slots = (tables.long()[:, j // bs] * bs + j % bs).flatten()
    meta = AttnMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        context_lens=torch.full((num_reqs,), ctx, dtype=torch.int32, device=device),
        block_tables=tables,
        is_tree=torch.ones(num_reqs, dtype=torch.bool, device=device),
        tree_bits=torch.tensor(bits, dtype=torch.int64, device=device),
        max_query_len=tree,
        max_kv_len=ctx + tree,
        query_start_loc_host=qsl,
    )
    q = torch.randn((num_reqs * tree, heads, head_dim), dtype=dtype, device=device)
    return q, k_cache, v_cache, meta


def dense_inputs(q, k_cache, v_cache, meta: AttnMetadata, num_reqs: int, tree: int, ctx: int):
    """[R, H, tree, D] queries, [R, KVH, kv, D] keys/values and a [R, 1, tree, kv] bool mask for SDPA."""
    bs = k_cache.shape[1]
    j = torch.arange(ctx + tree, device=q.device)
    slots = meta.block_tables.long()[:, j // bs] * bs + j % bs  # [R, kv]
    k = k_cache.flatten(0, 1)[slots].transpose(1, 2).contiguous()
    v = v_cache.flatten(0, 1)[slots].transpose(1, 2).contiguous()
    bits = meta.tree_bits.view(num_reqs, tree)
    step = torch.arange(tree, device=q.device)
    tree_vis = ((bits[:, :, None] >> step[None, None, :]) & 1).bool()  # [R, tree, tree]
    mask = torch.cat([torch.ones(num_reqs, tree, ctx, dtype=torch.bool, device=q.device), tree_vis], dim=2)
    qd = q.view(num_reqs, tree, *q.shape[1:]).transpose(1, 2)
    return qd, k, v, mask[:, None]


def time_ms(fn, device: torch.device, repeats: int = 3) -> float:
    """triton's do_bench on CUDA; elsewhere the median of `repeats` calls after one warm-up."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_case(num_reqs: int, tree: int, ctx: int, *, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                 peak: float | None = None, with_ref: bool = True, seed: int = 0) -> dict:
    """One case's times (ms) for the Triton kernel, SDPA over prebuilt dense inputs and the reference, the
    Triton kernel's achieved bandwidth (bytes/s; fraction of `peak` when given) and its max error vs SDPA.
    A column that runs out of memory is None. On CPU the kernel needs TRITON_INTERPRET=1."""
    from kernels.tree_attention import tree_attention

    device = device or torch.device("cuda")
    row = {"requests": num_reqs, "tree": tree, "ctx": ctx, "triton_ms": None, "sdpa_ms": None, "ref_ms": None,
           "bytes_per_s": None, "frac_peak": None, "x_sdpa": None, "max_err": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        q, k_cache, v_cache, meta = make_case(num_reqs, tree, ctx, kv_heads=kv_heads, heads=heads,
                                              head_dim=head_dim, block_size=block_size, dtype=dtype,
                                              device=device, seed=seed)
    except torch.OutOfMemoryError:
        return row | {"error": "out of memory building the case"}
    scale = head_dim ** -0.5
    run = lambda: tree_attention(q, k_cache, v_cache, meta, scale)  # noqa: E731
    row["triton_ms"] = time_ms(run, device)
    try:
        qd, kd, vd, mask = dense_inputs(q, k_cache, v_cache, meta, num_reqs, tree, ctx)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)
        row["sdpa_ms"] = time_ms(sdpa, device)
        dense = sdpa().transpose(1, 2).reshape(q.shape)
        row["max_err"] = (run().float() - dense.float()).abs().max().item()
        del qd, kd, vd, mask, dense
    except torch.OutOfMemoryError:
        pass
    if with_ref:
        try:
            row["ref_ms"] = time_ms(lambda: tree_attention_reference(q, k_cache, v_cache, meta, scale), device)
        except torch.OutOfMemoryError:
            pass
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = num_reqs * (ctx + tree) * kv_heads * head_dim * 2 * elem  # K and V, read once per request
    row["bytes_per_s"] = (kv_bytes + 2 * q.numel() * elem) / (row["triton_ms"] * 1e-3)  # + q in, out
    row["frac_peak"] = row["bytes_per_s"] / peak if peak else None
    row["x_sdpa"] = row["sdpa_ms"] / row["triton_ms"] if row["sdpa_ms"] else None
    return row


def format_row(row: dict) -> str:
    def f(value, spec: str, width: int) -> str:
        return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"

    gbps = row["bytes_per_s"] / 1e9 if row["bytes_per_s"] else None
    pct = 100 * row["frac_peak"] if row["frac_peak"] is not None else None
    line = (f"{row['requests']:>5} {row['tree']:>5} {row['ctx']:>6} {f(row['triton_ms'], '.3f', 10)} "
            f"{f(row['sdpa_ms'], '.3f', 9)} {f(row['ref_ms'], '.3f', 9)} {f(gbps, '.0f', 8)} {f(pct, '.1f', 6)} "
            f"{f(row['x_sdpa'], '.2f', 7)} {f(row['max_err'], '.1e', 8)}")
    return line + (f"  ({row['error']})" if row.get("error") else "")


HEADER = (f"{'reqs':>5} {'tree':>5} {'ctx':>6} {'triton_ms':>10} {'sdpa_ms':>9} {'ref_ms':>9} "
          f"{'GB/s':>8} {'%peak':>6} {'x_sdpa':>7} {'max_err':>8}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (Triton kernels); none found, nothing to measure.")
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_gbps * 1e9 if args.peak_gbps else peak_bytes_per_s(name)
    print(f"# {name}, {args.dtype}, heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, "
          f"block {args.block_size}, peak {f'{peak / 1e9:.0f}' if peak else 'unknown'} GB/s")
    print(HEADER)
    for num_reqs in args.requests:
        for tree in args.tree:
            for ctx in args.ctx:
                row = measure_case(num_reqs, tree, ctx, heads=args.heads, kv_heads=args.kv_heads,
                                   head_dim=args.head_dim, block_size=args.block_size, dtype=DTYPES[args.dtype],
                                   device=device, peak=peak, with_ref=not args.no_ref, seed=args.seed)
                print(format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
