"""How a config names a model: a local directory, a built-in model (`dtrain import --list`), a Hub
ID `org/name[@revision]`, a snapshot of the Hugging Face cache, or (by mistake) a GGUF file. Syntax
only: nothing here downloads or builds a model (dtrain/model/hub.py and dtrain/model/importer.py do,
by these rules)."""

from __future__ import annotations

import re
from pathlib import Path

# the built-in models' names; how each is made lives in model/importer.BUILTIN (a test checks both agree)
BUILTIN_MODELS = ("smollm2-135m-instruct", "gemma3-270m")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SNAPSHOT = re.compile(r"(models|datasets)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})$")


def parse(value: str | None) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `value` is a Hub ID and not an existing local path, else None."""
    if not value or Path(value).exists():
        return None
    repo, _, revision = value.partition("@")
    if not _ID.fullmatch(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if value.startswith((".", "/", "~")) or (revision == "" and "@" in value):
        return None
    return repo, revision or None


def is_hub_id(value: str | None) -> bool:
    return parse(value) is not None


def display(path: str | Path | None) -> str | None:
    """`org/name@commit` for a snapshot directory of an HF cache, else the path as given."""
    if path is None:
        return None
    m = _SNAPSHOT.search(Path(path).as_posix())
    return f"{m.group(2)}/{m.group(3)}@{m.group(4)}" if m else str(path)


def commit_of(path: str | Path | None) -> str | None:
    """The commit hash of a snapshot directory of an HF cache, else None."""
    m = _SNAPSHOT.search(Path(path).as_posix()) if path is not None else None
    return m.group(4) if m else None


def is_builtin(name: str | None) -> bool:
    return name is not None and name.lower() in BUILTIN_MODELS


def is_named_model(value: str | None) -> bool:
    """A built-in model's name or a Hub ID: a model that dtrain/model/sources.py resolves to a directory."""
    return is_builtin(value) or is_hub_id(value)


def gguf_hint(path: str | Path, what: str) -> str | None:
    """The error for a GGUF file given where a model directory is needed (None for other paths)."""
    p = Path(path)
    if p.suffix.lower() != ".gguf" or not p.is_file():
        return None
    return (
        f"{what} = '{p}' is a GGUF file; dtrain needs a model directory: run `dtrain import {p} --out DIR` "
        "once and use DIR"
    )
