"""Acceptance traces from the real draft/target pair, and the empirical acceptance model the simulator samples.

Recording observes the engine's steps (``LLMEngine.step_observers``): each ``StepResult`` carries every verified
tree's candidates, the selected tree and the accepted path. One JSONL line per verified tree:

    {"policy", "category" (the request's workload class, where the driver knows it), "parent": [M],
     "q": [M] draft prob per candidate, "sel": verified candidate slots,
     "acc": accepted candidate slots (a chain from the root)}

From those lines ``AcceptanceModel.from_trace`` derives
- ``fanout``: for every drafted node (the root included) its children's draft probabilities, sorted,
  padded to ``K`` columns: the simulator draws a node's children from this pool, so trees look like the
  drafter's (same spread of confidence per level);
- ``cond_accept(q)``: P(target picks this child | its parent was accepted) by bins of the draft probability
  ``q``, estimated on verified nodes whose parent was the root or accepted. Multiplying along a path gives
  P(path accepted), i.e. the empirical counterpart of ``f``;
- for the report, the unconditional P(node accepted | f bin) over verified nodes.

Fan-out rows and lookup chains keep their category: classes draft very differently (CPU sweep, adaserve:
1.16 accepted draft tokens per step on chat, 1.78 on coding, 2.36 on summarization, most of it prompt lookup),
so the simulator draws each request's trees from its own class's rows. The acceptance by q is pooled: it is
the draft's calibration, which the class changes far less than how confident the draft is.

Usage: ``python -m bench.traces record`` (in-process engine, bounded; writes
``bench/runs/traces-<time>/acceptance_trace.jsonl``; ``--out bench/results/acceptance_trace.jsonl --gzip`` replaces the
committed trace) and ``python -m bench.traces summary bench/results/acceptance_trace.jsonl.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.paths import run_dir

Q_BINS = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 + 1e-9])


class TraceRecorder:
    """A step observer (``LLMEngine.step_observers``): one dict per verified tree of every ``StepResult`` in
    ``lines``; ``flush`` appends them to ``path``, ``close`` also stops observing."""

    def __init__(self, engine, path: Path | None = None, policy_of=None, category_of=None):
        from app.engine.speculative.multi import MultiSourceDrafter

        if engine.speculator is None:
            raise ValueError("the engine has no draft: nothing to trace")
        self.engine = engine
        self.lines: list[dict] = []
        self.path = path
        self._policy_of = policy_of or (lambda rid: "")
        self._category_of = category_of
        source = engine.speculator.drafter
        names = source.names if isinstance(source, MultiSourceDrafter) else []
        self._lookup_bit = names.index("ngram") if "ngram" in names and len(names) > 1 else None
        engine.step_observers.append(self.observe)

    def observe(self, plan, result) -> None:
        for outcome in result.trees:
            candidates, slots = outcome.candidates, outcome.tree.slots
            line = {
                "policy": self._policy_of(outcome.request_id),
                **({"category": self._category_of(outcome.request_id)} if self._category_of else {}),
                "parent": candidates.parent.tolist(),
                "q": [round(float(x), 5) for x in candidates.draft_prob],
                "sel": [int(s) for s in slots[1:]],
                "acc": [int(slots[i]) for i in outcome.path[1:]],
            }
            source = getattr(candidates, "source", None)  # a merged tree records each node's sources
            if self._lookup_bit is not None and source is not None:  # 0 model draft, 1 lookup only, 2 both
                by_lookup = (source >> self._lookup_bit) & 1 == 1
                by_model = (source & ~np.uint8(1 << self._lookup_bit)) != 0
                line["lookup"] = np.where(by_lookup, np.where(by_model, 2, 1), 0).tolist()
            self.lines.append(line)

    def flush(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for line in self.lines:
                    f.write(json.dumps(line) + "\n")
        self.lines.clear()

    def close(self) -> None:
        if self.observe in self.engine.step_observers:
            self.engine.step_observers.remove(self.observe)
        self.flush()


def load_trace(path: str | Path) -> list[dict]:
    """Lines of a trace; ``.gz`` files (how the committed traces are stored) are read transparently; a
    missing ``x.jsonl`` falls back to ``x.jsonl.gz``."""
    path = Path(path)
    if not path.exists() and Path(str(path) + ".gz").exists():
        path = Path(str(path) + ".gz")
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def gzip_file(path: Path) -> Path:
    """path -> path.gz (the original removed); traces compress ~5x."""
    out = Path(str(path) + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes(), compresslevel=9))
    path.unlink()
    return out


@dataclass
class AcceptanceModel:
    fanout: np.ndarray  # [P, K] float32, each row a node's children's draft probs, descending, 0-padded
    bin_edges: np.ndarray  # [B + 1]
    cond_rate: np.ndarray  # [B] P(accepted | parent accepted, q in bin)
    cond_count: np.ndarray  # [B]
    f_rate: np.ndarray  # [B] P(accepted | f in bin), unconditional, for the report
    f_count: np.ndarray  # [B]
    mean_accepted_per_tree: float
    # Prompt lookup, from traces of merged drafts (empty otherwise); the tables above then cover the model's
    # nodes (those it proposed, alone or with the lookup):
    lookup_chains: np.ndarray | None = None  # [C, D] q along each tree's primary lookup chain, 0-padded
    lookup_shared_first: np.ndarray | None = None  # [C] bool: the chain's first node was the model's too
    lookup_share: float = 0.0  # fraction of trees that had a lookup chain
    lookup_cond_rate: np.ndarray | None = None  # [B] P(accepted | parent accepted, q in bin), lookup nodes
    # Per category (traces that record it): fanout rows and lookup chains are sorted by category, and each
    # category's rows are [start, start + count); its share of trees with a lookup chain
    category_rows: dict[str, tuple[int, int]] | None = None
    category_chains: dict[str, tuple[int, int]] | None = None
    category_lookup_share: dict[str, float] | None = None

    @classmethod
    def from_trace(cls, lines: list[dict], k: int = 4, max_chain: int = 16) -> "AcceptanceModel":
        fan, cq, ca, fq, fa, acc_len = [], [], [], [], [], []
        lq, la, chains, shared_first = [], [], [], []
        fan_cat, chain_cat, tree_cat = [], [], []
        has_lookup = any("lookup" in ln for ln in lines)
        for ln in lines:
            cat = str(ln.get("category", ""))
            parent = np.asarray(ln["parent"], dtype=np.int64)
            q = np.asarray(ln["q"], dtype=np.float64)
            m = parent.size
            if m == 0:
                continue
            src = np.asarray(ln.get("lookup", [0] * m), dtype=np.int64)
            f = np.ones(m)
            for i in range(m):  # parents-first
                f[i] = q[i] * (f[parent[i]] if parent[i] >= 0 else 1.0)
            kids: dict[int, list[float]] = {}
            for i in range(m):
                if src[i] != 1:  # the model's tree: its nodes, alone or shared with the lookup
                    kids.setdefault(int(parent[i]), []).append(q[i])
            for ch in kids.values():
                row = sorted(ch, reverse=True)[:k]
                fan.append(row + [0.0] * (k - len(row)))
                fan_cat.append(cat)
            sel, acc = set(ln["sel"]), set(ln["acc"])
            acc_len.append(len(acc))
            tree_cat.append(cat)
            for s in sel:
                p = int(parent[s])
                if p < 0 or p in acc:
                    if src[s] != 1:
                        cq.append(q[s])
                        ca.append(s in acc)
                    if src[s] != 0:
                        lq.append(q[s])
                        la.append(s in acc)
                fq.append(f[s])
                fa.append(s in acc)
            if has_lookup:
                chain, node = [], -1  # the primary lookup chain: from the root, the likeliest lookup child
                while len(chain) < max_chain:
                    nxt = [i for i in range(m) if parent[i] == node and src[i] != 0]
                    if not nxt:
                        break
                    node = max(nxt, key=lambda i: q[i])
                    if not chain:
                        shared_first.append(src[node] == 2)
                    chain.append(q[node])
                if chain:
                    chains.append(chain + [0.0] * (max_chain - len(chain)))
                    chain_cat.append(cat)
        if not fan:
            raise ValueError("empty trace")
        edges = Q_BINS
        centre = 0.5 * (edges[:-1] + edges[1:])

        def rate(x, y, min_count=1):  # thin bins get the bin centre's calibrated guess (q itself)
            r, n = _binned(np.asarray(x), np.asarray(y, dtype=float), edges)
            return np.where(n >= min_count, r, np.minimum(centre, 1.0)), n

        cond_rate, cond_count = rate(cq, ca)
        f_rate, f_count = _binned(np.asarray(fq), np.asarray(fa, dtype=float), edges)
        fan_order = np.argsort(np.asarray(fan_cat), kind="stable")
        lookup, by_cat = {}, {}
        if chains:
            chain_order = np.argsort(np.asarray(chain_cat), kind="stable")
            lookup = {"lookup_chains": np.asarray(chains, np.float32)[chain_order],
                      "lookup_shared_first": np.asarray(shared_first)[chain_order],
                      "lookup_share": len(chains) / len(acc_len), "lookup_cond_rate": rate(lq, la, min_count=5)[0]}
        cats = sorted(set(tree_cat) - {""})
        if cats:
            by_cat = {"category_rows": _ranges(np.asarray(fan_cat)[fan_order], cats),
                      "category_chains": _ranges(np.asarray(chain_cat)[chain_order], cats) if chains else None,
                      "category_lookup_share": {c: chain_cat.count(c) / max(tree_cat.count(c), 1) for c in cats}}
        return cls(np.asarray(fan, dtype=np.float32)[fan_order], edges, cond_rate, cond_count, f_rate, f_count,
                   float(np.mean(acc_len)) if acc_len else 0.0, **lookup, **by_cat)

    def pools_for(self, categories: list[str]) -> dict[str, np.ndarray]:
        """Per request, where its class's rows are: fan-out rows ``[fan_start, fan_start + fan_count)``, lookup
        chains likewise, and its share of trees with a lookup chain. A class the trace lacks (or a trace without
        classes) draws from every row."""
        n_chain = 0 if self.lookup_chains is None else self.lookup_chains.shape[0]
        everything = (0, self.fanout.shape[0], 0, n_chain, self.lookup_share)
        rows, chains, share = self.category_rows or {}, self.category_chains or {}, self.category_lookup_share or {}
        per_request = [(*rows[c], *chains.get(c, (0, 0)), share.get(c, 0.0)) if c in rows else everything
                       for c in categories]
        cols = list(zip(*per_request)) if per_request else [()] * 5
        names = ("fan_start", "fan_count", "chain_start", "chain_count")
        out = {name: np.array(col, np.int64) for name, col in zip(names, cols)}
        out["lookup_share"] = np.array(cols[4], np.float64)
        return out

    def _bin(self, q: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.bin_edges, q, side="right") - 1, 0, self.bin_edges.size - 2)

    def lookup_accept(self, q: np.ndarray) -> np.ndarray:
        """P(a lookup node is accepted | its parent was), by q bin."""
        return self.lookup_cond_rate[self._bin(q)]

    def cond_accept(self, q: np.ndarray) -> np.ndarray:
        return self.cond_rate[self._bin(q)]

    def to_dict(self) -> dict:
        return {"bin_edges": self.bin_edges.tolist(), "cond_rate": self.cond_rate.tolist(),
                "cond_count": self.cond_count.tolist(), "f_rate": self.f_rate.tolist(),
                "f_count": self.f_count.tolist(), "mean_accepted_per_tree": self.mean_accepted_per_tree,
                "num_fanout_rows": int(self.fanout.shape[0]),
                "mean_top1_q": float(self.fanout[:, 0].mean()), "lookup_share": self.lookup_share,
                "lookup_cond_rate": None if self.lookup_cond_rate is None else self.lookup_cond_rate.tolist()}

    def scaled(self, factor: float) -> "AcceptanceModel":
        """What-if 'a draft ``factor`` x as confident and as calibrated': every draft probability x factor
        (a node's children renormalised if they would sum past 1) and the acceptance at the scaled
        probability = factor x the measured acceptance at the original one (capped at 1)."""
        fan = self.fanout.astype(np.float64) * factor
        tot = fan.sum(axis=1, keepdims=True)
        fan = np.where(tot > 1.0, fan / np.maximum(tot, 1e-12), fan)
        edges = self.bin_edges * factor
        edges[-1] = max(edges[-1], 1.0 + 1e-9)
        return AcceptanceModel(fan.astype(np.float32), edges, np.minimum(self.cond_rate * factor, 1.0),
                               self.cond_count, self.f_rate, self.f_count, self.mean_accepted_per_tree * factor,
                               self.lookup_chains, self.lookup_shared_first, self.lookup_share,
                               self.lookup_cond_rate,  # the lookup stays as measured
                               self.category_rows, self.category_chains, self.category_lookup_share)


def _ranges(sorted_cats: np.ndarray, cats: list[str]) -> dict[str, tuple[int, int]]:
    """[start, count) of each category in a sorted array of category names."""
    lo = np.searchsorted(sorted_cats, cats, side="left")
    hi = np.searchsorted(sorted_cats, cats, side="right")
    return {c: (int(a), int(b - a)) for c, a, b in zip(cats, lo, hi)}


def _binned(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size == 0:
        return np.zeros(edges.size - 1), np.zeros(edges.size - 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)
    count = np.bincount(idx, minlength=edges.size - 1).astype(float)
    hits = np.bincount(idx, weights=y, minlength=edges.size - 1)
    return np.divide(hits, count, out=np.zeros_like(hits), where=count > 0), count


def print_summary(model: AcceptanceModel) -> None:
    e = model.bin_edges
    print(f"mean accepted draft tokens per verified tree: {model.mean_accepted_per_tree:.3f}; "
          f"mean top-1 draft prob {model.fanout[:, 0].mean():.3f}; {model.fanout.shape[0]} fan-out rows")
    lk = model.lookup_cond_rate is not None
    if lk:
        print(f"lookup chains in {100 * model.lookup_share:.0f}% of trees (first node shared with the model in "
              f"{100 * model.lookup_shared_first.mean():.0f}%), mean length "
              f"{(model.lookup_chains > 0).sum(axis=1).mean():.1f}")
    print(f"{'bin':>12} {'P(acc|parent acc, q)':>22} {'n':>7} {'P(acc | f)':>12} {'n':>7}"
          + (f" {'lookup P(acc|parent acc, q)':>28}" if lk else ""))
    for i in range(e.size - 1):
        print(f"[{e[i]:.2f},{min(e[i + 1], 1):.2f}) {model.cond_rate[i]:22.3f} {int(model.cond_count[i]):7d} "
              f"{model.f_rate[i]:12.3f} {int(model.f_count[i]):7d}"
              + (f" {model.lookup_cond_rate[i]:28.3f}" if lk else ""))


def record(out: Path, num_requests: int, max_tokens: int, token_budget: int, policy: str, seed: int,
           draft: str = "feature") -> None:
    """Run a bounded mixed workload through the in-process engine with wide trees; append the trace."""
    import torch

    from app.engine.config import EngineConfig
    from app.engine.engine import LLMEngine
    from bench.workloads import build_workload

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(draft=draft, policy=policy, device="cpu", token_budget=token_budget,
                                    kv_cache_memory_gb=1.0, max_num_seqs=8))
    wl = build_workload(num_requests, rate=1.0, seed=seed, max_tokens_cap=max_tokens)
    rec = TraceRecorder(engine, out, policy_of=lambda rid: policy, category_of=lambda rid: wl[int(rid)].slo_class)
    t0 = time.perf_counter()
    _generate_messages(engine, wl)
    rec.close()
    print(f"recorded {len(rec.lines)} verified trees in {time.perf_counter() - t0:.0f} s -> {out}")


def _generate_messages(engine, wl) -> None:
    from app.engine.config import SamplingParams

    for i, r in enumerate(wl):  # request id = workload index (the recorder's category_of reads it)
        prompt = engine.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
        engine.add_request(list(prompt), SamplingParams(max_tokens=r.max_tokens, ignore_eos=True), request_id=str(i))
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", type=Path, default=run_dir("traces") / "acceptance_trace.jsonl")
    r.add_argument("--num-requests", type=int, default=24)
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--token-budget", type=int, default=256)
    r.add_argument("--policy", default="dynamic-tree")
    r.add_argument("--seed", type=int, default=7)
    r.add_argument("--draft", default="feature,ngram", help="draft sources (default: the served feature,ngram)")
    r.add_argument("--gzip", action="store_true", help="compress the trace when done (x.jsonl -> x.jsonl.gz)")
    s = sub.add_parser("summary")
    s.add_argument("trace", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out, args.num_requests, args.max_tokens, args.token_budget, args.policy, args.seed, args.draft)
        if args.gzip:
            print(f"compressed -> {gzip_file(args.out)}")
    else:
        print_summary(AcceptanceModel.from_trace(load_trace(args.trace)))


if __name__ == "__main__":
    main()
