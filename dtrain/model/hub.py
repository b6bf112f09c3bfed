"""Models named the way users name them: `org/name` or `org/name@revision` on the Hugging Face Hub.

An ID is resolved through `huggingface_hub` into the standard HF cache (HF_HOME, HF_HUB_CACHE):
only the files training, merging and generation need are fetched (config, safetensors shards and
their index, tokenizer files and chat template, generation config). With HF_HUB_OFFLINE=1 the
cache alone answers, and a miss is one line naming the ID and the cache. A resolved model is an
ordinary local directory, `<cache>/models--org--name/snapshots/<commit>`, so everything downstream
reads it as it reads any local directory; `display` turns such a path back into `org/name@commit`,
the form a run records (config.yaml, the checkpoint's settings, adapter_config.json).

A local path that exists always wins over a Hub ID of the same spelling.
"""

from __future__ import annotations

import os
from pathlib import Path

from dtrain.config.names import commit_of, display, is_hub_id, parse  # noqa: F401  (hub.parse etc. for its users)
from dtrain.errors import ConfigError

# what a causal LM needs to train, merge and generate; weights in .bin or other formats are not fetched
MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]


def cache_dir() -> Path:
    """The HF hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def resolve(
    value: str, key: str, download: bool = True, repo_type: str = "model", patterns: list[str] | None = None
) -> Path:
    """The local snapshot directory of Hub ID `value` (see `parse`), downloading what is missing
    (`patterns`, default: what training needs) unless `download` is False or HF_HUB_OFFLINE=1.
    `key` names the setting in errors."""
    parsed = parse(value)
    if parsed is None:
        raise ConfigError(f"{key} = '{value}': neither a local path nor a Hugging Face Hub ID (org/name[@revision])")
    repo, revision = parsed
    from huggingface_hub import snapshot_download

    local_only = offline() or not download
    patterns = patterns or (MODEL_PATTERNS if repo_type == "model" else None)
    try:
        path = snapshot_download(
            repo, revision=revision, repo_type=repo_type, allow_patterns=patterns, local_files_only=local_only
        )
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types (offline, 404, network)
        raise ConfigError(_why(value, key, repo, revision, repo_type, local_only, e)) from None
    return Path(path)


def _why(value: str, key: str, repo: str, revision: str | None, repo_type: str, local_only: bool, e: Exception) -> str:
    """The one line for a failed resolution: what is missing, where it was looked for."""
    name = type(e).__name__
    where = cache_dir()
    if local_only:
        known = cached_revisions(repo, repo_type)
        why = "HF_HUB_OFFLINE=1" if offline() else "only rank 0 downloads; the other ranks read its cache"
        if known:
            return (
                f"{key} = '{value}': revision '{revision or 'main'}' is not in the Hugging Face cache {where} "
                f"({why}; cached: {', '.join(known)})"
            )
        hint = (
            f"run `dtrain download {value}` where the Hub is reachable, or point HF_HOME / HF_HUB_CACHE at "
            "a cache that has it"
        )
        return f"{key} = '{value}': no such local path, and not in the Hugging Face cache {where} ({why}); {hint}"
    if "RevisionNotFound" in name:
        return f"{key} = '{value}': the Hub repository {repo} has no revision '{revision}'"
    if "RepositoryNotFound" in name or "GatedRepo" in name:
        return (
            f"{key} = '{value}': no such local path, and no such {repo_type} repository on the Hub (or it "
            "needs a token: HF_TOKEN)"
        )
    first = (str(e).strip().splitlines() or [name])[0][:200]
    return (
        f"{key} = '{value}': no such local path, and it could not be downloaded from the Hugging Face Hub "
        f"into {where} ({name}: {first})"
    )


def cached_revisions(repo: str, repo_type: str = "model") -> list[str]:
    """Branch / tag names (refs) and commit hashes of `repo` present in the cache."""
    d = cache_dir() / f"{repo_type}s--{repo.replace('/', '--')}"
    refs = sorted(p.name for p in (d / "refs").glob("*") if p.is_file())
    commits = sorted(p.name for p in (d / "snapshots").glob("*") if p.is_dir())
    return refs + commits


def is_main_process() -> bool:
    """Rank 0 (or alone) by the launcher's variables: only it downloads (config checks run before
    the process group exists)."""
    from dtrain.backends import launcher

    return launcher.rank() == 0


def model_dir(value: str | Path, key: str) -> Path:
    """The local directory a command's model argument names: a local directory as given, a built-in
    model's import, or a Hub ID's snapshot (`key` names the flag in errors, e.g. --base)."""
    from dtrain.model import importer

    value = str(value)
    if Path(value).is_dir():
        return Path(value)
    if importer.is_builtin(value):
        return importer.resolve(value)
    if is_hub_id(value):
        return resolve(value, key)
    return Path(value)  # the command's own check reports the missing directory
