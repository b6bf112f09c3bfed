r"""LoRA on fused mixture-of-experts weights (PEFT's `target_parameters`, `lora.ParamWrapper`).

In transformers 5 the experts of Qwen3-MoE, Mixtral and gpt-oss are one module holding 3-D
parameters, `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (gpt-oss stores them transposed,
[E, in, out], and adds biases), not nn.Linear modules. An expert parameter gets, per adapter, one
low-rank update per expert, stored as PEFT 0.21 stores it:

    lora_A  [r * E, in]    rows e*r .. e*r + r-1 are expert e's A_e (r x in)
    lora_B  [out, r * E]   column k*E + e is column k of expert e's B_e (out x r)

so W'_e = W_e + s B_e A_e (s = alpha / r, or alpha / sqrt(r)); A Kaiming-uniform from a name-seeded
generator, B zero. Several parameters of one module nest as PEFT nests them: the parameter
registered last is the outermost wrapper (`experts.lora_A`), the one before it wraps inside it
(`experts.base_layer.lora_A`), so parameter names and saved keys equal PEFT's.

Compute. The update is applied to the routed tokens, never by building W_e + s B_e A_e: tokens are
sorted by expert (as transformers' grouped_mm path does) and each projection runs as one grouped
matmul over the experts for the frozen weight, and the same grouped matmul for A then B:

    y = grouped(x, W) + s * grouped(grouped(x, A), B)        (x: the routed rows, sorted by expert)

Each parameter is read inside its own module's call (the frozen ones in the experts module's,
A and B in their own), which is where FSDP2 and ZeRO-3 have gathered them. No rank is asked here.
"""

from __future__ import annotations

import dataclasses
import types

import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.lora import layer as lora, router
from dtrain.lora.expert_forward import Groups, grouped_linear, lora_experts_forward
from dtrain.model import expert_quant
from dtrain.model.shapes import logical_shape


class ExpertFactor(nn.Linear):
    """An expert parameter's A ([r*E, in]) or B ([out, r*E]); called on expert-sorted rows, it
    applies each expert's factor to that expert's rows (its weight is read in its own call)."""

    def __init__(
        self, in_features: int, out_features: int, kind: str, experts: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device)
        self.kind, self.experts = kind, experts

    def stacked(self) -> torch.Tensor:
        """Per-expert factors [E, rows, cols]: A_e [r, in], or B_e [out, r]."""
        w, e = self.weight, self.experts
        if self.kind == "lora_A":
            return w.reshape(e, -1, w.shape[-1])
        return w.reshape(w.shape[0], -1, e).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, groups: Groups | None = None) -> torch.Tensor:
        if groups is None:
            return self.weight.detach().clone()
        return grouped_linear(x.to(self.weight.dtype), self.stacked(), groups)


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, ExpertLoRA):
        module = module.base_layer
    return module


