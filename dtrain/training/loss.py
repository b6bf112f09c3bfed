"""The training loss: next-token cross-entropy summed over labelled tokens, from the logits
(`token_loss`) or chunked from the hidden states (`ChunkedCE`, below).

Chunked cross-entropy: the loss from the last hidden state and the output head, a chunk of tokens
at a time, so that a step never holds the logits of the whole micro-batch.

The largest activation of a LoRA step on a modern vocabulary is the logits: tokens x vocab in
fp32 (plus the float copy for the loss); at vocab 128,256 and 8 x 2,048 tokens, 8 GiB. Here
`ChunkedCE` computes, for `chunk` tokens at a time, the logits, the chunk's loss and at once the
gradient of that loss with respect to the hidden states (and to the head's weight when it trains),
then drops the chunk's logits. It keeps only that gradient (the size of the hidden states) for
backward, which scales it by the upstream gradient: nothing is recomputed, and the matmuls are
the logits path's. Peak extra memory: one chunk's logits instead of the micro-batch's logits,
their float copy and the log-softmax that cross_entropy saves for backward. Only the labelled
positions are gathered into the head (prompt and padding rows never meet its matmul), and the
chunk is sized from the vocabulary so one chunk's fp32 logits stay within 256 MiB (`auto_chunk`).

Where it runs: inside the head module's own call. `install(head)` replaces the head's `forward`
(the instance attribute; the module, its parameters and their names stay) by one that, while a
`labels(head, ...)` context is active, returns the summed token loss (a 0-dim tensor) instead of the
logits; the model passes it through as `.logits`. Being the head's forward, it runs where every
sharding backend has the head's weight whole: FSDP2's pre-forward unshard (the root unit when the
head is tied to the embeddings, the head's own unit otherwise), ZeRO-3's pre-forward gather, and in
backward ZeRO-3's pre-backward gather on the head's output. Outside the context (evaluation through
`Backend.forward`, generation, merging) the head computes logits as before.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.data.rows import IGNORE
from dtrain.training import logps as logps_lib

CHUNK_BUDGET_BYTES = 256 * 2**20  # one chunk's fp32 logits (softmax and gradient reuse them in place)
_LABELS = "_dtrain_chunked_labels"
_PER_TOKEN = "_dtrain_per_token"  # set: the head returns log p of each labelled token instead (logps.py)


def auto_chunk(vocab: int, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk whose fp32 logits fit `budget`: 1,365 at vocab 49,152, 523 at 128,256,
    256 at 262,144 (a fixed token count would make the transient grow with the vocabulary)."""
    return max(1, budget // (4 * vocab))


def labelled_tokens(labels: torch.Tensor) -> int:
    """The positions that are a labelled next-token target: every label after a row's first (the
    one home of this count: the step's mean, the loss and the metrics all divide by it)."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, number of labelled tokens)."""
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    shift_labels = shift(labels).reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, shift_labels, ignore_index=IGNORE, reduction="sum")
    return total, labelled_tokens(labels)


def _compute_dtype(weight: torch.Tensor, device_type: str) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class ChunkedCE(torch.autograd.Function):
    """sum over labelled tokens of cross_entropy(hidden @ weight.T (+ bias), labels), in chunks.

    The gradient is computed in forward, chunk by chunk, right after each chunk's loss: d loss /
    d logits = softmax - onehot(label) needs only that chunk's logits, which are dropped before the
    next chunk. What is kept for backward is the gradient itself (the size of the hidden states,
    plus the head's when it trains); backward only scales it by the upstream gradient of the sum.
    No logits are recomputed: the matmuls are those of the logits path (one for the logits, one
    for the hidden states' gradient, one more for the head's weight when it trains).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, dtype):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype) if need_h else None
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], labels[s : s + chunk]
            logits = _logits(h, weight, bias, dtype)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            keep = (y != IGNORE).unsqueeze(1)
            index = y.clamp(min=0).unsqueeze(1)
            total += ((lse - logits.gather(1, index)) * keep).sum()
            if need_h or need_w or need_b:
                g = logits.sub_(lse).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, index, torch.full_like(g[:, :1], -1.0)).mul_(keep)
                gd = g.to(dtype)
                if need_h:
                    grad_h[s : s + chunk] = (gd @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(gd.t().float(), h.to(dtype).float())
                if need_b:
                    grad_b += g.sum(0)
            del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_total.float()
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * scale).to(w_dtype) if grad_w is not None else None,
            (grad_b * scale).to(b_dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(h.device.type, enabled=False):
        out = h.to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            out = out + bias.to(dtype)
    return out.float()


def chunked_token_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shifted_labels: torch.Tensor, chunk: int = 0
) -> torch.Tensor:
    """Summed cross-entropy of `hidden` (..., H) against `shifted_labels` (...) through the head;
    `chunk` tokens at a time (0: `auto_chunk` of the vocabulary)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels = shifted_labels.reshape(-1).to(flat.device)
    # Only labelled positions reach the head: in SFT most positions are prompt or padding, and an
    # unlabelled row's logits are pure cost. The index's backward puts the gradient back on those
    # rows (zero elsewhere), so losses and gradients are the full head's.
    where = (labels != IGNORE).nonzero().squeeze(1)
    flat, labels = flat.index_select(0, where), labels.index_select(0, where)
    dtype = _compute_dtype(weight, flat.device.type)
    chunk = int(chunk) if chunk else auto_chunk(weight.shape[0])
    return ChunkedCE.apply(flat, weight, bias, labels, max(1, chunk), dtype)


