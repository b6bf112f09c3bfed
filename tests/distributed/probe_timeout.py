"""Run under torchrun with 2 ranks: create the configured backend (its process group gets
`backend.timeout_s`), then rank 1 stays away from the next collective for SLEEP seconds while rank 0
enters it. Rank 0 prints one JSON line: how long the collective waited and how it failed.

Usage: torchrun --nproc_per_node 2 tests/distributed/probe_timeout.py SLEEP CONFIG [overrides]
"""

import json
import os
import sys
import time

from dtrain import backends
from dtrain.backends import env as dist
from dtrain.model.sources import load_config


def main() -> None:
    sleep, cfg = float(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
    env = dist.detect(cfg.backend.device, cfg.backend.dist_backend)
    backend = backends.create(cfg, env)
    import torch

    backend.barrier()  # both ranks are up: what follows times only the collective below
    if env.rank == 1:
        time.sleep(sleep)  # a rank stuck (a long save, a hang) or dead: never joins
        os._exit(0)
    start = time.monotonic()
    try:
        backend.all_reduce_sum(torch.ones(1))
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - the probe reports whatever the timeout raised
        result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    result["waited_s"] = time.monotonic() - start
    print("PROBE " + json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
