"""Run under a launcher (or as one process): train each tiny MoE family of tests/moe_models.py in
turn, in one process group, each into OUT/<family> (metrics, checkpoints, adapter, and this rank's
parameter storage after training in storage-rank<r>.json, as tests/distributed/probe_backend.py
measures it). A first argument `families=a,b` trains only those; `{router}` in an override is the
family's router weight (tests/moe_models.ROUTER: mlp.gate.weight, gpt-oss's mlp.router.weight).

Usage: torchrun --nproc_per_node 2 tests/distributed/moe_probe.py MODELS OUT [families=..] [overrides]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests.moe_models

from dtrain.config import schema as config_lib  # noqa: E402
from dtrain.training import trainer as trainer_lib  # noqa: E402
from tests.distributed.probe_backend import storage  # noqa: E402
from tests.moe_models import FAMILIES, ROUTER  # noqa: E402

RUN = [
    "data.seq_len=32",
    "training.max_steps=4",
    "training.warmup_steps=1",
    "training.lr=1e-2",
    "training.eval_every=0",
    "training.save_every=2",
    "training.keep_last=2",
    "logging.loss_curve=false",
    "lora.r=2",
    "lora.alpha=4",
]


def main() -> None:
    models, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    families = list(FAMILIES)
    if overrides and overrides[0].startswith("families="):
        families, overrides = overrides[0].split("=", 1)[1].split(","), overrides[1:]
    t = None
    for family in families:
        mine = [o.replace("{router}", ROUTER[family]) for o in overrides]
        cfg = config_lib.load(None, [*RUN, f"model.path={models / family}", *mine, f"output.dir={out / family}"])
        t = trainer_lib.Trainer(cfg)
        t.setup()
        assert t.train() == 0
        (t.out / f"storage-rank{t.backend.rank}.json").write_text(json.dumps(storage(t.backend)))
        t.backend.release()  # keeps the process group for the next family
    t.cleanup()


if __name__ == "__main__":
    trainer_lib.setup_logging(True)
    main()
    from dtrain.backends.env import exit_now

    exit_now(0)
