"""`dtrain estimate --objective dpo`: the estimate of a preference step, LoRA against full DPO.

A DPO micro-batch of `batch` pairs is 2 x batch rows (chosen and rejected) through the policy,
whose activations are kept for backward, plus the same rows through the reference under no_grad
(nothing kept beyond one layer's transient). With LoRA the reference is the same model with the
adapter off: no bytes added. Full-parameter DPO needs a frozen reference copy of the whole model
(TRL's `ref_model`), sharded like the policy: param dtype x parameters / N more frozen weights.
"""

from __future__ import annotations

from dataclasses import replace

from dtrain.memory.estimate import Estimate, Plan, estimate
from dtrain.memory.model_spec import ModelSpec


def estimate_dpo(spec: ModelSpec, plan: Plan) -> Estimate:
    """The estimate of DPO with `plan.batch` pairs per GPU (the plan returned counts rows)."""
    rows = replace(plan, batch=2 * plan.batch)
    est = estimate(spec, rows)
    reference_copy = plan.param_bytes * spec.total_params / plan.world_size
    return replace(est, full=replace(est.full, frozen_weights=est.full.frozen_weights + reference_copy))
