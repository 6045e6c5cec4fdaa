"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU: catches GPU-only lowering
errors (dot shapes, dtypes, layouts) that the interpreter cannot. Run in a process without TRITON_INTERPRET."""

from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels.kv_commit import _copy_rows_kernel  # noqa: E402
from kernels.tree_attention import _merge_splits_kernel, _tree_attn_kernel, _write_kv_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def compile_kernel(kernel, types: dict[str, str], constexprs: dict[str, object], **options) -> None:
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    triton.compile(src, target=TARGET, options=options or None)


def main(quick: bool) -> None:
    grid = itertools.product(["fp16", "bf16"], [64, 128], [1, 4, 7], [1, 4])
    if quick:  # one config per dtype / head dim / split mode
        grid = [("fp16", 128, 4, 1), ("bf16", 64, 7, 4)]
    for dtype, head_dim, group, splits in grid:
        block_m = max(16, min(64, triton.next_power_of_2(group * 16)))
        types = {"q_ptr": PTR[dtype], "k_cache_ptr": PTR[dtype], "v_cache_ptr": PTR[dtype],
                 "out_ptr": PTR[dtype] if splits == 1 else "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                 "qsl_ptr": "*i32", "ctx_ptr": "*i32", "block_table_ptr": "*i32", "is_tree_ptr": "*i1",
                 "bits_ptr": "*i64", "scale_log2": "fp32"}
        compile_kernel(_tree_attn_kernel, types, dict(
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_Q=block_m // group, BLOCK_M=block_m,
            BLOCK_N=64, BLOCK_R=256, NUM_SPLITS=splits, PRECISION="tf32"))
        if splits > 1:
            compile_kernel(_merge_splits_kernel, {"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                                                  "out_ptr": PTR[dtype]},
                           dict(HEAD_DIM=head_dim, ROW=32 * head_dim, BLOCK_E=1024, BLOCK_S=splits))
    compile_kernel(_tree_attn_kernel, {k: "*fp32" for k in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr",
                                                             "m_ptr", "l_ptr")} | {
        "qsl_ptr": "*i32", "ctx_ptr": "*i32", "block_table_ptr": "*i32", "is_tree_ptr": "*i1",
        "bits_ptr": "*i64", "scale_log2": "fp32"}, dict(
        GROUP=4, HEAD_DIM=64, BLOCK_D=64, BLOCK_Q=4, BLOCK_M=16, BLOCK_N=64, BLOCK_R=4, NUM_SPLITS=1,
        PRECISION="ieee"))
    for dtype in ["fp16", "bf16"]:
        compile_kernel(_write_kv_kernel, {"k_ptr": PTR[dtype], "v_ptr": PTR[dtype], "k_cache_ptr": PTR[dtype],
                                          "v_cache_ptr": PTR[dtype], "slot_ptr": "*i64"},
                       dict(KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128))
        for gather in (True, False):
            compile_kernel(_copy_rows_kernel, {"k_src_ptr": PTR[dtype], "v_src_ptr": PTR[dtype],
                                               "k_dst_ptr": PTR[dtype], "v_dst_ptr": PTR[dtype],
                                               "src_rows_ptr": "*i64", "dst_rows_ptr": "*i64",
                                               "src_layer_stride": "i64", "dst_layer_stride": "i64"},
                           dict(ROW=1024, BLOCK_R=16, BLOCK_E=256, GATHER=gather))
    print("compiled all kernels for sm_90")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
