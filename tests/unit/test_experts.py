"""Expert LoRA in one process: the grouped forward equals transformers' at B = 0 and PEFT's with any
B, for the three fused-expert families, with the router's weight adapted too; presets, rsLoRA, the
estimator's count and bad input."""

from __future__ import annotations

import pytest
import torch

from dtrain import lora
from dtrain.errors import ConfigError
from dtrain.lora import experts
from tests.helpers import run_dtrain
from tests.moe_models import FAMILIES, ROUTER, save_family

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: save_family(f, root / f) for f in FAMILIES}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_equals_transformers_and_peft(models, family):
    from peft import LoraConfig, get_peft_model

    model = _load(models[family])
    with torch.no_grad():
        plain = model(IDS).logits
    spec = lora.AdapterSpec(r=2, alpha=4.0, use_rslora=True)
    names, params = experts.resolve(model, "all", None, None)
    assert params == [(f"model.layers.{i}.mlp.experts", p) for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert not any(n.endswith((".gate", ".router")) for n in names)  # the router stays frozen
    routers = experts.select_parameters(model, [ROUTER[family]])  # unless named: LoRA on its [E, H] weight
    assert routers == [(f"model.layers.{i}.mlp.{ROUTER[family].split('.')[1]}", "weight") for i in range(2)]
    lora.inject(model, names, spec)
    experts.inject(model, params + routers, spec)
    lora.freeze_base(model)
    gate = model.get_submodule(routers[0][0])
    assert (gate.lora_A["default"].weight.shape, gate.lora_B["default"].weight.shape) == ((2, 32), (4, 2))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain)  # B = 0: exactly the base
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g))
    logits = model(IDS).logits
    logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    peft = get_peft_model(
        _load(models[family]),
        LoraConfig(
            r=2,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", ROUTER[family]],
        ),
    )
    ours = lora.adapter_state_dict(model, "default")
    assert {k.replace(".default.weight", ".weight") for k in peft.state_dict() if ".lora_" in k} == set(ours)
    with torch.no_grad():
        for k, v in peft.state_dict().items():
            if ".lora_" in k:
                v.copy_(ours[k.replace(".default.weight", ".weight")])
        torch.testing.assert_close(peft(IDS).logits, logits.detach(), rtol=1e-4, atol=1e-4)
        lora.merge(model)
        lora.unwrap(model)
        assert "forward" not in model.model.layers[0].mlp.experts.__dict__  # its own forward again
        router = model.get_submodule(routers[0][0])
        assert "forward" not in router.__dict__ and type(router).__name__.endswith("TopKRouter")
        torch.testing.assert_close(model(IDS).logits, logits.detach(), rtol=1e-4, atol=1e-4)


def test_estimator_counts_expert_lora_as_the_built_model(models):
    import json

    from dtrain.memory import estimate, model_spec

    cfg = json.loads((models["qwen3_moe"] / "config.json").read_text())
    spec = model_spec.spec_from_config(cfg, "tiny")
    model = _load(models["qwen3_moe"])
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    assert (spec.total_params, spec.expert_params) == (total, expert)
    assert spec.active_params == total - expert // 2  # top-2 of 4 experts
    for targets in ("experts", "all"):
        names, params = experts.resolve(model, targets, None, None)
        m = _load(models["qwen3_moe"])
        lora.inject(m, names, lora.AdapterSpec(r=2)) if names else None
        experts.inject(m, params, lora.AdapterSpec(r=2))
        lora.freeze_base(m)
        est = estimate.estimate(spec, estimate.Plan(targets=(targets,), rank=2))
        assert lora.count_parameters(m)[0] == est.lora_params
        experts.inject(m, experts.select_parameters(m, ["mlp.gate.weight"]), lora.AdapterSpec(r=2))
        lora.freeze_base(m)
        plan = estimate.Plan(targets=(targets,), target_parameters=("mlp.gate.weight",), rank=2)
        assert lora.count_parameters(m)[0] == estimate.estimate(spec, plan).lora_params == est.lora_params + 144
    only = estimate.Plan(targets=(), target_parameters=("mlp.gate.weight", "mlp.experts.down_proj"), rank=2)
    assert estimate.estimate(spec, only).lora_params == 144 + 2 * 2 * 4 * (16 + 32)  # 2 layers x r (H + E); r E (I + H)


def test_bad_input_is_one_line(models):
    model = _load(models["mixtral"])
    with pytest.raises(
        ConfigError,
        match=r"'mlp.experts.w1' matches no fused expert weight or router weight; the model has: "
        r"experts.down_proj, experts.gate_up_proj, gate.weight$",
    ):
        experts.select_parameters(model, ["mlp.experts.w1"])
    with pytest.raises(
        ConfigError,
        match=r"^lora.target_parameters: 'self_attn.q_proj.weight' is the 2-D parameter "
        r"model.layers.0.self_attn.q_proj.weight \[32, 32\], which dtrain does not adapt as a parameter "
        r"\(only fused 3-D expert weights and router weights: experts.down_proj, experts.gate_up_proj, "
        r"gate.weight; a linear layer goes in lora.targets\)$",
    ):
        experts.select_parameters(model, ["self_attn.q_proj.weight"])  # a linear layer's weight: lora.targets
    with pytest.raises(ConfigError, match="^lora.target_parameters: LoRA on a router weight takes no lora.use_dora"):
        experts.inject(model, [("model.layers.0.mlp.gate", "weight")], lora.AdapterSpec(r=2, use_dora=True))
    with pytest.raises(ConfigError, match="no lora.use_dora and no lora.dropout"):
        experts.inject(model, [("model.layers.0.mlp.experts", "down_proj")], lora.AdapterSpec(use_dora=True))
    proc = run_dtrain(["train", "configs/tiny.yaml", "lora.targets=experts", "training.max_steps=1"], check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "the model has no experts (no fused expert weights and no "
            "linear layer under '.experts.'); use all-linear or a list of "
            "module names"
        )
    )
