"""Facts about a model's layers that several modules need, with one owner each: which layers hold
quantized storage, which module is the output head, the NF4 block size, and the names of a
Hugging Face checkpoint's weight files. No torch at import, no bitsandbytes: cheap to import.
"""

from __future__ import annotations

import json
import re
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
    raise ConfigError(
        f"{where} '{directory}': no model.safetensors or index file (dtrain reads safetensors; "
        "convert a .bin checkpoint with save_pretrained first)"
    )


def is_quantized(module: nn.Module) -> bool:
    """A frozen linear with quantized storage (dtrain.model.quant.QuantLinear): it can rebuild its float
    weight (`dequantized_weight`), and loading fills its storage from that weight."""
    return callable(getattr(module, "dequantized_weight", None))


def is_linear(module: nn.Module) -> bool:
    """A linear layer a LoRA adapter can wrap: torch's, a quantized one, or transformers' Conv1D."""
    from torch import nn

    return isinstance(module, nn.Linear) or is_quantized(module) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a linear layer whose weight is stored [in, out]
    (PEFT's `fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer, whatever its storage (Conv1D: nx -> nf)."""
    if is_conv1d(module):
        return int(module.nx), int(module.nf)
    return int(module.in_features), int(module.out_features)


def _named_module(model: nn.Module, getter_name: str) -> nn.Module | None:
    """What the model's own getter (get_output_embeddings, get_input_embeddings) gives, when it is
    a module; None where the model has no such getter or it raises."""
    getter = getattr(model, getter_name, None)
    try:
        found = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    from torch import nn

    return found if isinstance(found, nn.Module) else None


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head: the module the model says it is (`get_output_embeddings()`); None where
    the model names none. The one answer every part of dtrain uses (LoRA targets, quantization,
    FSDP2 units, the chunked loss, the estimator)."""
    return _named_module(model, "get_output_embeddings")


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embeddings the model names (`get_input_embeddings()`), or None."""
    return _named_module(model, "get_input_embeddings")


# Names taken for output heads in a module that names none (a model's head: output_head).
HEAD_NAMES = frozenset({"lm_head", "embed_out", "output", "output_layer", "score", "classifier", "qa_outputs", "head"})


def is_head_name(name: str) -> bool:
    """True for output heads by name alone: the last component of ``name`` is in ``HEAD_NAMES``."""
    return name.rsplit(".", 1)[-1] in HEAD_NAMES


def head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head module (empty where the model names none)."""
    head = output_head(model)
    if head is None:
        return set()
    names = {n for n, m in model.named_modules() if m is head}
    names |= {n for n, m in model.named_modules() if getattr(m, "base_layer", None) is head}  # wrapped in LoRA
    return names


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks, in order: the modules of the classes it names in
    `_no_split_modules` (what transformers itself never splits across devices); for a model that
    names none, the largest module list as long as the config's number of layers."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks or not hasattr(model, "config"):
        return blocks
    from torch import nn

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def checkpoint_key(param_name: str) -> str:
    """The checkpoint key of a model parameter: LoRA wrapping adds '.base_layer', drop it."""
    return re.sub(r"(\.base_layer)+\.", ".", param_name)  # nested wrappers (expert LoRA) add several
