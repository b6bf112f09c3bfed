"""A planted NaN loss (DTRAIN_TEST_FAULT, on the last rank only) under FSDP2 on 2 ranks, one launch:
step 2 is non-finite on one rank, every rank skips it (no update: the checkpoints of steps 1 and 2
hold the same adapter and optimizer state) and the metrics row says so; step 3 trains; steps 4
and 5 are non-finite in a row and the run stops there (nonfinite_max=2) in one line, exit 1."""

from __future__ import annotations

from safetensors.torch import load_file

from dtrain.training import checkpoint
from tests.helpers import metrics, train


def test_planted_nan_is_skipped_on_every_rank_then_stops_after_two_in_a_row(tmp_path):
    out = tmp_path / "run"
    proc = train(
        out,
        [
            "training.max_steps=6",
            "training.save_every=1",
            "training.keep_last=6",
            "training.micro_batch_size=2",
            "backend.name=fsdp",
            "training.nonfinite_max=2",
            "logging.loss_curve=false",
        ],
        nproc=2,
        launcher="torchrun",
        check=False,
        env={"DTRAIN_TEST_FAULT": "nan_loss:2,4,5"},
    )
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5], proc.stderr[-3000:]
    assert [rows[s].get("nonfinite") for s in range(1, 6)] == [
        None,
        "loss and grad_norm",
        None,
        "loss and grad_norm",
        "loss and grad_norm",
    ]
    assert [rows[s].get("nonfinite_steps") for s in (2, 4, 5)] == [1, 2, 3] and rows[2]["skipped"] is True
    assert rows[2]["lr"] == rows[3]["lr"]  # the schedule did not step either
    one, two, three = (checkpoint.checkpoint_dir(out, s) for s in (1, 2, 3))
    for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors"):
        a, b, c = (load_file(str(d / name)) for d in (one, two, three))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
        assert any((a[k] != c[k]).any() for k in a), name  # step 3 trained
    lines = [x for x in proc.stderr.splitlines() if x.startswith("dtrain: error:")]
    assert lines == [
        "dtrain: error: step 5: non-finite loss and grad_norm (loss nan, grad norm nan) on every "
        "rank: step skipped, no update (2 in a row, 3 in all); stopping after 2 in a row "
        "(training.nonfinite_max=2)"
    ], proc.stderr[-3000:]
    assert "exitcode: 1" in proc.stderr and not (out / "adapter").exists()
