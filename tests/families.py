"""The model families dtrain is tested on: one row per family, (model_type, its config kwargs on top
of COMMON). Adding a family is one line here; tests/distributed/test_families.py and
tests/distributed/family_probe.py run every row. Models are minuscule (2 layers, hidden 32, vocab
288) so that the whole matrix costs seconds, not minutes."""

from __future__ import annotations

from pathlib import Path

VOCAB = 288  # the byte-level BPE needs 256 bytes + 3 specials; a few merges on top
CORPUS = Path(__file__).resolve().parents[1] / "dtrain" / "assets" / "tiny_corpus.txt"
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GEMMA = {"head_dim": 8}  # Gemma's default head_dim is 256, whatever the hidden size

FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": GEMMA,
    "gemma2": {**GEMMA, "sliding_window": 16},
    "gemma3_text": {**GEMMA, "sliding_window": 16, "sliding_window_pattern": 2},
    "mistral": {},
    "phi3": {},
    "olmo2": {},
    "gpt_neox": {"num_key_value_heads": None},
    "gpt2": {
        "num_key_value_heads": None,
        "intermediate_size": None,
        "n_inner": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },  # dropout differs per rank
    "granite": {},
    "smollm3": {},
    # mixture of experts, fused 3-D experts (4, top-2): the probe's `lora.targets: all` adapts them
    "qwen3_moe": {
        "head_dim": 8,
        "moe_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
    },
    "mixtral": {"head_dim": 8, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {
        "head_dim": 8,
        "intermediate_size": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def config(model_type: str):
    """The family's transformers config (its own config class), fixed seed-independent."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in {**COMMON, **FAMILIES[model_type]}.items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def save(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A tiny random model of the family, saved by transformers' save_pretrained into `directory`,
    with a byte-level BPE of VOCAB tokens built from the tiny corpus (dtrain then reads both)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dtrain.model.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(model_type), dtype=torch.float32)
    model.save_pretrained(directory)
    build_tokenizer(CORPUS, vocab_size=VOCAB - 16).save_pretrained(directory)  # room for added tokens
    return Path(directory)