# ---- the head -------------------------------------------------------------------------------
def supports(head: nn.Module | None) -> bool:
    """A plain float nn.Linear head (no adapter, not quantized): what the chunked path computes."""
    return type(head) is nn.Linear and head.weight.is_floating_point()


def install(head: nn.Module, chunk: int = 0) -> None:
    """Let `head` return the chunked token loss while a `labels(head, ...)` context is active."""
    if not supports(head):
        raise TypeError(f"chunked loss needs a plain nn.Linear head, got {type(head).__name__}")
    plain = type(head).forward

    def forward(self, hidden):
        shifted = getattr(self, _LABELS, None)
        if shifted is None:
            return plain(self, hidden)
        if getattr(self, _PER_TOKEN, False):
            return logps_lib.chunked(hidden, self.weight, self.bias, shifted, self._dtrain_chunk)
        loss = chunked_token_loss(hidden, self.weight, self.bias, shifted, self._dtrain_chunk)
        self._dtrain_loss = None if getattr(self, "_dtrain_checked", False) else loss
        return loss

    head._dtrain_chunk = int(chunk) or auto_chunk(head.out_features)
    # an instance attribute, not a subclass: FSDP2 and ZeRO-3 hook the module object itself, so the
    # head keeps its parameters, its hooks and its type (PEFT and checkpoints still see an nn.Linear)
    head.forward = types.MethodType(forward, head)


def installed(head: nn.Module | None) -> bool:
    return head is not None and hasattr(head, "_dtrain_chunk")


@contextlib.contextmanager
def labels(head: nn.Module, shifted: torch.Tensor, per_token: bool = False):
    """While inside, the head's call returns the summed loss against `shifted` (labels shifted left),
    or with `per_token` log p of each labelled token (row-major, [N])."""
    setattr(head, _LABELS, shifted)
    setattr(head, _PER_TOKEN, per_token)
    try:
        yield
    finally:
        setattr(head, _LABELS, None)
        setattr(head, _PER_TOKEN, False)
        head._dtrain_loss = None


def check_passed_through(head: nn.Module, total: torch.Tensor, model_type: str) -> torch.Tensor:
    """`total`, the model's `.logits` under `labels`, must be the head's loss as it returned it: a
    model that changes its logits after the head (softcapping, scaling) would have changed the loss
    instead. Compared by value (ZeRO-3's hooks pass module outputs through autograd functions, a new
    tensor object), on the first micro-batch only: the comparison is a host-device sync."""
    if getattr(head, "_dtrain_checked", False):
        return total
    returned = getattr(head, "_dtrain_loss", None)
    if returned is None or not torch.equal(total.detach(), returned.detach()):
        from dtrain.errors import ConfigError

        raise ConfigError(
            f"training.chunked_loss: a {model_type} model changes its logits after the output head, "
            "which a loss computed in the head cannot follow: set training.chunked_loss=false"
        )
    head._dtrain_checked = True
    return total


def shift(labels_: torch.Tensor) -> torch.Tensor:
    """Next-token targets: labels shifted left by one, IGNORE at each row's end."""
    return F.pad(labels_[:, 1:], (0, 1), value=IGNORE)
