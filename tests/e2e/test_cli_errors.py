"""Bad input a user can cause, through the real CLI: one `dtrain: error:` line naming the file or
flag and the key, exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.user_errors import assert_one_line, make_base, make_custom_code_model, train_cases
from tests.helpers import TINY, env_for_tests, launch_cmd, run_dtrain


def _files(tmp: Path) -> dict[str, Path]:
    """The bad inputs: files and directories."""
    f = {
        name: tmp / name
        for name in ("nonutf8.yaml", "binary.txt", "empty.txt", "broken.jsonl", "emptytok", "badjson", "truncated")
    }
    f["nonutf8.yaml"].write_bytes(TINY.read_bytes() + b"\n# caf\xe9\n")
    f["binary.txt"].write_bytes(bytes(range(256)) * 64)
    f["empty.txt"].write_bytes(b"")
    f["broken.jsonl"].write_text('{"text": "fine"}\n\n{"text": broken}\n')
    f["emptytok"].mkdir()
    f["badjson"].mkdir()
    (f["badjson"] / "config.json").write_text("{not json")
    (f["badjson"] / "model.safetensors").write_bytes(b"")
    base = make_base(tmp / "base")
    shutil.copytree(base, f["truncated"])
    weights = f["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    f["custom"] = make_custom_code_model(tmp / "custom")
    return f


def _config_cases() -> dict[str, tuple[list[str], list[str]]]:
    """Errors of the config alone: name -> (overrides after FAST, parts the error line must hold)."""
    return {
        "regex": (
            ["lora.target_regex=(q|v"],
            ["override 'lora.target_regex=(q|v'", "lora.target_regex = '(q|v'", "not a valid regular expression"],
        ),
        "adapter_name": (["lora.adapter_name=my.adapter"], ["lora.adapter_name = 'my.adapter'", "no dots"]),
        "heads": (
            ["model.arch.num_attention_heads=5"],
            [
                "override 'model.arch.num_attention_heads=5'",
                "model.arch.num_attention_heads = 5 does not divide model.arch.hidden_size = 64",
            ],
        ),
        "negative": (["model.arch.hidden_size=-64"], ["model.arch.hidden_size = -64: must be a positive integer"]),
        "fraction": (
            ["model.arch.intermediate_size=12.5"],
            ["model.arch.intermediate_size = 12.5: must be a positive integer"],
        ),
        "model_type": (["model.arch.model_type=nosuch"], ["model.arch: Unrecognized model identifier: nosuch"]),
        "rope_theta": (
            ["model.arch.rope_theta=abc"],
            ["model: transformers cannot build a llama model from this config (TypeError: "],
        ),
        "rank": (
            ["lora.r=40"],
            ["lora.r = 40 is larger than min(in, out) = 32 of model.layers.0.self_attn.v_proj (64 -> 32)"],
        ),
        "unmatched": (
            ["lora.targets=[q_proj,lm_head]"],
            ["lora.targets = ['q_proj', 'lm_head']: lm_head matches no", "the model has: "],
        ),
        "no_causal_lm": (["model.arch.model_type=t5"], ["model: t5 has no causal-LM head in transformers"]),
        "syntax_empty": (["=5"], ["override '=5': '' is not a key"]),
        "syntax_dots": (["lora..r=5"], ["override 'lora..r=5': 'lora..r' is not a key"]),
        "syntax_section": (
            ["lora=5"],
            ["override 'lora=5': lora = 5: lora is a section, not a value", "keys: r, alpha"],
        ),
    }


def _cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (overrides after FAST, parts the error line must hold): the config's errors and
    those of the files it names."""
    f = _files(tmp)
    no_arch = "model.arch=null"
    return {
        **_config_cases(),
        "path_and_arch": ([f"model.path={tmp / 'base'}"], ["model.path and model.arch are both set"]),
        "binary_data": ([f"data.path={f['binary.txt']}"], [f"data.path = '{f['binary.txt']}'", "binary"]),
        "empty_data": ([f"data.path={f['empty.txt']}"], [f"data.path = '{f['empty.txt']}': the file is empty"]),
        "broken_jsonl": (
            [f"data.path={f['broken.jsonl']}"],
            [f"data.path = '{f['broken.jsonl']}': line 3 is not valid JSON"],
        ),
        "empty_tokenizer": (
            [f"data.tokenizer={f['emptytok']}"],
            [f"tokenizer directory '{f['emptytok']}': no tokenizer files"],
        ),
        "model_json": (
            [no_arch, f"model.path={f['badjson']}"],
            [f"model.path = '{f['badjson']}': config.json:", "not a valid JSON file"],
        ),
        "truncated": (
            [no_arch, f"model.path={f['truncated']}"],
            [f"'{f['truncated'] / 'model.safetensors'}' is not a readable safetensors file"],
        ),
        "custom_code": (
            [no_arch, f"model.path={f['custom']}"],
            [f"model.path = '{f['custom']}': tinycustom is custom code", "model.trust_remote_code=true"],
        ),
        "head_not_named": (
            [no_arch, f"model.path={f['custom']}", "model.trust_remote_code=true"],
            ["model: tinycustom: TinyForCausalLM names no output head"],
        ),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("errors")
    cases = _cases(tmp)
    return {"tmp": tmp, "cases": cases, "procs": train_cases(tmp, cases)}


@pytest.mark.parametrize(
    "name",
    [
        "regex",
        "adapter_name",
        "heads",
        "negative",
        "fraction",
        "model_type",
        "rope_theta",
        "path_and_arch",
        "binary_data",
        "empty_data",
        "broken_jsonl",
        "empty_tokenizer",
        "model_json",
        "truncated",
        "rank",
        "unmatched",
        "syntax_empty",
        "syntax_dots",
        "syntax_section",
        "no_causal_lm",
        "custom_code",
        "head_not_named",
    ],
)
def test_train_error_is_one_line(results, name: str) -> None:
    line = assert_one_line(results["procs"][name], *results["cases"][name][1])
    assert "_OverrideValue" not in line and "did you mean" not in line
    out = results["tmp"] / "out" / name
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


def test_config_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(TINY.read_bytes() + b"\n# caf\xe9\n")
    assert_one_line(run_dtrain(["train", str(p)], check=False), f"{p}: not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--time", "4 hours"], ["--time '4 hours': not a SLURM time"]),
        (["--time", "04:00:00\n#SBATCH --x"], ["--time", "not a SLURM time"]),
        (["--partition", "gpu\n#SBATCH --account=other"], ["--partition 'gpu\\n#SBATCH --account=other'"]),
        (["--job-name", "a b"], ["--job-name 'a b': use letters, digits"]),
        (["--extra=--account=x\n--qos=y"], ["--extra", "must look like --name=value"]),
        (["lora.r=0"], ["override 'lora.r=0': lora.r = 0 is out of range"]),
    ],
)
def test_slurm_refuses_unsafe_or_invalid_values(tmp_path: Path, flags: list[str], parts: list[str]) -> None:
    out = tmp_path / "job.sbatch"
    proc = run_dtrain(["slurm", str(TINY), *flags, "--out", str(out)], check=False)
    assert_one_line(proc, *parts)
    assert not out.exists()


def test_slurm_accepts_slurm_time_formats(tmp_path: Path) -> None:
    for i, t in enumerate(["90", "30:00", "04:00:00", "2-12", "1-00:30", "1-00:00:00"]):
        run_dtrain(["slurm", str(TINY), "--time", t, "--out", str(tmp_path / f"{i}.sbatch")])
        assert f"#SBATCH --time={t}\n" in (tmp_path / f"{i}.sbatch").read_text()


def test_torchrun_prints_the_error_once_and_first(tmp_path: Path) -> None:
    cmd = launch_cmd(2, "torchrun") + [
        "train",
        str(TINY),
        "lora.r=0",
        "backend.name=fsdp",
        f"output.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        cmd, env=env_for_tests(), capture_output=True, text=True, errors="replace", timeout=240, cwd=TINY.parents[1]
    )
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert lines[0] == "dtrain: error: override 'lora.r=0': lora.r = 0 is out of range: must be >= 1", proc.stderr
    assert proc.stderr.count("dtrain: error:") == 1, proc.stderr
    assert "exitcode: 2" in proc.stderr  # every rank exits 2; torchrun's own report follows
    assert not (tmp_path / "run").exists()
