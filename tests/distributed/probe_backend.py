"""Run under a launcher: build the configured backend, take one step, print this rank's storage as JSON to <output.dir>/probe-rank<r>.json.

`storage(backend)` is the per-rank measure of frozen and trainable bytes; ds_probe.py uses it too.

Usage: torchrun --nproc_per_node 2 tests/distributed/probe_backend.py CONFIG [overrides]
"""

import json
import sys

import torch

from dtrain.lora.ops import is_lora_param
from dtrain.model.shapes import logical_numel
from dtrain.model.sources import load_config
from dtrain.training import trainer as trainer_lib


def storage(backend) -> dict:
    """This rank's bytes of frozen and of trainable parameters (its shards), the whole frozen base's
    bytes (logical sizes, however sharded) and the quantized storage among the frozen bytes."""
    local = backend.local_tensors()
    params = dict(backend.model.named_parameters())
    frozen = {n: v.numel() * v.element_size() for n, v in local.items() if not params[n].requires_grad}
    trainable = {n: v.numel() * v.element_size() for n, v in local.items() if params[n].requires_grad}
    return {
        "frozen_bytes": sum(frozen.values()),
        "trainable_bytes": sum(trainable.values()),
        "trainable_names": sorted(trainable),
        "all_trainable_are_lora": all(is_lora_param(n) for n in trainable),
        "quant_storage_bytes": sum(v for n, v in frozen.items() if n.endswith(("weight_int8", "weight_nf4"))),
        "quant_scale_bytes": sum(v for n, v in frozen.items() if n.endswith(("weight_scale", "weight_absmax"))),
        # fused expert weights (dtrain/expert_quant.py): `<param>_int8` / `_nf4` and `_scale` / `_absmax`
        "expert_storage_bytes": sum(v for n, v in frozen.items() if ".experts." in n and n.endswith(("_int8", "_nf4"))),
        "expert_scale_bytes": sum(
            v for n, v in frozen.items() if ".experts." in n and n.endswith(("_scale", "_absmax"))
        ),
        "full_frozen_bytes": sum(logical_numel(p) * p.element_size() for p in params.values() if not p.requires_grad),
    }


def fsdp_units(model: torch.nn.Module) -> list[str]:
    """Names of the modules FSDP2 made units of ("" is the root); empty for other backends."""
    from torch.distributed.fsdp import FSDPModule

    return sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    t = trainer_lib.Trainer(cfg)
    t.setup()
    t._train_step()
    b = t.backend
    opt = b.optimizer_state()["optimizer"]["state"]
    opt_bytes = sum(
        v.numel() * v.element_size()
        for s in opt.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    row = {
        "rank": b.rank,
        "world": b.world_size,
        **storage(b),
        "optimizer_state_entries": len(opt),
        "optimizer_state_bytes": opt_bytes,
        "fsdp_units": fsdp_units(b.model),
        "head_is_embedding": b.model.get_output_embeddings().weight is b.model.get_input_embeddings().weight,
    }
    (t.out / f"probe-rank{b.rank}.json").write_text(json.dumps(row))
    t.cleanup()


if __name__ == "__main__":
    main()
    from dtrain.backends.env import exit_now

    exit_now(0)  # as `dtrain` does for a rank: no interpreter teardown (it can abort after gloo)
