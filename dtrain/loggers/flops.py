r"""Model FLOPs utilization (MFU) of a training step, on CUDA only.

What is counted, per token of a training step (a multiply-add is 2 FLOPs; P_frozen and
P_trainable are the weights of the matrix multiplies: every linear layer, the output head
included, the input embedding not, since it is a lookup):

    forward                     2 * (P_frozen + P_trainable)
    backward, input gradients   2 * (P_frozen + P_trainable)
    backward, weight gradients  2 * P_trainable            (a frozen weight needs none)
    attention scores and mix    12 * L * s * d_attn        (QK^T and AV: 4 L s d forward,
                                                            8 L s d backward; s = data.seq_len,
                                                            no causal halving, as in PaLM's MFU)

    flops_per_token = 4 * P_frozen + 6 * P_trainable + 12 * L * s * d_attn

For LoRA, P_trainable (the A and B matrices) is tiny: a LoRA step costs about 4 P_frozen per
token against 6 P for full fine-tuning (mode = full: every weight is trainable, P_frozen = 0).
Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs), nor
are norms, activations, the loss or the optimizer. Every position of the batch counts, padding
included (the GPU computes it; `padding_fraction` is logged next to it):

    mfu = flops_per_token * global_batch * seq_len / (step_time * world_size * peak_flops)

peak_flops is one GPU's dense bf16 tensor-core peak (`logging.peak_tflops`, or the table below
for known GPUs); fp32 runs are measured against the same peak. Plain torch: nothing distributed.
"""

from __future__ import annotations

import torch
from torch import nn

from dtrain.model import layers

# Dense (not 2:4 sparse) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the
# first substring of the device name that matches wins.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weights of the model's matrix multiplies, logical sizes (a sharded or
    quantized weight counts as its [out, in] elements)."""
    frozen = trainable = 0
    for module in model.modules():
        if not layers.is_linear(module):
            continue
        fan_in, fan_out = layers.linear_dims(module)  # GPT-2's Conv1D included
        n = fan_in * fan_out
        w = getattr(module, "weight", None)
        trainable_weight = isinstance(w, torch.Tensor) and w.requires_grad
        if trainable_weight:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


def attention_dims(config) -> tuple[int, int]:
    """(layers, d_attn = heads * head_dim) from a Hugging Face config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(heads * head_dim)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """4 P_frozen + 6 P_trainable + 12 L s d_attn (see the module docstring)."""
    frozen, trainable = matmul_params(model)
    layers, d_attn = attention_dims(model.config)
    return 4.0 * frozen + 6.0 * trainable + 12.0 * layers * seq_len * d_attn


def peak_flops(device: torch.device, tflops: float | None = None) -> float | None:
    """One GPU's peak FLOP/s: `tflops` when given, else the table's; None off CUDA or when unknown."""
    if device.type != "cuda":
        return None
    if tflops is not None:
        return tflops * 1e12
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value * 1e12
    return None


def mfu(flops_token: float, tokens: int, seconds: float, world_size: int, peak: float) -> float:
    """Model FLOPs per second per GPU over the GPU's peak."""
    return flops_token * tokens / (seconds * world_size * peak)
