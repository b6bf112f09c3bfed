"""The token cache: rank 0 tokenizes once and writes the token tensors; later runs (and the other
ranks) read them. An entry is keyed by a hash of the data files' bytes, the tokenizer (its full
serialization and chat template) and the data settings that change tokenization.

Layout: `<cache_dir>/<key>/tokens.safetensors` (per dataset the three arrays of a `Ragged`:
`{i}.ids`, `{i}.labels` flat int32 and `{i}.offsets` int64, n + 1 example boundaries) and
`counts.json` (per dataset: path and counts). Written aside, then renamed. Loaded as those tensors,
never as Python lists: memory is 8 bytes a token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from dtrain.config.schema import DataConfig
from dtrain.data import chat, locate, parallel, records, shards
from dtrain.data.encode import Encoded
from dtrain.data.ragged import Ragged
from dtrain.storage import files

log = logging.getLogger("dtrain.data")
VERSION = "dtrain-tokens-1"
NOT_IN_KEY = {
    "mix",
    "eval_path",
    "eval_fraction",
    "cache_dir",
    "packing",
    "tokenizer",
    "chat_template",
    "num_proc",
    "prepare_timeout_s",
}


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return files.cache_home() / "tokens"


def tokenizer_hash(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id, str(tokenizer.chat_template)]).encode())
    return h.hexdigest()


def key(cfgs: list[DataConfig], tokenizer) -> str:
    h = hashlib.sha256(VERSION.encode())
    h.update(tokenizer_hash(tokenizer).encode())
    for c in cfgs:
        settings = {k: v for k, v in dataclasses.asdict(c).items() if k not in NOT_IN_KEY}
        settings["template"] = chat.template_of(c, tokenizer) if c.format != "instruction" else None
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(fingerprint(c).encode())
    return h.hexdigest()[:32]


def fingerprint(cfg) -> str:
    """A hash of the records' bytes: every shard's (in order), a save_to_disk directory's files,
    or a Hub dataset's commit (its snapshot in the HF cache)."""
    loc = locate.locate(cfg.path)
    h = hashlib.sha256(loc.kind.encode())
    if loc.kind == "files":
        for f in loc.shards:
            h.update(files.sha256_file(f).encode())
    elif loc.kind == "disk":
        for f in sorted(p for p in Path(loc.where).rglob("*") if p.is_file()):
            h.update(f.relative_to(loc.where).as_posix().encode() + files.sha256_file(f).encode())
    else:
        h.update(str(records.hub_snapshot(cfg.path)).encode())  # .../snapshots/<commit>
    return h.hexdigest()


def load(root: Path, k: str) -> list[Encoded] | None:
    d = root / k
    if not (d / "counts.json").is_file():
        return None
    return _read(d)


def _read(d: Path) -> list[Encoded]:
    """The entry's datasets, their tensors over a mapping of tokens.safetensors (pages load on use)."""
    meta = json.loads((d / "counts.json").read_text())
    t = shards.mmap_safetensors(d / "tokens.safetensors")
    out = []
    for i, m in enumerate(meta["datasets"]):
        out.append(Encoded(Ragged(t[f"{i}.ids"], t[f"{i}.labels"], t[f"{i}.offsets"]), Counter(m["counts"])))
    return out


def build(root: Path, k: str, cfgs: list[DataConfig], tokenizer, progress: bool) -> list[Encoded]:
    """Tokenize every dataset into shards (data.num_proc processes), stream them into the entry,
    move it into place and read it back memory-mapped. An unwritable cache dir costs a warning: the
    entry is then built in the system's temp dir and removed once mapped."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp, keep = Path(tempfile.mkdtemp(prefix=f".{k}.", dir=root)), True
    except OSError as e:
        log.warning("data: could not write the token cache under %s: %s", root, e)
        tmp, keep = Path(tempfile.mkdtemp(prefix=f"dtrain-tokens-{k}.")), False
    try:
        per_dataset, meta = [], {"key": k, "datasets": []}
        for i, c in enumerate(cfgs):
            (tmp / f"shards-{i}").mkdir()
            found, counts = parallel.encode_to_shards(c, tokenizer, tmp / f"shards-{i}", progress)
            per_dataset.append(found)
            meta["datasets"].append({"path": c.path, "format": c.format, "counts": dict(counts)})
        shards.stream_safetensors(tmp / "tokens.safetensors", per_dataset, {"format": "pt", "key": k})
        for i in range(len(cfgs)):
            shutil.rmtree(tmp / f"shards-{i}")
        (tmp / "counts.json").write_text(json.dumps(meta, indent=1) + "\n")
        if not keep:
            return _read(tmp)
        try:
            tmp.rename(root / k)
        except OSError:  # another process wrote the same entry meanwhile: read that one
            shutil.rmtree(tmp, ignore_errors=True)
        return _read(root / k)
    finally:
        if not keep or tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save(root: Path, k: str, cfgs: list[DataConfig], encoded: list[Encoded]) -> None:
    """Write the entry (aside, then renamed into place); a failure only costs a warning."""
    from safetensors.torch import save_file

    tensors, meta = {}, {"key": k, "datasets": []}
    for i, (c, e) in enumerate(zip(cfgs, encoded)):
        r = e.examples
        tensors[f"{i}.ids"], tensors[f"{i}.labels"] = r.ids.to(torch.int32), r.labels.to(torch.int32)
        tensors[f"{i}.offsets"] = r.offsets.to(torch.int64)
        meta["datasets"].append({"path": c.path, "format": c.format, "counts": dict(e.counts)})
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{k}.", dir=root))
        save_file(tensors, str(tmp / "tokens.safetensors"))
        (tmp / "counts.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(root / k)
        except OSError:  # another process wrote the same entry meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("data: could not write the token cache under %s: %s", root, e)
