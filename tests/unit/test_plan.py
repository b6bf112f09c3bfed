"""`dtrain plan` (dtrain/memory/planner.py, plan_cli.py), `dtrain estimate CONFIG` reading the
whole plan (plan_config.py), and the chunked loss in the estimate."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
import yaml

from dtrain.cli import plan as plan_cli
from dtrain.cli.estimate import add_estimate_parser
from dtrain.errors import ConfigError
from dtrain.memory import planner
from dtrain.memory.estimate import Plan, estimate
from dtrain.memory.model_spec import spec_from_config
from dtrain.memory.plan_config import config_dict, plan_fields, read_plan, typed
from tests.helpers import REPO

GIB = 2**30
ROW = re.compile(r"^\s*\d+ (fsdp|deepspeed)\s+(16|8|4)\s+(\d+) (\S+)\s+(\S+)\s+([0-9.]+)\s+([0-9.]+)G\s+([0-9,]+)$")


def _run(command: str, argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="dtrain")
    sub = parser.add_subparsers(dest="command")
    plan_cli.add_parser(sub)
    add_estimate_parser(sub)
    args = parser.parse_args([command, *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "model,gpus,nodes,memory", [("Llama-3.1-8B", 8, 1, 24), ("Llama-3.1-70B", 8, 2, 80), ("Llama-3.1-405B", 8, 8, 80)]
)
def test_plans_that_fit(capsys, model: str, gpus: int, nodes: int, memory: int) -> None:
    out = _run(
        "plan",
        ["--model", model, "--gpus", str(gpus), "--nodes", str(nodes), "--gpu-memory", f"{memory}GB", "--top", "50"],
        capsys,
    )
    rows = [ROW.match(line) for line in out.splitlines()[2:]]
    assert rows and all(rows), out
    for row in rows:
        total, headroom = float(row.group(6)), float(row.group(7))
        assert total <= planner.HEADROOM * memory and abs(total + headroom - memory) < 0.02
    speeds = [int(r.group(8).replace(",", "")) for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    # the listed estimate is `dtrain estimate`'s for the same plan
    best = rows[0]
    ckpt = {"off": "false", "blocks": "true", "attention": "attention"}[best.group(4)]
    est = _run(
        "estimate",
        [
            "--model",
            model,
            "--gpus",
            str(gpus),
            "--nodes",
            str(nodes),
            "--backend",
            best.group(1),
            "--bits",
            best.group(2),
            "--batch",
            best.group(3),
            "--grad-checkpointing",
            ckpt,
            "--chunked-loss",
            "true" if best.group(5) == "chunked" else "false",
            "--json",
        ]
        + (["--fp32-grads"] if best.group(1) == "deepspeed" else []),
        capsys,
    )
    assert f"{yaml.safe_load(est)['per_gpu']['lora']['total'] / GIB:.2f}" == best.group(6)


def test_70b_on_two_24gb_gpus_is_refused_with_the_way_out(capsys) -> None:
    with pytest.raises(ConfigError) as err:
        _run("plan", ["--model", "Llama-3.1-70B", "--gpus", "2", "--gpu-memory", "24GB"], capsys)
    text = str(err.value)
    assert "\n" not in text and "nothing fits Llama-3.1-70B-Instruct on 2 x 24 GiB" in text
    assert "it fits on 4 GPUs" in text and "4-bit" in text
    assert "the sharded model states alone need" in text  # no sequence length helps on 2 GPUs


def test_write_emits_a_config_and_its_launch_line(tmp_path, capsys) -> None:
    out = _run(
        "plan",
        [
            str(REPO / "configs" / "llama3.1-70b_qlora_fsdp.yaml"),
            "--gpus",
            "8",
            "--nodes",
            "2",
            "--gpu-memory",
            "80GB",
            "--write",
            str(tmp_path),
        ],
        capsys,
    )
    text = (tmp_path / "plan.yaml").read_text()
    first = text.splitlines()[0]
    assert first.startswith("# torchrun --nnodes 2") or first.startswith("# deepspeed --hostfile")
    assert f"launch: {first[2:]}" in out and "dtrain slurm" in first
    raw = yaml.safe_load(text)
    recipe = yaml.safe_load((REPO / "configs" / "llama3.1-70b_qlora_fsdp.yaml").read_text())
    assert raw["model"]["path"] == recipe["model"]["path"] and raw["lora"]["r"] == 16  # the recipe's model, kept
    assert raw["data"]["path"] == "dtrain/assets/dates_train.jsonl"  # the config's other keys stay
    plan = read_plan(tmp_path / "plan.yaml", {}).plan  # the written config reads back as the plan
    assert (plan.gpus, plan.nodes, plan.targets) == (8, 2, ("all-linear",))
    with pytest.raises(ConfigError, match="exists"):
        _run(
            "plan", ["--model", "Llama-3.1-8B", "--gpus", "1", "--gpu-memory", "80GB", "--write", str(tmp_path)], capsys
        )


def test_gpu_memory_and_launch_lines() -> None:
    assert plan_cli.gpu_memory("80GB") == plan_cli.gpu_memory("80 GiB") == 80 * GIB
    for bad in ("eighty", "-4GB", "0"):
        with pytest.raises(ConfigError, match="--gpu-memory"):
            plan_cli.gpu_memory(bad)
    assert plan_cli.launch_line(Plan(gpus=8), "p.yaml") == "torchrun --nproc_per_node 8 -m dtrain train p.yaml"
    assert (
        plan_cli.launch_line(Plan(gpus=4, backend="deepspeed"), "p.yaml")
        == "deepspeed --num_gpus 4 --module dtrain train p.yaml"
    )


def test_estimate_config_reads_the_whole_plan(tmp_path, capsys) -> None:
    recipe = REPO / "configs" / "llama3.1-70b_qlora_zero3.yaml"
    read = read_plan(recipe, {})
    p = read.plan
    assert (p.gpus, p.nodes, p.backend, p.bits, p.rank, p.targets, p.batch, p.seq_len) == (
        8,
        2,
        "deepspeed",
        4,
        16,
        ("all-linear",),
        2,
        2048,
    )
    assert (p.grad_checkpointing, p.param_dtype, p.fp32_grads) == (True, "bf16", True)
    assert "chunked_loss = auto (training.chunked_loss not set)" in read.assumed
    out = _run("estimate", [str(recipe), "--rank", "8"], capsys)  # a flag overrides the config
    assert "LoRA: r=8 on all-linear" in out and "assumed: rank" not in out
    tiny = _run("estimate", [str(REPO / "configs" / "tiny.yaml")], capsys)
    assert "assumed: gpus = 1 (no --gpus, no launch command" in tiny


def test_config_dict_round_trip() -> None:
    plan = Plan(
        gpus=1,
        backend="deepspeed",
        bits=8,
        rank=4,
        targets=("q_proj", "k_proj"),
        batch=3,
        seq_len=512,
        grad_checkpointing="attention",
        checkpoint_every=2,
        param_dtype="bf16",
        chunked_loss=False,
        loss_chunk=256,
        fp32_grads=True,
    )
    back = Plan(gpus=1, **plan_fields(typed(config_dict(plan, {"arch": {"model_type": "llama"}}), "x")))
    assert back == plan


def test_chunked_loss_saves_the_hidden_gradient_not_the_logits() -> None:
    """Gemma 3 270M's shapes (vocabulary 262,144): the gap the chunked loss closes."""
    spec = spec_from_config(yaml.safe_load((REPO / "tests/unit/gemma3_270m.json").read_text()), "gemma")
    plan = Plan(batch=4, seq_len=512, targets=("q_proj", "v_proj"), param_dtype="fp32", loss_chunk=1024)
    on, off = estimate(spec, plan).lora, estimate(spec, dataclasses.replace(plan, chunked_loss=False)).lora
    tokens = 4 * 512
    assert off.activations - on.activations == tokens * 262144 * 4 - tokens * 640 * 4
    assert on.loss_logits == 1024 * 262144 * 4 and off.loss_logits == tokens * 262144 * 4
    assert off.activations / on.activations > 1.7  # the full logits were most of LoRA's activations
    # training.loss_chunk_tokens = 0: the chunk sized from the vocabulary (256 MiB of fp32 logits)
    by_vocab = estimate(spec, dataclasses.replace(plan, loss_chunk=0)).lora
    assert by_vocab.loss_logits == 256 * 262144 * 4 == 256 * 2**20
