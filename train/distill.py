"""Train the distilled draft for the embedded target (SmolLM2-135M-Instruct) on CPU.

    python -m train.distill --out-dir /tmp/draft-run [--minutes 45] [--quick] [--resume]

Data (all local, nothing held out for evaluation is touched: MT-Bench and HumanEval are never read here):
- ShareGPT conversations, formatted with the target's chat template, cut into `--seq-len` chunks, with the
  target's next-token distribution computed on the fly (teacher forcing, bf16 at prefill speed).
- Self-distillation: the target's own greedy answers to ShareGPT prompts (`--self-distill N` prompts, generated
  once with the engine and cached in the run directory); `--self-distill-frac` of every batch comes from them.
Loss: KL(target || draft) over the draft's vocabulary (a frequency-ranked subset of `--vocab-subset` rows, both
distributions renormalised over it). The draft's layers are initialised from target layers `--init-layers`.

Resumable: every `--ckpt-every` steps the run directory gets `ckpt.pt` (params, optimiser, step, data cursors,
RNG) and `draft.safetensors` (the shipped format); `--resume` continues from ckpt.pt. Seeded (`--seed`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.engine.layers import rms_norm
from app.engine.model import LlamaModel
from app.engine.weights import Checkpoint, load_checkpoint, load_tokenizer
from bench.datasets import iter_sharegpt_conversations
from train.export import save_draft_weights, save_feature_draft
from train.forward import dense_forward, feature_forward_train, fused_layer, rope_for_length


@dataclass
class TrainConfig:
    out_dir: str = "/tmp/adaserve-draft"
    target: str = "embedded"
    kind: str = "layers"  # "layers": token-only decoder layers; "feature": EAGLE style, reads the target's features
    passes: int = 3  # feature kind: unrolled passes over the draft's own estimates (training-time test)
    feature_loss_weight: float = 0.1  # feature kind: smooth-L1 of g vs the target's next feature, added to the KL
    init_layers: str = "0,29"  # target layers the draft's layers start from (their count = draft depth)
    vocab_subset: int = 16384  # 0 = full vocabulary head
    vocab_count_convs: int = 3000  # ShareGPT conversations used to rank token frequencies
    seq_len: int = 256
    batch_size: int = 8
    max_chunks_per_conv: int = 2
    steps: int = 1500  # cosine schedule length (the run may stop earlier on --minutes)
    minutes: float = 0.0  # wall-clock limit for this invocation (0 = none)
    lr: float = 3e-4
    min_lr_frac: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_convs: int = 64  # the first conversations are validation, training starts after them
    val_chunks: int = 16
    eval_every: int = 100
    ckpt_every: int = 50
    self_distill: int = 256  # prompts answered greedily by the target (0 = off)
    self_distill_tokens: int = 128
    self_distill_frac: float = 0.25
    seed: int = 0
    threads: int = 1  # torch threads (0 = torch default); 1 is far faster when the cores are shared
    export: str = ""  # also copy draft.safetensors here at every checkpoint
    quick: bool = False
    resume: bool = False


QUICK = dict(vocab_subset=8192, vocab_count_convs=200, seq_len=128, batch_size=4, steps=400, minutes=1.0,
             lr=1e-3, warmup=5, val_convs=8, val_chunks=4, eval_every=10**9, ckpt_every=10**9, self_distill=4,
             self_distill_tokens=16)


# ---- data ----------------------------------------------------------------------------------------------------

def format_conversation(tokenizer, messages: list[dict], max_chars: int) -> list[int]:
    kept, total = [], 0
    for m in messages:
        kept.append({"role": m["role"], "content": m["content"][: max(1, max_chars - total)]})
        total += len(kept[-1]["content"])
        if total >= max_chars:
            break
    return list(tokenizer.apply_chat_template(kept, tokenize=True, return_dict=False))


class ShareGPTChunks:
    """Chat-formatted ShareGPT conversations from index `cursor` on, cut into chunks of at most seq_len tokens."""

    def __init__(self, tokenizer, seq_len: int, max_chunks: int, cursor: int):
        self.tokenizer, self.seq_len, self.max_chunks = tokenizer, seq_len, max_chunks
        self.cursor = cursor  # conversations fully handed out
        self._it = iter_sharegpt_conversations(skip=cursor)
        self._pending: list[list[int]] = []

    def next(self) -> list[int]:
        while not self._pending:
            conv = next(self._it, None)
            if conv is None:  # wrapped around the whole file
                self._it, self.cursor = iter_sharegpt_conversations(), 0
                continue
            self.cursor += 1
            ids = format_conversation(self.tokenizer, conv["messages"], self.seq_len * self.max_chunks * 6)
            for s in range(0, min(len(ids), self.seq_len * self.max_chunks), self.seq_len):
                chunk = ids[s: s + self.seq_len]
                if len(chunk) >= 32:
                    self._pending.append(chunk)
        return self._pending.pop(0)


def frequency_ranked_vocab(tokenizer, num_convs: int, size: int, vocab_size: int,
                           always: list[int]) -> torch.Tensor:
    """The `size` most frequent token ids over chat-formatted ShareGPT text (special tokens always in)."""
    counts: Counter[int] = Counter()
    for conv in iter_sharegpt_conversations(limit=num_convs):
        counts.update(format_conversation(tokenizer, conv["messages"], 8000))
    for t in always:
        counts[t] += 10**9
    ranked = [t for t, _ in counts.most_common() if t < vocab_size]
    if len(ranked) < size:  # fill with the remaining ids in order
        seen = set(ranked)
        ranked += [t for t in range(vocab_size) if t not in seen][: size - len(ranked)]
    return torch.tensor(ranked[:size], dtype=torch.int64)


def self_distill_answers(cfg: TrainConfig, ckpt: Checkpoint, tokenizer, path: Path) -> list[list[int]]:
    """Prompt + the target's greedy answer, for ShareGPT prompts; cached as jsonl in prompt order and extended
    (only the missing prompts are answered) when a resumed run asks for more."""
    if cfg.self_distill <= 0:
        return []
    rows = []
    if path.exists():
        rows = [json.loads(line)["token_ids"] for line in path.read_text().splitlines() if line.strip()]
        if len(rows) >= cfg.self_distill:
            return rows[: cfg.self_distill]
    prompts = []
    for conv in iter_sharegpt_conversations(limit=cfg.self_distill - len(rows), skip=cfg.val_convs + len(rows)):
        first = next(m["content"] for m in conv["messages"] if m["role"] == "user")
        prompts.append(list(tokenizer.apply_chat_template([{"role": "user", "content": first[:600]}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)))
    model = LlamaModel(ckpt.config, ckpt.state_dict, torch.bfloat16, torch.device("cpu"))
    eos = set(ckpt.config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    bar = tqdm(total=len(prompts), desc="self-distill answers", unit="prompt")
    for i in range(0, len(prompts), 64):
        batch = prompts[i: i + 64]
        new = [p + a for p, a in zip(batch, greedy_answers(model, batch, cfg.self_distill_tokens, eos))]
        with path.open("a") as f:  # appended batch by batch: an interrupted run keeps what it generated
            f.write("".join(json.dumps({"token_ids": t}) + "\n" for t in new))
        rows += new
        bar.update(len(batch))
    bar.close()
    return rows


@torch.inference_mode()
def greedy_answers(model: LlamaModel, prompts: list[list[int]], max_tokens: int, eos: set[int]) -> list[list[int]]:
    """Batched greedy decoding with the paged forward (prompts in one prefill, then one token per request)."""
    from app.engine.kv_cache import KVCache
    from app.engine.runner import ModelRunner, SeqInput

    block = 16
    need = sum(-(-(len(p) + max_tokens) // block) for p in prompts)
    kv = KVCache(*model.new_kv_cache(need, block))
    runner = ModelRunner(model, kv)
    tables = []
    for p in prompts:
        b: list[int] = []
        kv.ensure_capacity(b, len(p) + max_tokens)
        tables.append(b)
    out = runner.run([SeqInput(block_ids=b, context_len=0, token_ids=p) for b, p in zip(tables, prompts)])
    answers = [[t] for t in out.logits.argmax(-1).tolist()]
    live = [i for i, a in enumerate(answers) if a[-1] not in eos]
    while live and len(answers[live[0]]) < max_tokens:
        seqs = [SeqInput(block_ids=tables[i], context_len=len(prompts[i]) + len(answers[i]) - 1,
                         token_ids=[answers[i][-1]]) for i in live]
        nxt = runner.run(seqs).logits.argmax(-1).tolist()
        for i, t in zip(live, nxt):
            answers[i].append(t)
        live = [i for i in live if answers[i][-1] not in eos]
    return answers


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


# ---- teacher and student -------------------------------------------------------------------------------------

class Teacher:
    """The target in bf16: next-token log-probabilities over the draft's vocabulary, teacher-forced."""

    def __init__(self, ckpt: Checkpoint, vocab_ids: torch.Tensor | None):
        self.model = LlamaModel(ckpt.config, ckpt.state_dict, torch.bfloat16, torch.device("cpu"))
        self.config = ckpt.config
        self.head = self.model.lm_head if vocab_ids is None else self.model.lm_head[vocab_ids].contiguous()

    @torch.inference_mode()
    def run(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-normed hidden [B, L, H] bf16, next-token log-probs [B, L, S] float32)."""
        cos, sin = rope_for_length(self.config, ids.shape[1], torch.bfloat16, ids.device)
        h = dense_forward(self.model.layers, self.model.embed[ids], self.config, cos, sin)
        h = rms_norm(h, self.model.norm, self.config.rms_norm_eps)
        return h, F.log_softmax(F.linear(h, self.head).float(), dim=-1)


class Student(torch.nn.Module):
    def __init__(self, ckpt: Checkpoint, init_layers: list[int], vocab_ids: torch.Tensor | None):
        super().__init__()
        self.config = ckpt.config
        self.layers = torch.nn.ModuleList()
        for i in init_layers:
            d = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in fused_layer(ckpt.state_dict, i).items()})
            self.layers.append(d)
        embed = ckpt.state_dict["model.embed_tokens.weight"]
        self.register_buffer("embed", embed.to(torch.bfloat16), persistent=False)
        head = embed if vocab_ids is None else embed[vocab_ids]
        self.register_buffer("head", head.to(torch.bfloat16).contiguous(), persistent=False)
        self.register_buffer("norm", ckpt.state_dict["model.norm.weight"].float(), persistent=False)

    def layer_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [dict(d.items()) for d in self.layers]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_for_length(self.config, ids.shape[1], torch.float32, ids.device)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = dense_forward(self.layer_dicts(), self.embed[ids].float(), self.config, cos, sin)
            h = rms_norm(h, self.norm, self.config.rms_norm_eps)
            return F.linear(h, self.head).float()  # [B, L, S]


class FeatureStudent(torch.nn.Module):
    """The feature draft (app/engine/speculative/feature.py) under training: fc, one layer, the output norm."""

    def __init__(self, ckpt: Checkpoint, init_layer: int, vocab_ids: torch.Tensor | None, passes: int):
        super().__init__()
        self.config, self.passes = ckpt.config, passes
        H = ckpt.config.hidden_size
        self.fc = torch.nn.Parameter(torch.cat([torch.eye(H), torch.eye(H)], dim=1))
        self.layer = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v) for k, v in fused_layer(ckpt.state_dict, init_layer).items()})
        self.norm = torch.nn.Parameter(ckpt.state_dict["model.norm.weight"].float().clone())
        embed = ckpt.state_dict["model.embed_tokens.weight"]
        self.register_buffer("embed", embed.to(torch.bfloat16), persistent=False)
        head = embed if vocab_ids is None else embed[vocab_ids]
        self.register_buffer("head", head.to(torch.bfloat16).contiguous(), persistent=False)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per pass: logits [B, L - 1, S] (position i predicts x_{i+2}) and g [B, L - 1, H]."""
        cos, sin = rope_for_length(self.config, ids.shape[1] - 1, torch.float32, ids.device)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gs = feature_forward_train(self.fc, dict(self.layer.items()), self.norm, self.embed, features, ids,
                                       self.config, cos, sin, self.passes)
            return [F.linear(g, self.head).float() for g in gs], gs

    def save(self, path: Path, ckpt: Checkpoint, vocab_ids: torch.Tensor | None, extra: dict) -> None:
        save_feature_draft(path, self.fc, dict(self.layer.items()), self.norm, ckpt.config,
                           ckpt.state_dict["model.embed_tokens.weight"], vocab_ids, extra)


