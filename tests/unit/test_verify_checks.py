"""dtrain verify's adapter comparison: AdamW's near-eps elements may differ (up to K x lr), a
fault that moves whole tensors may not."""

from __future__ import annotations

import torch

from dtrain.training import verify


def _adapters() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    ours = {"a": torch.randn(8, 1000, generator=g), "b": torch.randn(1000, 2, generator=g)}  # 10,000 elements
    return ours, {k: v.clone() for k, v in ours.items()}


def test_a_few_elements_within_k_steps_of_lr_pass():
    ours, theirs = _adapters()
    theirs["a"].view(-1)[[3, 70, 999, 4000, 7999]] += 5e-4  # 5 of 10,000 (0.05%), each < 3 x 1e-2
    check = verify.compare_adapters(ours, theirs, tol=1e-4, step_bound=3e-2)
    assert check.ok, check.detail
    assert "max absolute difference 5.00e-04 (tolerance 1e-04); 5 of 10000 elements above it" in check.detail


def test_a_whole_tensor_off_or_one_element_past_the_bound_fails():
    ours, theirs = _adapters()
    theirs["b"] += 2e-4  # 2,000 of 10,000: what a wrongly reduced gradient does
    check = verify.compare_adapters(ours, theirs, tol=1e-4, step_bound=3e-2)
    assert not check.ok and "2000 of 10000 elements above it" in check.detail
    ours, theirs = _adapters()
    theirs["a"][0, 0] += 0.05  # one element, but more than 3 AdamW steps of lr 1e-2 can move it
    check = verify.compare_adapters(ours, theirs, tol=1e-4, step_bound=3e-2)
    assert not check.ok and "1 of 10000" in check.detail
    theirs = {"a": theirs["a"]}
    assert not verify.compare_adapters(ours, theirs, tol=1e-4, step_bound=3e-2).ok
