"""Expert LoRA in one process: the grouped forward equals transformers' at B = 0 and PEFT's with any
B, for the three fused-expert families; presets, rsLoRA, the estimator's count and bad input."""

from __future__ import annotations

import pytest
import torch

from dtrain import lora
from dtrain.errors import ConfigError
from dtrain.lora import experts
from tests.helpers import run_dtrain
from tests.moe_models import FAMILIES, save_family

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
    lora.inject(model, names, spec)
    experts.inject(model, params, spec)
    lora.freeze_base(model)
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
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    ours = lora.adapter_state_dict(model, "default")
    with torch.no_grad():
        for k, v in peft.state_dict().items():
            if ".lora_" in k:
                v.copy_(ours[k.replace(".default.weight", ".weight")])
        torch.testing.assert_close(peft(IDS).logits, logits.detach(), rtol=1e-4, atol=1e-4)
        lora.merge(model)
        lora.unwrap(model)
        assert "forward" not in model.model.layers[0].mlp.experts.__dict__  # its own forward again
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


def test_bad_input_is_one_line(models):
    model = _load(models["mixtral"])
    with pytest.raises(
        ConfigError,
        match=r"'mlp.experts.w1' matches no 3-D parameter; the model has: "
        r"experts.down_proj, experts.gate_up_proj",
    ):
        experts.select_parameters(model, ["mlp.experts.w1"])
    with pytest.raises(
        ConfigError,
        match=r"^lora.target_parameters: 'mlp.gate.weight' is the 2-D parameter "
        r"model.layers.0.mlp.gate.weight \[4, 32\], which dtrain does not adapt "
        r"\(only fused 3-D expert weights: experts.down_proj, experts.gate_up_proj; "
        r"a router stays frozen, a linear layer goes in lora.targets\)$",
    ):
        experts.select_parameters(model, ["mlp.gate.weight"])  # Mixtral's router (a TopKRouter, no nn.Linear)
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
