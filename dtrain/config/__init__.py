"""The run's configuration: `schema` (the typed fields and their defaults, loading YAML with
`key.sub=value` overrides), `types` (coercion and range checks), `checks` (cross-field checks),
`paths` (relative paths resolved one way). Pure: nothing here downloads or builds a model.

`dtrain.config.load`, `dtrain.config.Config` and the section classes are importable from here."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    name: "dtrain.config.schema"
    for name in (
        "Config",
        "ModelConfig",
        "LoraConfig",
        "DataConfig",
        "TrainingConfig",
        "DpoConfig",
        "BackendConfig",
        "QuantizationConfig",
        "OutputConfig",
        "LoggingConfig",
        "load",
        "from_dict",
        "to_dict",
        "save",
        "describe_schema",
    )
}
_PUBLIC["ConfigError"] = "dtrain.errors"


def __getattr__(name: str) -> Any:  # lazy: importing dtrain.config.types must not import the schema
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dtrain.config' has no attribute {name!r}")
