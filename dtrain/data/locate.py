"""Where one dataset's records come from, as data.path names it: one file, a glob or a directory of
shards (jsonl/json/parquet/csv/txt, one type), a `datasets` save_to_disk directory, or a Hub
dataset `org/name` (with data.subset and data.split, through `datasets.load_dataset`, from its
cache when HF_HUB_OFFLINE=1). No torch or datasets import here: config checks call `check`.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from dtrain.errors import ConfigError
from dtrain.model import hub

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass(frozen=True)
class Located:
    """kind: files (builder + shards), disk (a save_to_disk directory) or hub (a Hub dataset ID)."""

    kind: str
    where: str  # data.path as written
    builder: str | None = None
    shards: tuple[Path, ...] = ()


def locate(where: str, key: str = "data.path") -> Located:
    """What `where` names, or a one-line ConfigError naming it and what exists."""
    p = Path(where)
    if glob.has_magic(where):
        matches = sorted(Path(m) for m in glob.glob(where, recursive=True) if Path(m).is_file())
        if not matches:
            raise ConfigError(f"{key} = '{where}': the glob matches no file")
        return _shards(where, matches, key)
    if p.is_file():
        return _shards(where, [p], key)
    if p.is_dir():
        if any((p / m).is_file() for m in DISK_MARKERS):
            return Located("disk", where)
        found = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not found:
            raise ConfigError(
                f"{key} = '{where}': the directory holds no {'/'.join(BUILDERS)} file and is not a save_to_disk dataset"
            )
        return _shards(where, found, key)
    if hub.is_hub_id(where) and p.suffix.lower() not in BUILDERS:  # `data/x.jsonl` is a missing file
        return Located("hub", where)
    raise ConfigError(f"{key} = '{where}': file not found")


def _shards(where: str, shards: list[Path], key: str) -> Located:
    kinds = {f.suffix.lower() for f in shards}
    unknown = sorted(kinds - set(BUILDERS))
    if unknown:
        which = f" {unknown[0]}" if len(shards) > 1 else ""
        raise ConfigError(f"{key} = '{where}': unsupported file type{which} (allowed: {', '.join(BUILDERS)})")
    builders = {BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise ConfigError(f"{key} = '{where}': shards of different types ({', '.join(sorted(kinds))}); use one type")
    return Located("files", where, builders.pop(), tuple(shards))


def check(where: str, key: str) -> None:
    """data.path (or a mix entry's, or data.eval_path) names something readable; offline, a Hub
    dataset must be in one of the caches `datasets` reads."""
    loc = locate(where, key)
    if loc.kind == "hub" and hub.offline() and not (hub.cache_dir() / f"datasets--{where.replace('/', '--')}").is_dir():
        raise ConfigError(
            f"{key} = '{where}': no such local path, and the Hub dataset is not in the Hugging Face "
            f"cache {hub.cache_dir()} (HF_HUB_OFFLINE=1); run `dtrain download {where} --dataset` "
            "where the Hub is reachable"
        )


def is_text(where: str) -> bool:
    """Plain-text shards (paragraphs as records)."""
    try:
        loc = locate(where)
    except ConfigError:
        return Path(where).suffix.lower() == ".txt"
    return loc.builder == "text"
