"""The grouped expert matmul: torch's grouped_mm gives the same numbers as the per-expert loop
(outputs and gradients bit-equal in fp32, empty experts and expanded gradients included), the
routed offsets need no host sync on the float path, and shapes grouped_mm refuses take the loop."""

from __future__ import annotations

import pytest
import torch

from dtrain import lora
from dtrain.lora import expert_forward, experts
from tests.moe_models import save_family

pytestmark = pytest.mark.skipif(expert_forward._GROUPED_MM is None, reason="this torch has no grouped_mm")
E, ROWS = 6, 40


def _ids() -> torch.Tensor:
    ids = torch.randint(1, E - 1, (ROWS,), generator=torch.Generator().manual_seed(0))
    ids[ids == 3] = 2  # experts 0, 3 and 5 get no rows
    return torch.sort(ids).values


def _both(x, w, groups, transposed, grad):
    """(y, dx, dw) through grouped_linear (grouped_mm) and through the per-expert loop."""
    out = []
    for grouped in (True, False):
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        b = wi if transposed else wi.transpose(-2, -1)
        y = (
            expert_forward.grouped_linear(xi, wi, groups, transposed)
            if grouped
            else expert_forward._loop(xi, b, groups.counts)
        )
        (y.sum() if grad is None else (y * grad).sum()).backward()  # .sum(): an expanded gradient
        out.append((y.detach(), xi.grad, wi.grad))
    return out


def _check_strided_b(w: torch.Tensor, groups: expert_forward.Groups) -> None:
    """B's stacked view through grouped_linear: the same numbers as on its contiguous copy, and
    within float rounding of the loop reading the strided view (a different matmul kernel)."""
    x = torch.randn(ROWS, w.shape[-1], generator=torch.Generator().manual_seed(3))
    y = expert_forward.grouped_linear(x, w, groups)
    assert torch.equal(y, expert_forward.grouped_linear(x, w.contiguous(), groups))
    torch.testing.assert_close(y, expert_forward._loop(x, w.transpose(-2, -1), groups.counts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["out_in", "in_out", "lora_A", "lora_B"])
@pytest.mark.parametrize("expanded", [True, False])
def test_grouped_mm_equals_the_loop_bit_for_bit(layout, expanded):
    g = torch.Generator().manual_seed(1)
    ids, size_in, size_out, r = _ids(), 24, 12, 4
    groups = expert_forward.Groups(ids, E)
    counts = torch.bincount(ids, minlength=E)
    assert groups.offs.dtype == torch.int32 and torch.equal(groups.offs, counts.cumsum(0).int())
    transposed = layout == "in_out"
    if layout.startswith("lora"):  # the factors through ExpertFactor.stacked(): A [E, r, in], B a strided view
        kind = layout
        factor = (
            experts.ExpertFactor(size_in, r * E, kind, E)
            if kind == "lora_A"
            else experts.ExpertFactor(r * E, size_out, kind, E)
        )
        with torch.no_grad():
            factor.weight.copy_(torch.randn(factor.weight.shape, generator=g))
        w = factor.stacked()
        if kind == "lora_B":  # experts innermost: grouped_linear copies it contiguous for grouped_mm
            _check_strided_b(w, groups)
            w = w.contiguous()  # ... so the loop, on the same bytes, gives the same bits
        size_in = w.shape[-1]
    else:
        w = torch.randn((E, size_in, size_out) if transposed else (E, size_out, size_in), generator=g)
    x = torch.randn(ROWS, size_in, generator=g)
    assert expert_forward._fits_grouped_mm(x, w if transposed else w.transpose(-2, -1))
    grad = None if expanded else torch.randn(ROWS, w.shape[-1] if transposed else w.shape[-2], generator=g)
    (y1, dx1, dw1), (y2, dx2, dw2) = _both(x, w, groups, transposed, grad)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    assert dw1[[0, 3, 5]].abs().sum() == 0 and dw1[[1, 2, 4]].abs().sum() > 0  # empty experts: zero grad


def test_refused_shapes_take_the_loop_and_no_rows_give_an_empty_output():
    ids = _ids()
    groups = expert_forward.Groups(ids, E)
    w = torch.randn(E, 2, 24)  # out 2 fp32 = 8-byte rows: grouped_mm refuses it
    assert not expert_forward._fits_grouped_mm(torch.randn(ROWS, 24), w.transpose(-2, -1))
    x = torch.randn(ROWS, 24)
    y = expert_forward.grouped_linear(x, w, groups)
    assert torch.equal(y, torch.cat([x[ids == e] @ w[e].T for e in range(E)]))
    none = expert_forward.Groups(torch.zeros(0, dtype=torch.long), E)
    x0 = torch.randn(0, 24, requires_grad=True)
    w0 = torch.randn(E, 8, 24, requires_grad=True)
    y0 = expert_forward.grouped_linear(x0, w0, none)
    y0.sum().backward()
    assert y0.shape == (0, 8) and w0.grad.abs().sum() == 0


def test_float_model_runs_grouped_without_counts_and_equals_the_loop(tmp_path, monkeypatch):
    """Expert LoRA (r 4: grouped_mm takes the factors) on a tiny qwen3_moe: logits bit-equal and
    every LoRA gradient within 1e-7 (abs) with and without grouped_mm (seen: <= 3e-8 on grads up to 0.1),
    and the float path never asks for host counts."""
    from transformers import AutoModelForCausalLM

    path = save_family("qwen3_moe", tmp_path / "m")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    asked = []
    real = expert_forward.Groups.counts.func
    monkeypatch.setattr(expert_forward.Groups, "counts", property(lambda self: asked.append(1) or real(self)))
    runs = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(expert_forward, "_GROUPED_MM", None)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        spec = lora.AdapterSpec(r=4, alpha=8.0)
        experts.inject(
            model, experts.select_parameters(model, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), spec
        )
        lora.freeze_base(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        logits = model(ids).logits
        logits.pow(2).mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        if grouped:
            assert not asked  # no .tolist() of the routing on the grouped path
    assert asked  # the loop did read them
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys() and len(runs[0][1]) == 8
    for n in runs[0][1]:  # the loop reads B's strided view (another matmul kernel): rounding only
        torch.testing.assert_close(runs[0][1][n], runs[1][1][n], rtol=1e-6, atol=1e-7)


def test_autocast_casts_as_the_loop_does():
    g = torch.Generator().manual_seed(2)
    ids = _ids()
    groups = expert_forward.Groups(ids, E)
    x, w = torch.randn(ROWS, 32, generator=g), torch.randn(E, 16, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_forward.grouped_linear(x, w, groups)
        ref = torch.cat([torch.nn.functional.linear(x[ids == e], w[e]) for e in range(E) if (ids == e).any()])
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=0)
