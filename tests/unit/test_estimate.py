"""Unit tests for dtrain.memory.model_spec, estimate, paper and estimate_cli.

Checked: parameter counts against real ``nn.Parameter``s of models built by transformers,
LoRA trainable counts against an independent sum over ``nn.Linear`` layers and against PEFT,
the arithmetic fallback against the meta build, quantized frozen bytes against hand
arithmetic and ``dtrain.model.quant``, the activation formula against Korthikanti et al. for GPT-3
shapes, agreement with DeepSpeed's ZeRO-3 estimator, the presets, JSON / table output, the
LoRA-paper comparison and one-line ConfigErrors.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.memory.estimate import Plan, estimate, frozen_bytes, layer_activation_bytes
from dtrain.memory.model_spec import PRESETS, spec_from_config, spec_from_llama_arithmetic
from dtrain.memory.paper import paper_comparison_markdown, paper_gpt3_comparison

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
TINY = {
    "llama": TINY_LLAMA,
    "mistral": {**TINY_LLAMA, "model_type": "mistral", "head_dim": 32},
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},
    "llama_tied": {**TINY_LLAMA, "tie_word_embeddings": True},
    "opt": {
        "model_type": "opt",
        "vocab_size": 300,
        "hidden_size": 48,
        "ffn_dim": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 48,
    },
    "gpt2": {"model_type": "gpt2", "vocab_size": 300, "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gpt_neox": {
        "model_type": "gpt_neox",
        "vocab_size": 300,
        "hidden_size": 48,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    },
}


def _real_model(cfg: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(cfg)
    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModelForCausalLM.from_config(hf_cfg)


def _unique_params(model: nn.Module) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def _linear_in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return tuple(module.weight.shape)
    return None


def _independent_lora_count(model: nn.Module, targets: list[str], r: int) -> int:
    """r*(in+out) summed over every Linear/Conv1D whose name ends with a target (not the head)."""
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        shape = _linear_in_out(module)
        if shape is None or module is head:
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            total += r * (shape[0] + shape[1])
    return total


@pytest.fixture(scope="module")
def preset_specs() -> dict:
    return {name: spec_from_config(cfg, name) for name, cfg in PRESETS.items()}


# ----------------------------------------------------------------------------- counting


@pytest.mark.parametrize("kind", sorted(TINY))
def test_counts_match_real_model(kind: str) -> None:
    cfg = TINY[kind]
    model = _real_model(cfg)
    spec = spec_from_config(cfg, kind)
    assert spec.source == "meta"
    assert spec.total_params == _unique_params(model)
    emb = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    assert spec.embedding_params == sum(emb.values())
    head = model.get_output_embeddings()
    assert spec.tied_embeddings == (id(head.weight) in emb)
    assert spec.head_params == (0 if spec.tied_embeddings else head.weight.numel())
    linear_sum = sum(lin.count * lin.params for lin in spec.linears)
    real_linear = sum(
        sum(p.numel() for p in m.parameters())
        for m in model.modules()
        if _linear_in_out(m) is not None and m is not head
    )
    assert linear_sum == real_linear
    assert spec.num_layers * spec.block_params + spec.non_block_params == spec.total_params


@pytest.mark.parametrize(
    "kind,targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("qwen2", ["q_proj", "v_proj"]),
        ("opt", ["q_proj", "v_proj"]),
        ("gpt2", ["c_attn"]),
        ("llama", ["all-linear"]),
    ],
)
def test_lora_trainable_params(kind: str, targets: list[str]) -> None:
    peft = pytest.importorskip("peft")
    cfg, r = TINY[kind], 8
    spec = spec_from_config(cfg, kind)
    est = estimate(spec, Plan(gpus=2, rank=r, targets=tuple(targets)))
    model = _real_model(cfg)
    if targets != ["all-linear"]:
        assert est.lora_params == _independent_lora_count(model, targets, r)
    lora_cfg = peft.LoraConfig(
        r=r, lora_alpha=16, target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(model, lora_cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert est.lora_params == trainable


def test_llama_q_v_rank8_closed_form() -> None:
    spec = spec_from_config(TINY_LLAMA, "tiny")
    h, kv_dim, layers = 64, 2 * 16, 3
    expected = layers * (8 * (h + h) + 8 * (h + kv_dim))  # q: h->h, v: h->kv_heads*head_dim
    assert estimate(spec, Plan(rank=8)).lora_params == expected


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama_tied"])
def test_arithmetic_fallback_equals_meta(kind: str) -> None:
    meta = spec_from_config(TINY[kind], kind)
    arith = spec_from_llama_arithmetic(TINY[kind], kind)
    assert dataclasses.replace(arith, source="meta") == meta


def test_unknown_model_type_falls_back_or_fails() -> None:
    spec = spec_from_config({**TINY_LLAMA, "model_type": "not-a-real-arch"}, "x")
    assert spec.source == "arithmetic"
    assert spec.total_params == spec_from_config(TINY_LLAMA).total_params
    with pytest.raises(ConfigError, match="cannot build model_type"):
        spec_from_config({"model_type": "not-a-real-arch", "n_embd": 8}, "x")


# ----------------------------------------------------------------------------- presets


def _llama_params(h: int, f: int, layers: int, kv_dim: int, vocab: int) -> int:
    block = 2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h
    return layers * block + 2 * vocab * h + h


def test_presets_full_ft_and_lora_numbers(preset_specs: dict) -> None:
    expected = {
        "llama-7b": _llama_params(4096, 11008, 32, 4096, 32000),
        "llama-70b": _llama_params(8192, 28672, 80, 1024, 32000),
        # GPT-3 as OPT: 12 h^2 + 13 h per layer, tied token embedding, 2050 position rows,
        # final LayerNorm.
        "gpt3-175b": 96 * (12 * 12288**2 + 13 * 12288) + 50257 * 12288 + 2050 * 12288 + 2 * 12288,
    }
    assert expected["llama-7b"] == 6_738_415_616 and expected["llama-70b"] == 68_976_648_192
    for name, p in expected.items():
        spec = preset_specs[name]
        assert spec.total_params == p, name
        est = estimate(spec, Plan(gpus=8))
        assert est.full.model_states == 16 * p / 8
        assert est.cluster("full").model_states == 16 * p
        assert est.full.optimizer_state == 12 * p / 8
    lora7 = estimate(preset_specs["llama-7b"], Plan(gpus=8, rank=8))
    assert lora7.lora_params == 32 * 2 * 8 * (4096 + 4096)
    steps = 4 * 32 * 2 * 2  # + AdamW's 4-byte step per LoRA tensor (A, B of q, v in 32 layers)
    assert lora7.lora.model_states == (2 * expected["llama-7b"] + 16 * lora7.lora_params) / 8 + steps


def test_sharding_scales_with_world_size(preset_specs: dict) -> None:
    spec = preset_specs["llama-7b"]
    a, b = estimate(spec, Plan(gpus=8)), estimate(spec, Plan(gpus=8, nodes=2))
    assert b.full.model_states == a.full.model_states / 2
    assert b.lora.frozen_weights == a.lora.frozen_weights / 2
    assert b.full.activations == a.full.activations  # per-GPU micro-batch: not sharded


def test_fp32_dtype_and_fp32_grads(preset_specs: dict) -> None:
    spec = preset_specs["llama-7b"]
    p = spec.total_params
    fp32 = estimate(spec, Plan(gpus=4, param_dtype="fp32")).full
    assert (fp32.trainable_params, fp32.gradients, fp32.optimizer_state) == (p, p, 2 * p)
    grads32 = estimate(spec, Plan(gpus=4, fp32_grads=True)).full
    assert grads32.model_states == 18 * p / 4


# ----------------------------------------------------------------------------- frozen bytes


def test_quantized_frozen_bytes_by_hand() -> None:
    spec = spec_from_config(TINY_LLAMA, "tiny")
    weights = sum(lin.count * lin.weight_params for lin in spec.linears)
    rest = spec.total_params - weights
    int8 = sum(lin.count * (lin.weight_params + 4 * lin.out_features) for lin in spec.linears)
    nf4 = sum(
        lin.count * ((lin.weight_params + 1) // 2 + 4 * math.ceil(lin.weight_params / 64)) for lin in spec.linears
    )
    assert frozen_bytes(spec, 16, 2) == 2 * spec.total_params
    assert frozen_bytes(spec, 8, 2) == int8 + 2 * rest
    assert frozen_bytes(spec, 4, 2) == nf4 + 2 * rest
    est = estimate(spec, Plan(gpus=2, bits=4))
    assert est.lora.frozen_weights == (nf4 + 2 * rest) / 2


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bytes_match_dtrain_quant(bits: int) -> None:
    quant = pytest.importorskip("dtrain.model.quant")
    spec = spec_from_config(TINY_LLAMA, "tiny")
    model = _real_model(TINY_LLAMA)
    quant.quantize_model(model, bits)
    stored = quant.quantized_bytes(model)
    weights = sum(lin.count * lin.weight_params for lin in spec.linears)
    expected = frozen_bytes(spec, bits, 2) - 2 * (spec.total_params - weights)
    assert stored["int_bytes"] + stored["scale_bytes"] == expected


def test_gathered_unit_by_hand() -> None:
    spec = spec_from_config(TINY_LLAMA, "tiny")
    h, f, kv, vocab = 64, 176, 32, 512
    block = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    non_block = 2 * vocab * h + h  # embeddings, head, final norm
    emb = vocab * h  # FSDP units of their own: the embeddings, the head (untied); the root: final norm
    lora_block = 8 * (h + h) + 8 * (h + kv)  # q_proj, v_proj at r=8
    assert (spec.block_params, spec.non_block_params) == (block, non_block)
    fsdp, ds = estimate(spec, Plan()), estimate(spec, Plan(backend="deepspeed"))
    assert fsdp.full.gathered_unit == 2 * 2 * max(block, emb)
    assert ds.full.gathered_unit == 2 * 2 * vocab * h  # largest module: the embedding
    assert fsdp.lora.gathered_unit == max(2 * block + 8 * lora_block, 2 * emb)
    q4 = estimate(spec, Plan(bits=4))
    dequant = 2 * h * f  # one bf16 copy of the largest linear weight
    assert q4.lora.gathered_unit == 2 * emb + dequant  # the embedding unit is the larger here
    two = estimate(spec, Plan(backend="deepspeed", gpus=2))  # ZeRO-3 keeps one rank's share gathered
    assert two.lora.gathered_unit == -(-spec.total_params // 2) * 2  # bf16 frozen, > the embedding
    tied = spec_from_config({**TINY_LLAMA, "tie_word_embeddings": True}, "tied")
    assert tied.non_block_params == vocab * h + h
    assert estimate(tied, Plan()).full.gathered_unit == 2 * 2 * max(block, vocab * h + h)  # all in the root


# ----------------------------------------------------------------------------- activations


def test_activations_match_korthikanti_for_gpt3_shapes(preset_specs: dict) -> None:
    spec = preset_specs["gpt3-175b"]
    s, b, h, a, v = 2048, 2, 12288, 96, 50257
    eager = Plan(batch=b, seq_len=s, attention="eager", targets=("q_proj",))
    assert layer_activation_bytes(spec, eager) == s * b * h * (34 + 5 * a * s / h)
    sdpa = Plan(batch=b, seq_len=s, targets=("q_proj",))
    assert layer_activation_bytes(spec, sdpa) == s * b * h * 34 + 4 * a * s * b
    est = estimate(spec, dataclasses.replace(sdpa, chunked_loss=False))  # the logits path for both
    logits = s * b * v * 4
    assert est.full.activations == 96 * s * b * h * 34 + 96 * 4 * a * s * b + logits
    # LoRA (q_proj): frozen linears save no input for a weight grad: MLP in h, GeLU out 4h, masks
    lora_layer = s * b * (2 * 11 * h + 4 * a)
    assert est.lora.activations == 96 * (lora_layer + s * b * 8 * 2) + logits
    ckpt = estimate(spec, dataclasses.replace(sdpa, grad_checkpointing=True))
    layer = layer_activation_bytes(spec, sdpa)
    assert ckpt.full.activations == 96 * s * b * h * 2 + layer + logits


# ----------------------------------------------------------------------------- DeepSpeed


def test_largest_layer_matches_deepspeed_on_real_models() -> None:
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    for kind in ("llama", "opt", "gpt2"):
        spec = spec_from_config(TINY[kind], kind)
        assert stage3.model_to_params(_real_model(TINY[kind])) == (spec.total_params, spec.largest_module_params), kind


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 2)])
def test_deepspeed_zero3_estimator_agreement(preset_specs: dict, capsys, gpus: int, nodes: int) -> None:
    """DeepSpeed (offload none, zero_init=1): 4*largest_layer + 18*P/N. Ours with fp32
    gradients: (2 + 4 + 12)*P/N + gathered module (2 B param + 2 B grad) = the same, plus the
    share of parameters dtrain's generated config keeps gathered for backward (P/N, bf16)."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    spec = preset_specs["llama-7b"]
    p, largest = spec.total_params, spec.largest_module_params
    assert largest == 32000 * 4096  # the embedding (and the head) is DeepSpeed's largest layer
    _, ds_gpu, ds_largest = stage3.estimate_zero3_model_states_mem_needs(
        total_params=p,
        largest_layer_params=largest,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    plan = Plan(gpus=gpus, nodes=nodes, backend="deepspeed", fp32_grads=True)
    ours = estimate(spec, plan).full
    kept = -(-p // (gpus * nodes))  # stage3_max_live_parameters = one rank's share
    assert kept > largest
    assert ours.gathered_unit == ds_largest + 2 * (kept - largest)
    assert abs(ours.model_states + ds_largest - ds_gpu) <= 1  # DS truncates to int
    stage3.estimate_zero3_model_states_mem_needs_all_cold(
        total_params=p, largest_layer_params=largest, num_gpus_per_node=gpus, num_nodes=nodes
    )
    line = next(
        x
        for x in capsys.readouterr().out.splitlines()
        if "offload_param=none, offload_optimizer=none, zero_init=1" in x
    )
    printed_gb = float(re.findall(r"([\d.]+)GB", line)[1]) * 2**30
    assert abs(ours.model_states + ds_largest - printed_gb) / printed_gb < 0.01
    default = estimate(spec, dataclasses.replace(plan, fp32_grads=False)).full
    assert (
        abs(default.model_states + 2 * p / (gpus * nodes) + ds_largest - ds_gpu) <= 1
    )  # 16-bit gradients: exactly 2 B/param below DeepSpeed


# ----------------------------------------------------------------------------- LoRA paper


def test_paper_gpt3_comparison() -> None:
    r = paper_gpt3_comparison()
    p = r["params"]
    assert p == 174_604_283_904
    assert r["lora_trainable_params"] == 96 * 2 * 4 * (12288 + 12288) == 18_874_368
    assert r["ours"]["full_bytes"] == 16 * p
    assert r["ours"]["lora_bytes"] == 2 * p + 16 * 18_874_368 + 4 * 96 * 2 * 2  # + AdamW's step per A, B
    assert abs(r["ours"]["lora_bytes"] - 350e9) / 350e9 < 0.005
    assert r["paper"]["ratio"] == pytest.approx(1.2e12 / 350e9)
    assert r["paper"]["full_bytes_per_param"] == pytest.approx(6.857, abs=1e-3)
    assert r["ours"]["ratio"] == pytest.approx(7.99, abs=0.01)
    table = paper_comparison_markdown(r)
    assert "| 1.20 TB | 350.0 GB | 3.4x |" in table and "| 2.79 TB | 349.5 GB | 8.0x |" in table


# ----------------------------------------------------------------------------- CLI
