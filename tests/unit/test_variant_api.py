"""dtrain.lora.variants: a LoRA variant is one object. A toy variant added the documented way (its
class, its VARIANTS line, its flag on the spec; no dtrain file changed) works through the layer,
freezing, LoRA+, the adapter state dict, PEFT keys, adapter loading checks, merge, unmerge and
`dtrain merge`'s tensor merge. And the layer and model code name no variant."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain import lora
from dtrain.errors import ConfigError, DtrainError
from dtrain.inference import merge as merge_lib
from dtrain.lora import dora, peft_format, variants
from dtrain.lora.layer import AdapterSpec

DTRAIN = Path(__file__).resolve().parents[2] / "dtrain"


class Gate(nn.Module):
    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, device=device))


class Gated(variants.LoraVariant):
    """h = W0 x + g * s B A x, a learned gate g per output row starting at 0.5."""

    flag, name, title = "use_gate", "gated LoRA", "gate"
    state = fast_state = ("lora_gate",)

    def init(self, layer, name, device):
        layer.lora_gate[name] = Gate(layer.out_features, device)

    def reset(self, layer, name):
        layer.lora_gate[name].weight.fill_(0.5)

    def saved_shape(self, kind, fan_in, fan_out):
        return (fan_out,)

    def forward(self, layer, name, x, h, out):
        a, b, g = layer.lora_A[name], layer.lora_B[name], layer.lora_gate[name].weight
        return out + (g * b(a(h)) * layer.scaling[name]).to(out.dtype)

    def merge(self, layer, name, w):
        w.add_(layer.lora_gate[name].weight[:, None] * layer.delta_weight(name))

    def unmerge(self, layer, name, w):
        w.sub_(layer.lora_gate[name].weight[:, None] * layer.delta_weight(name))

    def merged_tensor(self, w, delta, tensors):
        return w.float() + tensors["lora_gate"].float()[:, None] * delta


@dataclasses.dataclass(frozen=True)
class GatedSpec(AdapterSpec):
    use_gate: bool = False


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def gated():
    variants.VARIANTS["use_gate"] = f"{__name__}:Gated"
    variants.classes.cache_clear()
    try:
        yield
    finally:
        del variants.VARIANTS["use_gate"]
        variants.classes.cache_clear()


def _gated_model() -> tuple[Tiny, Tiny]:
    torch.manual_seed(0)
    base = Tiny()
    model = Tiny()
    model.load_state_dict(base.state_dict())
    lora.inject(model, ["up", "down"], GatedSpec(r=2, alpha=4, use_gate=True))
    return base, model


def test_the_registered_variants_are_plain_and_dora():
    assert variants.classes() == (dora.DoRA,)
    assert type(variants.for_spec(AdapterSpec())) is variants.Plain
    assert type(variants.for_spec(AdapterSpec(use_rslora=True))) is variants.Plain  # rsLoRA: a scale only
    assert AdapterSpec(r=16, alpha=8, use_rslora=True).scaling == 2.0 and AdapterSpec(r=16, alpha=8).scaling == 0.5
    one, two = variants.for_spec(AdapterSpec(use_dora=True)), variants.for_spec(AdapterSpec(use_dora=True))
    assert type(one) is dora.DoRA and one is not two  # one object per adapter: DoRA keeps its merge's norm


def test_a_toy_variant_runs_through_the_layer_and_the_model_operations(gated):
    base, model = _gated_model()
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)  # B = 0: the base model
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].weight.normal_()
            m.lora_gate["default"].weight.uniform_(0.1, 2.0)
    up = model.up
    a, b, g = up.lora_A["default"].weight, up.lora_B["default"].weight, up.lora_gate["default"].weight
    want = base.up(x) + g * (x @ a.t() @ b.t()) * 2.0  # s = alpha / r = 2
    torch.testing.assert_close(up(x), want, atol=1e-6, rtol=1e-6)
    lora.freeze_base(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"{m}.{k}.default.weight" for m in ("down", "up") for k in ("lora_A", "lora_B", "lora_gate")]
    assert [lora.is_loraplus_fast(n) for n in trainable[:3]] == [False, True, True]
    state = lora.adapter_state_dict(model, "default")
    assert sorted(state) == [
        f"base_model.model.{m}.{k}" for m in ("down", "up") for k in ("lora_A.weight", "lora_B.weight", "lora_gate")
    ]  # PEFT's bare state key
    assert all(lora.from_peft_key(k, "default") in dict(model.named_parameters()) for k in state)
    adapted = model(x)
    lora.merge(model)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up.base_layer.weight, base.up.weight + g[:, None] * (b @ a) * 2.0, atol=1e-6, rtol=1e-6)
    merged = merge_lib._merged(base.up.weight.detach(), {"lora_A": a, "lora_B": b, "lora_gate": g}, 2.0)
    torch.testing.assert_close(merged, up.base_layer.weight, atol=1e-6, rtol=1e-6)  # `dtrain merge`'s path
    lora.unmerge(model)
    torch.testing.assert_close(up.base_layer.weight, base.up.weight, atol=1e-6, rtol=1e-6)


def test_adapter_files_with_a_toy_variants_state_are_read_only_with_its_flag(gated):
    _, model = _gated_model()
    tensors = {k: t.detach() for k, t in lora.adapter_state_dict(model, "default").items()}
    modules = peft_format.adapter_modules(tensors, "x", GatedSpec(use_gate=True))
    assert sorted(modules["up"]) == ["lora_A", "lora_B", "lora_gate"] and modules["up"]["lora_gate"].shape == (16,)
    with pytest.raises(DtrainError, match="module '(up|down)' has a gate but use_gate is not set"):
        peft_format.adapter_modules(tensors, "x", GatedSpec())
    with pytest.raises(ConfigError, match="use_dora and use_gate cannot be combined"):
        variants.for_spec(GatedSpec(use_gate=True, use_dora=True))


def _code_names(path: Path) -> set[str]:
    """Identifiers and non-docstring string constants of a module's code."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.add(n.value)
    return out


@pytest.mark.parametrize(
    "module",
    ["lora/layer.py", "lora/ops.py", "lora/targets.py", "lora/peft_format.py", "lora/base_weight.py", "model/build.py"],
)
def test_the_layer_and_model_code_name_no_variant(module):
    """DoRA lives in its variant: no `dora`, `use_dora` or magnitude in the code (docstrings may cite
    it; the flag is a field of AdapterSpec, its one mention)."""
    names = _code_names(DTRAIN / module) - {f.name for f in dataclasses.fields(AdapterSpec)}
    assert [n for n in names if "dora" in n.lower() or "magnitude" in n.lower()] == []


def test_one_home_for_targetable_linears_and_the_base_weight():
    """The old second homes are gone: presets' weight_module_names, DoRA's base_weight helpers, the
    layer's private float-weight helpers."""
    old = {"weight_module_names", "whole_base_weight", "_has_float_weight", "_dequantized_linear"}
    defined = {
        n.name
        for p in DTRAIN.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }
    assert old & defined == set()
