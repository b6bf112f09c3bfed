"""`dtrain merge --base-bits 4` into a checkpoint that stores experts per expert (`experts.<e>.gate_proj`,
`up_proj`, `down_proj`; Mixtral's `w1`, `w3`, `w2`): each merged tensor is exactly training's
deq(q(W)) + s B_e A_e, where dtrain/model/expert_quant.py quantized the fused expert ([2I, H]
for gate + up) in NF4 blocks of 64, also where a block runs across gate and up (I * H not a
multiple of 64)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dtrain.inference import merge as merge_lib
from dtrain.lora import experts
from dtrain.model import expert_quant
from tests.moe_models import COMMON, FAMILIES, save_family

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PARTS = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj", "mlp"), "mixtral": ("w1", "w3", "w2", "block_sparse_moe")}


def _base_and_adapter(family: str, root, width: int, monkeypatch):
    """A tiny `family` model with expert width `width`, saved (per-expert tensors), and a PEFT
    expert adapter on it with random B; returns (base dir, adapter dir, fused float model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    key = "moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"
    monkeypatch.setitem(FAMILIES, family, {**FAMILIES[family], key: width})
    base = save_family(family, root / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    peft.save_pretrained(root / "adapter")
    return base, root / "adapter", AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("width", [16, 3])  # 16 x 32 = 8 NF4 blocks per part; 3 x 32 = 96: a block spans gate and up
def test_merge_base_bits_4_into_per_expert_tensors_is_trainings_nf4_plus_the_update(
    family, width, tmp_path, monkeypatch
):
    base, adapter, model = _base_and_adapter(family, tmp_path, width, monkeypatch)
    gate, up, down, mlp = PARTS[family]
    assert f"model.layers.0.{mlp}.experts.3.{gate}.weight" in load_file(str(base / "model.safetensors"))
    merge_lib.merge(base, adapter, tmp_path / "out", base_bits=4)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    E, inter, hidden = 4, width, COMMON["hidden_size"]
    for i in range(2):
        mod = model.model.layers[i].mlp.experts
        for pname, prefix, parts in (("gate_up_proj", "base_layer.", (gate, up)), ("down_proj", "", (down,))):
            w = getattr(mod, pname).detach()
            key = f"base_model.model.model.layers.{i}.mlp.experts.{prefix}"
            d = experts.delta(ad[key + "lora_A.weight"], ad[key + "lora_B.weight"], E, False, 2.0)
            want = (expert_quant.round_trip(w, 4, False) + d).to(torch.bfloat16)  # [E, out, in]
            got = torch.stack(
                [torch.cat([merged[f"model.layers.{i}.{mlp}.experts.{e}.{p}.weight"] for p in parts]) for e in range(E)]
            )
            assert got.shape == (E, 2 * inter if len(parts) == 2 else hidden, hidden if len(parts) == 2 else inter)
            assert torch.equal(got, want), (family, width, i, pname)
