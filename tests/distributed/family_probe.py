"""Train every family of tests/families.py in one launch: for each, a few steps of LoRA on every linear layer and the experts (`all`) on
the saved tiny model, writing <out>/<family>/ (the run: metrics, adapter) and probe-rank<r>.json
(this rank's frozen bytes before and after the run's evaluations, the whole frozen base's bytes, the
parameter count). One process group serves every family: the launch, not the family, costs seconds.

Usage: [torchrun --nproc_per_node 2] tests/distributed/family_probe.py MODELS_DIR OUT BACKEND FAMILY... [-- overrides]
BACKEND "none+8bit": one process, each family trained twice, on its float and on its 8-bit base
(<out>/<family>-8bit).
"""

import json
import sys
from pathlib import Path

from dtrain import lora
from dtrain.config import schema as config_lib
from dtrain.training import trainer as trainer_lib
from tests.distributed.probe_backend import storage
from tests.helpers import TINY

STEPS = [
    "training.max_steps=2",
    "training.warmup_steps=1",
    "training.micro_batch_size=2",
    "training.eval_every=2",
    "data.eval_fraction=0.2",
    "training.eval_batches=1",
    "data.seq_len=32",
    "lora.targets=all",
    "lora.dropout=0",
    "training.lr=1e-3",
    "output.overwrite=true",
    "logging.loss_curve=false",
    "model.arch=null",
]


def run_family(models: Path, out: Path, backend: str, family: str, extra: list[str], run: str = ""):
    overrides = [
        *STEPS,
        f"model.path={models / family}",
        f"backend.name={backend}",
        f"output.dir={out / (run or family)}",
        *extra,
    ]
    t = trainer_lib.Trainer(config_lib.load(str(TINY), overrides))
    t.setup()
    before = storage(t.backend)["frozen_bytes"]
    t.train()  # evaluates after its last step, then saves the adapter
    after = storage(t.backend)
    row = {
        "rank": t.backend.rank,
        "frozen_before": before,
        "frozen_after": after["frozen_bytes"],
        "full_frozen_bytes": after["full_frozen_bytes"],
        "base_params": _base_params(t.backend.model),
        "trainable_are_lora": after["all_trainable_are_lora"],
    }
    row["quant_storage_bytes"] = after["quant_storage_bytes"]
    (out / (run or family) / f"probe-rank{t.backend.rank}.json").write_text(json.dumps(row))
    return t


def _base_params(model) -> int:
    """dtrain's count of the base model's parameters (the total without the LoRA ones)."""
    trainable, total = lora.count_parameters(model)
    return total - trainable


def main() -> None:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    models, out, backend, families = Path(args[0]), Path(args[1]), args[2], args[3:]
    last, with_8bit = None, backend.endswith("+8bit")
    backend = backend.removesuffix("+8bit")
    for family in families:
        last = run_family(models, out, backend, family, extra)
        if with_8bit:
            last = run_family(models, out, backend, family, [*extra, "quantization.bits=8"], f"{family}-8bit")
    if last is not None:
        last.cleanup()


if __name__ == "__main__":
    main()
    from dtrain.backends.env import exit_now

    exit_now(0)
