"""ZeRO-3 optimizer state in full, by parameter name, and back into this run's flat partitions.

ZeRO-3 keeps AdamW's exp_avg / exp_avg_sq as one flat fp32 tensor per sub-group and rank: the
concatenation, in `fp16_groups` order, of each trainable parameter's partition. A parameter of
`ds_numel` elements is padded to a multiple of the world size and cut into `world` equal partitions
of `n = p.ds_tensor.ds_numel` elements; rank r holds elements [r n, (r + 1) n) of the flattened
parameter (deepspeed/runtime/zero/partition_parameters.py, `_partition_param`), which is what
`p.ds_tensor` holds and where `optimizer_state` in deepspeed.py reads it. Saving all-gathers each
parameter's partitions and drops the padding; loading pads the full tensor again and copies this
rank's slice, so the world size (and the backend) of the save does not matter. AdamW's `step` is
one per flat sub-group (all its parameters step together).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dtrain.backends.base import _hyper, _set_hyper

KEYS = ("exp_avg", "exp_avg_sq")


def _gather(part: torch.Tensor, p, world: int) -> torch.Tensor:
    """The full tensor of parameter `p` from every rank's partition `part` (collective)."""
    pieces = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(pieces, part.contiguous())
    return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).cpu().clone()


def _slice(full: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s partition (n elements) of a full tensor, zero padding included."""
    flat = torch.zeros(n * world, dtype=full.dtype)
    flat[: full.numel()] = full.reshape(-1)
    return flat[rank * n: (rank + 1) * n]


def full_state(backend, subgroups) -> dict:
    """`Backend.full_optimizer_state` for ZeRO-3 (every rank calls it: all-gathers)."""
    opt, names, world = backend.optimizer, backend._names, backend.world_size
    params = {}
    for group, flat in subgroups:
        st = opt.optimizer.state.get(flat, {})
        step, offset = float(st.get("step", 0)), 0
        for p in group:
            n = p.ds_tensor.ds_numel
            if "exp_avg" in st:
                params[names[id(p)]] = {"step": step, **{k: _gather(st[k].narrow(0, offset, n).detach(), p, world)
                                                         for k in KEYS}}
            offset += n
    engine = {k: getattr(backend.engine, k) for k in ("global_steps", "global_samples", "micro_steps",
                                                        "skipped_steps")}
    return {"params": params, "hyper": _hyper(opt.optimizer.param_groups[0]),
            "scheduler": backend.scheduler.state_dict(), "engine": {**engine, "world_size": world}}


def load_full_state(backend, subgroups, state: dict) -> None:
    """`Backend.load_full_optimizer_state` for ZeRO-3: this rank's slices into the flat partitions."""
    opt, names, rank, world = backend.optimizer, backend._names, backend.rank, backend.world_size
    for group, flat in subgroups:
        st, offset, steps = opt.optimizer.state.setdefault(flat, {}), 0, []
        for p in group:
            n, saved = p.ds_tensor.ds_numel, state["params"].get(names[id(p)])
            if saved is not None:
                for k in KEYS:
                    if k not in st:
                        st[k] = torch.zeros_like(flat)
                    st[k].narrow(0, offset, n).copy_(_slice(saved[k].to(flat.dtype), n, rank, world))
                steps.append(float(saved["step"]))
            offset += n
        if steps:
            old = st.get("step")
            st["step"] = torch.tensor(max(steps), dtype=old.dtype if isinstance(old, torch.Tensor) else torch.float32)
    for g in opt.optimizer.param_groups:
        _set_hyper(g, state["hyper"])
    backend.scheduler.load_state_dict(state["scheduler"])
    _set_engine_counters(backend, state)


def _set_engine_counters(backend, state: dict) -> None:
    """DeepSpeed's step counters: as saved when the same number of ZeRO-3 ranks wrote them, else
    derived from the step (the global batch is the same: resume_check refuses another)."""
    engine, saved = backend.engine, state.get("engine") or {}
    if saved.get("world_size") == backend.world_size:
        for k, v in saved.items():
            if k != "world_size":
                setattr(engine, k, v)
        return
    step = int(state["step"])
    engine.global_steps, engine.skipped_steps = step, 0
    engine.global_samples = step * engine.train_batch_size()
    engine.micro_steps = step * engine.gradient_accumulation_steps()
