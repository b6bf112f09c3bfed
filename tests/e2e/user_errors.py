"""Helpers for the tests of user errors: the one-line check, file snapshots, a tiny base and adapter."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def assert_one_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit code 2 and exactly one `dtrain: error:` line on stderr, holding every part."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: "), proc.stderr[-4000:]
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def train_cases(tmp: Path, cases: dict[str, tuple[list[str], list[str]]]) -> dict[str, subprocess.CompletedProcess]:
    """`dtrain train` on the tiny config for every case (name -> (overrides, parts of the error)),
    two at a time (each process mostly waits on imports), each into its own output dir."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import FAST, TINY, run_dtrain

    def one(name: str) -> subprocess.CompletedProcess:
        args = ["train", str(TINY), *FAST, *cases[name][0], f"output.dir={tmp / 'out' / name}"]
        return run_dtrain(args, check=False, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(one, cases)))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def make_base(directory: Path) -> Path:
    """A tiny random Llama saved in HF format (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(directory)
    return directory


def make_adapter(
    directory: Path,
    base: Path,
    r: int = 4,
    config_r: int | None = None,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A PEFT-format LoRA adapter for `base` (random A and B) with rank `r` in its tensors and
    `config_r` (default r; None-able through the config) in adapter_config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    outs = {"q_proj": cfg.hidden_size, "v_proj": cfg.num_key_value_heads * head_dim}
    tensors = {}
    for t in targets:
        prefix = f"base_model.model.model.layers.0.self_attn.{t}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, cfg.hidden_size)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(outs[t], r)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r if config_r is None else config_r,
        "lora_alpha": 8,
        "target_modules": list(targets),
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


CUSTOM_CONFIG = """from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tinycustom"

    def __init__(self, vocab_size=64, hidden_size=16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)
"""
CUSTOM_MODEL = """from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny import TinyConfig


class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.vocab_size)  # a head the model does not name

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.out(self.embed(input_ids)))
"""


def make_custom_code_model(directory: Path) -> Path:
    """A model directory whose config maps to custom code (auto_map), with a head it does not name
    (no lm_head, no get_output_embeddings)."""
    directory.mkdir(parents=True)
    (directory / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (directory / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    config = {
        "model_type": "tinycustom",
        "architectures": ["TinyForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 16,
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory
