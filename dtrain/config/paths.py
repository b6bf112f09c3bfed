"""Relative paths in a config, resolved one way everywhere (data, model, tokenizer, templates, JSON).

A relative path (or glob) is taken (1) as given when it exists from the working directory: what
dtrain always did; else (2) `dtrain/assets/...` names the assets shipped inside the installed
package, wherever it is installed; else (3) relative to the config file's directory, when it exists
there. Anything else stays as written, so its error names it as the user wrote it (and a Hub ID,
which exists nowhere on disk, stays a Hub ID). output.dir and data.cache_dir are places to write,
not to find: they stay relative to the working directory.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ASSETS_PREFIX = "dtrain/assets/"


def _exists(p: str) -> bool:
    return bool(glob.glob(p)) if glob.has_magic(p) else os.path.exists(p)


def resolve(value: str | None, config_dir: Path | None = None) -> str | None:
    """The path a config's `value` names (see the module docstring)."""
    if not value or os.path.isabs(value) or _exists(value):
        return value
    if value.replace(os.sep, "/").startswith(ASSETS_PREFIX):
        shipped = str(ASSETS / value[len(ASSETS_PREFIX) :])
        if _exists(shipped):
            return shipped
    if config_dir is not None:
        beside = str(config_dir / value)
        if _exists(beside):
            return beside
    return value


def resolve_config(cfg, config_dir: Path | None) -> None:
    """Resolve, in place, every path a config reads (not the ones it writes)."""
    d = cfg.data
    cfg.model.path = resolve(cfg.model.path, config_dir)
    for key in ("path", "eval_path", "tokenizer"):
        setattr(d, key, resolve(getattr(d, key), config_dir))
    if d.chat_template is not None and d.chat_template.endswith(".jinja"):
        d.chat_template = resolve(d.chat_template, config_dir)
    for entry in d.mix or []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            entry["path"] = resolve(entry["path"], config_dir)
    cfg.backend.deepspeed_config = resolve(cfg.backend.deepspeed_config, config_dir)
