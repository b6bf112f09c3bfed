"""Fixtures shared by the distributed tests."""

from __future__ import annotations

import pytest

from tests.helpers import train

# lr 1e-3: see test_deepspeed.py's docstring. Evaluation (no_grad, no RNG, fixed data) does not
# change training, so one reference serves the tests that compare eval losses and those that do not.
REFERENCE = ["training.lr=1e-3", "training.eval_every=2", "training.eval_batches=2"]


@pytest.fixture(scope="session")
def single(tmp_path_factory):
    """The single-process reference run (micro-batch 4) the 2-rank runs are compared with."""
    out = tmp_path_factory.mktemp("single")
    train(out, ["backend.name=none", "training.micro_batch_size=4", *REFERENCE])
    return out
