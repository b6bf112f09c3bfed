"""dtrain.lora.layer: the LoRA layer against hand computation, on a real tiny Llama: init, merge, adapters, targets."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from dtrain import lora
from dtrain.errors import ConfigError
from dtrain.lora.layer import AdapterSpec, LoRALinear

ARCH = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**ARCH, **kw})).eval()


@pytest.fixture(scope="module")
def plain() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, ARCH["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_B(model: nn.Module, adapter: str = "default", seed: int = 0, scale: float = 0.1) -> None:
    """B starts at zero; give it seeded random values (by module name) so the LoRA path matters."""
    with torch.no_grad():
        for name, m in lora.lora_modules(model):
            g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)) + len(name))
            w = m.lora_B[adapter].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def all_linear(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


# ---- one layer ------------------------------------------------------------------------------


def _layer(dropout: float = 0.0, bias: bool = True) -> tuple[LoRALinear, AdapterSpec]:
    torch.manual_seed(3)
    base = nn.Linear(16, 12, bias=bias)
    layer = LoRALinear(base, qualified_name="blocks.0.proj")
    spec = AdapterSpec(r=4, alpha=6.0, dropout=dropout, init_seed=7)
    layer.add_adapter(spec)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(12, 4, generator=torch.Generator().manual_seed(5)))
    return layer, spec


def test_forward_equals_hand_computation() -> None:
    layer, spec = _layer()
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert A.shape == (4, 16) and B.shape == (12, 4)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(9))
    expected = x @ W0.T + b0 + (6.0 / 4) * ((x @ A.T) @ B.T)
    layer.eval()
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert layer.scaling["default"] == 1.5
    # the update is non-trivial and is exactly what delta_weight reports
    assert (out - (x @ W0.T + b0)).abs().max() > 0.1
    assert torch.equal(layer.delta_weight("default"), (B @ A) * 1.5)
    # the base is frozen, A and B train
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad


def test_A_init_is_kaiming_uniform_from_name_seed() -> None:
    spec = AdapterSpec(r=4, init_seed=7)
    a1 = lora.init_lora_A("m.q_proj", spec, 16)
    assert torch.equal(a1, lora.init_lora_A("m.q_proj", spec, 16))  # same name, same tensor
    assert not torch.equal(a1, lora.init_lora_A("m.k_proj", spec, 16))
    assert not torch.equal(a1, lora.init_lora_A("m.q_proj", AdapterSpec(r=4, init_seed=8), 16))
    assert a1.abs().max() <= 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) bound
    assert a1.abs().max() > 0.8 / math.sqrt(16)
    layer, _ = _layer()
    assert torch.equal(
        layer.lora_A["default"].weight, lora.init_lora_A("blocks.0.proj", AdapterSpec(r=4, alpha=6.0, init_seed=7), 16)
    )
    layer.reset_adapter("default")
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(12, 4))


def test_dropout_only_on_lora_input() -> None:
    layer, spec = _layer(dropout=0.5)
    W0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(9))
    base = x @ W0.T + b0
    layer.train()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask the layer drew
    assert (dropped == 0).any() and not torch.equal(dropped, x)
    torch.testing.assert_close(out, base + 1.5 * (dropped @ A.T) @ B.T, atol=1e-6, rtol=1e-6)
    # the base part is untouched by dropout: with B = 0 the train-mode output is W0 x + b exactly
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    torch.manual_seed(123)
    assert torch.equal(layer(x), layer.base_layer(x))
    # eval mode: no dropout, exact and repeatable
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(B)
    layer.eval()
    e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, base + 1.5 * (x @ A.T) @ B.T, atol=1e-6, rtol=1e-6)


# ---- whole model ----------------------------------------------------------------------------


def test_output_unchanged_at_init(plain, ids) -> None:
    ref = logits(plain, ids)
    for targets in (["q_proj", "v_proj"], "all-linear"):
        model = copy.deepcopy(plain)
        names = lora.select_targets(model, targets, None)
        lora.inject(model, names, AdapterSpec(r=8, alpha=16, init_seed=3))
        assert torch.equal(logits(model, ids), ref)  # bit for bit: B = 0
        assert all(torch.count_nonzero(m.lora_A["default"].weight) > 0 for _, m in lora.lora_modules(model))


def test_freeze_base_and_counts(plain) -> None:
    model = copy.deepcopy(plain)
    lora.inject(model, lora.select_targets(model, "all-linear", None), AdapterSpec(r=4))
    lora.freeze_base(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(trainable) == 2 * 7 * 2
    # r (in + out) per wrapped linear, counted from the plain model's shapes
    expect = sum(4 * (m.in_features + m.out_features) for n, m in plain.named_modules() if n in all_linear(plain))
    total = sum(p.numel() for p in plain.parameters()) + expect
    assert lora.count_parameters(model) == (expect, total)


def test_merge_unmerge_round_trip(plain, ids) -> None:
    model = copy.deepcopy(plain)
    lora.inject(model, lora.select_targets(model, "all-linear", None), AdapterSpec(r=4, alpha=8))
    randomize_B(model)
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in lora.lora_modules(model)}
    unmerged = logits(model, ids)
    assert (unmerged - logits(plain, ids)).abs().max() > 1e-2  # the adapter changes the output

    lora.merge(model)
    for n, m in lora.lora_modules(model):
        expect = w0[n] + 2.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight
        torch.testing.assert_close(m.base_layer.weight, expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge before switching"):
        lora.set_adapter(model, "default")

    lora.unmerge(model)
    for n, m in lora.lora_modules(model):
        torch.testing.assert_close(m.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        lora.unmerge(model)


def test_merge_then_unwrap_is_the_plain_model(plain, ids) -> None:
    model = copy.deepcopy(plain)
    lora.inject(model, lora.select_targets(model, "all-linear", None), AdapterSpec(r=4, alpha=8))
    randomize_B(model)
    with torch.no_grad():
        deltas = {n: 2.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight for n, m in lora.lora_modules(model)}
    unmerged = logits(model, ids)
    lora.merge(model)
    merged = logits(model, ids)
    lora.unwrap(model)

    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(logits(model, ids), merged)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    # the same weights put into a fresh plain model by hand give the same logits
    by_hand = copy.deepcopy(plain)
    with torch.no_grad():
        for n, d in deltas.items():
            by_hand.get_submodule(n).weight.add_(d)
    torch.testing.assert_close(logits(by_hand, ids), merged, atol=1e-6, rtol=0)


def test_two_adapters_switch(plain, ids) -> None:
    names = lora.select_targets(plain, ["q_proj", "v_proj", "down_proj"], None)
    spec_a = AdapterSpec(name="task_a", r=4, alpha=8, init_seed=1)
    spec_b = AdapterSpec(name="task_b", r=2, alpha=2, init_seed=2)
    both = copy.deepcopy(plain)
    lora.inject(both, names, spec_a)
    lora.inject(both, names, spec_b)
    randomize_B(both, "task_a", seed=1)
    randomize_B(both, "task_b", seed=2)
    assert all(m.active_adapter == "task_a" for _, m in lora.lora_modules(both))  # the first one added

    singles = {}
    for spec, seed in ((spec_a, 1), (spec_b, 2)):
        one = copy.deepcopy(plain)
        lora.inject(one, names, spec)
        randomize_B(one, spec.name, seed=seed)
        singles[spec.name] = logits(one, ids)

    lora.set_adapter(both, "task_b")
    out_b = logits(both, ids)
    lora.set_adapter(both, "task_a")
    out_a = logits(both, ids)
    assert torch.equal(out_a, singles["task_a"])
    assert torch.equal(out_b, singles["task_b"])
    assert (out_a - out_b).abs().max() > 1e-2

    with pytest.raises(ConfigError, match=r"adapter 'task_c' not found; have: task_a, task_b"):
        lora.set_adapter(both, "task_c")
    with pytest.raises(ConfigError, match="adapter 'task_a' already exists"):
        lora.inject(both, names, spec_a)

    lora.freeze_base(both, adapter="task_b")
    trainable = [n for n, p in both.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names) and all(".task_b." in n for n in trainable)
    sd = lora.adapter_state_dict(both, "task_b")
    assert len(sd) == 2 * len(names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 2)
    for key in sd:
        assert lora.to_peft_key(lora.from_peft_key(key, "task_b"), "task_b") == key


def test_set_adapter_without_lora_layers(plain) -> None:
    with pytest.raises(ConfigError, match="adapter 'default' not found; have: none"):
        lora.set_adapter(copy.deepcopy(plain), "default")


# ---- target selection ----------------------------------------------------------------------


def test_targets_suffix_list(plain) -> None:
    got = lora.select_targets(plain, ["q_proj", "v_proj"], None)
    assert got == [f"model.layers.{i}.self_attn.{k}" for i in range(2) for k in ("q_proj", "v_proj")]
    assert lora.select_targets(plain, "o_proj", None) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    # a full module name matches itself
    assert lora.select_targets(plain, ["model.layers.1.mlp.up_proj"], None) == ["model.layers.1.mlp.up_proj"]
    # 'proj' is no suffix after a dot: no partial-word matches
    with pytest.raises(ConfigError):
        lora.select_targets(plain, ["proj"], None)


def test_targets_regex_replaces_list(plain) -> None:
    got = lora.select_targets(plain, ["q_proj"], r"layers\.1\.mlp\.(gate|up)_proj$")
    assert got == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("tied", [False, True])
def test_targets_all_linear_excludes_head(tied: bool) -> None:
    model = tiny_llama(tie_word_embeddings=tied)
    got = lora.select_targets(model, "all-linear", None)
    assert got == all_linear(model)
    assert len(got) == 2 * 7 and "lm_head" not in got
    # after injection, all-linear still names the same (now wrapped) layers, never their parts
    base_total = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    lora.inject(model, got, AdapterSpec())
    assert lora.select_targets(model, "all-linear", None) == got
    lora.freeze_base(model)
    n_lora = sum(8 * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in got)
    assert lora.count_parameters(model) == (n_lora, base_total + n_lora)
    if tied:
        assert base_total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        assert base_total + 128 * 64 == sum(p.numel() for p in tiny_llama().parameters())


def test_targets_no_match_lists_the_models_modules(plain) -> None:
    with pytest.raises(ConfigError) as e:
        lora.select_targets(plain, ["query", "value"], None)
    msg = str(e.value)
    assert msg.startswith("lora.targets = ['query', 'value'] matches no linear module; the model has: ")
    assert msg.split("the model has: ")[1] == ", ".join(sorted(KINDS))
    with pytest.raises(
        ConfigError, match=r"lora.target_regex = 'attn\\.qkv' matches no linear module; the model has: down_proj"
    ):
        lora.select_targets(plain, "all-linear", r"attn\.qkv")


def test_targets_partly_unmatched_are_refused(plain) -> None:
    with pytest.raises(ConfigError) as e:
        lora.select_targets(plain, ["q_proj", "lm_head", "qkv"], None)
    assert str(e.value) == (
        "lora.targets = ['q_proj', 'lm_head', 'qkv']: lm_head, qkv matches no linear module a "
        "LoRA adapter can target (never the output head); the model has: " + ", ".join(sorted(KINDS))
    )


def test_rank_above_a_layers_size_is_refused(plain) -> None:
    names = lora.select_targets(plain, ["k_proj"], None)
    layer = plain.get_submodule(names[0])
    small = min(layer.in_features, layer.out_features)
    lora.check_rank(plain, names, small)  # full rank: allowed
    with pytest.raises(
        ConfigError,
        match=rf"lora.r = {small + 1} is larger than min\(in, out\) = {small} of "
        rf"{re.escape(names[0])} \({layer.in_features} -> {layer.out_features}\)",
    ):
        lora.inject(copy.deepcopy(plain), names, AdapterSpec(r=small + 1))
