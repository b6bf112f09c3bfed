"""Writing files so that a crash never leaves a half-written one: write beside, fsync, rename.

A whole directory is published the same way: it is written under `staging_dir(final)`, then
`publish` writes the COMPLETE marker last (the caller's info, and the sha256 of every file), fsyncs
and renames it into place. `verify` tells a complete, intact directory from an interrupted,
truncated or corrupted one. `together` runs a write on rank 0 (or on every rank) so that its
failure ends every rank. Only safetensors and JSON: no pickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.errors import DtrainError

if TYPE_CHECKING:
    import torch

MARKER = "COMPLETE"


MARKER_FORMAT = 1


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` by `text` in one step: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # torch on first use: every `dtrain` command imports this module

    """Write a safetensors file and fsync it. An empty tensor is refused, never written.

    An empty tensor in a state to save is an unmaterialized shard (a ZeRO-3 parameter read outside
    a gather is a shape-[0] placeholder): writing it would silently produce a broken file.
    """
    for key, t in tensors.items():
        if t.numel() == 0:
            raise ValueError(
                f"refusing to write '{key}' of shape {list(t.shape)} to {path.name}: an empty "
                "(unmaterialized) tensor; gather the full parameter first"
            )
    try:
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path), metadata)
    except Exception as e:  # safetensors reports I/O errors as its own type: keep "disk full" an OSError
        if "os error 28" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise
    fsync_path(path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or malformed file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DtrainError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {str(e).splitlines()[0]}"
        ) from None


def cache_home() -> Path:
    """dtrain's cache (imported models, token caches): $DTRAIN_CACHE, else ~/.cache/dtrain."""
    return Path(os.environ.get("DTRAIN_CACHE") or Path.home() / ".cache" / "dtrain")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- directories published with a checksummed marker ----------------------------------------


def staging_dir(final: Path) -> Path:
    """The temporary directory, next to `final`, that is renamed to `final` when complete."""
    return final.parent / f".tmp-{final.name}"


def fresh_dir(path: Path) -> None:
    """An empty directory at `path` (whatever was there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def publish(tmp: Path, final: Path, info: dict) -> None:
    """Write COMPLETE (info + sha256 of every file) into `tmp`, fsync, rename `tmp` to `final`."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
    sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        fsync_path(d)
    write_json(tmp / MARKER, {**info, "format": MARKER_FORMAT, "files": sums})
    fsync_path(tmp)
    replace_dir(tmp, final)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final`. An existing `final` (a stale copy, or one the
    user asked to overwrite) is moved aside first and removed only once the new one is in place:
    a crash in between leaves one of the two whole."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify(directory: Path, required: Callable[[dict], list[str]] = lambda info: []) -> str | None:
    """None when published `directory` is complete and intact, else the reason it is not (one line).
    `required(info)`: the files its COMPLETE marker (info) must list, for the kind of directory."""
    marker = directory / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (interrupted write?)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER} marker"
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    missing = [f for f in required(info) if f not in files]
    if missing:
        return f"{MARKER} does not list {missing[0]}"
    for rel, digest in sorted(files.items()):
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its checksum (truncated or corrupted)"
    return None
