"""Why a data file could not be read, in one line: the `datasets` library's own errors say
"An error occurred while generating the dataset" and little else. Called only after a read failed,
so a large, valid file is never scanned twice."""

from __future__ import annotations

import json
from pathlib import Path

_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


def explain(path: str | Path) -> str | None:
    """The first concrete problem of data file `path` (empty, not UTF-8, a bad JSON line), or None."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return f"data.path = '{p}': the file is empty"
        if p.suffix.lower() not in _TEXT_SUFFIXES:
            return None
        with open(p, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if p.suffix.lower() == ".jsonl" and line.strip():
                    problem = _json_problem(line)
                    if problem:
                        return f"data.path = '{p}': line {number} is not valid JSON ({problem})"
    except UnicodeDecodeError as e:
        return f"data.path = '{p}': not UTF-8 text (byte 0x{e.object[e.start]:02x}; a binary file?)"
    except OSError as e:
        return f"data.path = '{p}': cannot read it ({e.strerror})"
    return None


def _json_problem(line: str) -> str | None:
    try:
        value = json.loads(line)
    except ValueError as e:
        return f"{getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}"
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    return None
