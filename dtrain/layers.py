"""Facts about a model's layers that several modules need, with one owner each: which layers hold
quantized storage, which module is the output head, the NF4 block size, and the names of a
Hugging Face checkpoint's weight files. No torch at import, no bitsandbytes: cheap to import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dtrain.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by the callers; the CLI reads the file names without it
    from torch import nn

NF4_BLOCKSIZE = 64  # elements per NF4 absmax block (QLoRA's), over the row-major flattened weight
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: Path, where: str) -> tuple[list[str], dict | None]:
    """A checkpoint directory's safetensors files (one, or the shards its index names) and the
    index; the one reader of that layout (training's weight source and `dtrain merge`). `where`
    names the key or flag in errors ("model.path", "--base")."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where} '{index_path}': not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ConfigError(f"{where} '{index_path}': no 'weight_map' mapping")
        return sorted(set(index["weight_map"].values())), index
    if (directory / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE], None
    raise ConfigError(f"{where} '{directory}': no model.safetensors or index file (dtrain reads safetensors; "
                      "convert a .bin checkpoint with save_pretrained first)")


def is_quantized(module: nn.Module) -> bool:
    """A frozen linear with quantized storage (dtrain.quant.QuantLinear): it can rebuild its float
    weight (`dequantized_weight`), and loading fills its storage from that weight."""
    return callable(getattr(module, "dequantized_weight", None))


def is_linear(module: nn.Module) -> bool:
    """A linear layer a LoRA adapter can wrap: torch's, or a quantized one."""
    from torch import nn

    return isinstance(module, nn.Linear) or is_quantized(module)


def head_names(model: nn.Module) -> set[str]:
    """Names of the output head: what the model calls its output embeddings, and `lm_head`."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        head = None
    return {n for n, m in model.named_modules() if head is not None and m is head} | {"lm_head"}
