"""metrics.jsonl: one JSON object per logged step, appended (a resumed run continues the file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlLogger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a")

    def log(self, row: dict[str, Any], step: int) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
