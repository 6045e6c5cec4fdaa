"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU: catches GPU-only lowering
errors (dot shapes, dtypes, layouts) that the interpreter cannot. Run in a process without TRITON_INTERPRET.

The attention kernels are compiled with the very parameters `tree_attention` launches for decode
(`attn_constexprs`, `merge_constexprs`): bf16, head dim 64 and 128, GQA group 1 / 4 / 8 (8 KV heads), plain decode
(1 query token) and verify trees (16 and 64 tokens), 1 to 256 requests, with and without split-K. `--quick` (CI)
compiles plain decode for each head dim and group plus one tree and one split-K launch; the full grid is the
`gpu`-marked test, run where the CPUs are fast.
"""

from __future__ import annotations

import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels.kv_commit import _copy_rows_kernel  # noqa: E402
from kernels.tree_attention import (_merge_splits_kernel, _tree_attn_kernel, _write_kv_kernel,  # noqa: E402
                                    attn_constexprs, merge_constexprs, write_kv_constexprs)

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
KV_HEADS = 8


KERNELS = {k.fn.__name__: k for k in (_tree_attn_kernel, _merge_splits_kernel, _write_kv_kernel, _copy_rows_kernel)}


def compile_kernel(job: tuple[str, dict[str, str], dict[str, object]]) -> None:
    name, types, constexprs = job
    kernel = KERNELS[name]
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    triton.compile(src, target=TARGET)


def attention_launches(quick: bool) -> list[tuple[torch.dtype, int, int, dict]]:
    """(dtype, heads, head_dim, constexprs) of distinct `_tree_attn_kernel` launches, deduplicated."""
    if quick:
        grid = [(torch.bfloat16, g, d, 1, 32, 1) for d in (64, 128) for g in (1, 4, 8)]  # plain decode
        grid += [(torch.bfloat16, 4, 128, 16, 32, 1), (torch.bfloat16, 8, 128, 1, 1, 4),  # a tree, split-K
                 (torch.float16, 4, 128, 16, 4, 1), (torch.float32, 4, 64, 4, 4, 1)]
    else:
        grid = list(itertools.product([torch.bfloat16], (1, 4, 8), (64, 128), (1, 16, 64), (1, 256), (1, 4)))
        grid += [(torch.float16, 4, 128, 16, 4, 1), (torch.float32, 4, 64, 4, 4, 1)]
    seen, launches = set(), []
    for dtype, group, head_dim, q_len, num_reqs, splits in grid:
        c = attn_constexprs(dtype, group, head_dim, q_len, num_reqs, num_splits=splits)
        key = (dtype, tuple(sorted(c.items())))
        if key not in seen:
            seen.add(key)
            launches.append((dtype, group * KV_HEADS, head_dim, c))
    return launches


def main(quick: bool) -> None:
    launches = attention_launches(quick)
    jobs, merges = [], set()
    for dtype, heads, head_dim, c in launches:
        splits = c["NUM_SPLITS"]
        types = {"q_ptr": PTR[dtype], "k_cache_ptr": PTR[dtype], "v_cache_ptr": PTR[dtype],
                 "out_ptr": PTR[dtype] if splits == 1 else "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                 "qsl_ptr": "*i32", "ctx_ptr": "*i32", "block_table_ptr": "*i32", "is_tree_ptr": "*i1",
                 "bits_ptr": "*i64", "scale_log2": "fp32"}
        jobs.append(("_tree_attn_kernel", types, c))
        if splits > 1 and (dtype, heads, head_dim, splits) not in merges:
            merges.add((dtype, heads, head_dim, splits))
            jobs.append(("_merge_splits_kernel", {"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                                                  "out_ptr": PTR[dtype]}, merge_constexprs(heads, head_dim, splits)))
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    for dtype, head_dim in itertools.product(dtypes, (64, 128)):
        ptr = PTR[dtype]
        jobs.append(("_write_kv_kernel", {"k_ptr": ptr, "v_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr,
                                          "slot_ptr": "*i64"}, write_kv_constexprs(KV_HEADS, head_dim)))
    for dtype, gather in itertools.product(dtypes, (True, False)):
        ptr = PTR[dtype]
        jobs.append(("_copy_rows_kernel", {"k_src_ptr": ptr, "v_src_ptr": ptr, "k_dst_ptr": ptr, "v_dst_ptr": ptr,
                                           "src_rows_ptr": "*i64", "dst_rows_ptr": "*i64",
                                           "src_layer_stride": "i64", "dst_layer_stride": "i64"},
                     dict(ROW=1024, BLOCK_R=16, BLOCK_E=256, GATHER=gather)))
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:  # compiles are CPU-bound
        list(pool.map(compile_kernel, jobs))
    print(f"compiled all kernels for sm_90 ({len(launches)} attention launches, {len(merges)} merges)")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
