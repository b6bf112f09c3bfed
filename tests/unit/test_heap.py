"""StepTrimmer trims only when RSS after a step grew past the settled level by the slack (real RSS)."""

from __future__ import annotations

import sys

import pytest
import torch

from dtrain.backends import heap
from dtrain.memory.process import process_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def rss() -> float:
    return process_memory(torch.device("cpu"))["rss_bytes"]


def test_rss_is_read():
    assert rss() > 10 * 2**20


def test_no_trim_while_rss_stays_then_one_trim_when_it_grows_past_the_slack():
    t = heap.StepTrimmer(slack_fraction=0.0, min_slack=64 * 2**20)
    assert t.after_step() is False and t.settled is not None  # first step: the settled level
    assert t.after_step() is False and t.trims == 0  # same RSS: nothing to do
    grown = bytearray(160 * 2**20)  # zero-filled: every page is touched, so RSS grows by 160 MiB
    assert rss() > t.settled + 64 * 2**20
    assert t.after_step() is True and t.trims == 1 and t.settled is None
    assert t.after_step() is False and t.settled is not None  # the new settled level
    del grown
