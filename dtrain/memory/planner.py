"""`dtrain plan`'s search: every LoRA configuration of a model on a cluster that the estimator says
fits, ranked by an estimated throughput, and, when none fits, what would.

Searched: backend (fsdp, deepspeed) x frozen bits (16, 8, 4) x micro-batch (1 .. 64) x gradient
checkpointing (off, attention, whole blocks) x chunked loss (on, off); the rest of the plan (rank,
targets, sequence length, dtype) is the user's. A configuration fits when its estimated total per
GPU is at most ``HEADROOM`` (90%) of the GPU's memory: the estimate leaves out the CUDA context,
fragmentation and communication buckets (the recipes table keeps the same margin).

Throughput model (relative, for ranking; docs/memory_estimate.md): a micro-batch costs its FLOPs at
``MFU`` of ``PEAK_FLOPS`` plus the all-gathers of the frozen weights (forward and again in
backward: 2 x frozen bytes x (N-1)/N per GPU) at ``BANDWIDTH`` within a node or ``BANDWIDTH_INTER``
across nodes, without overlap. FLOPs per token: 2 per frozen matmul weight forward, 2 more for
the input gradient, LoRA's own (6 per adapter weight), attention's 4 s d_q per layer each way;
recomputation adds a forward of the checkpointed part; 8-/4-bit weights cost ``DEQUANT`` more.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from dtrain.memory.estimate import Estimate, Plan, estimate
from dtrain.memory.model_spec import ModelSpec

HEADROOM = 0.9
GIB = 2**30
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
MFU = 0.4
BANDWIDTH = 150e9  # bytes/s per GPU of all-gather within a node (NVLink, effective)
BANDWIDTH_INTER = 25e9  # across nodes (200 Gb/s per GPU)
DEQUANT = 1.15
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CHECKPOINTING = (False, "attention", True)


@dataclass(frozen=True)
class Option:
    """One configuration: its estimate, bytes per GPU, headroom against the GPU, tokens/s/GPU."""

    est: Estimate
    total: float
    headroom: float
    tokens_per_s: float

    @property
    def plan(self) -> Plan:
        return self.est.plan


def flops_per_token(spec: ModelSpec, plan: Plan, lora_params: int) -> float:
    """Training FLOPs per token of a LoRA step (see the module docstring)."""
    weights = sum(lin.count * lin.weight_params for lin in spec.linears) + spec.vocab_size * spec.hidden_size
    attention = 4 * plan.seq_len * spec.num_heads * spec.head_dim * spec.num_layers
    forward = 2 * weights + attention + 2 * lora_params
    step = 2 * forward + 4 * lora_params  # + input gradients (frozen: no weight gradient) + LoRA's
    blocks = (forward - 2 * spec.vocab_size * spec.hidden_size) / spec.num_layers
    from dtrain.memory.activations import checkpointed_blocks

    ckpt = checkpointed_blocks(spec, plan)
    if plan.grad_checkpointing == "attention":
        step += ckpt * attention / spec.num_layers
    elif ckpt:
        step += ckpt * blocks
    return step * (DEQUANT if plan.bits < 16 else 1.0)


def tokens_per_second(est: Estimate) -> float:
    """Estimated tokens/s per GPU of one micro-batch (compute + frozen-weight all-gathers)."""
    plan, tokens = est.plan, est.plan.batch * est.plan.seq_len
    compute = tokens * flops_per_token(est.spec, plan, est.lora_params) / (PEAK_FLOPS * MFU)
    n = plan.world_size
    bandwidth = BANDWIDTH if plan.nodes == 1 else BANDWIDTH_INTER
    gathered = 2 * est.lora.frozen_weights * (n - 1)  # frozen bytes per GPU x N = the whole base
    return tokens / (compute + gathered / bandwidth)


def candidates(base: Plan) -> list[Plan]:
    """Every searched variation of ``base`` (see the module docstring)."""
    out = []
    for backend, bits, batch, ckpt, chunked in itertools.product(
        ("fsdp", "deepspeed"), (16, 8, 4), BATCHES, CHECKPOINTING, (True, False)
    ):
        out.append(
            dataclasses.replace(
                base,
                backend=backend,
                bits=bits,
                batch=batch,
                grad_checkpointing=ckpt,
                chunked_loss=chunked,
                fp32_grads=backend == "deepspeed",
            )
        )
    return out


def evaluate(spec: ModelSpec, base: Plan, gpu_bytes: float) -> list[Option]:
    """Every candidate with its estimate, best (fitting, fastest, then most headroom) first."""
    options = []
    for plan in candidates(base):
        est = estimate(spec, plan)
        total = est.lora.total
        options.append(Option(est, total, gpu_bytes - total, tokens_per_second(est)))
    return sorted(options, key=lambda o: (-o.tokens_per_s, -o.headroom))


def fitting(options: list[Option], gpu_bytes: float) -> list[Option]:
    return [o for o in options if o.total <= HEADROOM * gpu_bytes]


def smallest(spec: ModelSpec, base: Plan) -> Option:
    """The least memory any searched configuration needs on ``base``'s cluster."""
    options = evaluate(spec, base, 0.0)
    return min(options, key=lambda o: o.total)


def way_out(spec: ModelSpec, base: Plan, gpu_bytes: float) -> str:
    """What would fit when nothing does: more GPUs, a shorter sequence (4-bit is searched already)."""
    least = smallest(spec, base)
    parts = [
        f"the smallest configuration ({describe(least.plan)}) needs "
        f"{least.total / GIB:.1f} GiB per GPU against {HEADROOM * gpu_bytes / GIB:.1f} GiB usable"
    ]
    for factor in (2, 4, 8, 16, 32, 64, 128):
        more = dataclasses.replace(base, gpus=base.gpus * factor)
        if smallest(spec, more).total <= HEADROOM * gpu_bytes:
            parts.append(f"it fits on {more.world_size} GPUs ({more.nodes} x {more.gpus})")
            break
    seq = base.seq_len // 2
    while seq >= 128:
        if smallest(spec, dataclasses.replace(base, seq_len=seq)).total <= HEADROOM * gpu_bytes:
            parts.append(f"or on these GPUs with --seq-len {seq}")
            break
        seq //= 2
    else:
        parts.append(
            "no sequence length fits these GPUs: the sharded model states alone need "
            f"{least.est.lora.model_states / GIB:.1f} GiB"
        )
    return "; ".join(parts)


def describe(plan: Plan) -> str:
    """``fsdp, 4-bit, micro-batch 1, checkpointing blocks, chunked loss`` and the like."""
    ckpt = {False: "no checkpointing", True: "checkpointing blocks", "attention": "checkpointing attention"}
    return (
        f"{plan.backend}, {plan.bits}-bit, micro-batch {plan.batch}, {ckpt[plan.grad_checkpointing]}, "
        f"{'chunked' if plan.chunked_loss is True else 'full-logits'} loss"
    )
