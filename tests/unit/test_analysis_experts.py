"""`dtrain analyze` on an expert adapter over an 8-/4-bit gpt-oss base (experts stored [E, in, out]):
its numbers equal the float analysis on the weights training saw, deq(q(W)) per expert with
[out, in] rows (dtrain/model/expert_quant.py), written back in the parameter's layout."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtrain.analysis import run
from dtrain.analysis.weights import BaseWeights
from dtrain.model import expert_quant, quant
from tests.moe_models import save_family

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _save_with_random_b(peft_model, out) -> None:
    """Save a PEFT model's adapter with every B random (seeded by name), so B A is not zero."""
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    peft_model.save_pretrained(out)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(base dir, {bits: the same base with every fused expert weight replaced by training's
    deq(q(W)) in the parameter's [E, in, out] layout}, a PEFT expert adapter with random B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("analysis_moe")
    base = save_family("gpt_oss", root / "base")
    deq = {}
    for bits in (8, 4):
        tensors = load_file(str(base / "model.safetensors"))
        deq[bits] = shutil.copytree(base, root / f"deq{bits}")
        for key in [k for k in tensors if k.endswith(tuple(TARGETS))]:
            tensors[key] = expert_quant.round_trip(tensors[key], bits, transposed=True).contiguous()
        save_file(tensors, str(deq[bits] / "model.safetensors"), {"format": "pt"})
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS),
    )
    _save_with_random_b(model, root / "adapter")
    return base, deq, root / "adapter"


@pytest.mark.parametrize("bits", [8, 4])
def test_analysis_of_a_quantized_gpt_oss_base_equals_the_float_one_on_its_dequantized_weights(gpt_oss, bits):
    base, deq, adapter = gpt_oss
    ad = run.load_adapter(adapter, "a")
    quantized = run.analyze_one(ad, BaseWeights(base, bits=bits))["modules"]
    on_deq = run.analyze_one(ad, BaseWeights(deq[bits]))["modules"]
    experts = [m for m in quantized if ".experts." in m]
    assert len(experts) == 2 * 2 * 4 and set(quantized) == set(on_deq)  # 2 layers x 2 weights x 4 experts
    for m in experts:
        for k, v in on_deq[m].items():
            assert quantized[m][k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-6, abs=1e-9)), (m, k)
    w = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.experts.gate_up_proj"][2]  # [in, out]
    got = BaseWeights(base, bits=bits).weight("model.layers.1.mlp.experts.2.gate_up_proj")
    assert torch.equal(got, quant.round_trip(w.T.contiguous(), bits))  # [out, in]: the rows dtrain quantized
    assert not torch.equal(quant.round_trip(w, bits).T, got)  # [in, out] rows / blocks: what analyze took before


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def per_expert(request, tmp_path_factory):
    """(the base as save_pretrained writes it: one tensor per expert, Mixtral's `block_sparse_moe`
    names; the same weights with transformers' fused in-memory names; a PEFT adapter on the experts
    and the router with random B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.moe_models import ROUTER

    family = request.param
    root = tmp_path_factory.mktemp(f"analysis_{family}")
    base = save_family(family, root / "base")
    assert any(".experts.0." in k for k in load_file(str(base / "model.safetensors")))  # the older layout on disk
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fused = shutil.copytree(base, root / "fused")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_parameters=[*TARGETS, ROUTER[family]]))
    _save_with_random_b(peft, root / "adapter")
    return base, fused, root / "adapter"


@pytest.mark.parametrize("bits", [None, 4])
def test_analysis_reads_per_expert_checkpoints_as_the_fused_weights(per_expert, bits):
    base, fused, adapter = per_expert
    ad = run.load_adapter(adapter, "a")
    got = run.analyze_one(ad, BaseWeights(base, bits=bits))["modules"]
    want = run.analyze_one(ad, BaseWeights(fused, bits=bits))["modules"]
    assert set(got) == set(want) and len([m for m in got if ".experts." in m]) == 2 * 2 * 4
    assert len([m for m in got if m.endswith(".gate")]) == 2  # the router of each layer
    for m in want:
        assert got[m] == want[m], m
