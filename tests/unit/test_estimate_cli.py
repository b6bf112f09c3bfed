"""`dtrain estimate`: its JSON and table output from every kind of --model (preset, YAML with an
inline architecture or a path, model directory, config.json), the LoRA paper's table, and one-line
errors for bad flags."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from dtrain.cli.estimate import add_estimate_parser, run_estimate
from dtrain.errors import ConfigError
from dtrain.memory.estimate import CATEGORIES
from tests.unit.test_estimate import TINY_LLAMA


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dtrain")
    add_estimate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", *argv])
    assert args.func is run_estimate
    return args.func(args)


def test_cli_json(capsys) -> None:
    assert _cli(["--model", "llama-7b", "--gpus", "8", "--bits", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for mode in ("full_ft", "lora"):
        for key in (*CATEGORIES, "model_states", "total"):
            assert isinstance(data["per_gpu"][mode][key], int)
            assert data["cluster"][mode][key] == pytest.approx(8 * data["per_gpu"][mode][key], abs=8)
    assert data["per_gpu"]["full_ft"]["model_states"] == 2 * 6_738_415_616
    assert data["lora"]["trainable_params"] == 4_194_304
    assert data["ratio_full_over_lora"]["total"] > 1 and data["assumptions"]


def test_cli_table_yaml_and_dir(tmp_path, capsys) -> None:
    yaml_arch = tmp_path / "arch.yaml"
    yaml_arch.write_text("model:\n  arch:\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in TINY_LLAMA.items()))
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    yaml_path = tmp_path / "path.yaml"
    yaml_path.write_text(f"model:\n  path: {model_dir}\n")
    outs = []
    as_yaml = ["--batch", "4", "--seq-len", "128", "--dtype", "fp32", "--fp32-grads"]  # YAML defaults
    for source in (yaml_arch, model_dir, model_dir / "config.json", yaml_path):
        extra = [] if source.suffix == ".yaml" else as_yaml
        assert _cli(["--model", str(source), "--gpus", "2", "--backend", "deepspeed", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert "optimizer state" in outs[0] and "gathered unit" in outs[0]
    assert "assumed: batch = 4 (training.micro_batch_size not set)" in outs[0]
    bodies = {"\n".join(ln for ln in o.splitlines()[1:] if not ln.startswith("assumed:")) for o in outs}
    assert len(bodies) == 1


def test_cli_paper(capsys) -> None:
    assert _cli(["--paper"]) == 0
    assert "2.79 TB" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/no/such/dir", "--gpus", "2"], "no such directory"),
        (["--model", "{tmp}", "--gpus", "2"], "has no config.json"),
        (["--model", "llama-7b", "--gpus", "abc"], "--gpus must be a positive integer"),
        (["--model", "llama-7b", "--gpus", "0"], "--gpus must be a positive integer"),
        (["--model", "llama-7b", "--gpus", "2", "--bits", "3"], "bits must be one of"),
        (["--model", "llama-7b", "--gpus", "2", "--rank", "-4"], "--rank must be"),
        (["--model", "llama-7b", "--gpus", "2", "--targets", "q_prj"], "match no linear layer"),
        (["--model", "llama-7b"], "--gpus is required"),
        (["--gpus", "2"], "--model is required"),
        (["--model", "{tmp}/bad.yaml", "--gpus", "2"], "model.arch needs 'model_type'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, argv: list[str], message: str) -> None:
    (tmp_path / "bad.yaml").write_text("model:\n  arch:\n    hidden_size: 8\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        _cli(argv)
    assert "\n" not in str(err.value)
