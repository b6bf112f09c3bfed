"""The MFU FLOP count: 4 P_frozen + 6 P_trainable + 12 L s d_attn per token, on a meta model."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from dtrain import lora
from dtrain.loggers import flops
from dtrain.model import build as model_lib


def tiny_lora_model():
    config = AutoConfig.for_model(
        "llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = model_lib.build_empty(config, torch.float32, "meta")
    names = lora.select_targets(model, ["q_proj", "v_proj"], None)
    lora.inject(model, names, lora.AdapterSpec(r=8))
    lora.freeze_base(model)
    return model


def test_flops_per_token_by_hand():
    model = tiny_lora_model()
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q k v o gate up down
    frozen = 2 * per_layer + 64 * 512  # + the untied head; the embedding is a lookup
    trainable = 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))  # A and B of q_proj and v_proj
    assert flops.matmul_params(model) == (frozen, trainable)
    assert trainable == lora.count_parameters(model)[0]
    assert flops.flops_per_token(model, 32) == 4 * frozen + 6 * trainable + 12 * 2 * 32 * 64


def test_mfu_only_on_cuda():
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops(torch.device("cpu"), 100.0) is None
    assert flops.mfu(1e9, 1000, 2.0, 4, 1e12) == 1e12 / (2.0 * 4 * 1e12)
