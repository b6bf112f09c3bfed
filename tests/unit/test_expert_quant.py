"""8-/4-bit fused expert weights (dtrain/model/expert_quant.py) on the tiny Qwen3-MoE, Mixtral and gpt-oss
models: the quantized grouped forward and its input gradient equal a float reference built from the
dequantized weights (1e-6); the int8 and NF4 round-trip errors are within their bounds; the stored
bytes are 1 (int8) or 1/2 (NF4) per parameter plus the scales, and the estimator counts the same."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dtrain.lora import experts, layer as lora
from dtrain.model import expert_quant, quant
from tests.moe_models import FAMILIES, save_family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_q")
    return {f: save_family(f, root / f) for f in FAMILIES}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _with_dequantized(model, q_model):
    """A copy of float `model` whose expert weights are those `q_model` computes with."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for name, module in q_model.named_modules():
        for pname, meta in expert_quant.quantized(module).items():
            with torch.no_grad():
                getattr(mods[name], pname).copy_(
                    expert_quant.dequantize_stack(*expert_quant.storage(module, pname), meta)
                )
    return ref


def _route(module, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g)  # tests/moe_models.py: hidden 32
    ids = torch.stack([torch.randperm(module.num_experts, generator=g)[:2] for _ in range(tokens)])
    return x.requires_grad_(), ids, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_forward_equals_dequantized_reference(models, family, bits):
    """The experts module on 8-/4-bit storage = transformers' own forward on the dequantized float
    weights (outputs and input gradients to 1e-6), and with expert LoRA = the float grouped path."""
    model = _load(models[family])
    q_model = copy.deepcopy(model)
    assert experts.quantize(q_model, bits) == 2  # both layers' experts
    ref = _with_dequantized(model, q_model)
    q_exp, ref_exp = q_model.model.layers[0].mlp.experts, ref.model.layers[0].mlp.experts
    assert not any(p.is_floating_point() and p.dim() == 3 for p in q_exp.parameters())
    x, ids, w = _route(ref_exp, 24, 0)
    x2 = x.detach().clone().requires_grad_()
    want, got = ref_exp(x, ids, w), q_exp(x2, ids, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    want.pow(2).sum().backward()
    got.pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-6)
    spec = lora.AdapterSpec(r=2, alpha=4.0)
    for m in (q_model, ref):
        experts.inject(m, experts.select_parameters(m, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), spec)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, p in m.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=g))
    ids_tok = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q_model(ids_tok).logits, ref(ids_tok).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_error_is_bounded(models, family):
    """int8: every weight within half a row step (absmax_row / 254) of its original, the largest
    error measured; NF4: within half the largest NF4 code gap times the block absmax."""
    model = _load(models[family])
    experts_mod = model.model.layers[1].mlp.experts
    code = quant.nf4_code()
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts_mod, name).detach()
        meta = expert_quant._meta(8, tuple(w.shape), bool(experts_mod.is_transposed))
        q, s = expert_quant.quantize_stack(w, meta)
        err = (expert_quant.dequantize_stack(q, s, meta) - w).abs()
        rows = w.transpose(1, 2) if meta.transposed else w
        step = rows.abs().amax(dim=-1, keepdim=True) / 127  # [E, out, 1]
        err_rows = err.transpose(1, 2) if meta.transposed else err
        assert (err_rows <= step / 2 + 1e-6).all()
        assert 0 < err.max() < 0.004  # weights ~N(0, 0.2): absmax ~0.7, half step ~0.0028
        m4 = expert_quant._meta(4, tuple(w.shape), meta.transposed)
        q4, s4 = expert_quant.quantize_stack(w, m4)
        e4 = (expert_quant.dequantize_stack(q4, s4, m4) - w).abs()
        e4 = (e4.transpose(1, 2) if meta.transposed else e4).reshape(w.shape[0], -1, 64)
        assert (e4 <= half_gap * s4.unsqueeze(-1) + 1e-6).all()


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_bytes_are_quantized_and_estimated(models, bits):
    """Expert weights at 1 byte (int8) or 1/2 byte (NF4) a parameter plus fp32 scales (per expert
    row / per 64); the whole 8-/4-bit base's bytes equal the estimator's frozen_bytes exactly."""
    from dtrain.memory import estimate, model_spec, shards

    model = _load(models["qwen3_moe"])
    expert_params = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    quant.quantize_model(model, bits, skip=quant.skip_rule(False, model))
    experts.quantize(model, bits)
    got = expert_quant.quantized_bytes(model)
    assert got["params"] == expert_params == 2 * 4 * (32 * 32 + 32 * 16)  # layers x E x (gate_up + down)
    rows = 2 * 4 * (32 + 32)  # out rows: gate_up 2I = 32, down H = 32
    if bits == 8:
        assert (got["int_bytes"], got["scale_bytes"]) == (expert_params, 4 * rows)
    else:
        blocks = 2 * 4 * (32 * 32 // 64 + 32 * 16 // 64)
        assert (got["int_bytes"], got["scale_bytes"]) == (expert_params // 2, 4 * blocks)
    spec = model_spec.spec_from_config(json.loads((models["qwen3_moe"] / "config.json").read_text()), "tiny")
    assert _bytes(model) == estimate.frozen_bytes(spec, bits, 4)
    assert _bytes(model) == shards.frozen_tensors(spec, bits, 4).local_bytes(1, "fsdp")  # experts counted once
    assert math.isclose(got["int_bytes"] / expert_params, 1.0 if bits == 8 else 0.5)
