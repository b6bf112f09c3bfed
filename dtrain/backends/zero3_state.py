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

from dtrain.training.optim import hyper as _hyper, set_hyper as _set_hyper

KEYS = ("exp_avg", "exp_avg_sq")
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _gather(part: torch.Tensor, p, world: int) -> torch.Tensor:
    """The full tensor of parameter `p` from every rank's partition `part` (collective)."""
    pieces = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(pieces, part.contiguous())
    return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).cpu().clone()


def _slice(full: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s partition (n elements) of a full tensor, zero padding included."""
    flat = torch.zeros(n * world, dtype=full.dtype)
    flat[: full.numel()] = full.reshape(-1)
    return flat[rank * n : (rank + 1) * n]


def full_optimizer_state(backend, subgroups) -> dict:
    """`Backend.full_optimizer_state` for ZeRO-3 (every rank calls it: all-gathers)."""
    opt, names, world = backend.optimizer, backend._names, backend.world_size
    params = {}
    for group, flat in subgroups:
        st = opt.optimizer.state.get(flat, {})
        step, offset = float(st.get("step", 0)), 0
        for p in group:
            n = p.ds_tensor.ds_numel
            if "exp_avg" in st:
                params[names[id(p)]] = {
                    "step": step,
                    **{k: _gather(st[k].narrow(0, offset, n).detach(), p, world) for k in KEYS},
                }
            offset += n
    engine = {k: getattr(backend.engine, k) for k in ENGINE_COUNTERS}
    return {
        "params": params,
        "hyper": _hyper(opt.optimizer.param_groups[0]),
        "scheduler": backend.scheduler.state_dict(),
        "engine": {**engine, "world_size": world},
    }


def load_full_optimizer_state(backend, subgroups, state: dict) -> None:
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


# ---- per-rank partitions (same world size only; the probes in tests/distributed use them) ----


def rank_state(backend, subgroups) -> dict:
    """This rank's ZeRO-3 partition of the AdamW state, by parameter name, plus the scheduler.

    {"optimizer": {"state": {param name: {"exp_avg": T, "exp_avg_sq": T[, "master": T]}},
                   "param_groups": [hyper-parameters], "zero3": {world_size, rank, steps (AdamW's
                   step of each flat group), partitions ({param name: [offset, numel]})}},
     "scheduler": LambdaLR state, "engine": DeepSpeed's step counters}
    T are 1-D fp32 CPU copies of this rank's partition (numel = the parameter's partition size,
    padding included), so only LoRA parameters appear. "master" appears only when the fp32
    master is not a copy of the parameter's own partition (a 16-bit trainable parameter):
    dtrain's LoRA parameters are fp32, their masters equal them after every step and come back
    through `DeepSpeedBackend.load_full_state` (the adapter).
    """
    opt, names = backend.optimizer, backend._names
    state_out: dict[str, dict[str, torch.Tensor]] = {}
    partitions: dict[str, list[int]] = {}
    steps = []
    for i, (group, flat) in enumerate(subgroups):
        state = opt.optimizer.state.get(flat, {})
        steps.append(_plain(state.get("step", 0)))
        master_is_param = opt.fp16_partitioned_groups_flat[i].dtype == flat.dtype
        offset = 0
        for p in group:
            name, n = names[id(p)], p.ds_tensor.ds_numel
            partitions[name] = [offset, n]
            entry = {
                key: state[key].narrow(0, offset, n).detach().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq")
                if key in state
            }
            if not master_is_param:
                entry["master"] = flat.narrow(0, offset, n).detach().cpu().clone()
            state_out[name] = entry
            offset += n
    groups = [{k: _plain(v) for k, v in g.items() if k != "params"} for g in opt.optimizer.param_groups]
    zero3 = {"world_size": backend.world_size, "rank": backend.rank, "steps": steps, "partitions": partitions}
    engine = {k: getattr(backend.engine, k) for k in ENGINE_COUNTERS}
    return {
        "optimizer": {"state": state_out, "param_groups": groups, "zero3": zero3},
        "scheduler": _plain(backend.scheduler.state_dict()),
        "engine": engine,
    }


def load_rank_state(backend, subgroups, state: dict) -> None:
    """Restore what `optimizer_state` returned on this rank (same world size and parameters)."""
    opt, names = backend.optimizer, backend._names
    saved = state["optimizer"]
    zero3 = saved.get("zero3")
    if zero3 is None or zero3["world_size"] != backend.world_size:
        where = f"{zero3['world_size']} ZeRO-3 rank(s)" if zero3 else "another backend"
        raise ValueError(f"optimizer state is from {where}; this run is ZeRO-3 on {backend.world_size}")
    for i, (group, flat) in enumerate(subgroups):
        state_i = opt.optimizer.state.setdefault(flat, {})
        offset = 0
        for p in group:
            name, n = names[id(p)], p.ds_tensor.ds_numel
            if zero3["partitions"].get(name) != [offset, n]:
                raise ValueError(
                    f"optimizer state: partition of {name!r} differs "
                    f"({zero3['partitions'].get(name)} saved, {[offset, n]} now)"
                )
            entry = saved["state"].get(name, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry:
                    if key not in state_i:
                        state_i[key] = torch.zeros_like(flat)
                    state_i[key].narrow(0, offset, n).copy_(entry[key])
            if "master" in entry:
                flat.data.narrow(0, offset, n).copy_(entry["master"])
            offset += n
        if "exp_avg" in state_i:
            old = state_i.get("step")
            dtype = old.dtype if isinstance(old, torch.Tensor) else torch.float32
            state_i["step"] = torch.tensor(float(zero3["steps"][i]), dtype=dtype)
    for g, hyper in zip(opt.optimizer.param_groups, saved["param_groups"]):
        for k, v in hyper.items():
            g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
    backend.scheduler.load_state_dict(state["scheduler"])
    for k, v in state.get("engine", {}).items():
        setattr(backend.engine, k, v)


def _plain(v):
    """JSON-able plain data from optimizer/scheduler state values."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
