"""LoRA target presets: `lora.targets: attention-qv | attention | mlp | all-linear`, resolved
per model family from the model's module names.

    preset         llama / mistral / qwen2 / gemma    gpt2                  bert
    attention-qv   q_proj, v_proj (the LoRA paper's)   attn.c_attn (fused)   query, value
    attention      q_proj, k_proj, v_proj, o_proj      attn.c_attn, c_proj   query, key, value,
                                                                             attention.output.dense
    mlp            gate_proj, up_proj, down_proj       mlp.c_fc, c_proj      intermediate.dense,
                                                                             output.dense (not
                                                                             attention's)
    all-linear     every linear layer but the output head (`linear_names`)

GPT-2 fuses q, k and v into one c_attn projection, so its attention-qv adapts all three (as PEFT
does for GPT-2). The family comes from `config.model_type`; an unknown model type is recognized by
its module names (the first family whose attention pattern matches). A preset resolves to the full
names of the chosen modules; the patterns also match the block-relative names the memory
estimator uses (`self_attn.q_proj`). Also the selection itself: `linear_names` (what a LoRA
adapter may target) and `select_targets` (lora.targets / lora.target_regex on a model). Plain
Python on module names: torch only where a model is passed in.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dtrain.errors import ConfigError
from dtrain.model import layers

if TYPE_CHECKING:  # a model is passed in by callers that have torch; this module does not import it
    from torch import nn

ALL_LINEAR = "all-linear"
PRESETS = ("attention-qv", "attention", "mlp", ALL_LINEAR)

# family -> preset -> pattern on the end of a module name (preceded by '.' or the start)
FAMILIES: dict[str, dict[str, str]] = {
    "llama": {
        "attention-qv": r"self_attn\.(q_proj|v_proj)",
        "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "mlp": r"mlp\.(gate_proj|up_proj|down_proj)",
    },
    "gpt2": {"attention-qv": r"attn\.c_attn", "attention": r"attn\.(c_attn|c_proj)", "mlp": r"mlp\.(c_fc|c_proj)"},
    "bert": {
        "attention-qv": r"attention\.self\.(query|value)",
        "attention": r"attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r"(intermediate\.dense|(?<!attention\.)output\.dense)",
    },
}
# config.model_type -> family (same module names)
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "olmo": "llama",
    "olmo2": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "roberta": "bert",
}


def is_preset(targets: object) -> bool:
    """True for a preset name other than all-linear (which select_targets handles itself)."""
    return isinstance(targets, str) and targets in PRESETS and targets != ALL_LINEAR


def family_of(names: list[str], model_type: str | None = None) -> str:
    """The family whose module names the model has: by model_type, else by the names."""
    family = MODEL_TYPES.get(model_type or "")
    if family is not None:
        return family
    for fam, patterns in FAMILIES.items():
        if any(_matches(n, patterns["attention"]) for n in names):
            return fam
    known = ", ".join(sorted(k for k, v in MODEL_TYPES.items() if v))
    raise ConfigError(
        f"lora.targets: no target preset for model_type '{model_type}' (presets know: {known}); "
        "list module-name suffixes (e.g. [q_proj, v_proj]) or use all-linear"
    )


def resolve_names(names: list[str], preset: str, model_type: str | None = None) -> list[str]:
    """The names (of `names`, in order) that `preset` chooses for this model family."""
    if preset not in FAMILIES["llama"]:
        raise ConfigError(f"lora.targets = {preset!r}: not a preset ({', '.join(PRESETS)})")
    family = family_of(names, model_type)
    pattern = FAMILIES[family][preset]
    chosen = [n for n in names if _matches(n, pattern)]
    if not chosen:
        raise ConfigError(
            f"lora.targets = {preset}: no module of this {family}-family model matches "
            f"{pattern!r}; list module-name suffixes or use all-linear"
        )
    return chosen


def _matches(name: str, pattern: str) -> bool:
    return re.search(rf"(^|\.){pattern}$", name) is not None


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers a LoRA adapter may target (nn.Linear, GPT-2's Conv1D,
    dtrain's quantized and LoRA-wrapped linears; never the output head, never a LoRA layer's own
    parts): the one list that target selection, presets and the PEFT config are computed from."""
    from dtrain.lora.layer import LoRALinear  # torch: only once there is a model

    head = layers.head_names(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names.append(name)
        elif (
            layers.is_linear(module) and name not in head and ".lora_" not in name and not name.endswith(".base_layer")
        ):
            names.append(name)
    return names


def select_targets(model: nn.Module, targets: list[str] | str, regex: str | None) -> list[str]:
    """Names of the linear modules chosen by suffix list, 'all-linear' or a regex."""
    names = linear_names(model)
    if regex:
        chosen = [n for n in names if re.search(regex, n)]
        what = f"lora.target_regex = '{regex}'"
    elif targets == "all-linear":
        chosen, what = names, "lora.targets = all-linear"
    else:
        suffixes = [targets] if isinstance(targets, str) else list(targets)
        chosen = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
        what = f"lora.targets = {suffixes}"
    kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
    if not chosen:
        raise ConfigError(f"{what} matches no linear module; the model has: {kinds}")
    if not regex and targets != "all-linear":
        unmatched = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
        if unmatched:
            raise ConfigError(
                f"{what}: {', '.join(unmatched)} matches no linear module a LoRA adapter can "
                f"target (never the output head); the model has: {kinds}"
            )
    return chosen


def expand(model: nn.Module, targets: list[str] | str) -> list[str] | str:
    """`lora.targets` for select_targets: a preset becomes the full names it chooses on `model`;
    module-name suffixes and all-linear pass through unchanged."""
    if not is_preset(targets):
        return targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return resolve_names(linear_names(model), targets, model_type)
