"""Tiny random mixture-of-experts models saved by transformers (qwen3_moe, mixtral, gpt_oss: fused
3-D experts), with the built-in tokenizer, for the expert-LoRA tests. One table: a family is a line."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import REPO

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"
COMMON = dict(
    vocab_size=512,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# family -> its config's MoE keys (4 experts, top-2: a 4 x 32-token batch routes to every expert)
FAMILIES = {
    "qwen3_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    ),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
EXPERT_TARGETS = "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"
ROUTER = {"qwen3_moe": "mlp.gate.weight", "mixtral": "mlp.gate.weight", "gpt_oss": "mlp.router.weight"}  # [E, H]


def save_family(family: str, out: Path) -> Path:
    """A random-weight model of `family` (std 0.2, so the routing and the loss are far from uniform)
    written by save_pretrained, plus dtrain's built-in tokenizer; returns its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtrain.model.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **COMMON, **FAMILIES[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0, 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer(CORPUS).save_pretrained(out)
    return out


def save_all(root: Path) -> Path:
    for family in FAMILIES:
        if not (root / family / "config.json").is_file():
            save_family(family, root / family)
    return root
