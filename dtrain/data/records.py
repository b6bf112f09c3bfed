"""Raw records from local files (through `datasets`, no hub access) and their checks per format."""

from __future__ import annotations

import logging
from pathlib import Path

from dtrain.config import DataConfig
from dtrain.errors import ConfigError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_records(cfg: DataConfig) -> list[dict]:
    """The raw records of data.path, read with `datasets` (no hub access)."""
    import datasets

    path = Path(cfg.path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"data.path = '{path}': unsupported file type (allowed: {', '.join(BUILDERS)})")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    if builder == "csv":  # keep the fields as written: an answer "4" must not become the int 4
        names = (cfg.text_field, cfg.prompt_field, cfg.response_field, *cfg.alpaca_fields)
        kwargs["converters"] = {f: str for f in names}
    datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets")  # its own log line would repeat ours, less clearly
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types for a malformed file
        from dtrain.data.explain import explain

        reason = explain(path) or f"data.path = '{path}': cannot read as {builder}: {str(e).splitlines()[0]}"
        raise ConfigError(reason) from None
    finally:
        quiet.setLevel(level)
    return ds.to_list()


def required_fields(cfg: DataConfig) -> list[str]:
    """Fields that must hold non-empty text (the conversation formats are checked in chat.py)."""
    return {"text": [cfg.text_field], "instruction": [cfg.prompt_field, cfg.response_field],
            "alpaca": [cfg.alpaca_fields[0], cfg.alpaca_fields[2]]}.get(cfg.format, [])


def record_problem(rec: dict, cfg: DataConfig) -> str | None:
    """Why the record cannot be used, or None."""
    for f in required_fields(cfg):
        if not isinstance(rec.get(f), str) or not rec[f].strip():
            return f"a missing or empty '{f}'"
    return None
