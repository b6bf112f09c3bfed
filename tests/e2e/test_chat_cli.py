"""`dtrain train` on chat data: nothing to learn is a one-line error (exit 2); a second run hits the
token cache."""

from __future__ import annotations

import json

from tests.helpers import REPO, metrics, train

MESSAGES = REPO / "dtrain" / "assets" / "tiny_messages.jsonl"


def chat_overrides(smollm2_dir, tmp_path, seq_len: int = 96) -> list[str]:
    return [
        f"data.path={MESSAGES}",
        "data.format=messages",
        f"data.tokenizer={smollm2_dir}",
        "model.arch.vocab_size=49152",
        f"data.seq_len={seq_len}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


def test_nothing_to_learn_is_one_line_exit_2(smollm2_dir, tmp_path) -> None:
    proc = train(tmp_path / "run", chat_overrides(smollm2_dir, tmp_path, seq_len=16), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        f"dtrain: error: data.path = '{MESSAGES}': no example has a labelled token within "
        "data.seq_len = 16 (48 records -> 0 examples; dropped 48 over seq_len; data.truncation = drop)"
    )
    assert "Traceback" not in proc.stderr


def test_second_run_hits_the_token_cache(smollm2_dir, tmp_path) -> None:
    args = chat_overrides(smollm2_dir, tmp_path) + ["training.max_steps=1"]
    first = train(tmp_path / "a", args)
    assert "token cache hit" not in first.stderr and "48 records -> 48 examples" in first.stderr
    second = train(tmp_path / "b", args)
    assert "token cache hit" in second.stderr and "48 records -> 48 examples" in second.stderr
    row = [r for r in metrics(tmp_path / "b") if "loss" in r][0]
    assert 0 < row["padding_fraction"] < 1 and row["tokens_per_s"] > 0
    assert (
        json.loads(next((tmp_path / "cache").glob("*/counts.json")).read_text())["datasets"][0]["counts"]["examples"]
        == 48
    )
