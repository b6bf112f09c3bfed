"""bench/vs_trl.py without running either tool: the generated chats (seeded, the issue's word
ranges, the same pairs in both record shapes) and the table built from per-run results."""

from __future__ import annotations

import json
from types import SimpleNamespace

from bench import vs_trl


def test_chats_are_seeded_in_range_and_written_alike(tmp_path) -> None:
    pairs = vs_trl.chats(200, seed=3)
    assert pairs == vs_trl.chats(200, seed=3) and pairs != vs_trl.chats(200, seed=4)
    assert all(5 <= len(p.split()) <= 40 and 5 <= len(c.split()) <= 120 for p, c in pairs)
    msgs, pc = vs_trl.write_data(tmp_path, 20, seed=3)
    m = [json.loads(line) for line in msgs.read_text().splitlines()]
    t = [json.loads(line) for line in pc.read_text().splitlines()]
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in m] == vs_trl.chats(20, seed=3)
    assert [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in t] == vs_trl.chats(20, seed=3)


def test_table_ratios_from_medians() -> None:
    run = lambda tok, rss, share: {"tok_s": tok, "rss_mib": rss, "real_share": share, "first_loss": 2.0}  # noqa: E731
    results = {
        "on": {
            "dtrain": [run(300.0, 3000, 0.98), run(320.0, 3100, 0.98)],
            "trl": [run(200.0, 4000, 0.985), run(200.0, 4100, 0.985)],
        },
        "off": {"dtrain": [{"error": "boom"}], "trl": [run(150.0, 4000, None)]},
    }
    text = vs_trl.table(results, SimpleNamespace())
    on = next(line for line in text.splitlines() if line.startswith("| on |"))
    assert "| 1.55x |" in on and "3,100 / 4,100 (0.76x)" in on and "98.0% / 98.5%" in on
    assert "failed: ['boom']" in text


def test_same_batch_column_reports_the_difference_and_flags_over_1e4() -> None:
    d = {"tok_s": 1.0, "rss_mib": 1, "real_share": 1.0, "first_loss": 6.8635204}
    close = {"dtrain": [d], "trl": [d], "first": {"loss": 6.8635206}}
    far = {"dtrain": [d], "trl": [d], "first": {"loss": 6.8659}}
    assert vs_trl.same_batch(close) == "6.863520 / 6.863521 (2.0e-07)"
    assert vs_trl.same_batch(far).endswith("(2.4e-03, > 1e-4)")
    assert vs_trl.same_batch({"dtrain": [d], "trl": [d], "first": {"error": "boom"}}) == "TRL failed: boom"
    assert vs_trl.same_batch({"dtrain": [d], "trl": [d]}) == "n/a"
