"""Activation bytes of one micro-batch on one GPU, by arithmetic (docs/memory_estimate.md).

Saved for backward: each decoder layer's tensors (full fine-tuning: Korthikanti et al. 2022,
generalised to GQA and gated MLPs; LoRA: only what a frozen layer still needs, ``lora_layer_bytes``),
fewer with a checkpointing policy, and the loss's: the fp32 log-softmax of the whole
micro-batch's logits (``b*s*V*4``), or, with the chunked loss (dtrain/training/loss.py, on by default for
LoRA), only the gradient with respect to the hidden states (``b*s*h`` in the compute dtype).
Transient at the loss (``loss_transient_bytes``): the logits the loss is computed from, for the
whole micro-batch or one chunk of ``loss_chunk`` tokens, in the compute dtype plus their fp32 copy.

``plan`` is a ``dtrain.memory.estimate.Plan`` (read by attribute; not imported, no cycle).
"""

from __future__ import annotations

import math
from typing import Any

from dtrain.memory.model_spec import LinearModule, ModelSpec


def layer_activation_bytes(spec: ModelSpec, plan: Any) -> float:
    """Bytes one decoder layer saves for backward (no recompute), whole micro-batch.

    Korthikanti et al. 2022, ``s*b*h*(34 + 5*a*s/h)`` for GPT with 16-bit activations, split
    into what is saved: 2 LayerNorm inputs (2h), QKV input (h), Q, K, V (dq + 2 dkv), output
    projection input (dq), MLP input (h), MLP hidden (2f: activation in / out; 4f when gated:
    gate, up, act(gate), product), in 16 bits (4 B if fp32), plus two 1-byte dropout masks
    (2h B). Attention scores: eager saves softmax out, its dropout mask and output
    ((2*act_bytes + 1)*a*s B per token); sdpa/flash saves a fp32 logsumexp (4*a B).
    For GPT-3 shapes (dq = dkv = h, f = 4h) this is exactly 34 s*b*h (+ 5 a s^2 b eager).
    """
    return (
        plan.seq_len
        * plan.batch
        * (plan.param_bytes * _layer_elements(spec) + 2 * spec.hidden_size + _score_bytes(spec, plan))
    )


def _layer_elements(spec: ModelSpec) -> int:
    h, f = spec.hidden_size, spec.intermediate_size
    dq, dkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return 2 * h + h + (dq + 2 * dkv) + dq + h + (4 if spec.gated_mlp else 2) * f


def lora_layer_bytes(spec: ModelSpec, plan: Any, lora: tuple[LinearModule, ...]) -> float:
    """What one decoder layer saves when only ``lora``'s layers train (whole micro-batch).

    A frozen linear needs no weight gradient, so its input is saved only where an adapter on it
    (A saves x) or another op needs it: both norms' inputs (2h), the attention's input (h) when
    q, k or v is targeted, Q K V and the attention output (sdpa saves them: d_q + 2 d_kv + d_q),
    the MLP's input (h) when gate / up (fc1) is targeted, the gated MLP's gate, act(gate) and up
    (3f; non-gated: the activation's input, f), the down projection's input (f) when targeted;
    no dropout masks (LoRA recipes and Llama-style models train without dropout). Under ZeRO-3
    every linear's input is saved (its memory_efficient_linear). Measured on the
    tiny Llama by `dtrain memory`: within 1% of what autograd saves (docs/memory_estimate.md).
    """
    h, f = spec.hidden_size, spec.intermediate_size
    dq, dkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    # ZeRO-3's memory_efficient_linear (dtrain's ds_config) saves every linear's input, frozen or not
    every = plan.backend == "deepspeed"
    attn_in = every or any(_in_attention(lin) and lin.in_features == h for lin in lora)
    mlp_in = every or any(not _in_attention(lin) and lin.in_features == h for lin in lora)
    down = every or any(not _in_attention(lin) and lin.in_features != h for lin in lora)
    elements = (
        2 * h
        + (h if attn_in else 0)
        + (dq + 2 * dkv)
        + dq
        + (h if mlp_in else 0)
        + (3 if spec.gated_mlp else 1) * f
        + (f if down else 0)
    )
    return plan.seq_len * plan.batch * (plan.param_bytes * elements + _score_bytes(spec, plan))


def _in_attention(lin: LinearModule) -> bool:
    return "attn" in lin.name or "attention" in lin.name


