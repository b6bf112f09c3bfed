"""Hub model IDs, offline, against a Hugging Face cache built by hand in huggingface_hub's layout:
what is an ID, revisions by branch and by commit, the recorded `org/name@commit`, and the one-line
errors of an empty offline cache (through the CLI: exit 2, nothing written)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dtrain.config import schema as config_lib
from dtrain.errors import ConfigError
from dtrain.model import hub, sources
from tests.helpers import REPO, env_for_tests
from tests.hub_cache import add_snapshot

ID = "someorg/tiny-llama"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    add_snapshot(tmp_path / "hub", ID, src, "a" * 40, refs=("main",))
    add_snapshot(tmp_path / "hub", ID, src, "b" * 40, refs=("v2",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_ids_revisions_and_the_recorded_form(hf_cache, tmp_path, monkeypatch):
    assert hub.parse(ID) == (ID, None) and hub.parse(f"{ID}@v2") == (ID, "v2")
    for not_an_id in ("relative-dir", "./a/b", "/abs/a", "a/b/c", "a--b/c", f"{ID}@", str(tmp_path / "src")):
        assert hub.parse(not_an_id) is None, not_an_id
    snap = hf_cache / f"models--{ID.replace('/', '--')}" / "snapshots"
    assert hub.resolve(ID, "model.path") == snap / ("a" * 40)
    assert hub.resolve(f"{ID}@v2", "model.path") == snap / ("b" * 40)
    assert hub.resolve(f"{ID}@{'b' * 40}", "model.path") == snap / ("b" * 40)
    assert hub.display(snap / ("b" * 40)) == f"{ID}@{'b' * 40}" and hub.display("/x/y") == "/x/y"
    with pytest.raises(ConfigError) as e:
        hub.resolve(f"{ID}@v3", "model.path")
    assert str(e.value) == (
        f"model.path = '{ID}@v3': revision 'v3' is not in the Hugging Face cache {hf_cache} "
        f"(HF_HUB_OFFLINE=1; cached: main, v2, {'a' * 40}, {'b' * 40})"
    )
    (tmp_path / "someorg" / "tiny-llama").mkdir(parents=True)  # a local directory of that name wins
    monkeypatch.chdir(tmp_path)
    assert hub.parse(ID) is None


def test_offline_with_an_empty_cache_is_one_line_and_writes_nothing(tmp_path):
    env = env_for_tests({"HF_HOME": str(tmp_path / "hf")})
    out = tmp_path / "run"
    cmds = [
        [
            "train",
            str(REPO / "configs" / "tiny.yaml"),
            "model.arch=null",
            "model.path=HuggingFaceTB/SmolLM2-135M-Instruct",
            f"output.dir={out}",
        ],
        ["download", "HuggingFaceTB/SmolLM2-135M-Instruct", "--revision", "v1"],
    ]
    want = [
        "model.path = 'HuggingFaceTB/SmolLM2-135M-Instruct'",
        "dtrain download = 'HuggingFaceTB/SmolLM2-135M-Instruct@v1'",
    ]
    for cmd, start in zip(cmds, want):
        proc = subprocess.run(
            [sys.executable, "-m", "dtrain", *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(
            f"dtrain: error: {start}: no such local path, and not in the Hugging Face cache "
            f"{tmp_path / 'hf' / 'hub'} (HF_HUB_OFFLINE=1); run `dtrain download "
        ), lines
    assert not out.exists() and not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())


def test_estimate_reads_a_hub_models_config(hf_cache):
    from dtrain.cli.estimate import resolve_model

    assert resolve_model(f"{ID}@v2") == ("tiny-llama", {"model_type": "llama"})


def test_config_records_the_commit(hf_cache, tmp_path):
    assert config_lib.load(None, [f"model.path={ID}@v2"]).model.path == f"{ID}@v2"  # config/ itself resolves nothing
    cfg = sources.load_config(None, [f"model.path={ID}@v2"])
    assert hub.commit_of(cfg.model.path) == "b" * 40
    assert config_lib.to_dict(cfg)["model"]["path"] == f"{ID}@{'b' * 40}"
