r"""LoRA on an MoE router's weight (PEFT 0.21's `ParamWrapper` on a 2-D parameter).

In transformers 5 the router of Qwen3-MoE / Mixtral (`mlp.gate`) and gpt-oss (`mlp.router`) is a
*TopKRouter module, not an nn.Linear: it holds `weight` [E, H] (gpt-oss also `bias` [E]) and its
forward runs linear -> softmax / top-k in one call. Naming `mlp.gate.weight` in
`lora.target_parameters` adapts it as PEFT does (num_experts = 1):

    lora_A  [r, H]     lora_B  [E, r]     W' = W + s B A     (s = alpha / r, or alpha / sqrt(r))

The wrapper (PEFT's names: `mlp.gate.base_layer` is the router, `mlp.gate.lora_A` / `lora_B`)
builds s B A, each factor read inside its own call (where FSDP2 / ZeRO-3 have gathered it), and
calls the router with it; the router's own forward then reads `weight` as W + s B A for that call
only. Materialising the update is right here, unlike for a linear or the experts: [E, H] is the
router's own size (E x H, a few thousand to a few hundred thousand numbers), and the softmax /
top-k inside the router's forward needs the logits of the whole weight. No rank is asked here.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.lora import layer as lora, variants
from dtrain.model.shapes import logical_shape


def is_router(module: nn.Module) -> bool:
    """A transformers 5 MoE router dtrain can wrap: not a linear layer, a 2-D `weight` [E, H] with
    one row per expert, read by its own forward (the *TopKRouter of qwen3_moe, mixtral, gpt_oss)."""
    w = module._parameters.get("weight")
    if isinstance(module, nn.Linear) or w is None or not hasattr(module, "top_k"):
        return False
    shape = logical_shape(w)
    return len(shape) == 2 and int(shape[0]) == int(getattr(module, "num_experts", -1))


class RouterFactor(nn.Linear):
    """The router's A [r, H] or B [E, r]: called without input it returns its weight with its
    gradient, as a new tensor (ZeRO-3 frees the parameter's storage after the call)."""

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * 1 if x is None else super().forward(x)


def _router_forward(self: nn.Module, *args, _lora_delta: torch.Tensor | None = None, **kwargs):
    """The router's class forward, its `weight` read as W + delta during this call only. It runs
    after every pre-forward hook, so ZeRO-3 / FSDP2 have gathered W by then."""
    if _lora_delta is None:
        return type(self).forward(self, *args, **kwargs)
    w = self._parameters["weight"]
    self.__dict__["weight"] = w + _lora_delta.to(w.dtype)  # shadows the parameter for this call
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        del self.__dict__["weight"]


class ParamMerge:
    """merge / unmerge of LoRA on a parameter (router or experts): `base_param()` += or -= the
    layer's `delta_weight`, in the parameter's layout and dtype."""

    def merge(self) -> None:
        if self.merged_adapter is not None:
            raise RuntimeError(f"{self.qualified_name}: adapter '{self.merged_adapter}' is already merged")
        if self.active_adapter is not None:
            self._fold(self.active_adapter, 1.0)
            self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            if self.active_adapter is None:
                return
            raise RuntimeError(f"{self.qualified_name}: no adapter is merged")
        self._fold(self.merged_adapter, -1.0)
        self.merged_adapter = None

    def _fold(self, name: str, sign: float) -> None:
        w = self.base_param().data
        with torch.no_grad():
            w.add_((sign * self.delta_weight(name)).to(w.dtype))


class RouterLoRA(ParamMerge, lora.LoRALinear):
    """LoRA on a router's `weight` (PEFT's ParamWrapper on a 2-D parameter, its names and layout)."""

    def __init__(self, base_layer: nn.Module, qualified_name: str = "") -> None:
        nn.Module.__init__(self)
        if not is_router(base_layer):
            raise ConfigError(
                f"lora.target_parameters: {qualified_name} belongs to a {type(base_layer).__name__}, "
                "not an MoE router dtrain can adapt"
            )
        self.base_layer, self.param_name, self.qualified_name = base_layer, "weight", qualified_name
        out, fan_in = (int(d) for d in logical_shape(base_layer.weight))
        self.in_features, self.out_features = fan_in, out
        self.num_experts, self.transposed, self.fan_in_fan_out = 1, False, False  # as PEFT reads a 2-D parameter
        self.init_adapters()
        if "forward" not in base_layer.__dict__:
            base_layer.forward = types.MethodType(_router_forward, base_layer)

    def unwrapped(self) -> nn.Module:
        """The router, its own forward restored (after merge: the base model's module)."""
        self.base_layer.__dict__.pop("forward", None)
        return self.base_layer

    def add_adapter(self, spec: lora.AdapterSpec) -> None:
        variant = plain_lora(spec, "LoRA on a router weight", "the router's weight")
        device = self.base_layer.weight.device
        a = RouterFactor(self.in_features, spec.r, bias=False, device=device)
        add_factors(self, spec, variant, a, RouterFactor(spec.r, self.out_features, bias=False, device=device))

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return self.base_layer(*args, **kwargs)
        a, b = self.lora_A[name](), self.lora_B[name]()  # each gathered in its own call
        return self.base_layer(*args, _lora_delta=(b @ a) * self.scaling[name], **kwargs)

    def base_param(self) -> nn.Parameter:
        return self.base_layer.weight


def plain_lora(spec: lora.AdapterSpec, what: str, weight: str):
    """The variant of `spec` for LoRA on a parameter (router or experts), which is plain LoRA only,
    as PEFT's ParamWrapper: no DoRA, no dropout (it cannot be factored out of a weight)."""
    variant = variants.for_spec(spec)
    if variant.flag or spec.dropout > 0:
        raise ConfigError(
            f"lora.target_parameters: {what} takes no lora.use_dora and no lora.dropout "
            f"(as PEFT's ParamWrapper: dropout cannot be factored out of {weight})"
        )
    return variant


def add_factors(layer: lora.LoRALinear, spec: lora.AdapterSpec, variant, a: nn.Module, b: nn.Module) -> None:
    """Register adapter `spec`'s A and B on a parameter wrapper (router or experts: plain LoRA, no
    dropout), initialised unless built on the meta device; the first adapter becomes active."""
    layer.lora_A[spec.name], layer.lora_B[spec.name] = a, b
    layer.specs[spec.name], layer.scaling[spec.name] = spec, spec.scaling
    layer.lora_variant[spec.name] = variant
    layer.lora_dropout[spec.name] = nn.Identity()
    if a.weight.device.type != "meta":
        layer.reset_adapter(spec.name)
    if layer.active_adapter is None:
        layer.active_adapter = spec.name


def router_weights(model: nn.Module) -> list[tuple[str, str]]:
    """(router module name, 'weight') of every router dtrain can adapt, in registration order
    (names without the '.base_layer' that wrapping adds)."""
    out = []
    for name, module in model.named_modules():
        if is_router(module):
            out.append((name.removesuffix(".base_layer"), "weight"))
    return out
