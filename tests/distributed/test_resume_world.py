"""Resume on another world size and another backend: the optimizer state is stored unsharded and
resharded on load (checkpoint format 2, docs/resume.md).

One chain per 2-rank backend, all with the same global batch of 4 sequences: 1 process (micro-batch
4) is SIGKILLed after checkpoint K1, resumed on 2 ranks of FSDP2 or ZeRO-3 (micro-batch 2) and
SIGKILLed after checkpoint K2, then resumed on 1 process again to the end. Every rank-count change
is crossed once in each direction, and the end must be the uninterrupted 1-process run's adapter.

Tolerance: the chain is not bit-exact, only equal up to the order of floating-point reductions
(2 ranks sum two half-batch gradients, 1 process one full batch): ~1e-7 relative per gradient.
Measured (2-core CPU, 2026-11-29, torch 2.13, deepspeed 0.19): A and B (|A| up to 0.13) differ by
at most 7.5e-9 (FSDP2) and 1.5e-8 (ZeRO-3), losses by 7.9e-8 relative. The test allows atol 1e-6
(as the backend-equality tests do) and losses equal to 1e-5 relative; an optimizer state lost or
misplaced on resume moves the next AdamW update by ~lr = 1e-3 and fails it. Dropout is 0:
dropout masks are drawn per rank, so with dropout no run on another rank count could match.
"""

from __future__ import annotations

import pytest

from dtrain import checkpoint
from tests.distributed.test_checkpoint import STEPS, finish, kill_after, start
from tests.helpers import assert_same_losses_and_adapter, metrics

# kill_after / start take a kind from test_checkpoint.BACKENDS: "single", "fsdp", "zero3"
SAME = ["lora.dropout=0.0", "training.lr=1e-3"]
MICRO = {"single": ["training.micro_batch_size=4"], "fsdp": ["training.micro_batch_size=2"],
         "zero3": ["training.micro_batch_size=2"]}
K1, K2 = 2, 4


def _run(kind: str, out, extra: list[str]) -> str:
    rc, log = finish(start(kind, out, [*SAME, *MICRO[kind], *extra]), out)
    assert rc == 0, f"{kind} exited {rc}\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref-single") / "run"
    _run("single", out, [])
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_resume_1_to_2_to_1_ranks_ends_with_the_uninterrupted_adapter(kind, uninterrupted, tmp_path):
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    kill_after("single", out, K1, [*SAME, *MICRO["single"]])
    kill_after(kind, out, K2, [*SAME, *MICRO[kind], "training.resume=auto"])
    two_rank_log = (out.parent / "run.log").read_text(errors="replace")
    assert "optimizer state resharded" in two_rank_log and "resumed from" in two_rank_log
    assert checkpoint.find_latest(out)[0] >= K2
    log = _run("single", out, ["training.resume=auto"])
    assert "2 rank(s) wrote" in log and "resumed from" in log
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
    assert_same_losses_and_adapter(out, uninterrupted, rel=1e-5, atol=1e-6)
