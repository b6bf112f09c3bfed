"""Generation metrics on held-out prompts: exact match of the model's answer with the expected
one, and a per-record file of prompt, expected and got."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dtrain.errors import DtrainError


@dataclass
class ExactMatch:
    correct: int
    total: int
    records: list[dict]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def expected_pairs(records: list[dict], source: str) -> list[tuple[list[dict] | str, str]]:
    """(prompt or conversation up to the last assistant turn, expected answer) for each record:
    'messages' whose last turn is the assistant's, or 'prompt' + 'response'."""
    pairs = []
    for i, rec in enumerate(records):
        msgs = rec.get("messages")
        if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
            pairs.append((msgs[:-1], str(msgs[-1]["content"])))
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
            pairs.append((rec["prompt"], rec["response"]))
        else:
            raise DtrainError(
                f"{source}: record {i}: needs 'messages' ending with an assistant turn, or 'prompt' and 'response'"
            )
    return pairs


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        raise DtrainError(f"'{path}': file not found")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DtrainError(f"'{path}': line {i}: not JSON ({e.msg})") from None
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DtrainError(f"'{path}': no records")
    return out


def exact_match(generator, records: list[dict], sampling, source: str = "eval data", stop=None) -> ExactMatch:
    """Answer every prompt; an answer counts when it equals the expected one (both stripped).
    `stop()`, asked before each batch of prompts, ends it early (raising preempt.Preempted)."""
    pairs = expected_pairs(records, source)
    got = generator.generate([p for p, _ in pairs], sampling, stop=stop)
    rows, correct = [], 0
    for (prompt, want), answer in zip(pairs, got):
        ok = answer.strip() == want.strip()
        correct += ok
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        rows.append({"prompt": shown, "expected": want, "got": answer, "correct": ok})
    return ExactMatch(correct, len(pairs), rows)
