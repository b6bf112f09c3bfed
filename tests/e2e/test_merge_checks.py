"""`dtrain merge` checks the adapter and the base before writing anything: each bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dtrain.storage import files
from tests.e2e.user_errors import assert_one_line, make_adapter, make_base
from tests.helpers import run_dtrain


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("merge") / "base")


def _merge(base: Path, adapter: Path, out: Path):
    return run_dtrain(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)], check=False)


def _published(tmp_path: Path, base: Path) -> Path:
    """An adapter directory as dtrain writes it: with a checksummed COMPLETE marker."""
    staging = make_adapter(tmp_path / ".tmp-adapter", base)
    files.publish(staging, tmp_path / "adapter", {"kind": "adapter"})
    return tmp_path / "adapter"


def test_merge_checks_in_one_process_each(base: Path, tmp_path: Path) -> None:
    cases = {}
    cases["r"] = (
        make_adapter(tmp_path / "r", base, r=4, config_r=8),
        ["adapter_config.json: 'r' = 8, but model.layers.0.self_attn.q_proj.lora_A has shape [4, 16]", "(rank 4)"],
    )
    no_r = make_adapter(tmp_path / "no_r", base)
    config = json.loads((no_r / "adapter_config.json").read_text())
    del config["r"]
    (no_r / "adapter_config.json").write_text(json.dumps(config))
    cases["no_r"] = (no_r, [f"{no_r / 'adapter_config.json'}: 'r' is missing; needs a positive integer"])
    corrupt = _published(tmp_path / "corrupt", base)
    data = bytearray((corrupt / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(data))
    cases["checksum"] = (
        corrupt,
        [f"adapter directory '{corrupt}': adapter_model.safetensors does not match its checksum"],
    )
    truncated = make_adapter(tmp_path / "truncated", base)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    cases["truncated"] = (truncated, [f"{weights}: not a readable safetensors file"])
    for name, (adapter, parts) in cases.items():
        out = tmp_path / f"out-{name}"
        assert_one_line(_merge(base, adapter, out), *parts)
        assert not out.exists()


def test_merge_checks_the_base(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter", base)
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_one_line(_merge(broken, adapter, tmp_path / "o1"), f"--base '{weights}': not a readable safetensors")
    shutil.copy(base / "model.safetensors", weights)
    (broken / "config.json").write_text("{not json")
    assert_one_line(_merge(broken, adapter, tmp_path / "o2"), f"--base '{broken / 'config.json'}': not valid JSON")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_merge_of_an_intact_dtrain_adapter(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    run_dtrain(["merge", "--base", str(base), "--adapter", str(_published(tmp_path, base)), "--out", str(out)])
    assert (out / "model.safetensors").is_file()
