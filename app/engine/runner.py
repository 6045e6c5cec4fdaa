"""Turns per-request token lists into one flat batch of tensors and runs a model over it.

The same runner serves the target (prefill chunks, decodes, tree verification) and a draft model (its own KV
cache): a sequence is a run of new tokens after `context_len` cached ones, causal or shaped as a tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel
from kernels.metadata import AttnMetadata, bits_from_parents


@dataclass
class SeqInput:
    block_ids: list[int]
    context_len: int  # tokens of this request already in the cache
    token_ids: list[int]  # new tokens; K/V goes to logical indices context_len + i
    parents: list[int] | None = None  # tree: parent step index per token (-1 for the first); None = causal chain
    logits: str = "last"  # "last" | "all" | "none": which tokens' logits to return


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [num_tokens, hidden] final-normed
    logits: torch.Tensor  # [num_logit_rows, vocab] float32
    logit_rows: list[list[int]]  # per sequence, row indices into `logits`
    token_rows: list[list[int]]  # per sequence, row indices into `hidden`


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache):
        self.model, self.kv = model, kv_cache
        self.device = model.device

    def build(self, seqs: list[SeqInput]) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bits: list[int] = []
        qsl = [0]
        logit_rows: list[int] = []
        max_blocks = max((len(s.block_ids) for s in seqs), default=0)
        for s in seqs:
            n = len(s.token_ids)
            start = len(input_ids)
            input_ids.extend(s.token_ids)
            if s.parents is None:
                positions.extend(range(s.context_len, s.context_len + n))
                bits.extend([0] * n)
            else:
                depth: list[int] = []
                for p in s.parents:
                    depth.append(0 if p < 0 else depth[p] + 1)
                positions.extend(s.context_len + d for d in depth)
                bits.extend(bits_from_parents(s.parents))
            slots.extend(self.kv.slots(s.block_ids, s.context_len, n))
            qsl.append(start + n)
            if s.logits == "all":
                logit_rows.extend(range(start, start + n))
            elif s.logits == "last" and n:
                logit_rows.append(start + n - 1)
        dev = self.device
        tables = torch.full((len(seqs), max(max_blocks, 1)), -1, dtype=torch.int32)
        for r, s in enumerate(seqs):
            if s.block_ids:
                tables[r, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        q_lens = [qsl[i + 1] - qsl[i] for i in range(len(seqs))]
        meta = AttnMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            context_lens=torch.tensor([s.context_len for s in seqs], dtype=torch.int32),
            block_tables=tables,
            is_tree=torch.tensor([s.parents is not None for s in seqs], dtype=torch.bool),
            tree_bits=torch.tensor(bits, dtype=torch.int64),
            max_query_len=max(q_lens, default=0),
            max_kv_len=max((s.context_len + len(s.token_ids) for s in seqs), default=0),
            query_start_loc_host=qsl,
        )
        if dev.type != "cpu":
            meta = meta.to(dev)
        return (torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta, logit_rows)

    def run(self, seqs: list[SeqInput], input_embeds: torch.Tensor | None = None) -> ForwardOutput:
        """input_embeds: [num_tokens, hidden] instead of embedding the token ids (feature drafts)."""
        input_ids, positions, meta, rows = self.build(seqs)
        hidden = self.model.forward(input_ids, positions, meta, self.kv.tensors, input_embeds=input_embeds)
        logits = self.model.logits(hidden[rows]) if rows else hidden.new_zeros((0, self.model.config.vocab_size))
        # Map flat rows back to sequences.
        logit_rows, token_rows = [], []
        cursor = 0
        qsl = meta.query_start_loc_host
        for i, s in enumerate(seqs):
            token_rows.append(list(range(qsl[i], qsl[i + 1])))
            k = len(s.token_ids) if s.logits == "all" else (1 if s.logits == "last" and s.token_ids else 0)
            logit_rows.append(list(range(cursor, cursor + k)))
            cursor += k
        return ForwardOutput(hidden=hidden, logits=logits, logit_rows=logit_rows, token_rows=token_rows)
