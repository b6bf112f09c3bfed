"""lora.targets presets resolve to each family's module names on small meta-device models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from dtrain import lora
from dtrain.errors import ConfigError
from dtrain.lora import targets as presets
from dtrain.model import build as model_lib

DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
CONFIGS = {
    "llama": dict(DECODER),
    "mistral": dict(DECODER),
    "qwen2": dict(DECODER),
    "gemma": dict(DECODER, head_dim=8),
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "bert": dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        is_decoder=True,
    ),
}
LLAMA = {
    "attention-qv": ["self_attn.q_proj", "self_attn.v_proj"],
    "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
EXPECTED = {
    **{t: ("model.layers.{i}.", LLAMA) for t in ("llama", "mistral", "qwen2", "gemma")},
    "gpt2": (
        "transformer.h.{i}.",
        {
            "attention-qv": ["attn.c_attn"],
            "attention": ["attn.c_attn", "attn.c_proj"],
            "mlp": ["mlp.c_fc", "mlp.c_proj"],
        },
    ),
    "bert": (
        "bert.encoder.layer.{i}.",
        {
            "attention-qv": ["attention.self.query", "attention.self.value"],
            "attention": [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ],
            "mlp": ["intermediate.dense", "output.dense"],
        },
    ),
}


def meta_model(model_type: str):
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    return model_lib.build_empty(config, torch.float32, "meta")


@pytest.mark.parametrize("model_type", list(CONFIGS))
@pytest.mark.parametrize("preset", ["attention-qv", "attention", "mlp"])
def test_preset_resolves_to_family_names(model_type, preset):
    model = meta_model(model_type)
    prefix, table = EXPECTED[model_type]
    want = sorted(prefix.format(i=i) + s for i in range(2) for s in table[preset])
    assert sorted(presets.expand(model, preset)) == want
    if model_type != "gpt2":  # GPT-2's Conv1D is not a layer dtrain's LoRA wraps (see dtrain/lora/targets.py)
        assert sorted(lora.select_targets(model, presets.expand(model, preset), None)) == want


def test_unknown_model_type_found_by_module_names():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    assert presets.resolve_names(names, "attention-qv", "my_llama_clone") == names[:2]
    with pytest.raises(ConfigError, match="no target preset for model_type 'odd'"):
        presets.resolve_names(["blocks.0.wqkv"], "attention", "odd")


def test_suffixes_and_all_linear_pass_through():
    model = meta_model("llama")
    assert presets.expand(model, ["q_proj"]) == ["q_proj"] and presets.expand(model, "all-linear") == "all-linear"


def test_estimator_block_names_take_presets():
    from dtrain.memory.estimate import targeted_linears
    from dtrain.memory.model_spec import spec_from_config

    spec = spec_from_config({"model_type": "llama", **DECODER}, "tiny")
    assert sorted(lin.name for lin in targeted_linears(spec, ("mlp",))) == sorted(LLAMA["mlp"])
    assert sorted(lin.name for lin in targeted_linears(spec, ("attention-qv",))) == sorted(LLAMA["attention-qv"])


@pytest.mark.ondemand  # a training run; the presets' targets are resolved in process above
def test_training_with_a_preset(tmp_path):
    from tests.helpers import adapter, train

    train(tmp_path / "run", ["lora.targets=attention", "training.max_steps=1"])
    layers = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter(tmp_path / "run")}
    assert layers == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
