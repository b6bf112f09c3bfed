"""DPO's bad input through the real CLI: one `dtrain: error:` line, exit 2 (records without
rejected, identical chosen and rejected, a prompt limit that leaves no room, mode full with the
base as reference, preference data without objective dpo, an init_from adapter of another r);
`dtrain estimate --objective dpo` adds full DPO's reference copy and nothing to LoRA's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.e2e.user_errors import assert_one_line, train_cases
from tests.helpers import FAST, REPO, TINY, run_dtrain

PAIRS = REPO / "dtrain" / "assets" / "tiny_preferences.jsonl"


def _adapter(d: Path, r: int) -> Path:
    """A PEFT-format adapter for configs/tiny.yaml's q_proj / v_proj (hidden 64, 2 KV heads of 16)."""
    d.mkdir()
    t = {}
    for layer in range(2):
        for proj, out in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = torch.zeros(r, 64), torch.zeros(out, r)
    save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]})
    )
    return d


def _cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello."}) + "\n" + PAIRS.read_text())
    same = tmp / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}) + "\n")
    dpo = ["objective=dpo", "data.format=preference"]
    return {
        "no_rejected": (
            [*dpo, f"data.path={bad}", "data.bad_records=error"],
            [f"data.path = '{bad}': record 0 has a missing or empty 'rejected'"],
        ),
        "identical": (
            [*dpo, f"data.path={same}", "data.bad_records=error"],
            [f"data.path = '{same}': record 0 has identical 'chosen' and 'rejected'"],
        ),
        "init_r": (
            [f"lora.init_from={_adapter(tmp / 'r4', 4)}"],
            [f"lora.init_from = '{tmp / 'r4'}': the adapter has r = 4, the config lora.r = 8"],
        ),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dpo-errors")
    cases = _cases(tmp)
    return {"cases": cases, "procs": train_cases(tmp, cases)}


@pytest.mark.parametrize("name", ["no_rejected", "identical", "init_r"])
def test_dpo_error_is_one_line(results, name):
    assert_one_line(results["procs"][name], *results["cases"][name][1])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.max_prompt_tokens=32"],
            "data.max_prompt_tokens = 32 leaves no room for the completions in data.seq_len = 32",
        ),
        (["mode=full"], "objective dpo with mode: full and dpo.reference = base: there is no frozen base"),
        (
            ["objective=sft"],
            "objective = sft with data.format = preference: objective dpo needs data.format: preference",
        ),
        (["data.format=messages"], "objective = dpo with data.format = messages: objective dpo needs"),
        (["data.packing=true"], "data.packing = true with objective dpo: not supported"),
        (["dpo.reference=adapter:/no/such"], "dpo.reference = 'adapter:/no/such': directory not found"),
        (["dpo.reference=sft"], "dpo.reference = 'sft': use base or adapter:DIR"),
    ],
)
def test_dpo_config_errors(overrides, message):
    """Cross-field checks, before any heavy import (the CLI prints them as one line, exit 2)."""
    from dtrain.config import schema as config_lib
    from dtrain.errors import ConfigError

    base = [*FAST, "objective=dpo", "data.format=preference", f"data.path={PAIRS}", "output.dir=/tmp/x"]
    with pytest.raises(ConfigError) as e:
        config_lib.load(TINY, [*base, *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_estimate_dpo_adds_the_reference_copy_to_full_only():
    from dtrain.memory.estimate import Plan, estimate
    from dtrain.memory.estimate_dpo import estimate_dpo
    from dtrain.memory.model_spec import PRESETS, spec_from_config

    spec = spec_from_config(PRESETS["llama-7b"], "llama-7b")
    plan = Plan(gpus=8, batch=2, seq_len=1024)
    sft, rows, dpo = estimate(spec, plan), estimate(spec, Plan(gpus=8, batch=4, seq_len=1024)), estimate_dpo(spec, plan)
    assert dpo.lora == rows.lora and dpo.lora.frozen_weights == sft.lora.frozen_weights
    assert dpo.full.frozen_weights == 2 * spec.total_params / 8  # bf16 reference copy, sharded over 8
    assert dpo.lora.activations == rows.lora.activations > sft.lora.activations  # 2 rows per pair
    proc = run_dtrain(["estimate", "--model", "llama-7b", "--gpus", "8", "--objective", "dpo", "--json"])
    out = json.loads(proc.stdout)
    assert out["objective"] == "dpo" and out["per_gpu"]["full_ft"]["frozen_weights"] == round(dpo.full.frozen_weights)
