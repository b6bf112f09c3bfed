"""A Hugging Face Hub cache built by hand in huggingface_hub's own layout, so tests resolve Hub IDs
with no network: `<hub>/models--org--name/blobs/<sha256>` holds each file once,
`snapshots/<commit>/<file>` links to its blob, `refs/<branch>` holds the commit hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_snapshot(
    hub: Path,
    repo_id: str,
    src: Path,
    commit: str,
    refs: tuple[str, ...] = ("main",),
    repo_type: str = "model",
    skip: tuple[str, ...] = (),
) -> Path:
    """Put the files of directory `src` into `hub` as revision `commit` of `repo_id`; returns the
    snapshot directory."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name not in skip):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            os.link(f, blob) if f.stat().st_dev == blob.parent.stat().st_dev else blob.write_bytes(f.read_bytes())
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap
