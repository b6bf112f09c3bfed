"""bench/run.py's typed configuration: model shapes, presets, variants, and what one run launches with.

Everything here is frozen: `main` derives a run's preset with `Preset.with_overrides` (a new value),
never by changing a module-level one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

LLAMA_58M = MappingProxyType(
    {  # the NOTES peer baseline's shape: 58.1M parameters
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
)
LLAMA_1B = MappingProxyType(
    {  # TinyLlama-1.1B's shape: 1.10B parameters
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
)
LLAMA_TINY = MappingProxyType(
    {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
)


@dataclass(frozen=True)
class LoRASpec:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 3e-4


LORA = LoRASpec()


@dataclass(frozen=True)
class LatencyShape:
    batch: int
    seq: int
    iters: int
    warmup: int


@dataclass(frozen=True)
class Preset:
    name: str
    arch: Mapping
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    n_sequences: int  # distinct sequences in the synthetic data set (cycled)
    latency: LatencyShape
    timeout_s: int  # per variant

    def with_overrides(
        self,
        steps: int | None = None,
        warmup: int | None = None,
        micro_batch: int | None = None,
        seq_len: int | None = None,
    ) -> Preset:
        """A copy with the given fields replaced (None: keep); the model's positions grow to seq_len."""
        changes = {
            k: v
            for k, v in dict(steps=steps, warmup=warmup, micro_batch=micro_batch, seq_len=seq_len).items()
            if v is not None
        }
        p = dataclasses.replace(self, **changes)
        if p.seq_len > p.arch.get("max_position_embeddings", p.seq_len):
            p = dataclasses.replace(p, arch=MappingProxyType({**p.arch, "max_position_embeddings": p.seq_len}))
        return p

    def valid(self) -> bool:
        return self.steps >= 1 and self.warmup >= 0 and self.micro_batch >= 1 and self.seq_len >= 2


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "cpu": Preset(
            "cpu",
            LLAMA_58M,
            seq_len=256,
            micro_batch=4,
            steps=12,
            warmup=3,
            n_sequences=96,
            latency=LatencyShape(batch=1, seq=256, iters=30, warmup=3),
            timeout_s=3600,
        ),
        "gpu": Preset(
            "gpu",
            LLAMA_1B,
            seq_len=1024,
            micro_batch=8,
            steps=20,
            warmup=5,
            n_sequences=256,
            latency=LatencyShape(batch=1, seq=1024, iters=50, warmup=5),
            timeout_s=3600,
        ),
        "quick": Preset(
            "quick",
            LLAMA_TINY,
            seq_len=64,
            micro_batch=2,
            steps=3,
            warmup=1,
            n_sequences=32,
            latency=LatencyShape(batch=1, seq=32, iters=5, warmup=1),
            timeout_s=900,
        ),
    }
)
# Dense bf16 peak of known GPUs, FLOP/s (no sparsity).
GPU_PEAK_BF16: Mapping[str, float] = MappingProxyType(
    {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # dtrain | peft | latency
    backend: str | None = None  # fsdp | deepspeed
    mode: str = "lora"  # lora | full
    bits: int = 16
    default: bool = True


VARIANTS = (
    Variant("dtrain-fsdp", "dtrain", "fsdp"),
    Variant("dtrain-fsdp-full", "dtrain", "fsdp", mode="full"),
    Variant("dtrain-fsdp-8bit", "dtrain", "fsdp", bits=8),
    Variant("peft-fsdp", "peft", "fsdp"),
    Variant("dtrain-ds", "dtrain", "deepspeed"),
    Variant("dtrain-ds-full", "dtrain", "deepspeed", mode="full"),
    Variant("dtrain-ds-8bit", "dtrain", "deepspeed", bits=8),
    Variant("peft-ds", "peft", "deepspeed"),
    Variant("latency", "latency"),
    Variant("peft-fsdp-full", "peft", "fsdp", mode="full", default=False),
    Variant("peft-ds-full", "peft", "deepspeed", mode="full", default=False),
)
BY_NAME: Mapping[str, Variant] = MappingProxyType({v.name: v for v in VARIANTS})


@dataclass(frozen=True)
class DataFiles:
    """The synthetic data, written once per run (runners.make_data)."""

    tokenizer: Path  # word-level tokenizer: `w<i>` is token i
    text: Path  # for dtrain (`format: text`)
    ids: Path  # the same sequences as an id tensor (.pt), for the baseline


@dataclass(frozen=True)
class Launch:
    """How every variant of one run is launched, and where it writes."""

    work: Path  # the run's temp dir: one folder per variant
    data: DataFiles
    arch_file: Path  # the model's inline config as JSON (baseline and latency read it)
    nproc: int
    dtype: str  # fp32 | bf16
    cuda: bool
    timeout_s: int  # per variant
    overrides: tuple[str, ...] = ()  # dtrain config overrides for every dtrain variant
