"""The family matrix: every model family of tests/families.py (tiny random models saved by
transformers' save_pretrained), all-linear LoRA on 1 process, FSDP2 (2 ranks) and ZeRO-3 (2 ranks),
one launch per backend for all families (tests/distributed/family_probe.py).

Per family: equal losses (1e-5) and adapters (1% of one lr step) on every backend; each rank holds
exactly half of the frozen bytes (tied weights once), as much after the run's evaluation as before;
PEFT loads the adapter and its logits equal `dtrain merge`'s model; the 8-bit base trains;
the estimator's parameter count is the model's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from tests import families
from tests.helpers import PY, REPO, adapter, env_for_tests, launch_cmd, losses

# DTRAIN_FAMILIES=gpt2,gemma narrows the matrix while working on a family (the suite runs all).
FAMILIES = [f for f in os.environ.get("DTRAIN_FAMILIES", "").split(",") if f] or list(families.FAMILIES)
LR = 1e-3  # family_probe's lr: adapters agree within 1% of one step
# ZeRO-3 in the default suite: one family for each way a build differs from Llama's (gemma2: tied
# and scaled embeddings and softcapped logits; gpt_neox: a renamed head; gpt2: Conv1D); Llama's own
# build runs on ZeRO-3 in test_deepspeed; all families with DTRAIN_ONDEMAND=1.
ZERO3_CORE = ("gemma2", "gpt_neox", "gpt2")
BACKENDS = {
    "single": ("none+8bit", 1, ["training.grad_accum=2"]),
    "fsdp": ("fsdp", 2, []),
    "zero3": ("deepspeed", 2, []),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        families.save(family, root / family)
    return root


def _launch(kind: str, models, out, families_: list[str]) -> None:
    backend, nproc, extra = BACKENDS[kind]
    cmd = ([PY] if nproc == 1 else launch_cmd(nproc, "torchrun")[:-2]) + [
        "tests/distributed/family_probe.py",
        str(models),
        str(out),
        backend,
        *families_,
        "--",
        *extra,
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env_for_tests({"PYTHONPATH": str(REPO)}),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=900,
    )
    assert proc.returncode == 0, f"{kind}: exit {proc.returncode}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """{backend: directory of its runs}: one launch per backend, every family inside it (ZeRO-3: the
    families of ZERO3_CORE; the others in `zero3_rest`, on demand)."""
    out = {kind: tmp_path_factory.mktemp(kind) for kind in BACKENDS}
    for kind in BACKENDS:
        _launch(kind, models, out[kind], [f for f in FAMILIES if kind != "zero3" or f in ZERO3_CORE])
    return out


@pytest.fixture(scope="module")
def zero3_rest(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_rest")
    _launch("zero3", models, out, [f for f in FAMILIES if f not in ZERO3_CORE])
    return out


def _run_dir(request, runs, kind: str, family: str):
    if kind == "zero3" and family not in ZERO3_CORE:
        return request.getfixturevalue("zero3_rest") / family
    return runs[kind] / family


def _sharded(families_: list[str]) -> list:
    """(backend, family) pairs: FSDP2 for every family; ZeRO-3 in the suite for ZERO3_CORE, on demand
    for the rest (a ZeRO-3 engine per family costs seconds: the suite's budget)."""
    return [
        pytest.param(
            kind, f, id=f"{kind}-{f}", marks=[pytest.mark.ondemand] if kind == "zero3" and f not in ZERO3_CORE else []
        )
        for kind in ("fsdp", "zero3")
        for f in families_
    ]


def _probe(run_dir, rank: int = 0) -> dict:
    return json.loads((run_dir / f"probe-rank{rank}.json").read_text())


def _hf_model(models, family: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32).eval()


def _unique_params(model) -> list[torch.Tensor]:
    return list({id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("kind, family", _sharded(FAMILIES))
def test_family_trains_alike_on_every_backend(request, runs, kind: str, family: str) -> None:
    ref = losses(runs["single"] / family)
    ref_adapter = adapter(runs["single"] / family)
    assert len(ref) == 2 and all(math.isfinite(v) for v in ref)
    assert any(t.abs().sum() > 0 for k, t in ref_adapter.items() if "lora_B" in k)
    got = losses(_run_dir(request, runs, kind, family))
    assert len(got) == len(ref) and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got)), (kind, ref, got)
    other = adapter(_run_dir(request, runs, kind, family))
    assert other.keys() == ref_adapter.keys()
    for k in ref_adapter:
        torch.testing.assert_close(other[k], ref_adapter[k], rtol=0, atol=0.01 * LR)


def _model_size(models, family: str) -> tuple[int, int]:
    """(parameters, bytes) of the model as transformers loads it, a tied head once."""
    params = _unique_params(_hf_model(models, family))
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_parameter_count(runs, models, family: str) -> None:
    from dtrain.cli.estimate import read_config_json
    from dtrain.memory.model_spec import spec_from_config

    count, nbytes = _model_size(models, family)
    single = _probe(runs["single"] / family)
    assert single["base_params"] == count and single["full_frozen_bytes"] == nbytes
    assert spec_from_config(read_config_json(models / family), family).total_params == count  # dtrain estimate


@pytest.mark.parametrize("kind, family", _sharded(FAMILIES))
def test_family_frozen_bytes_halved(request, runs, models, kind: str, family: str) -> None:
    count, nbytes = _model_size(models, family)
    for rank in (0, 1):
        row = _probe(_run_dir(request, runs, kind, family), rank)
        assert row["full_frozen_bytes"] == nbytes and row["base_params"] == count
        assert 2 * row["frozen_before"] == nbytes, (kind, rank, row)
        assert row["frozen_after"] == row["frozen_before"], (kind, rank, row)  # nothing left gathered


@pytest.mark.parametrize("family", FAMILIES)
def test_family_adapter_loads_in_peft_and_equals_merge(runs, models, family: str, tmp_path) -> None:
    from peft import PeftModel

    from dtrain.inference import merge as merge_lib

    run = runs["single"] / family
    merged = merge_lib.merge(models / family, run / "adapter", tmp_path / "merged")
    ids = torch.randint(3, families.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    peft = PeftModel.from_pretrained(_hf_model(models, family), run / "adapter").eval()
    with torch.no_grad():
        want, got, base = (
            peft(ids).logits,
            _hf_model(merged.parent, merged.name)(ids).logits,
            _hf_model(models, family)(ids).logits,
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (want - base).abs().max() > 1e-3  # the adapter changed the model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_8bit_base_trains(runs, family: str) -> None:
    q8 = runs["single"] / f"{family}-8bit"
    got, ref = losses(q8), losses(runs["single"] / family)
    assert len(got) == 2 and all(math.isfinite(v) for v in got)
    assert abs(got[0] - ref[0]) <= 0.02 * ref[0]  # the int8 base computes nearly the float one's loss
    assert any(t.abs().sum() > 0 for k, t in adapter(q8).items() if "lora_B" in k)
    row = _probe(q8)
    assert (
        row["quant_storage_bytes"] > 0
        and row["full_frozen_bytes"] < _probe(runs["single"] / family)["full_frozen_bytes"]
    )
