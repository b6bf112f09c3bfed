"""`dtrain plan`'s per-rank estimate against `dtrain memory`'s measurement of the same config, on
1 and 2 ranks of FSDP2 and ZeRO-3: the tiny config and the real SmolLM2-135M-Instruct (and Gemma 3
270M, vocabulary 262k, where the chunked loss matters most, when its import is in the cache).

LoRA model states must be equal to the byte; activations within ACTIVATIONS (5%), or PADDED (10%)
for the chat configs: their padded rows give SDPA an attention mask, and on CPU SDPA then takes its
math kernel, which saves the b x heads x s x s softmax (the estimate assumes the fused kernels
that save none; SmolLM2 measured -9.5%, the estimate below). The 2-rank tiny
runs are in the default suite (tests/distributed/test_memory.py::test_plan_equals_measured); these
are the wider matrix, ondemand (a real model per run, minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtrain.storage.files import cache_home
from tests.helpers import REPO, TINY, run_dtrain

ACTIVATIONS = 0.05
PADDED = 0.10
STATES = ("frozen_weights", "trainable_params", "gradients", "optimizer_state", "model_states")
SMOLLM2 = REPO / "configs" / "smollm2_dates.yaml"
GEMMA = cache_home() / "models" / "gemma3-270m"
SHORT = ["training.micro_batch_size=2", "data.seq_len=64"]

CASES = [
    pytest.param(TINY, [], 1, "fsdp", id="tiny-1-fsdp"),
    pytest.param(TINY, [], 1, "deepspeed", id="tiny-1-deepspeed"),
    pytest.param(SMOLLM2, SHORT, 1, "fsdp", id="smollm2-1-fsdp"),
    pytest.param(SMOLLM2, SHORT, 2, "fsdp", id="smollm2-2-fsdp"),
    pytest.param(SMOLLM2, SHORT, 1, "deepspeed", id="smollm2-1-deepspeed"),
    pytest.param(SMOLLM2, SHORT, 2, "deepspeed", id="smollm2-2-deepspeed"),
    pytest.param(
        SMOLLM2,
        [*SHORT, f"model.path={GEMMA}", "data.tokenizer=null"],
        1,
        "fsdp",
        id="gemma3-1-fsdp",
        marks=[
            pytest.mark.skipif(not GEMMA.is_dir(), reason="Gemma 3 270M not imported"),
            pytest.mark.xfail(
                strict=True,
                reason="model states equal, but activations +28%: "
                "Gemma's 4 norms, q/k norms and head_dim 256 are not in the formula",
            ),
        ],
    ),
]


@pytest.mark.ondemand
@pytest.mark.parametrize("config,extra,nproc,backend", CASES)
def test_plan_equals_measured(tmp_path: Path, config: Path, extra: list[str], nproc: int, backend: str) -> None:
    out = tmp_path / "memory"
    run_dtrain(
        ["memory", str(config), *extra, f"backend.name={backend}", "--steps", "2", "--out", str(out)],
        nproc=nproc,
        launcher="torchrun",
        timeout=1500,
    )
    report = json.loads((out / "memory_report.json").read_text())
    assert report["estimate_error"] is None
    for entry in report["ranks"]:
        cats = entry["vs_estimate"]["lora"]
        print(entry["rank"], {c: (cats[c]["measured"], cats[c]["estimate"]) for c in (*STATES, "activations")})
        for cat in STATES:
            assert cats[cat]["estimate"] == cats[cat]["measured"], (entry["rank"], cat)
        tolerance = ACTIVATIONS if config == TINY else PADDED
        assert abs(cats["activations"]["rel_diff"]) <= tolerance, cats["activations"]