def feature_loss(student: FeatureStudent, features: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                 mask: torch.Tensor, feature_weight: float) -> tuple[torch.Tensor, list[float]]:
    """Mean over passes of KL(teacher || draft) + feature_weight * smooth-L1(g, next feature); top-1 agreement
    per pass (pass p = tree level p + 1)."""
    logits, gs = student(features, ids)
    loss, agrees = 0.0, []
    for p, (lg, g) in enumerate(zip(logits, gs)):
        m = mask[:, 1:].clone()  # position i (pair F_i, x_{i+1}) matches the teacher at i + 1
        m[:, :p] = False  # no estimate before position p
        kl, ag = kl_and_agreement(lg, teacher_logp[:, 1:], m)
        reg = F.smooth_l1_loss(g.float(), features[:, 1:].float(), reduction="none").mean(-1)
        mf = m.float()
        loss = loss + kl + feature_weight * (reg * mf).sum() / mf.sum().clamp_min(1)
        agrees.append(ag)
    return loss / len(logits), agrees


def kl_and_agreement(student_logits: torch.Tensor, teacher_logp: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean per-token KL(teacher || student) over valid positions, and top-1 agreement."""
    logq = F.log_softmax(student_logits, dim=-1)
    kl = F.kl_div(logq, teacher_logp, log_target=True, reduction="none").sum(-1)  # [B, L]
    m = mask.float()
    loss = (kl * m).sum() / m.sum().clamp_min(1)
    agree = ((student_logits.argmax(-1) == teacher_logp.argmax(-1)).float() * m).sum() / m.sum().clamp_min(1)
    return loss, float(agree)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


# ---- the loop --------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with the loss history."""
    start_time = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ckpt = load_checkpoint(cfg.target)
    tokenizer = load_tokenizer(ckpt.tokenizer_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    vocab_path = out / "vocab_ids.pt"
    vocab_ids = None
    if cfg.vocab_subset:
        if vocab_path.exists():
            vocab_ids = torch.load(vocab_path)
        else:
            always = sorted({*ckpt.config.eos_token_ids, *tokenizer.all_special_ids})
            vocab_ids = frequency_ranked_vocab(tokenizer, cfg.vocab_count_convs, cfg.vocab_subset,
                                               ckpt.config.vocab_size, always)
            torch.save(vocab_ids, vocab_path)
    answers_path = out / f"self_distill_{cfg.self_distill_tokens}tok.jsonl"
    answers = self_distill_answers(cfg, ckpt, tokenizer, answers_path)

    init_layers = [int(x) for x in cfg.init_layers.split(",")]
    teacher = Teacher(ckpt, vocab_ids)
    feature = cfg.kind == "feature"
    if cfg.kind not in ("layers", "feature"):
        raise ValueError(f"unknown draft kind {cfg.kind!r}: layers or feature")
    student = (FeatureStudent(ckpt, init_layers[-1], vocab_ids, cfg.passes) if feature
               else Student(ckpt, init_layers, vocab_ids))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    step, cursor, answer_pos, history = 0, cfg.val_convs, 0, []
    order_rng = random.Random(cfg.seed)
    ckpt_path = out / "ckpt.pt"
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        step, cursor, answer_pos, history = state["step"], state["cursor"], state["answer_pos"], state["history"]
        order_rng.setstate(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
    answer_order = list(range(len(answers)))
    order_rng.shuffle(answer_order)

    # Validation: fixed chunks from the first val_convs conversations, teacher outputs computed once.
    val_stream = ShareGPTChunks(tokenizer, cfg.seq_len, cfg.max_chunks_per_conv, 0)
    val_seqs = [val_stream.next() for _ in range(cfg.val_chunks)]
    val_ids, val_mask = pad_batch(val_seqs, pad_id)
    val_out = [teacher.run(val_ids[i: i + 4]) for i in range(0, len(val_seqs), 4)]

    def evaluate() -> dict:
        with torch.no_grad():
            kls, agrees = [], []
            for j, (feats, logp) in enumerate(val_out):
                ids, mask = val_ids[4 * j: 4 * j + 4], val_mask[4 * j: 4 * j + 4]
                if feature:
                    kl, ag = feature_loss(student, feats, ids, logp, mask, 0.0)
                else:
                    kl, ag = kl_and_agreement(student.logits(ids), logp, mask)
                    ag = [ag]
                kls.append(float(kl))
                agrees.append(ag)
        per_pass = [sum(a[p] for a in agrees) / len(agrees) for p in range(len(agrees[0]))]
        out = {"val_kl": sum(kls) / len(kls), "val_agree": per_pass[0]}
        if len(per_pass) > 1:
            out["val_agree_by_level"] = per_pass
        return out

    def save() -> None:
        state = {"student": student.state_dict(), "opt": opt.state_dict(), "step": step, "cursor": stream.cursor,
                 "answer_pos": answer_pos, "history": history, "order_rng": order_rng.getstate(),
                 "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}
        torch.save(state, str(ckpt_path) + ".tmp")
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)
        extra = {"init_layers": cfg.init_layers, "train_steps": step, "train_tokens": tokens_seen,
                 "seq_len": cfg.seq_len, "self_distill_answers": len(answers)}
        if feature:
            student.save(out / "draft.safetensors", ckpt, vocab_ids, {**extra, "passes": cfg.passes})
        else:
            save_draft_weights(out / "draft.safetensors", student.layer_dicts(), ckpt.config,
                               ckpt.state_dict["model.embed_tokens.weight"], vocab_ids, extra)
        if cfg.export:
            Path(cfg.export).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.export).write_bytes((out / "draft.safetensors").read_bytes())

    stream = ShareGPTChunks(tokenizer, cfg.seq_len, cfg.max_chunks_per_conv, cursor)
    n_answers = round(cfg.batch_size * cfg.self_distill_frac) if answers else 0
    tokens_seen = sum(h.get("tokens", 0) for h in history)
    first_eval = evaluate() if step == 0 else None
    if first_eval:
        history.append({"step": 0, **first_eval})
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step")
    deadline = time.perf_counter() + cfg.minutes * 60 if cfg.minutes else None
    stopped = "steps"
    while step < cfg.steps:
        if deadline and time.perf_counter() > deadline:
            stopped = "time"
            break
        seqs = []
        for _ in range(n_answers):
            a = answers[answer_order[answer_pos % len(answers)]]
            answer_pos += 1
            seqs.append(a[-cfg.seq_len:])
        seqs += [stream.next() for _ in range(cfg.batch_size - len(seqs))]
        ids, mask = pad_batch(seqs, pad_id)
        target_feats, target_logp = teacher.run(ids)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        if feature:
            loss, agrees = feature_loss(student, target_feats, ids, target_logp, mask, cfg.feature_loss_weight)
            agree = agrees[0]
        else:
            loss, agree = kl_and_agreement(student.logits(ids), target_logp, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_v = float(loss.detach())
        ntok = int(mask.sum())
        tokens_seen += ntok
        rec = {"step": step, "loss": loss_v, "agree": agree, "tokens": ntok,
               "elapsed_s": round(time.perf_counter() - start_time, 1)}
        if step % cfg.eval_every == 0:
            rec.update(evaluate())
        history.append(rec)
        bar.set_postfix(loss=f"{loss_v:.3f}", agree=f"{agree:.3f}", tok=tokens_seen)
        bar.update(1)
        if step % cfg.ckpt_every == 0:
            save()
            (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    bar.close()
    final = evaluate()
    history.append({"step": step, **final})
    save()
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    losses = [h["loss"] for h in history if "loss" in h]
    return {"steps": step, "stopped_on": stopped, "tokens_seen": tokens_seen,
            "unique_sharegpt_conversations": stream.cursor - cfg.val_convs, "self_distill_answers": len(answers),
            "wall_s": round(time.perf_counter() - start_time, 1), "losses": losses, **final,
            "weights": str(out / "draft.safetensors")}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true", default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    base = asdict(defaults)
    if args.get("quick"):
        base.update(QUICK)
    base.update(args)
    return TrainConfig(**base)


def main(argv: list[str] | None = None) -> None:
    summary = train(parse_args(argv))
    losses = summary.pop("losses")
    k = max(1, min(5, len(losses) // 4))
    summary["loss_first"] = sum(losses[:k]) / k if losses else None
    summary["loss_last"] = sum(losses[-k:]) / k if losses else None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
