"""The one place that picks Triton kernels or torch references.

CUDA tensors use the Triton kernels; CPU tensors use the torch reference, unless TRITON_INTERPRET=1 is set,
which forces the Triton path (run by Triton's interpreter) so tests exercise the kernels on CPU.
ADASERVE_KERNELS=reference forces the torch references on every device (the baseline the CUDA kernels are tested
and timed against). Both variables are read at each call. Triton reads TRITON_INTERPRET when it is first imported,
so the kernel modules are imported lazily: a CPU run that never asks for Triton never imports it, and a test that
sets the variable first gets the interpreter.
"""

from __future__ import annotations

import os

import torch

from kernels.metadata import AttnMetadata
from kernels.reference import kv_commit_reference, tree_attention_reference, write_kv_reference


def use_triton(device: torch.device) -> bool:
    if os.environ.get("ADASERVE_KERNELS") == "reference":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if use_triton(k.device):
        from kernels.tree_attention import write_kv as write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata,
              scale: float) -> torch.Tensor:
    if use_triton(q.device):
        from kernels.tree_attention import tree_attention

        return tree_attention(q, k_cache, v_cache, meta, scale)
    return tree_attention_reference(q, k_cache, v_cache, meta, scale)


def kv_commit(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
              dst_slots: torch.Tensor) -> None:
    if use_triton(k_cache.device):
        from kernels.kv_commit import kv_commit as kv_commit_triton

        kv_commit_triton(k_cache, v_cache, src_slots, dst_slots)
    else:
        kv_commit_reference(k_cache, v_cache, src_slots, dst_slots)