def _attention_elements(spec: ModelSpec) -> int:
    """Per token, what the attention module saves inside itself beyond its input: Q, K, V and
    the output projection's input (what attention-only checkpointing recomputes)."""
    dq, dkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return (dq + 2 * dkv) + dq


def _score_bytes(spec: ModelSpec, plan: Any) -> float:
    if plan.attention == "eager":
        return (2 * plan.param_bytes + 1) * spec.num_heads * plan.seq_len
    return 4 * spec.num_heads


def _lora_bytes(plan: Any, lora: tuple[LinearModule, ...], attention_only: bool = False) -> float:
    """The rank-r intermediates (A x, saved for B's gradient) of the targets in one layer
    (``attention_only``: only those inside the attention module)."""
    tokens = plan.seq_len * plan.batch
    count = sum(lin.count for lin in lora if not attention_only or "attn" in lin.name)
    return tokens * plan.rank * plan.param_bytes * count


def checkpointed_blocks(spec: ModelSpec, plan: Any) -> int:
    """Blocks under the checkpointing policy: blocks 0, k, 2k, ... (k = ``checkpoint_every``)."""
    if plan.grad_checkpointing in (False, "off"):
        return 0
    return math.ceil(spec.num_layers / plan.checkpoint_every)


def layers_bytes(spec: ModelSpec, plan: Any, lora: tuple[LinearModule, ...] = ()) -> float:
    """Every layer's saved tensors under the plan's checkpointing policy.

    Whole blocks (``True``): a checkpointed block keeps only its input (``b*s*h``) and, during its
    recompute in backward, one layer's full set. ``attention``: a checkpointed block's attention
    keeps only its input (already counted as the QKV input) and drops Q, K, V, the output
    projection's input, the scores and the LoRA intermediates inside it; one attention's set is
    recomputed at a time.
    """
    tokens, layers = plan.seq_len * plan.batch, spec.num_layers
    saved = lora_layer_bytes(spec, plan, lora) if lora else layer_activation_bytes(spec, plan)
    full_layer = saved + _lora_bytes(plan, lora) / layers
    ckpt = checkpointed_blocks(spec, plan)
    if ckpt == 0:
        return layers * full_layer
    if plan.grad_checkpointing == "attention":
        attention = (
            tokens * (plan.param_bytes * _attention_elements(spec) + _score_bytes(spec, plan))
            + _lora_bytes(plan, lora, attention_only=True) / layers
        )
        return layers * full_layer - ckpt * attention + attention
    inputs = ckpt * tokens * spec.hidden_size * plan.param_bytes
    return (layers - ckpt) * full_layer + inputs + full_layer


def loss_saved_bytes(spec: ModelSpec, plan: Any, chunked: bool) -> float:
    """What the loss saves for backward: fp32 log-softmax of all logits, or (chunked) the
    gradient with respect to the hidden states, in the compute dtype."""
    tokens = plan.seq_len * plan.batch
    return tokens * (spec.hidden_size * plan.param_bytes if chunked else spec.vocab_size * 4)


def loss_transient_bytes(spec: ModelSpec, plan: Any, chunked: bool) -> float:
    """Logits alive at once while the loss is computed (not saved): the micro-batch's, or one
    chunk's (``loss_chunk`` tokens), in the compute dtype plus an fp32 copy when that is 16-bit."""
    tokens = plan.seq_len * plan.batch
    rows = min(loss_chunk_tokens(spec, plan), tokens) if chunked else tokens
    per_logit = plan.param_bytes + (4 if plan.param_bytes != 4 else 0)
    return rows * spec.vocab_size * per_logit


# training.loss_chunk_tokens = 0 sizes the chunk from the vocabulary: one chunk's fp32 logits
# within this budget (dtrain.training.loss.auto_chunk, where the chunked loss defines it; restated here so
# that the estimator imports no torch)
LOSS_CHUNK_BUDGET = 256 * 2**20


def loss_chunk_tokens(spec: ModelSpec, plan: Any) -> int:
    """Tokens per loss chunk: the plan's, or (0) the vocabulary-sized chunk."""
    return plan.loss_chunk or max(1, LOSS_CHUNK_BUDGET // (4 * spec.vocab_size))


def activation_bytes(spec: ModelSpec, plan: Any, lora: tuple[LinearModule, ...] = (), chunked: bool = False) -> float:
    """Saved activations on one GPU: the layers (``layers_bytes``) plus the loss's saved tensors."""
    return layers_bytes(spec, plan, lora) + loss_saved_bytes(spec, plan, chunked)
