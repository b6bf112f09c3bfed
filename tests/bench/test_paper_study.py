"""bench/paper_study.py's parameter budgets and the verdicts docs/paper.md prints, on given numbers."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "bench"))
    import paper_study
    import paper_text

    yield paper_study, paper_text
    sys.path.remove(str(REPO / "bench"))


def test_table5_configurations_share_one_budget(study):
    paper_study, _ = study
    table5 = {n: v for n, v in paper_study.RUNS.items() if v[0] == "5"}
    assert len(table5) == 7
    assert {paper_study.budget(v[1], v[2]) for v in table5.values()} == {345_600}  # 11,520 per layer
    # counted from the shapes: q/o 576 -> 576, k/v 576 -> 192 (3 KV heads x 64)
    assert paper_study.budget(["q_proj"], 10) == 30 * 10 * (576 + 576)
    assert paper_study.budget(["k_proj"], 15) == 30 * 15 * (576 + 192)
    assert sorted(v[2] for n, v in paper_study.RUNS.items() if v[0] == "6") == [1, 2, 4, 8, 64]


def row(name, em, loss, params=1):
    return {"name": name, "exact_match": em, "eval_loss": loss, "params": params}


def test_verdicts_follow_the_numbers(study):
    _, text = study
    good = {
        "t5_q": row("t5_q", 0.1, 0.5),
        "t5_k": row("t5_k", 0.0, 0.6),
        "t5_qv": row("t5_qv", 0.5, 0.2),
        "t5_all": row("t5_all", 0.6, 0.1),
    }
    v = text.t5_verdict(good)
    assert "best is **all four**" in v and "**agrees** that spreading" in v and "(**agrees**)." in v
    bad = {"t5_q": row("t5_q", 0.9, 0.1), "t5_qv": row("t5_qv", 0.1, 0.5)}
    assert "**disagrees**: single types" in text.t5_verdict(bad)
    ranks = {"t6_r1": row("t6_r1", 0.5, 0.2), "t6_r64": row("t6_r64", 0.55, 0.19)}
    assert "**agrees** (r=1 within 10 points" in text.t6_verdict(ranks)
    ranks["t6_r1"] = row("t6_r1", 0.1, 0.4)
    assert "**disagrees**: with this short training r=1 trails the best rank by more than 10" in text.t6_verdict(ranks)
    ranks["t6_r64_seed2"] = row("t6_r64_seed2", 0.05, 0.3)  # seeds alone move it by 50 points
    assert "**agrees** (r=1 within 50 points" in text.t6_verdict(ranks)
    assert "moves by 50 points of exact match and 0.1100 of eval loss" in text.seed_note(ranks)
    assert text.t6_verdict({"t6_r8": row("t6_r8", 0.5, 0.2)}).startswith("(r=1")
