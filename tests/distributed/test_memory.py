"""`dtrain memory` on 2 gloo ranks, FSDP2 and DeepSpeed ZeRO-3: the report's bytes per category
equal what the tensors hold, computed here independently from the tiny config's shapes and each
backend's sharding rule.

Sharding rules (what each rank holds of a parameter of shape `s`, W ranks):
* FSDP2: dim 0 cut like torch.chunk: ceil(s[0] / W) rows per rank (the last ranks get fewer).
* ZeRO-3: the flattened tensor cut into ceil(numel / W) elements per rank (the last padded).
Optimizer state per rank: FSDP2 (torch AdamW): m and v shards (8 B/element) plus a 4-byte `step`
tensor per parameter tensor. ZeRO-3: one flat fp32 partition per sub-group (one here) with m, v
and a separate fp32 master copy (12 B/element; DeepSpeed 0.19 copies even fp32 weights) plus one
4-byte `step`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, TINY, run_dtrain, tiny_shapes

WORLD = 2
R = 8
TARGETS = ("q_proj", "v_proj")
ARGS = ["lora.targets=[q_proj,v_proj]", "training.micro_batch_size=4", "data.seq_len=32"]
BACKENDS = [
    "fsdp",
    pytest.param(
        "deepspeed",
        marks=pytest.mark.skipif(
            not (REPO / "dtrain/backends/deepspeed.py").exists(), reason="no DeepSpeed backend yet"
        ),
    ),
]
MODEL_STATES = ("frozen_weights", "trainable_params", "gradients", "optimizer_state")


def local_numel(shape: tuple[int, ...], rank: int, backend: str) -> int:
    """Elements of a parameter held by `rank` (see the module docstring)."""
    numel = math.prod(shape)
    if backend == "deepspeed":
        return math.ceil(numel / WORLD)
    chunk = math.ceil(shape[0] / WORLD)
    rows = max(0, min(chunk, shape[0] - rank * chunk))
    return rows * numel // shape[0]


def expected(mode: str, rank: int, backend: str) -> dict[str, int]:
    """Per-category bytes on `rank` for `mode` (fp32 everywhere)."""
    base, lora = tiny_shapes()
    frozen, trainable = ([], base) if mode == "full" else (base, lora)
    fb = 4 * sum(local_numel(s, rank, backend) for s in frozen)
    tb = 4 * sum(local_numel(s, rank, backend) for s in trainable)
    opt = 3 * tb + 4 if backend == "deepspeed" else 2 * tb + 4 * len(trainable)
    return {"frozen_weights": fb, "trainable_params": tb, "gradients": tb, "optimizer_state": opt}


@pytest.fixture(scope="module", params=BACKENDS)
def measured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    """One `dtrain memory` run per backend on 2 ranks: (backend, report dir, report JSON)."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"memory_{backend}")
    run_dtrain(
        ["memory", str(TINY), *ARGS, f"backend.name={backend}", "--steps", "2", "--out", str(out)],
        nproc=WORLD,
        launcher="torchrun",
        timeout=240,
    )
    return backend, out, json.loads((out / "memory_report.json").read_text())


def test_breakdown_equals_the_tensors(measured: tuple[str, Path, dict]) -> None:
    backend, out, report = measured
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and list(report["modes"]) == ["full", "lora"]
    for entry in report["ranks"]:
        for mode in ("full", "lora"):
            row = entry["measured"][mode]
            want = expected(mode, entry["rank"], backend)
            assert {k: row[k] for k in MODEL_STATES} == want, (backend, mode, entry["rank"])
            assert row["model_states"] == sum(want.values())
            assert row["activations"] > 0 and row["rss_peak_bytes"] > 0
    r0, r1 = (e["measured"] for e in report["ranks"])
    assert r0["lora"]["activations"] == r1["lora"]["activations"]  # same micro-batch shape
    assert r0["lora"]["activations"] < r0["full"]["activations"]  # frozen layers save less
    md = (out / "memory_report.md").read_text()
    assert "## Rank 0" in md and "## Rank 1" in md and "full / LoRA" in md
    assert (out / "memory_report.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_model_states_far_below_full(measured: tuple[str, Path, dict]) -> None:
    backend, _, report = measured
    for entry in report["ranks"]:
        ratio = entry["ratio_full_over_lora"]
        full, lora = expected("full", entry["rank"], backend), expected("lora", entry["rank"], backend)
        assert ratio["model_states"] == pytest.approx(sum(full.values()) / sum(lora.values()))
        assert ratio["model_states"] > 3.5  # fsdp 3.63x, deepspeed 4.43x on the tiny config
        assert ratio["optimizer_state"] > 35  # the trainable states alone: ~39x


def test_plan_equals_measured(measured: tuple[str, Path, dict]) -> None:
    """`dtrain plan`'s estimate (the report's, from the same config: plan_config.plan_from_config)
    equals the measured LoRA model states to the byte on every rank; activations within 5%."""
    _, _, report = measured
    for entry in report["ranks"]:
        cats = entry["vs_estimate"]["lora"]
        for cat in (*MODEL_STATES, "model_states"):
            assert cats[cat]["estimate"] == cats[cat]["measured"], (entry["rank"], cat)
        assert abs(cats["activations"]["rel_diff"]) <= 0.05, cats["activations"]


def test_estimate_within_10_percent_for_model_states(measured: tuple[str, Path, dict]) -> None:
    from dtrain.memory import estimate as est
    from dtrain.memory.model_spec import spec_from_llama_arithmetic

    backend, _, report = measured
    arch = yaml.safe_load(TINY.read_text())["model"]["arch"]
    plan = est.Plan(gpus=WORLD, backend=backend, rank=R, targets=TARGETS, batch=4, seq_len=32, param_dtype="fp32")
    e = est.estimate(spec_from_llama_arithmetic(arch), plan)
    for entry in report["ranks"]:
        for mode, breakdown in (("full", e.full), ("lora", e.lora)):
            row = entry["measured"][mode]
            for cat in (*MODEL_STATES, "model_states"):
                want = getattr(breakdown, cat)
                assert abs(want - row[cat]) <= 0.10 * max(row[cat], 1), (mode, cat, want, row[cat])
                assert not entry["vs_estimate"][mode][cat]["flag"]
