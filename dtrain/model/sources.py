"""Where a config's model comes from: a built-in model's name becomes its imported directory, a
Hub ID its snapshot in the Hugging Face cache (downloaded by rank 0 only). The commands that run a
model load their config through `load_config`; dtrain/config/ itself stays free of downloads."""

from __future__ import annotations

from pathlib import Path

from dtrain.config import names, schema
from dtrain.model import hub, importer


def load_config(path: str | Path | None, overrides: list[str] = ()) -> schema.Config:
    """`dtrain.config.load` with named models resolved to their directories before the checks."""
    return schema.load(path, overrides, resolve=resolve_named_models)


def resolve_named_models(cfg: schema.Config, download: bool | None = None) -> None:
    """model.path / data.tokenizer may name a built-in model (`dtrain import --list`): its local
    directory, imported on first use; or a Hub ID (`org/name[@revision]`): its snapshot in the HF
    cache. Only rank 0 downloads (`download` None: by the launcher's rank); the other ranks keep the
    ID until the trainer resolves it from rank 0's cache after the process group is up."""
    download = hub.is_main_process() if download is None else download
    for section, key in ((cfg.model, "path"), (cfg.data, "tokenizer")):
        value = getattr(section, key)
        if names.is_builtin(value) and not Path(value).is_dir():
            setattr(section, key, str(importer.resolve(value)))
        elif names.is_hub_id(value) and (download or hub.offline()):
            setattr(section, key, str(hub.resolve(value, f"{'model' if section is cfg.model else 'data'}.{key}")))
