"""Verify-pass attention benchmark (CUDA only): Triton tree attention vs SDPA with a dense mask vs the reference.

Each case is `requests` requests, each with a `ctx`-token paged context and a random `tree`-token draft tree
(tree = 1 is plain decode). Columns:
  triton  the paged tree-attention kernel (split-K chosen by its heuristic)
  sdpa    torch SDPA over K/V already gathered into dense [R, KVH, kv, D] tensors with a prebuilt dense mask
          (gathering and mask building excluded: a lower bound for the dense approach)
  ref     `tree_attention_reference` as the CPU path runs it (gather + mask + SDPA, every call)
Bandwidth counts the K/V bytes each request must read plus q and out, over the Triton time, as a fraction of
the HBM peak (--peak-gbps, default by device name: H200 4800, H100 3350 GB/s).

    python -m bench.kernels                       # default grid
    python -m bench.kernels --requests 1 8 --tree 1 64 --ctx 8192 --dtype fp16
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from kernels.metadata import AttnMetadata, bits_from_parents
from kernels.reference import tree_attention_reference

PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def random_parents(n: int, rng: random.Random) -> list[int]:
    """A random tree listed parents-first, biased towards shallow bushy trees like beam drafts."""
    return [-1] + [rng.randint(max(0, i // 2 - 2), i - 1) for i in range(1, n)]


def make_case(num_reqs: int, tree: int, ctx: int, args: argparse.Namespace, device: torch.device):
    """Random q, paged caches with shuffled blocks, and tree metadata for one benchmark case."""
    rng = random.Random(args.seed)
    bs, dtype = args.block_size, DTYPES[args.dtype]
    per_req = -(-(ctx + tree) // bs)
    perm = torch.randperm(num_reqs * per_req, device=device).to(torch.int32)
    tables = perm.view(num_reqs, per_req)
    cache_shape = (num_reqs * per_req, bs, args.kv_heads, args.head_dim)
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
    q = torch.randn((num_reqs * tree, args.heads, args.head_dim), dtype=dtype, device=device)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (Triton kernels); none found, nothing to measure.")
        return 0
    import triton.testing

    from kernels.tree_attention import tree_attention

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    elem = torch.finfo(DTYPES[args.dtype]).bits // 8
    scale = args.head_dim ** -0.5
    print(f"# {name}, {args.dtype}, heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, "
          f"block {args.block_size}, peak {peak or 'unknown'} GB/s")
    print(f"{'reqs':>5} {'tree':>5} {'ctx':>6} {'triton_ms':>10} {'sdpa_ms':>9} {'ref_ms':>9} "
          f"{'GB/s':>8} {'%peak':>6} {'x_sdpa':>7} {'max_err':>8}")

    for num_reqs in args.requests:
        for tree in args.tree:
            for ctx in args.ctx:
                torch.cuda.empty_cache()
                try:
                    q, k_cache, v_cache, meta = make_case(num_reqs, tree, ctx, args, device)
                except torch.OutOfMemoryError:
                    print(f"{num_reqs:>5} {tree:>5} {ctx:>6}  (out of memory building the case)")
                    continue
                run = lambda: tree_attention(q, k_cache, v_cache, meta, scale)  # noqa: E731
                t_tri = triton.testing.do_bench(run)
                t_sdpa = t_ref = float("nan")
                err = float("nan")
                try:
                    qd, kd, vd, mask = dense_inputs(q, k_cache, v_cache, meta, num_reqs, tree, ctx)
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                        qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=args.heads != args.kv_heads)
                    t_sdpa = triton.testing.do_bench(sdpa)
                    dense = sdpa().transpose(1, 2).reshape(q.shape)
                    err = (run().float() - dense.float()).abs().max().item()
                    del qd, kd, vd, mask
                except torch.OutOfMemoryError:
                    pass
                if not args.no_ref:
                    try:
                        t_ref = triton.testing.do_bench(
                            lambda: tree_attention_reference(q, k_cache, v_cache, meta, scale))
                    except torch.OutOfMemoryError:
                        pass
                kv_bytes = num_reqs * (ctx + tree) * args.kv_heads * args.head_dim * 2 * elem
                gbps = (kv_bytes + 2 * q.numel() * elem) / (t_tri * 1e-3) / 1e9
                frac = f"{100 * gbps / peak:6.1f}" if peak else f"{'n/a':>6}"
                print(f"{num_reqs:>5} {tree:>5} {ctx:>6} {t_tri:>10.3f} {t_sdpa:>9.3f} {t_ref:>9.3f} "
                      f"{gbps:>8.0f} {frac} {t_sdpa / t_tri:>7.2f} {err:>8.1e}", flush=True)
                del q, k_cache, v_cache, meta
    return 0


if __name__ == "__main__":
    sys.exit(main())
