"""Where `dtrain estimate` / `dtrain plan` find a model's HF config: a preset, a published
architecture under configs/models, a model directory, a config.json, or a dtrain YAML's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError
from dtrain.memory.model_spec import PRESETS


def resolve_model(arg: str) -> tuple[str, dict[str, Any]]:
    """(name, HF config dict) for --model: a preset, a YAML config, a directory or a JSON file."""
    if arg in PRESETS:
        return arg, dict(PRESETS[arg])
    path = Path(arg)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"estimate: config file not found: {arg}")
        return path.stem, load_yaml_model_config(path)
    if path.is_dir():
        return path.resolve().name, read_config_json(path)
    if path.is_file() and path.suffix == ".json":
        return path.resolve().parent.name, read_config_json(path)
    shipped = shipped_model(arg)
    if shipped is not None and not path.exists():
        return shipped.name, read_config_json(shipped)
    from dtrain.model import hub

    if hub.is_hub_id(arg) and not path.suffix:  # a Hub model: its config.json alone is fetched
        snapshot = hub.resolve(arg, "estimate: --model", patterns=["config.json"])
        return hub.parse(arg)[0].split("/")[1], read_config_json(snapshot)
    if not path.exists() and ("/" in arg or arg.startswith(".")):
        raise ConfigError(f"estimate: --model {arg!r}: no such directory or file")
    raise ConfigError(
        f"estimate: --model {arg!r} is not a preset ({', '.join(PRESETS)}), a "
        "model directory, a config.json or a YAML config"
    )


SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "models"


def shipped_model(arg: str) -> Path | None:
    """A published architecture under configs/models named by ``arg``: the directory's name, or
    its start (``Llama-3.1-8B`` -> Llama-3.1-8B-Instruct), case-insensitive; None if none or several."""
    if "/" in arg or not SHIPPED.is_dir():
        return None
    names = [d for d in SHIPPED.iterdir() if (d / "config.json").is_file()]
    exact = [d for d in names if d.name.lower() == arg.lower()]
    found = exact or [d for d in names if d.name.lower().startswith(arg.lower() + "-")]
    return found[0] if len(found) == 1 else None


def read_config_json(path: Path) -> dict[str, Any]:
    """The HF config of a model directory (its config.json) or of a JSON file."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"estimate: {path} has no config.json" if path.is_dir() else f"estimate: file not found: {path}"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"estimate: cannot read {file}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"estimate: {file} is not a JSON object")
    return data


def load_yaml_model_config(path: Path) -> dict[str, Any]:
    """HF config dict named by a dtrain YAML's ``model`` section: ``model.arch`` (inline HF
    config with ``model_type``) or ``model.path`` (a directory with config.json; relative to
    the working directory, else to the YAML's directory).

    The file is read by dtrain.config.schema's YAML reader, but not validated as a whole config: an
    estimate needs only the model, not the data files a training run would.
    """
    from dtrain.config.schema import read_yaml

    data = read_yaml(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"estimate: {path}: no 'model' section")
    arch = model.get("arch")
    if isinstance(arch, dict):
        if not arch.get("model_type"):
            raise ConfigError(f"estimate: {path}: model.arch needs 'model_type' (e.g. llama)")
        return dict(arch)
    if isinstance(model.get("path"), str):
        target = Path(model["path"])
        if not target.is_dir() and not target.is_absolute():
            target = path.parent / target
        shipped = path.parent / "models" / target.name  # a recipe's architecture (configs/models/<name>)
        if not target.is_dir() and (shipped / "config.json").is_file():
            target = shipped
        if not target.is_dir():
            raise ConfigError(f"estimate: {path}: model.path = {model['path']!r}: directory not found")
        return read_config_json(target)
    raise ConfigError(f"estimate: {path}: set model.arch (inline HF config) or model.path")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]
