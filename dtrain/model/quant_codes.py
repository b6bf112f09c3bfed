"""The raw 8- and 4-bit codes of dtrain's frozen weights: int8 with one absmax scale per row, and
NF4 (bitsandbytes' 16-value code, one absmax per NF4_BLOCKSIZE weights), quantized and dequantized
as plain tensors. model/quant.py builds the frozen layers on them; model/expert_quant.py the
fused expert weights."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from dtrain.model.layers import NF4_BLOCKSIZE


def _bnb():
    """bitsandbytes.functional, imported on first use: its import sets up torch.compile (seconds),
    which a run without a quantized layer never needs (the trainer imports this module)."""
    return importlib.import_module("bitsandbytes.functional")


SUPPORTED_BITS = (8, 4)
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


@functools.lru_cache(maxsize=None)
def _nf4_code_cached(device: str) -> Tensor:
    return _bnb().get_4bit_type("nf4", device=device, blocksize=NF4_BLOCKSIZE).float()


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 code values (sorted, float32, in [-1, 1]) on ``device``."""
    return _nf4_code_cached(str(torch.device(device)))


# ----------------------------------------------------------------------------- raw quantization


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8 quantization: returns ``(q int8 [out, in], scale float32 [out])``.

    Uses bitsandbytes' ``int8_vectorwise_quant`` (its CUDA kernel takes float16 only, so CUDA
    weights are rounded to float16 first). Rows that are all zero get ``q = 0``, ``scale = 0``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach()
    w = w.to(torch.float16) if w.is_cuda else w.to(torch.float32)
    q, absmax, _ = _bnb().int8_vectorwise_quant(w.contiguous())
    absmax = absmax.to(torch.float32)
    q = q.masked_fill((absmax == 0).unsqueeze(1), 0)  # bnb divides by absmax: 0/0 for zero rows
    return q, absmax / 127.0


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale[:, None]`` computed in float32, returned in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)).to(dtype)


def quantize_nf4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """NF4 quantization with bitsandbytes' ``quantize_4bit`` (block 64, no double quantization).

    Returns ``(packed uint8 [ceil(n/2), 1], absmax float32 [ceil(n/64)])``, ``n = weight.numel()``.
    """
    w = weight.detach()
    if w.dtype not in _BNB_DTYPES:
        w = w.to(torch.float32)
    packed, state = _bnb().quantize_4bit(
        w.contiguous(),
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )
    return packed.reshape(-1, 1), state.absmax.to(torch.float32)


def dequantize_nf4(
    packed: Tensor, absmax: Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of ``quantize_nf4``: rebuilds the ``QuantState`` and calls ``dequantize_4bit``."""
    bnb_dtype = dtype if dtype in _BNB_DTYPES else torch.float32
    state = _bnb().QuantState(
        absmax=absmax.to(torch.float32).contiguous(),
        shape=torch.Size(shape),
        code=nf4_code(packed.device),
        blocksize=NF4_BLOCKSIZE,
        quant_type="nf4",
        dtype=bnb_dtype,
    )
    out = _bnb().dequantize_4bit(packed.contiguous(), state)
    # bnb transposes the result when the packed tensor has one row (n <= 2): undo by reshape.
    return out.reshape(shape).to(dtype)


def round_trip(weight: Tensor, bits: int) -> Tensor:
    """deq(q(weight)) in float32: the weight a layer quantized to `bits` computes with."""
    if bits == 8:
        return dequantize_int8(*quantize_int8(weight))
    packed, absmax = quantize_nf4(weight)
    return dequantize_nf4(packed, absmax, tuple(weight.shape))
