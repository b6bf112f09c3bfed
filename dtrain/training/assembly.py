"""Model assembly for training, the same for every backend and run before any sharding: the
quantized base, the LoRA adapter from the config, what is frozen, the step options. No rank here.
"""

from __future__ import annotations

from torch import nn

from dtrain.config.schema import Config
from dtrain.lora import experts, ops as lora
from dtrain.lora.layer import AdapterSpec
from dtrain.training import reference, step_options as step_opts


def assemble(model: nn.Module, cfg: Config) -> None:
    """Quantize, add the adapter and freeze the base (mode lora), in place, before sharding; then
    the step options (checkpointing policy, compiled blocks, chunked-loss head)."""
    if cfg.quantization.bits in (8, 4):
        from dtrain.model import quant

        skip = quant.skip_rule(cfg.quantization.include_head, model)
        quant.quantize_model(model, cfg.quantization.bits, skip=skip)
        experts.quantize(model, cfg.quantization.bits)  # fused 3-D expert weights (no nn.Linear)
    if cfg.mode == "lora":
        c = cfg.lora
        names, params = experts.resolve(model, c.targets, c.target_regex, c.target_parameters)
        if names:
            lora.inject(model, names, adapter_spec(cfg))
        if params:
            experts.inject(model, params, adapter_spec(cfg))
        reference.inject_reference(model, cfg)  # dpo.reference = adapter:DIR: a frozen second adapter
        lora.freeze_base(model, cfg.lora.adapter_name)
    else:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    step_opts.apply(model, cfg)


def adapter_spec(cfg: Config) -> AdapterSpec:
    c = cfg.lora
    return AdapterSpec(
        name=c.adapter_name,
        r=c.r,
        alpha=c.alpha,
        dropout=c.dropout,
        init_seed=c.init_seed,
        use_rslora=c.use_rslora,
        use_dora=c.use_dora,
    )
