"""The grouped forward of a fused experts module with expert LoRA: tokens sorted by expert, each
projection one grouped matmul over the experts (torch's `grouped_mm` where it takes the operands,
else one matmul per expert with rows, as transformers' fallback), the LoRA update of each projection
added on the same sorted rows, so W + BA is never built. Quantized expert weights
(model/expert_quant.py) are dequantized one expert at a time."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from dtrain.model import expert_quant

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # its CPU and CUDA kernels' dtypes
_RECENT = torch.__version__ >= (2, 9)  # before 2.9 torch._grouped_mm had no CPU kernel, ran on SM90 only
_ALIGNED_PTRS = torch.__version__ < (2, 11)  # its CPU kernel wants 16-byte aligned data before 2.11


class Groups:
    """Rows sorted by expert: `offs` (int32, end of each expert's rows) computed on the device, so
    grouped_mm needs no host sync; `counts` (a host list: one sync, on first use) only for the paths
    that loop over experts (the 8-/4-bit storage, shapes grouped_mm refuses)."""

    def __init__(self, ids: torch.Tensor, num_experts: int) -> None:
        bounds = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
        self.offs = torch.searchsorted(ids, bounds, right=True, out_int32=True)  # ids are sorted

    @functools.cached_property
    def counts(self) -> list[int]:
        return torch.diff(self.offs, prepend=self.offs.new_zeros(1)).tolist()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward rejects an
    expanded one ("Invalid strides/sizes"), which is what `.sum()` or a broadcast add sends back."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad.is_contiguous() and 0 not in grad.stride():
            return grad
        return grad.new_empty(grad.shape).copy_(grad)  # an empty expanded grad "is contiguous" too


def _fits_grouped_mm(x: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether grouped_mm takes x [rows, in] and b [E, in, out] (same dtype, on its devices)."""
    if _GROUPED_MM is None or not _RECENT or x.dtype != b.dtype or x.dtype not in _GROUPED_DTYPES:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # inductor lowers bf16 only
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or (_ALIGNED_PTRS and (x.data_ptr() % 16 or b.data_ptr() % 16)):
        return False
    size = x.element_size()
    # the kernels want every row of x, b and the output to start on 16 bytes (found by a sweep)
    return (b.shape[-2] * size) % 16 == 0 and (b.shape[-1] * size) % 16 == 0


def grouped_linear(x: torch.Tensor, w: torch.Tensor, groups: Groups, transposed: bool = False) -> torch.Tensor:
    """Rows of `x` sorted by expert (`groups`) times expert e's weight: w [E, out, in] (or
    [E, in, out] when `transposed`). One grouped_mm where it takes these operands (the same
    numbers as the loop: a matmul per group), else one matmul per expert with rows."""
    b = w if transposed else w.transpose(-2, -1)  # [E, in, out], a view
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast: cast as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, b = x.to(dtype), b.to(dtype)
    if _fits_grouped_mm(x, b):
        if b.stride(-1) != 1 and b.stride(-2) != 1:  # B's stacked view (experts innermost): copy
            b = b.contiguous()
        return _ContiguousGrad.apply(_GROUPED_MM(x.contiguous(), b, offs=groups.offs))
    return _loop(x, b, groups.counts)


def _loop(x: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(x[start : start + c] @ b[e])
            start += c
    if not outs:
        return x.new_zeros(0, b.shape[-1])
    return torch.cat(outs)


def _project(
    experts: nn.Module, name: str, x: torch.Tensor, groups: Groups, ids: torch.Tensor, adapters: dict
) -> torch.Tensor:
    """One expert projection of the sorted rows: frozen weight (+ bias), plus the LoRA update."""
    if name in expert_quant.quantized(experts):  # 8-/4-bit storage: dequantized one expert at a time
        y = expert_quant.grouped_linear(experts, name, x, groups.counts)
    else:
        y = grouped_linear(x, getattr(experts, name), groups, experts.is_transposed)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[ids]
    if name in adapters:
        a, b, s = adapters[name]
        y = y + (b(a(x, groups), groups) * s).to(y.dtype)
    return y


def lora_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    _lora: dict | None = None,
) -> torch.Tensor:
    """The experts module's forward with the LoRA updates of `_lora` ({param: (A, B, s)})."""
    if not _lora and not expert_quant.quantized(self):  # the class forward reads float weights only
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    _lora = _lora or {}
    tokens, k = hidden_states.shape[0], top_k_index.shape[-1]
    ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // k]
    groups = Groups(ids, self.num_experts)
    up = "gate_up_proj" if self.has_gate else "up_proj"
    h = _project(self, up, x, groups, ids, _lora)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _project(self, "down_proj", h, groups, ids, _lora)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inv].view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)
