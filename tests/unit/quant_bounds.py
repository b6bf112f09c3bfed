"""The error bounds dtrain's 8-bit and NF4 storage must meet: the tests' oracle for dtrain/model/quant.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dtrain.model.quant import NF4_BLOCKSIZE, _check_bits, nf4_code

# Float32 slack added to the bounds, in units of eps32 * absmax (the analysis needs about 4).
_FP_SLACK_ULPS = 8.0


def _nf4_half_max_gap() -> float:
    code = nf4_code("cpu")
    return float((code[1:] - code[:-1]).max()) / 2.0


def quant_error_bounds(weight: Tensor, bits: int) -> Tensor:
    """Per-element bound on ``|w - deq(quant(w))|``, float32, broadcastable to ``weight``.

    * 8 bits: ``absmax_row / 127 / 2`` (half a quantization step: rounding to nearest), i.e.
      ``weight_scale[:, None] / 2``.
    * 4 bits (NF4): ``absmax_block * max_gap / 2`` where ``max_gap`` is the largest distance
      between adjacent NF4 code values (``1 - 0.6962`` near -1, so ``0.1519 * absmax``): the
      scaled value lies in ``[-1, 1]`` and is mapped to the nearest code value. Blocks are 64
      consecutive elements of the row-major flattened weight.

    Both add ``8 * eps32 * absmax`` for float32 rounding of the scale, the division and the
    product. For weights on CUDA and 8 bits (rounded to float16 before quantization), the
    float16 rounding ``2**-11 * |w| + 2**-25`` is added too.
    """
    _check_bits(bits)
    w = weight.detach().to(torch.float32)
    eps = torch.finfo(torch.float32).eps
    if bits == 8:
        absmax = w.abs().amax(dim=1, keepdim=True)
        bound = absmax / 254.0 + _FP_SLACK_ULPS * eps * absmax
        if weight.is_cuda:
            bound = bound + w.abs() * 2.0**-11 + 2.0**-25
        return bound.expand_as(w)
    flat = w.reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCKSIZE
    blocks = F.pad(flat, (0, pad)).reshape(-1, NF4_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    per_block = absmax * (_nf4_half_max_gap() + _FP_SLACK_ULPS * eps)
    return per_block.expand_as(blocks).reshape(-1)[: flat.numel()].reshape(w.shape)


def quant_error_bound(weight: Tensor, bits: int) -> float:
    """Largest element of ``quant_error_bounds(weight, bits)``: ``max |w - deq(w)|`` is below it."""
    return float(quant_error_bounds(weight, bits).max())