class ExpertLoRA(router.ParamMerge, lora.LoRALinear):
    """LoRA on one 3-D parameter of an experts module (PEFT's ParamWrapper layout and names)."""

    def __init__(self, base_layer: nn.Module, param_name: str, qualified_name: str = "") -> None:
        nn.Module.__init__(self)
        experts = innermost(base_layer)
        if not is_experts_module(experts):
            raise ConfigError(
                f"lora.target_parameters: {qualified_name} belongs to a {type(experts).__name__}, "
                "not a transformers experts module dtrain can adapt; target its linear layers "
                "with lora.targets"
            )
        shape = expert_quant.param_shape(experts, param_name)
        self.base_layer, self.param_name, self.qualified_name = base_layer, param_name, qualified_name
        self.num_experts = int(shape[0])
        # [E, out, in], or [E, in, out] for transposed experts (gpt-oss), as PEFT reads the shape
        self.transposed = bool(experts.is_transposed)
        self.in_features, self.out_features = (shape[1], shape[2]) if self.transposed else (shape[2], shape[1])
        self.init_adapters()
        _use_grouped_forward(experts)

    def unwrapped(self) -> nn.Module:
        """The experts module, its own forward restored (after merge: the base model's module)."""
        inner = innermost(self)
        inner.__dict__.pop("forward", None)
        return inner

    def base_param(self) -> nn.Parameter:
        if self.param_name in expert_quant.quantized(innermost(self)):
            raise RuntimeError(
                f"{self.qualified_name}: its 8-/4-bit storage cannot take a merged update; "
                "dtrain merge folds the adapter into the float checkpoint"
            )
        return getattr(innermost(self), self.param_name)

    def add_adapter(self, spec: lora.AdapterSpec) -> None:
        variant = router.plain_lora(spec, "expert LoRA", "a fused expert weight")
        device = next(innermost(self).parameters()).device
        rank = spec.r * self.num_experts
        a = ExpertFactor(self.in_features, rank, "lora_A", self.num_experts, device)
        b = ExpertFactor(rank, self.out_features, "lora_B", self.num_experts, device)
        router.add_factors(self, spec, variant, a, b)

    def initial_value(self, kind: str, name: str) -> torch.Tensor:
        spec = self.specs[name]
        if kind == "lora_B":
            return torch.zeros(self.out_features, spec.r * self.num_experts)
        wide = dataclasses.replace(spec, r=spec.r * self.num_experts)  # PEFT inits the [r*E, in] A at once
        return lora.init_lora_A(self.qualified_name, wide, self.in_features)

    def forward(self, *args, _lora: dict | None = None, **kwargs) -> torch.Tensor:
        adapters = dict(_lora or {})
        name = self.active_adapter
        if name is not None and self.merged_adapter is None:
            adapters[self.param_name] = (self.lora_A[name], self.lora_B[name], self.scaling[name])
        return self.base_layer(*args, _lora=adapters, **kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s B_e A_e for every expert, float32, in the parameter's layout ([E, out, in] or [E, in, out])."""
        return delta(
            self.lora_A[name].weight, self.lora_B[name].weight, self.num_experts, self.transposed, self.scaling[name]
        )


def unwrapped_name(name: str) -> str:
    """A module or parameter name without the '.base_layer' parts LoRA wrapping adds."""
    while ".base_layer." in name or name.endswith(".base_layer"):
        name = name.replace(".base_layer.", ".").removesuffix(".base_layer")
    return name


def expert_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(experts module name, parameter name) of every 3-D frozen parameter, in registration order."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (ExpertLoRA, ExpertFactor)):
            continue
        metas = expert_quant.quantized(module)
        storage = {p + s: p for p, m in metas.items() for s in expert_quant.SUFFIXES[m.bits]}
        for pname, p in module.named_parameters(recurse=False):
            if pname in storage and storage[pname] + expert_quant.SUFFIXES[metas[storage[pname]].bits][0] == pname:
                out.append((unwrapped_name(name), storage[pname]))  # a quantized expert weight, once
            elif pname not in storage and len(logical_shape(p)) == 3:
                out.append((unwrapped_name(name), pname))
    return out


def is_experts_module(module: nn.Module) -> bool:
    """A transformers 5 experts module with fused 3-D weights that the grouped forward can run."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts"))


def _use_grouped_forward(experts: nn.Module) -> None:
    if "forward" not in experts.__dict__:
        experts.forward = types.MethodType(lora_experts_forward, experts)


def quantize(model: nn.Module, bits: int) -> int:
    """Store every fused expert weight of `model` at `bits` (dtrain/model/expert_quant.py), in place;
    those experts run the grouped forward from then on. Returns the experts modules quantized."""
    done = 0
    for module in list(model.modules()):
        if (
            not isinstance(module, ExpertLoRA)
            and is_experts_module(module)
            and expert_quant.quantize_module(module, bits)
        ):
            _use_grouped_forward(module)
            done += 1
    return done


def adaptable_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(module, parameter) pairs lora.target_parameters may name, in registration order: the fused
    3-D expert weights and the routers' 2-D weights (dtrain/lora/router.py)."""
    order: dict[str, int] = {}
    for i, (n, _) in enumerate(model.named_modules()):
        order.setdefault(unwrapped_name(n), i)
    return sorted(expert_parameters(model) + router.router_weights(model), key=lambda mp: order[mp[0]])


def select_parameters(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """PEFT's matching: `module.param` equal to a target or ending in '.' + target; every target
    must match, else one line listing the parameters the model has that dtrain adapts."""
    have = adaptable_parameters(model)
    kinds = sorted({f"{m.rsplit('.', 2)[-1] if m.count('.') else m}.{p}" for m, p in have})
    listing = ", ".join(kinds) if kinds else "none (no fused expert weights or routers: use lora.targets)"
    chosen = []
    for t in targets:
        hits = [(m, p) for m, p in have if f"{m}.{p}" == t or f"{m}.{p}".endswith("." + t)]
        if not hits:
            raise ConfigError(_no_match(model, t, listing))
        chosen += [h for h in hits if h not in chosen]
    order = {h: i for i, h in enumerate(have)}
    return sorted(chosen, key=order.__getitem__)


def _no_match(model: nn.Module, target: str, listing: str) -> str:
    """The one line for a target_parameters entry that names no adaptable parameter: one that
    exists (a linear layer's weight, a norm) is named with its shape and refused."""
    other = next(
        (
            (unwrapped_name(n), p)
            for n, p in model.named_parameters()
            if unwrapped_name(n) == target or unwrapped_name(n).endswith("." + target)
        ),
        None,
    )
    if other is None:
        return (
            f"lora.target_parameters: {target!r} matches no fused expert weight or router weight; "
            f"the model has: {listing}"
        )
    shape = list(logical_shape(other[1]))
    return (
        f"lora.target_parameters: {target!r} is the {len(shape)}-D parameter {other[0]} {shape}, which dtrain "
        f"does not adapt as a parameter (only fused 3-D expert weights and router weights: {listing}; "
        "a linear layer goes in lora.targets)"
    )


def inject(model: nn.Module, targets: list[tuple[str, str]], spec: lora.AdapterSpec) -> list[ExpertLoRA]:
    """Add adapter `spec` on each (module, parameter); new wrappers nest as PEFT's (registration order)."""
    wrapped = []
    for module_name, pname in targets:
        outer = model.get_submodule(module_name)
        layer = outer if isinstance(outer, router.RouterLoRA) else _wrapper_of(outer, pname)
        if layer is None:
            parent_name, _, child = module_name.rpartition(".")
            qualified = f"{module_name}.{pname}"
            is_router = router.is_router(outer)
            layer = router.RouterLoRA(outer, qualified) if is_router else ExpertLoRA(outer, pname, qualified)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        if spec.name in layer.lora_A:
            raise ConfigError(f"{module_name}.{pname}: adapter '{spec.name}' already exists")
        if spec.r > min(layer.in_features, layer.out_features):
            raise ConfigError(
                f"lora.r = {spec.r} is larger than min(in, out) = "
                f"{min(layer.in_features, layer.out_features)} of {module_name}.{pname}"
            )
        layer.add_adapter(spec)
        wrapped.append(layer)
    return wrapped


def _wrapper_of(module: nn.Module, pname: str) -> ExpertLoRA | None:
    while isinstance(module, ExpertLoRA):
        if module.param_name == pname:
            return module
        module = module.base_layer
    return None


WRAPPERS = (ExpertLoRA, router.RouterLoRA)  # LoRA on a parameter (PEFT's ParamWrapper), not a linear layer
EXPERTS, ALL = "experts", "all"  # lora.targets presets: the experts; every linear layer plus the experts


def _is_router(name: str) -> bool:
    """An MoE router as a linear layer (older layouts): `mlp.gate`, `mlp.router`, `block_sparse_moe.gate`."""
    parts = name.split(".")
    return len(parts) > 1 and parts[-1] in ("gate", "router") and parts[-2] in ("mlp", "block_sparse_moe", "moe")


def resolve(
    model: nn.Module, targets: list[str] | str, regex: str | None, target_parameters: list[str] | None
) -> tuple[list[str], list[tuple[str, str]]]:
    """(linear modules, (module, 3-D parameter) pairs) that lora.targets / target_regex /
    target_parameters choose. `experts` takes the fused expert weights (every 3-D parameter of a
    module named `experts`), or, where the experts are nn.Linear modules (older layouts), the linear
    layers inside `.experts.`; `all` adds every linear layer but the head and the router."""
    from dtrain.lora import targets as presets

    params = select_parameters(model, list(target_parameters)) if target_parameters else []
    if regex or targets not in (EXPERTS, ALL):
        modules = (
            []
            if _only_parameters(targets, target_parameters)
            else presets.select_targets(model, targets if regex else presets.expand(model, targets), regex)
        )
        return modules, params
    fused = [(m, p) for m, p in expert_parameters(model) if m.rsplit(".", 1)[-1] == "experts"]
    linear_experts = [n for n in presets.linear_names(model) if ".experts." in n]
    if not fused and not linear_experts and targets == ALL:
        return [n for n in presets.linear_names(model) if not _is_router(n)], params  # a dense model: all-linear
    if not fused and not linear_experts:
        raise ConfigError(
            f"lora.targets = {targets}: the model has no experts (no fused expert weights and "
            "no linear layer under '.experts.'); use all-linear or a list of module names"
        )
    params += [f for f in fused if f not in params]
    modules = linear_experts if not fused else []
    if targets == ALL:
        modules = [n for n in presets.linear_names(model) if not _is_router(n)]
    return modules, params


def _only_parameters(targets: list[str] | str, target_parameters: list[str] | None) -> bool:
    """lora.targets: [] with target_parameters set: the adapter has expert weights only."""
    return bool(target_parameters) and isinstance(targets, list) and not targets


def adapted_parameters(model: nn.Module, adapter: str) -> list[tuple[str, str]]:
    """(module, parameter) pairs adapter `adapter` adapts (experts, routers), in registration order."""
    pairs = {
        (unwrapped_name(n), m.param_name)
        for n, m in model.named_modules()
        if isinstance(m, WRAPPERS) and adapter in m.lora_A
    }
    return [p for p in adaptable_parameters(model) if p in pairs]


def peft_target_parameters(model: nn.Module, pairs: list[tuple[str, str]], given: list[str] | None = None) -> list[str]:
    """PEFT's `target_parameters` for exactly `pairs`: the config's own list (`given`, what PEFT
    writes) when it selects exactly these, else `<parent>.<module>.<param>` suffixes
    (mlp.experts.gate_up_proj) when they do, else the full names."""
    if given and set(select_parameters(model, list(given))) == set(pairs):
        return list(given)
    suffixes = list(dict.fromkeys(".".join(f"{m}.{p}".split(".")[-3:]) for m, p in pairs))
    if set(select_parameters(model, suffixes)) == set(pairs):
        return suffixes
    return [f"{m}.{p}" for m, p in pairs]


def layer_names(model: nn.Module) -> set[str]:
    """Names of the parameter LoRA wrappers: experts (nested ones included) and routers."""
    return {n for n, m in model.named_modules() if isinstance(m, WRAPPERS)}


def delta(a: torch.Tensor, b: torch.Tensor, num_experts: int, transposed: bool, scaling: float) -> torch.Tensor:
    """s B_e A_e of PEFT-layout factors (A [r*E, in], B [out, r*E]) for every expert, float32, in the
    parameter's layout: [E, out, in], or [E, in, out] when `transposed` (merge only: the training
    forward never builds it)."""
    a3 = a.float().reshape(num_experts, -1, a.shape[-1])
    b3 = b.float().reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)
    d = torch.bmm(b3, a3) * scaling
    return d.transpose(1, 2) if transposed else d


def layout(model: nn.Module, target_parameters: list[str]) -> dict[str, tuple[str, int, bool]]:
    """{wrapper module name (PEFT's key prefix): (checkpoint key, experts, transposed)} of an adapter
    with these `target_parameters` on `model` (wrapped here on a throwaway adapter: build `model`
    on the meta device)."""
    pairs = select_parameters(model, list(target_parameters))
    inject(model, pairs, lora.AdapterSpec(name="layout", r=1))
    return {
        n: (m.qualified_name, m.num_experts, m.transposed)
        for n, m in model.named_modules()
        if isinstance(m, ExpertLoRA)
    }
