"""Where a step spends memory and time, chosen in the config and applied to the model before
sharding (by training/assembly.assemble): the gradient checkpointing policy, compiled decoder blocks, and the
chunked loss in the output head (dtrain/training/loss.py). None of this depends on the backend.

Checkpointing policy (`model.gradient_checkpointing`, `model.gradient_checkpointing_every: N`):
  true       whole decoder blocks 0, N, 2N, ... recompute their forward in backward (HF's own
             non-reentrant switch, turned off again on the other blocks)
  attention  only the attention module of those blocks recomputes: the MLP's activations are kept
             and the attention's (q, k, v, scores) are recomputed, a middle point between the two
Both recompute through the module's `forward` (not `__call__`), so the submodules are called again
and their sharding hooks (ZeRO-3's gathers) fire during recomputation.

Compiled blocks (`model.compile_blocks`): each decoder block's `forward` goes through
`torch.compile`; the module's hooks (FSDP2's unshard, ZeRO-3's gathers) stay outside the compiled
code. On CPU, inductor needs a C++ compiler; the first step pays the compilation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dtrain.model import layers
from dtrain.training import loss as loss_lib


def apply_checkpointing(model: nn.Module, policy: bool | str, every: int) -> list[int]:
    """Turn on the checkpointing policy; returns the indices of the blocks that recompute."""

    if not policy:
        return []
    blocks = layers.decoder_blocks(model)
    chosen = [i for i in range(len(blocks)) if i % every == 0]
    if policy == "attention":
        for i in chosen:
            checkpoint_attention(_attention(blocks[i]))
        model.config.use_cache = False
        return chosen
    enable_gradient_checkpointing(model)
    for i, block in enumerate(blocks):
        if i not in chosen and hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = False
    return chosen


def _attention(block: nn.Module) -> nn.Module:
    for name in ("self_attn", "attention", "attn", "self_attention"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    from dtrain.config.schema import ConfigError

    raise ConfigError(
        f"model.gradient_checkpointing = attention: {type(block).__name__} has no "
        f"self_attn / attention / attn submodule"
    )


def checkpoint_attention(attn: nn.Module) -> None:
    """`attn` recomputes its forward in backward (non-reentrant), when training with grad."""
    plain = attn.forward

    def forward(*args, **kwargs):
        if attn.training and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    attn.forward = forward
    attn._dtrain_checkpointed = True  # dtrain memory counts its inputs (kept for the recompute)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each decoder block's forward; returns how many were compiled."""
    blocks = layers.decoder_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)


# Config fields of models that transform the logits after the output head (Gemma 2/3's softcapping,
# Granite's scaling, Cohere's scale): the chunked loss, computed inside the head, would skip it.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0}


def logit_transform(config) -> str | None:
    """The config field by which this model changes its logits after the head, or None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(text, key, neutral)
        if value is not None and value != neutral:
            return key
    return None


def chunked_loss_wanted(setting: bool | str, mode: str, head: nn.Module | None, config=None) -> bool:
    """training.chunked_loss: true / false, or auto (LoRA with a plain linear head whose output the
    model returns as it is)."""
    from dtrain.config.schema import ConfigError

    if setting is True and not loss_lib.supports(head):
        raise ConfigError(
            f"training.chunked_loss = true needs a plain linear output head; this model's is "
            f"{type(head).__name__} (an adapted or quantized head): use auto or false"
        )
    transform = logit_transform(config) if config is not None else None
    if setting is True and transform:
        raise ConfigError(
            f"training.chunked_loss = true: a {config.model_type} model changes its logits after the "
            f"output head ({transform}), which a loss computed in the head would skip: use auto or false"
        )
    if setting == "auto":
        return mode == "lora" and loss_lib.supports(head) and transform is None
    return bool(setting)


def apply(model: nn.Module, cfg) -> None:
    """Every choice of this module the config makes, in place (before sharding). Silent: what was
    chosen is logged once the run has started (`describe`), so a later setup error stays one line."""
    m, t = cfg.model, cfg.training
    model._dtrain_checkpointed = apply_checkpointing(model, m.gradient_checkpointing, m.gradient_checkpointing_every)
    model._dtrain_compiled = compile_blocks(model) if m.compile_blocks else 0
    head = layers.output_head(model)
    if chunked_loss_wanted(t.chunked_loss, cfg.mode, head, model.config):
        loss_lib.install(head, t.loss_chunk_tokens)


def describe(model: nn.Module, cfg) -> list[str]:
    """What `apply` chose for this model, one line each."""
    m, lines = cfg.model, []
    chosen = getattr(model, "_dtrain_checkpointed", None)
    if chosen:
        kind = "attention only" if m.gradient_checkpointing == "attention" else "whole blocks"
        lines.append(f"gradient checkpointing ({kind}): blocks {_ranges(chosen, m.gradient_checkpointing_every)}")
    if getattr(model, "_dtrain_compiled", 0):
        lines.append(f"torch.compile: {model._dtrain_compiled} decoder blocks")
    if loss_lib.installed(layers.output_head(model)):
        head = layers.output_head(model)
        how = "" if cfg.training.loss_chunk_tokens else " (from the vocabulary)"
        lines.append(f"chunked loss: on, {head._dtrain_chunk} tokens per chunk{how}, labelled positions only")
    return lines


def _ranges(chosen: list[int], every: int) -> str:
    return f"{chosen[0]}..{chosen[-1]} every {every}" if every > 1 and len(chosen) > 2 else str(chosen)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing in every decoder layer (HF's switch)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
