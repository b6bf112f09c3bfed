"""Raw records of a dataset (data.path: a file, shards, a save_to_disk directory or a Hub dataset,
see locate.py), read with `datasets`, and their checks per format."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from dtrain.config.schema import DataConfig
from dtrain.data.locate import BUILDERS, Located, locate
from dtrain.errors import ConfigError

__all__ = ["BUILDERS", "load_records", "open_dataset", "required_fields", "record_problem"]


def load_records(cfg: DataConfig) -> list[dict]:
    """The raw records of data.path as a list of dicts."""
    return open_dataset(cfg).to_list()


def open_dataset(cfg: DataConfig):
    """data.path as a `datasets.Dataset` (Arrow, memory-mapped), one split."""
    import datasets

    loc = locate(cfg.path)
    datasets.disable_progress_bars()
    with _quiet():
        try:
            if loc.kind == "files":
                ds = _from_files(loc, cfg)
            elif loc.kind == "disk":
                ds = _from_disk(loc, cfg)
            else:
                ds = datasets.load_dataset(str(hub_snapshot(loc.where)), name=cfg.subset, split=cfg.split)
        except ConfigError:
            raise
        except Exception as e:  # datasets raises many types for a malformed file or a missing split
            raise ConfigError(_why(loc, e)) from None
    if loc.builder == "text" and cfg.text_field != "text":
        ds = ds.rename_column("text", cfg.text_field)
    return ds


def hub_snapshot(repo: str) -> Path:
    """A Hub dataset's snapshot in the HF cache, downloaded (whole) by rank 0 alone: `datasets` then
    reads it as a local folder (configs and splits from its README and file names), so an offline
    run needs nothing but that cache."""
    from dtrain.model import hub

    return hub.resolve(repo, "data.path", download=hub.is_main_process(), repo_type="dataset")


def _from_files(loc: Located, cfg: DataConfig):
    import datasets

    kwargs = {"sample_by": "paragraph"} if loc.builder == "text" else {}
    if loc.builder == "csv":  # keep the fields as written: an answer "4" must not become the int 4
        names = (cfg.text_field, cfg.prompt_field, cfg.response_field, *cfg.alpaca_fields)
        kwargs["converters"] = {f: str for f in names}
    _same_columns(loc)
    return datasets.load_dataset(loc.builder, data_files=[str(f) for f in loc.shards], split="train", **kwargs)


def _from_disk(loc: Located, cfg: DataConfig):
    import datasets

    ds = datasets.load_from_disk(loc.where)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ConfigError(
                f"data.path = '{loc.where}': no split '{cfg.split}' (splits: {', '.join(ds)}); set data.split"
            )
        ds = ds[cfg.split]
    return ds


def _same_columns(loc: Located) -> None:
    """Parquet and csv shards must agree on their columns (json shards are checked by datasets)."""
    if len(loc.shards) < 2 or loc.builder not in ("parquet", "csv"):
        return
    first = _columns(loc.shards[0], loc.builder)
    for f in loc.shards[1:]:
        cols = _columns(f, loc.builder)
        if cols != first:
            raise ConfigError(
                f"data.path = '{loc.where}': shards have different columns: {loc.shards[0].name} has "
                f"[{', '.join(first)}], {f.name} has [{', '.join(cols)}]"
            )


def _columns(f: Path, builder: str) -> list[str]:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return sorted(pq.read_schema(f).names)
    with open(f, encoding="utf-8", errors="replace") as fh:
        return sorted(c.strip() for c in fh.readline().rstrip("\r\n").split(","))


def _why(loc: Located, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if loc.kind == "files":
        from dtrain.data.explain import explain

        for f in loc.shards:
            reason = explain(f)
            if reason:
                return reason
        if len(loc.shards) > 1 and ("column" in first.lower() or "schema" in first.lower() or "cast" in first.lower()):
            return f"data.path = '{loc.where}': shards have different columns ({first})"
        return f"data.path = '{loc.where}': cannot read as {loc.builder}: {first}"
    if loc.kind == "hub":
        return f"data.path = '{loc.where}' (Hub dataset, subset / split from data.subset / data.split): {first}"
    return f"data.path = '{loc.where}': cannot load the save_to_disk dataset: {first}"


@contextlib.contextmanager
def _quiet():
    """datasets' own log lines would repeat ours, less clearly."""
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        quiet.setLevel(level)


def required_fields(cfg: DataConfig) -> list[str]:
    """Fields that must hold non-empty text (the conversation formats are checked in chat.py)."""
    return {
        "text": [cfg.text_field],
        "instruction": [cfg.prompt_field, cfg.response_field],
        "alpaca": [cfg.alpaca_fields[0], cfg.alpaca_fields[2]],
    }.get(cfg.format, [])


def record_problem(rec: dict, cfg: DataConfig) -> str | None:
    """Why the record cannot be used, or None."""
    for f in required_fields(cfg):
        if not isinstance(rec.get(f), str) or not rec[f].strip():
            return f"a missing or empty '{f}'"
    return None
