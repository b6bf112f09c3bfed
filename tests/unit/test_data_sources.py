"""data.path as users name datasets: a save_to_disk directory, a directory of parquet shards and a
glob of jsonl files give the token ids of the single file they were made from; bad sources are one
line each; config paths resolve from any working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.config import paths, schema as config_lib
from dtrain.config.schema import DataConfig
from dtrain.data import cache, encode, load_records
from dtrain.errors import ConfigError
from dtrain.model.tokenizer import load_tokenizer
from tests.helpers import REPO, env_for_tests

SRC = REPO / "dtrain" / "assets" / "tiny_instructions.jsonl"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 400 records as one file, 3 parquet shards, 4 jsonl files (a glob), save_to_disk."""
    import datasets

    tmp = tmp_path_factory.mktemp("layouts")
    rows = [json.loads(line) for line in SRC.read_text().splitlines()]
    parquet = tmp / "parquet"
    parquet.mkdir()
    for k, part in enumerate((rows[:150], rows[150:290], rows[290:])):
        datasets.Dataset.from_list(part).to_parquet(str(parquet / f"part-{k:05d}.parquet"))
    for k in range(4):
        (tmp / f"shard-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k * 100 : (k + 1) * 100]))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "disk"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:10]), "test": datasets.Dataset.from_list(rows[10:20])}
    ).save_to_disk(str(tmp / "dict"))
    return tmp


@pytest.fixture
def hub_dataset(layouts, monkeypatch):
    """The parquet shards as revision c..c of Hub dataset someorg/tiny-instructions, in a hand-built
    HF cache (huggingface_hub's layout), offline."""
    from huggingface_hub import constants

    from tests.hub_cache import add_snapshot

    src = layouts / "hubsrc"
    if not src.exists():
        (src / "data").mkdir(parents=True)
        for k, f in enumerate(sorted((layouts / "parquet").glob("*.parquet"))):
            os.link(f, src / "data" / f"train-{k:05d}-of-00003.parquet")
        add_snapshot(layouts / "hf" / "hub", "someorg/tiny-instructions", src, "c" * 40, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(layouts / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "someorg/tiny-instructions"


def _ids(path, tok, **kw):
    cfg = DataConfig(path=str(path), format="instruction", seq_len=64, **kw)
    return encode(cfg, load_records(cfg), tok).seqs


def test_shards_glob_and_save_to_disk_give_the_single_files_token_ids(layouts):
    tok = load_tokenizer(None, SRC)
    ref = _ids(SRC, tok)
    assert len(ref) == 400
    for path in (layouts / "parquet", layouts / "shard-*.jsonl", layouts / "disk"):
        assert _ids(path, tok) == ref, path
    assert _ids(layouts / "dict", tok, split="test") == ref[10:20]
    keys = {cache.key([DataConfig(path=str(p), format="instruction")], tok) for p in (SRC, layouts / "parquet")}
    assert len(keys) == 2  # the token cache tells the layouts apart (it hashes every shard's bytes)


def test_a_hub_dataset_from_the_hf_cache_offline(hub_dataset):
    tok = load_tokenizer(None, SRC)
    assert _ids(hub_dataset, tok) == _ids(SRC, tok)
    with pytest.raises(ConfigError, match="Unknown split \"test\". Should be one of \\['train'\\]"):
        _ids(hub_dataset, tok, split="test")
    with pytest.raises(ConfigError, match="BuilderConfig 'nope' not found"):
        _ids(hub_dataset, tok, subset="nope")


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: str(t / "none-*.jsonl"), "the glob matches no file"),
        (lambda t: str(t / "dict"), "no split 'train' \\(splits: train, test\\)|no split 'validation'"),
        (lambda t: str(t / "mixed"), "shards of different types"),
        (
            lambda t: str(t / "cols"),
            "shards have different columns: a.parquet has \\[prompt, response\\], "
            "b.parquet has \\[question, response\\]",
        ),
        (lambda t: str(t / "empty"), "holds no .jsonl/.json/.csv/.parquet/.txt file"),
    ],
)
def test_bad_sources_are_one_line(layouts, make, match):
    import datasets

    (layouts / "mixed").mkdir(exist_ok=True)
    (layouts / "mixed" / "a.jsonl").write_text(SRC.read_text())
    (layouts / "mixed" / "b.csv").write_text("prompt,response\nx,y\n")
    (layouts / "cols").mkdir(exist_ok=True)
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]).to_parquet(str(layouts / "cols" / "a.parquet"))
    datasets.Dataset.from_list([{"question": "a", "response": "b"}]).to_parquet(str(layouts / "cols" / "b.parquet"))
    (layouts / "empty").mkdir(exist_ok=True)
    path = make(layouts)
    with pytest.raises(ConfigError, match=match) as e:
        _ids(path, None, split="validation") if path.endswith("dict") else _ids(path, None)
    assert "\n" not in str(e.value)


def test_config_paths_resolve_from_any_working_directory(tmp_path):
    """configs/tiny.yaml names dtrain/assets/...: found in the installed package from any directory;
    a path beside the config file is found too; a Hub ID stays one."""
    (tmp_path / "data.jsonl").write_text(SRC.read_text())
    (tmp_path / "c.yaml").write_text(
        "data: {path: data.jsonl, format: instruction}\nmodel: {arch: {model_type: llama}}\n"
    )
    here = os.getcwd()
    try:
        os.chdir(tmp_path / "..")
        tiny = config_lib.load(REPO / "configs" / "tiny.yaml")
        assert Path(tiny.data.path) == paths.ASSETS / "tiny_corpus.txt"
        assert config_lib.load(tmp_path / "c.yaml").data.path == str(tmp_path / "data.jsonl")
    finally:
        os.chdir(here)
    assert paths.resolve("HuggingFaceH4/ultrachat_200k", tmp_path) == "HuggingFaceH4/ultrachat_200k"
    assert config_lib.load(REPO / "configs" / "tiny.yaml").data.path == "dtrain/assets/tiny_corpus.txt"  # as before


def test_a_hub_dataset_offline_and_not_cached_is_one_line(tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache: the Hub dataset's miss is one line, exit 2, no run dir."""
    out = tmp_path / "run"
    env = env_for_tests({"HF_HOME": str(tmp_path / "hf")})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "train",
            str(REPO / "configs" / "tiny.yaml"),
            "data.path=someorg/some_dataset",
            "data.format=instruction",
            f"output.dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "data.path = 'someorg/some_dataset': no such local path, and the Hub dataset is "
        f"not in the Hugging Face cache {tmp_path / 'hf' / 'hub'} (HF_HUB_OFFLINE=1)"
        in lines[0]
    ), lines
    assert not out.exists()


def test_training_from_another_directory_on_a_glob_of_text_shards(tmp_path):
    """configs/tiny.yaml run outside the repository, its data a glob of three .txt shards (the built-in
    tokenizer is trained on the first)."""
    paras = (REPO / "dtrain" / "assets" / "tiny_corpus.txt").read_text().split("\n\n")
    third = len(paras) // 3
    for k, part in enumerate((paras[:third], paras[third : 2 * third], paras[2 * third :])):
        (tmp_path / f"part{k}.txt").write_text("\n\n".join(part))
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "train",
            str(REPO / "configs" / "tiny.yaml"),
            f"data.path={tmp_path / 'part*.txt'}",
            "training.max_steps=2",
            "training.eval_every=0",
            "data.seq_len=32",
            f"output.dir={out}",
        ],
        cwd=tmp_path,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 2
