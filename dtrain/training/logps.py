"""Log-probabilities of the labelled tokens, and their sums per row: what preference objectives
(dtrain/training/dpo.py) are built on, from the logits or chunked inside the output head.

`ChunkedTokenLogp` is the per-token form of loss.ChunkedCE: for the labelled positions only, in
chunks of tokens, it computes log p(target) and at once its gradient with respect to the hidden
state (onehot - softmax) @ W, then drops the chunk's logits. Backward scales each token's gradient
by that token's upstream gradient, so any function of the per-token values (a sum per row, DPO's
sigmoid of differences of such sums) gets exact gradients without the micro-batch's logits ever
existing. The head's weight must be frozen (LoRA: the head is not adapted): its gradient would need
the per-token scale, which is only known in backward.
"""

from __future__ import annotations

import torch


def labelled(shifted: torch.Tensor) -> torch.Tensor:
    """Mask of the positions whose next token is a target (labels already shifted left)."""
    return shifted != -100


def from_logits(logits: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """log p(target) at the labelled positions (row-major order) from full logits [B, L, V]."""
    mask = labelled(shifted).to(logits.device)
    picked = logits[mask].float()  # only labelled positions: [N, V]
    targets = shifted.to(logits.device)[mask]
    return picked.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(picked, dim=-1)


def row_sums(token_logps: torch.Tensor, shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's labelled tokens [B], labelled tokens per row [B])."""
    mask = labelled(shifted).to(token_logps.device)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), mask.sum(1)


class ChunkedTokenLogp(torch.autograd.Function):
    """log p(targets) of `hidden` [N, H] through a frozen head (weight [V, H], bias), in chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        w = weight.to(dtype)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], targets[s : s + chunk].unsqueeze(1)
            with torch.autocast(h.device.type, enabled=False):
                logits = h.to(dtype) @ w.t()
                if bias is not None:
                    logits = logits + bias.to(dtype)
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            out[s : s + chunk] = (logits.gather(1, y) - lse).squeeze(1)
            if grad_h is not None:
                g = logits.sub_(lse).exp_().neg_()  # -softmax, in place of the logits
                g.scatter_add_(1, y, torch.ones_like(g[:, :1]))  # + onehot: d log p / d logits
                grad_h[s : s + chunk] = (g.to(dtype) @ w).to(hidden.dtype)
            del logits
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        g = None if grad_h is None else grad_h * grad_out.unsqueeze(1).to(grad_h.dtype)
        return g, None, None, None, None, None


def chunked(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shifted: torch.Tensor, chunk: int
) -> torch.Tensor:
    """log p(target) at the labelled positions of `hidden` [B, L, H] (row-major order), chunked."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise RuntimeError("per-token log-probabilities in the head need a frozen head (mode: lora)")
    mask = labelled(shifted).to(hidden.device)
    picked = hidden[mask]  # [N, H]; its backward scatters into the positions picked
    targets = shifted.to(hidden.device)[mask]
    dtype = (
        torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
    )
    return ChunkedTokenLogp.apply(picked, weight, bias, targets, max(1, int(chunk)), dtype)
