"""Load driver and metrics: replay a workload against the Ray Serve app (async HTTP, streaming) or against an
in-process engine (same engine, same policies; arrival-driven loop), one record per request, plus a summary.

Records (one JSONL line per request; times in seconds from the run start):
    index, category, slo_class, policy, tpot_slo_ms, ttft_slo_ms, scheduled_s, sent_s, first_token_s,
    last_token_s, token_times [[t, n_tokens], ...], num_tokens, error, refusal (which admission rule refused it,
    in-process runs), spec_steps, accepted_draft_tokens
Client-side TPOT = (last token time - first token time) / (num_tokens - 1) (vLLM's definition, and the
engine's); over HTTP the token count of each SSE chunk is unknown (merged deltas), so every token time is
the chunk's arrival and the count comes from ``usage``.

Metrics (``summarize``): SLO attainment per class and overall under two definitions: ``attainment`` (TTFT and TPOT
both met, as a user feels it) and ``attainment_tpot`` (TPOT only, the paper's); a failed, timed-out or refused
(``slo_unattainable``) request misses under both. Goodput both ways (paper: tokens of SLO-attaining requests / wall time; vLLM: SLO-attaining requests /
wall time), throughput, TTFT/TPOT percentiles, mean accepted tokens per speculative step.

CLI (against a running server): ``python -m bench.loadgen --url http://127.0.0.1:8000 --rate 1 -n 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.workloads import CATEGORIES, WorkloadRequest, build_workload


@dataclass
class RequestRecord:
    index: int
    category: str
    slo_class: str
    policy: str
    tpot_slo_ms: float | None
    ttft_slo_ms: float | None = None
    scheduled_s: float = 0.0
    sent_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    token_times: list = field(default_factory=list)  # [[t_s, n_tokens], ...]
    num_tokens: int = 0
    max_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    refusal: str | None = None  # which rule refused it (SLOUnattainableError.reason; "ttft_late": later, in the queue)
    spec_steps: int | None = None
    accepted_draft_tokens: int | None = None

    def add_tokens(self, t: float, n: int) -> None:
        if n <= 0:
            return
        if self.first_token_s is None:
            self.first_token_s = t
        self.last_token_s = t
        self.num_tokens += n
        self.token_times.append([round(t, 5), n])

    def shift(self, dt_s: float) -> None:
        """Move every time of the record by ``dt_s`` (a run that replayed a later block of a workload from 0)."""
        self.scheduled_s += dt_s
        for name in ("sent_s", "first_token_s", "last_token_s"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) + dt_s)
        self.token_times = [[round(t + dt_s, 5), n] for t, n in self.token_times]

    def to_dict(self) -> dict:
        return asdict(self)


# ---- metrics ------------------------------------------------------------------------------------------------
def tpot_s(rec: dict | RequestRecord) -> float | None:
    r = rec if isinstance(rec, dict) else rec.to_dict()
    if r.get("first_token_s") is None or r["num_tokens"] < 2:
        return None
    return (r["last_token_s"] - r["first_token_s"]) / (r["num_tokens"] - 1)


def ttft_s(rec: dict | RequestRecord) -> float | None:
    r = rec if isinstance(rec, dict) else rec.to_dict()
    return None if r.get("first_token_s") is None else r["first_token_s"] - r["scheduled_s"]


def attained(rec: dict | RequestRecord, ttft: bool = True) -> bool:
    """Finished without error, and TPOT <= its SLO (and, with ``ttft``, TTFT <= its TTFT SLO if set). A
    one-token request has no decode phase: only the TTFT SLO applies to it."""
    r = rec if isinstance(rec, dict) else rec.to_dict()
    if r.get("error") or r["num_tokens"] < 1:
        return False
    tp = tpot_s(r)
    if r.get("tpot_slo_ms") is not None and tp is not None and tp * 1e3 > r["tpot_slo_ms"] * (1 + 1e-9):
        return False
    if ttft and r.get("ttft_slo_ms") is not None:
        tt = ttft_s(r)
        if tt is None or tt * 1e3 > r["ttft_slo_ms"]:
            return False
    return True


def percentiles(values, ps=(50, 90, 99)) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {f"p{p}": (float(np.percentile(v, p)) if v.size else None) for p in ps}


def summarize(records: list, wall_s: float | None = None) -> dict:
    """Overall and per-class metrics. ``wall_s`` default: from 0 (the run start) to the last token."""
    recs = [r if isinstance(r, dict) else r.to_dict() for r in records]
    if wall_s is None:
        ends = [r["last_token_s"] for r in recs if r.get("last_token_s") is not None]
        wall_s = max(ends) if ends else 0.0

    def block(rs: list[dict]) -> dict:
        ok = [attained(r) for r in rs]
        ok_tpot = [attained(r, ttft=False) for r in rs]
        tokens = sum(r["num_tokens"] for r in rs)
        good_tokens = sum(r["num_tokens"] for r, a in zip(rs, ok) if a)
        spec = [(r.get("spec_steps") or 0, r.get("accepted_draft_tokens") or 0) for r in rs]
        steps = sum(s for s, _ in spec)
        out = {
            "requests": len(rs),
            "attained": int(sum(ok)),
            "attainment": (sum(ok) / len(rs)) if rs else None,
            "goodput_tok_s": good_tokens / wall_s if wall_s > 0 else 0.0,
            "goodput_req_s": sum(ok) / wall_s if wall_s > 0 else 0.0,
            "throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
            "attainment_tpot": (sum(ok_tpot) / len(rs)) if rs else None,
            "goodput_tpot_tok_s": (sum(r["num_tokens"] for r, a in zip(rs, ok_tpot) if a) / wall_s
                                   if wall_s > 0 else 0.0),
            "rejected": sum(1 for r in rs if r.get("error") == "slo_unattainable"),
            "errors": sum(1 for r in rs if r.get("error")),
            "accepted_tokens_per_step": (sum(a for _, a in spec) / steps + 1.0) if steps else None,
        }
        for name, fn in (("ttft_s", ttft_s), ("tpot_s", tpot_s)):
            for k, v in percentiles([fn(r) for r in rs]).items():
                out[f"{name}_{k}"] = v
        return out

    summary = {"wall_s": wall_s, "overall": block(recs)}
    for c in sorted({r["slo_class"] for r in recs}, key=lambda c: (CATEGORIES + (c,)).index(c)):
        summary[c] = block([r for r in recs if r["slo_class"] == c])
    return summary


def format_summary(summary: dict, title: str = "") -> str:
    rows = [k for k in summary if k != "wall_s"]
    head = (f"{title}  wall {summary['wall_s']:.1f} s\n" if title else "") + (
        f"{'class':<14}{'n':>4}{'attain':>8}{'tpot-only':>10}{'goodput':>9}{'good r/s':>9}{'thrpt':>8}{'TTFT p50':>9}"
        f"{'p90':>7}{'p99':>7}{'TPOT p50':>9}{'p99':>8}{'acc/st':>7}{'refused':>8}")
    lines = [head]
    for k in rows:
        b = summary[k]

        def f(x, scale=1.0, fmt="{:.0f}"):
            return "-" if x is None else fmt.format(x * scale)

        lines.append(f"{k:<14}{b['requests']:>4}{f(b['attainment'], 100, '{:.0f}%'):>8}"
                     f"{f(b.get('attainment_tpot'), 100, '{:.0f}%'):>10}{b['goodput_tok_s']:>9.2f}"
                     f"{b['goodput_req_s']:>9.3f}{b['throughput_tok_s']:>8.2f}{f(b['ttft_s_p50'], 1e3):>9}"
                     f"{f(b['ttft_s_p90'], 1e3):>7}{f(b['ttft_s_p99'], 1e3):>7}{f(b['tpot_s_p50'], 1e3):>9}"
                     f"{f(b['tpot_s_p99'], 1e3):>8}{f(b['accepted_tokens_per_step'], 1, '{:.2f}'):>7}"
                     f"{b.get('rejected', 0):>8}")
    return "\n".join(lines)


def write_jsonl(path: Path, records: list, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            d = r if isinstance(r, dict) else r.to_dict()
            f.write(json.dumps({**(extra or {}), **d}) + "\n")


# ---- in-process driver ------------------------------------------------------------------------------------
def run_engine(engine, workload: list[WorkloadRequest], policy: str, slo_ms: dict[str, float], *,
               max_duration_s: float = 600.0, progress: bool = True, prompt_ids: list[list[int]] | None = None,
               ttft: tuple[float, float] | None = None) -> tuple[list[RequestRecord], list]:
    """Arrival-driven replay through ``engine`` (an LLMEngine): requests are added at their arrival times
    (between steps, as the replica's loop does), every step's new tokens are stamped when the step returns.
    ``ttft``: (x idle prefill, allowance ms), every request's relative TTFT SLO, as the server's default.
    Returns the records and the engine's StepResults of this run. Requests still running at
    ``max_duration_s`` are aborted and recorded with error "timeout"; refused ones (on arrival, or later in the queue
    when their TTFT became unattainable) with "slo_unattainable", failed ones with "error"."""
    from app.engine.config import SamplingParams
    from app.engine.errors import SLOUnattainableError

    if prompt_ids is None:
        prompt_ids = [encode_chat(engine, r.messages) for r in workload]
    pending = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    recs = {i: RequestRecord(r.index, r.category, r.slo_class, policy, slo_ms.get(r.slo_class), None,
                             scheduled_s=r.arrival_s, max_tokens=r.max_tokens, prompt_tokens=len(prompt_ids[i]))
            for i, r in enumerate(workload)}
    bar = _bar(len(workload), f"{policy}", progress)
    steps_before = engine.num_steps
    t0 = time.perf_counter()
    live: set[str] = set()
    pos = 0
    while pos < len(pending) or live:
        now = time.perf_counter() - t0
        if now > max_duration_s:
            for rid in list(live):
                engine.abort(rid)
                recs[int(rid)].error = "timeout"
            for i in pending[pos:]:
                recs[i].error = "not sent"
            break
        while pos < len(pending) and workload[pending[pos]].arrival_s <= now:
            i = pending[pos]
            r = workload[i]
            recs[i].sent_s = now
            pos += 1
            try:
                engine.add_request(prompt_ids[i], SamplingParams(max_tokens=r.max_tokens, ignore_eos=True),
                                   request_id=str(i), tpot_slo_ms=slo_ms.get(r.slo_class),
                                   ttft_slo_x_prefill=ttft[0] if ttft else None,
                                   ttft_allowance_ms=ttft[1] if ttft else 0.0,
                                   policy=policy, arrival_time=t0 + r.arrival_s)
            except SLOUnattainableError as exc:
                recs[i].error, recs[i].refusal = "slo_unattainable", exc.reason
                recs[i].ttft_slo_ms = ttft[0] * engine.idle_prefill_s(len(prompt_ids[i])) * 1e3 + ttft[1]
                bar.update(1)
                continue
            recs[i].ttft_slo_ms = engine.requests[str(i)].ttft_slo_ms
            live.add(str(i))
        if not live:
            if pos == len(pending):  # the last arrivals were refused: nothing left to serve or send
                break
            time.sleep(max(0.0, min(workload[pending[pos]].arrival_s - now, 0.5)))
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        for o in outs:
            rec = recs[int(o.request_id)]
            rec.add_tokens(t, len(o.new_token_ids))
            if o.finished:
                live.discard(o.request_id)
                if o.finish_reason in ("slo_unattainable", "error", "abort"):  # refused in the queue, or failed
                    rec.error = o.finish_reason
                    if o.finish_reason == "slo_unattainable":
                        rec.refusal = "ttft_late"
                if o.metrics is not None:
                    rec.spec_steps, rec.accepted_draft_tokens = o.metrics.num_spec_steps, o.metrics.num_accepted_draft_tokens
                bar.update(1)
    bar.close()
    new_steps = min(engine.num_steps - steps_before, len(engine.step_history))
    steps = list(engine.step_history)[len(engine.step_history) - new_steps:] if new_steps else []
    return [recs[i] for i in range(len(workload))], steps


def encode_chat(engine, messages: list[dict]) -> list[int]:
    return list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=1.0)


# ---- HTTP driver ------------------------------------------------------------------------------------------
async def _one_http(client, url: str, model: str, req: WorkloadRequest, rec: RequestRecord, t0: float,
                    use_class: bool) -> None:
    import httpx

    body = {"model": model, "messages": req.messages, "max_tokens": req.max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if use_class:
        body["slo_class"] = req.slo_class
    elif rec.tpot_slo_ms is not None:
        body["tpot_slo_ms"] = rec.tpot_slo_ms
    if rec.ttft_slo_ms is not None:
        body["ttft_slo_ms"] = rec.ttft_slo_ms
    rec.sent_s = time.perf_counter() - t0
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"http {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            usage_tokens = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                t = time.perf_counter() - t0
                msg = json.loads(line[6:])
                for ch in msg.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        rec.add_tokens(t, 1)
                if msg.get("slo"):
                    slo = msg["slo"]
                    if use_class and slo.get("tpot_slo_ms") is not None:
                        rec.tpot_slo_ms = slo["tpot_slo_ms"]
                if msg.get("usage"):
                    usage_tokens = msg["usage"]["completion_tokens"]
                    rec.prompt_tokens = msg["usage"]["prompt_tokens"]
            if usage_tokens is not None:
                rec.num_tokens = usage_tokens  # chunks may merge tokens: the count comes from usage
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]


async def run_http(url: str, workload: list[WorkloadRequest], policy: str, slo_ms: dict[str, float] | None, *,
                   model: str = "SmolLM2-135M-Instruct", max_duration_s: float = 600.0, progress: bool = True,
                   ttft_slo_ms: float | None = None) -> list[RequestRecord]:
    """Send each request at its arrival time (streaming); ``slo_ms`` None sends ``slo_class`` and lets the
    server resolve it (relative classes); else absolute ``tpot_slo_ms`` per class."""
    import httpx

    recs = [RequestRecord(r.index, r.category, r.slo_class, policy, (slo_ms or {}).get(r.slo_class), ttft_slo_ms,
                          scheduled_s=r.arrival_s, max_tokens=r.max_tokens) for r in workload]
    bar = _bar(len(workload), policy, progress)
    limits = httpx.Limits(max_connections=len(workload) + 1, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_duration_s + 30), limits=limits) as client:
        t0 = time.perf_counter()

        async def fire(req: WorkloadRequest, rec: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
            if time.perf_counter() - t0 > max_duration_s:
                rec.error = "not sent"
                return
            try:
                await asyncio.wait_for(_one_http(client, url, model, req, rec, t0, slo_ms is None),
                                       timeout=max(1.0, max_duration_s - (time.perf_counter() - t0)))
            except asyncio.TimeoutError:
                rec.error = "timeout"
            bar.update(1)

        await asyncio.gather(*(fire(w, r) for w, r in zip(workload, recs)))
    bar.close()
    return recs


async def scrape_metrics(url: str) -> dict[str, float]:
    """Replica gauges from the ingress's /metrics (e.g. accepted_tokens_per_step), summed over replicas' lines
    by name (the mean is taken for per-replica gauges)."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    vals: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0]
        try:
            vals.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
        except ValueError:
            continue
    return {k: float(np.mean(v)) for k, v in vals.items() if all(math.isfinite(x) for x in v)}


def server_accepted_tokens_per_step(url: str) -> float | None:
    """The server's accepted tokens per step from /metrics; None when it cannot be read (metrics are optional)."""
    try:
        return asyncio.run(scrape_metrics(url)).get("adaserve_replica_accepted_tokens_per_step")
    except Exception:  # noqa: BLE001
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("-n", "--num-requests", type=int, default=20)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--mix", type=float, nargs=3, default=(0.6, 0.2, 0.2))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-duration", type=float, default=300.0)
    ap.add_argument("--absolute-ms", type=float, nargs=3, default=None, metavar=("CODING", "CHAT", "SUMM"),
                    help="absolute TPOT SLOs; default: the server's relative slo classes")
    ap.add_argument("--policy-label", default="server")
    ap.add_argument("--out", type=Path, default=None, help="JSONL, one line per request")
    args = ap.parse_args()
    wl = build_workload(args.num_requests, rate=args.rate, seed=args.seed, mix=tuple(args.mix), arrival=args.arrival,
                        cv=args.cv, max_tokens_cap=args.max_tokens)
    slo = dict(zip(CATEGORIES, args.absolute_ms)) if args.absolute_ms else None
    recs = asyncio.run(run_http(args.url, wl, args.policy_label, slo, model=args.model,
                                max_duration_s=args.max_duration))
    summary = summarize(recs)
    acc = server_accepted_tokens_per_step(args.url)
    if acc is not None:
        summary["overall"]["accepted_tokens_per_step"] = acc
    if args.out:
        write_jsonl(args.out, recs, {"rate": args.rate})
    print(format_summary(summary, f"{args.policy_label} @ {args.rate} req/s"))


if __name__ == "__main__":
    main()
