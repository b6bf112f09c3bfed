"""`dtrain verify` as users run it (torchrun, 2 gloo ranks, the tiny model): it passes on FSDP2
with an 8-bit base, and fails (exit 1, the table naming the layer) with a planted fault that drops
one layer's LoRA gradients on the sharded backend (DTRAIN_TEST_FAULT, never a config key).
ZeRO-3 (4-bit pass, 8-bit planted fault) and SmolLM2 on both backends are ondemand: each launch of
DeepSpeed or the real model costs 30-90 s on the 2-core machines."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_dtrain

TINY_ARGS = ["configs/tiny.yaml", "lora.targets=[q_proj,v_proj]", "training.micro_batch_size=2", "data.seq_len=32"]
LAYER = "layers.1.self_attn.v_proj"


def _verify(tmp_path, backend: str, bits: int, fault: bool, args=TINY_ARGS):
    out = tmp_path / "v"
    env = {"DTRAIN_TEST_FAULT": f"drop_grad:{LAYER}"} if fault else {}
    proc = run_dtrain(
        [
            "verify",
            *args,
            f"backend.name={backend}",
            f"quantization.bits={bits}",
            f"output.dir={tmp_path / 'run'}",
            "--out",
            str(out),
        ],
        nproc=2,
        launcher="torchrun",
        check=False,
        env=env,
        timeout=900,
    )
    table = proc.stdout[proc.stdout.index("dtrain verify:") :] if "dtrain verify:" in proc.stdout else ""
    print(table)
    return proc, table, {c["name"]: c for c in json.loads((out / "verify.json").read_text())} if table else {}


def _assert_passes(proc, table, checks, bits: int) -> None:
    assert proc.returncode == 0 and table.rstrip().endswith(f"verify: all {len(checks)} checks passed"), (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    assert len(checks) == 8 and f"quantization error of the {bits}-bit base" in checks
    assert checks["every LoRA tensor moved"]["detail"] == "8/8 changed"


def _assert_catches(proc, table, checks) -> None:
    assert proc.returncode != 0 and "exitcode: 1" in proc.stderr, proc.stderr[-3000:]
    failed = {n for n, c in checks.items() if not c["ok"]}
    assert {
        "losses, 2 rank(s) vs 1 process",
        "adapter after training, N ranks vs 1 process",
        "every LoRA tensor got a gradient",
        "every LoRA tensor moved",
    } <= failed, table
    assert f"6/8 non-zero (smallest norm 0.00e+00); none: model.{LAYER}.lora_A.default.weight" in table
    assert "verify: FAILED" in table


def test_verify_passes_on_fsdp_8bit(tmp_path):
    _assert_passes(*_verify(tmp_path, "fsdp", 8, False), bits=8)


def test_verify_catches_a_dropped_layer_gradient_on_fsdp_4bit(tmp_path):
    _assert_catches(*_verify(tmp_path, "fsdp", 4, True))


@pytest.mark.ondemand
def test_verify_on_zero3_passes_4bit_and_catches_the_fault_8bit(tmp_path):
    pytest.importorskip("deepspeed")
    _assert_passes(*_verify(tmp_path / "ok", "deepspeed", 4, False), bits=4)
    _assert_catches(*_verify(tmp_path / "bad", "deepspeed", 8, True))


@pytest.mark.ondemand
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_verify_on_smollm2(backend, smollm2_dir, tmp_path):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    args = [
        "configs/tiny.yaml",
        "model.arch=null",
        f"model.path={smollm2_dir}",
        "lora.targets=[q_proj,v_proj]",
        "training.micro_batch_size=1",
        "data.seq_len=64",
        "quantization.bits=16",
    ]
    proc, table, _ = _verify(tmp_path, backend, 16, False, args=args)
    assert proc.returncode == 0 and table.rstrip().endswith("verify: all 7 checks passed"), (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
