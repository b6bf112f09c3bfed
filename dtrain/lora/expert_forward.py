"""The grouped forward of a fused experts module with expert LoRA: tokens sorted by expert, one
matmul per expert that has tokens (as transformers' grouped_mm fallback does), the LoRA update of
each projection added on the same sorted rows, so W + BA is never built. Quantized expert weights
(model/expert_quant.py) are dequantized one expert at a time."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dtrain.model import expert_quant


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int], transposed: bool = False) -> torch.Tensor:
    """Rows of `x` sorted by expert (counts[e] rows for expert e) times expert e's weight:
    w [E, out, in] (or [E, in, out] when `transposed`). One matmul per expert with rows, as
    transformers' grouped_mm fallback (on CUDA with bf16 torch._grouped_mm would do it at once)."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            seg = x[start : start + c]
            outs.append(seg @ w[e] if transposed else F.linear(seg, w[e]))
            start += c
    if not outs:
        return x.new_zeros(0, w.shape[-1] if transposed else w.shape[-2])
    return torch.cat(outs)


def _project(
    experts: nn.Module, name: str, x: torch.Tensor, counts: list[int], ids: torch.Tensor, adapters: dict
) -> torch.Tensor:
    """One expert projection of the sorted rows: frozen weight (+ bias), plus the LoRA update."""
    if name in expert_quant.quantized(experts):  # 8-/4-bit storage: dequantized one expert at a time
        y = expert_quant.grouped_linear(experts, name, x, counts)
    else:
        y = grouped_linear(x, getattr(experts, name), counts, experts.is_transposed)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[ids]
    if name in adapters:
        a, b, s = adapters[name]
        y = y + (b(a(x, counts), counts) * s).to(y.dtype)
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
    counts = torch.bincount(ids, minlength=self.num_experts).tolist()  # one host sync per layer, as HF's loop
    up = "gate_up_proj" if self.has_gate else "up_proj"
    h = _project(self, up, x, counts, ids, _lora)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _project(self, "down_proj", h, counts, ids, _lora)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inv].view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)
