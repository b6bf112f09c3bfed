"""dtrain.config.schema: schema-typed overrides, one-line errors naming file and key, resolved-config round trip.

The same error cases are run through the real CLI in a subprocess in tests/e2e/test_cli_train.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from dtrain.config import schema as config
from dtrain.config.schema import Config, ConfigError
from tests.helpers import REPO, TINY

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"
ABS = [f"data.path={CORPUS}"]  # independent of the working directory


def load(*overrides: str, path=TINY) -> Config:
    return config.load(path, [*ABS, *overrides])


def error(*overrides: str, path=TINY) -> str:
    with pytest.raises(ConfigError) as e:
        load(*overrides, path=path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---- loading and typed overrides ---------------------------------------------------------


def test_tiny_yaml_loads_with_schema_types() -> None:
    cfg = load()
    assert cfg.model.arch["hidden_size"] == 64 and cfg.model.arch["model_type"] == "llama"
    assert cfg.model.path is None and cfg.model.dtype == "fp32"
    assert cfg.lora.r == 8
    assert cfg.lora.alpha == 16.0 and type(cfg.lora.alpha) is float  # `alpha: 16` in YAML, schema float
    assert cfg.lora.targets == "all-linear"
    assert cfg.training.lr == 0.01 and type(cfg.training.lr) is float
    assert cfg.training.max_steps == 60 and cfg.training.micro_batch_size == 8
    assert cfg.data.seq_len == 64 and cfg.data.format == "text"
    assert cfg.training.betas == [0.9, 0.999]  # untouched default
    assert cfg.output.dir == "runs/tiny"


def test_overrides_are_typed_by_the_schema() -> None:
    cfg = load(
        "training.lr=1e-2",
        "lora.targets=[q_proj,k_proj]",
        "model.gradient_checkpointing=true",
        "lora.r=4",
        "lora.alpha=32",
        "training.betas=[0,0.95]",
        "output.dir=2024",
        "lora.adapter_name=true",
        "quantization.bits=8",
        "lora.target_regex=null",
    )
    # YAML 1.1 reads '1e-2' as a string; the schema says float
    assert cfg.training.lr == 0.01 and type(cfg.training.lr) is float
    assert cfg.lora.targets == ["q_proj", "k_proj"]
    assert cfg.model.gradient_checkpointing is True
    assert cfg.lora.r == 4 and type(cfg.lora.r) is int
    assert cfg.lora.alpha == 32.0 and type(cfg.lora.alpha) is float
    assert cfg.training.betas == [0.0, 0.95] and all(type(b) is float for b in cfg.training.betas)
    assert cfg.output.dir == "2024"  # a str field keeps the text, not the int YAML would make
    assert cfg.lora.adapter_name == "true"
    assert cfg.quantization.bits == 8
    assert cfg.lora.target_regex is None


def test_override_inside_inline_arch_is_parsed() -> None:
    cfg = load("model.arch.hidden_size=32", "model.arch.tie_word_embeddings=true")
    assert cfg.model.arch["hidden_size"] == 32 and type(cfg.model.arch["hidden_size"]) is int
    assert cfg.model.arch["tie_word_embeddings"] is True
    assert cfg.model.arch["num_hidden_layers"] == 2  # the rest of the mapping is kept


def test_range_boundaries_accepted() -> None:
    cfg = load("lora.dropout=0", "lora.r=1", "lora.alpha=0.001", "training.lr=1e-12")
    assert (cfg.lora.dropout, cfg.lora.r, cfg.lora.alpha, cfg.training.lr) == (0.0, 1, 0.001, 1e-12)
    assert load("lora.dropout=0.999").lora.dropout == 0.999


def test_resolved_config_round_trip(tmp_path) -> None:
    cfg = load(
        "training.lr=5e-3",
        "lora.targets=[q_proj,v_proj]",
        "model.arch.hidden_size=32",
        "model.gradient_checkpointing=true",
        f"output.dir={tmp_path / 'run'}",
    )
    out = tmp_path / "config.yaml"
    config.save(cfg, out)
    back = config.load(out)
    assert back == cfg
    assert yaml.safe_load(out.read_text())["training"]["lr"] == 5e-3
    # every section and key is written, with resolved values
    written = yaml.safe_load(out.read_text())
    assert set(written) == {f.name for f in dataclasses.fields(Config)}
    assert written["lora"]["alpha"] == 16.0 and written["model"]["arch"]["hidden_size"] == 32


def test_defaults_need_a_model() -> None:
    with pytest.raises(ConfigError, match=r"<defaults>: model: set model.path .* or model.arch"):
        config.load(None, ABS)


def test_schema_rows_cover_every_field() -> None:
    rows = {key: help_ for key, _, help_ in config.describe_schema()}
    assert "lora.r" in rows and "training.lr" in rows and "mode" in rows
    assert all(rows.values()), [k for k, v in rows.items() if not v]


# ---- errors: one line, file + key path + what is allowed ---------------------------------


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("lora.rnak=4", "lora.rnak", "lora.r"),
        ("lora.rank=4", "lora.rank", "lora.r"),
        ("lora.alpah=4", "lora.alpah", "lora.alpha"),
        ("trainig.lr=1", "trainig", "training"),
        ("data.seqlen=8", "data.seqlen", "data.seq_len"),
        ("training.zzz=1", "training.zzz", None),
    ],
)
def test_unknown_key_suggests_closest(override: str, key: str, suggestion: str | None) -> None:
    msg = error(override)
    assert msg.startswith(f"override '{override}': unknown key '{key}'"), msg
    if suggestion:
        assert f"did you mean '{suggestion}'?" in msg, msg
    else:
        assert "did you mean" not in msg, msg
    assert "(allowed: " in msg


def test_unknown_key_in_yaml_file_names_the_file(tmp_path) -> None:
    p = tmp_path / "bad.yaml"
    raw = yaml.safe_load(TINY.read_text())
    raw["lora"]["rnak"] = 4
    p.write_text(yaml.safe_dump(raw))
    msg = error(path=p)
    assert msg.startswith(f"{p}: unknown key 'lora.rnak'; did you mean 'lora.r'?"), msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.r=abc", "lora.r = 'abc': expected a"),
        ("lora.r=2.5", "lora.r = 2.5: expected a"),
        ("lora.r=true", "lora.r = True: expected a"),
        ("training.lr=fast", "training.lr = 'fast': expected a float"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing = 'maybe': expected a bool"),
        ("data.format=csv", "data.format = 'csv': expected one of 'text', 'instruction'"),
        ("training.betas=[0.9,x]", "training.betas = [0.9, 'x']: expected a list of float"),
        ("model.arch=3", "model.arch = 3: expected a mapping or null"),
    ],
)
def test_wrong_type(override: str, expected: str) -> None:
    msg = error(override)
    assert msg.startswith(f"override '{override}': {expected}"), msg


@pytest.mark.parametrize(
    "override, key, bound",
    [
        ("lora.r=0", "lora.r", ">= 1"),
        ("lora.r=-3", "lora.r", ">= 1"),
        ("lora.alpha=0", "lora.alpha", "> 0"),
        ("lora.alpha=-1", "lora.alpha", "> 0"),
        ("lora.dropout=1", "lora.dropout", "in [0.0, 1.0)"),
        ("lora.dropout=1.5", "lora.dropout", "in [0.0, 1.0)"),
        ("lora.dropout=-0.1", "lora.dropout", ">= 0.0 and < 1.0"),
        ("training.lr=0", "training.lr", "> 0"),
        ("training.lr=-1e-3", "training.lr", "> 0"),
        ("training.lr=nan", "training.lr", "a finite number"),
        ("lora.dropout=.nan", "lora.dropout", "a finite number"),
        ("training.micro_batch_size=0", "training.micro_batch_size", ">= 1"),
    ],
)
def test_out_of_range(override: str, key: str, bound: str) -> None:
    msg = error(override)
    assert msg.startswith(f"override '{override}': {key} = "), msg
    assert msg.endswith(f"is out of range: must be {bound}"), msg


def test_betas_length_and_range() -> None:
    assert error("training.betas=[0.9]") == "override 'training.betas=[0.9]': training.betas = [0.9]: expected 2 values"
    assert (
        error("training.betas=[0.9,1.0]")
        == "override 'training.betas=[0.9,1.0]': training.betas = [0.9, 1.0] is out of range: must be in [0.0, 1.0)"
    )


def test_missing_files_and_dirs(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        config.load(missing / "c.yaml")
    assert str(e.value) == f"{missing / 'c.yaml'}: config file not found"
    assert (
        error(f"data.path={missing}.txt")
        == f"override 'data.path={missing}.txt': data.path = '{missing}.txt': file not found"
    )
    assert (
        error("model.arch=null", f"model.path={missing}")
        == f"override 'model.path={missing}': model.path = '{missing}': directory not found"
    )
    assert (
        error(f"data.tokenizer={missing}")
        == f"override 'data.tokenizer={missing}': data.tokenizer = '{missing}': directory not found"
    )


def test_bad_yaml_and_bad_override_syntax(tmp_path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("lora: [r: 1\n")
    msg = error(path=p)
    assert msg.startswith(f"{p}: not valid YAML"), msg
    p.write_text("- 1\n- 2\n")
    assert error(path=p) == f"{p}: top level must be a mapping of sections"
    assert error("lora.r") == "override 'lora.r': expected key.sub=value (e.g. lora.r=16)"
    assert error("lora.targets.x=1") == "override 'lora.targets.x=1': 'lora.targets' is not a section"
    assert error("lora=3") == (
        "override 'lora=3': lora = 3: lora is a section, not a value; set its keys "
        "(lora.<key>=...; keys: r, alpha, dropout, targets, target_regex, target_parameters, adapter_name, "
        "init_seed, use_rslora, use_dora, loraplus_lr_ratio, init_from)"
    )


def test_readme_configuration_table_is_the_schema():
    """README's configuration table lists every key with its default and description, in order."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    head = "| key | default | description |\n|---|---|---|\n"
    rows = readme[readme.index(head) + len(head) :].split("\n\n", 1)[0].splitlines()
    assert rows == [f"| `{k}` | `{d}` | {h.replace('|', '/')} |" for k, d, h in config.describe_schema()]
