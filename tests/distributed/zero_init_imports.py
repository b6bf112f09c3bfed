"""Run as a plain process by test_tied.py: build dtrain's ZeRO-3 backend (one rank) on the tiny
config with tied embeddings and print, as JSON, the modules first imported inside
`deepspeed.zero.Init` (its context patches `torch.Tensor.__new__`, and an import there of a module
that inspects it, such as `torch._dynamo`, fails) and whether head and embeddings are one tensor.

usage: python tests/distributed/zero_init_imports.py CONFIG [overrides]
"""

import json
import sys

from deepspeed.runtime.zero import partition_parameters as zero_pp

from dtrain.backends import env as dist
from dtrain.backends.deepspeed import DeepSpeedBackend
from dtrain.model.sources import load_config

inside: list[str] = []
enter, leave = (
    zero_pp.InsertPostInitMethodToModuleSubClasses.__enter__,
    zero_pp.InsertPostInitMethodToModuleSubClasses.__exit__,
)


def recording_enter(self):
    self._modules_before = set(sys.modules)
    return enter(self)


def recording_exit(self, *exc):
    inside.extend(sorted(set(sys.modules) - self._modules_before))
    return leave(self, *exc)


def main() -> None:
    zero_pp.InsertPostInitMethodToModuleSubClasses.__enter__ = recording_enter
    zero_pp.InsertPostInitMethodToModuleSubClasses.__exit__ = recording_exit
    cfg = load_config(sys.argv[1], sys.argv[2:])
    backend = DeepSpeedBackend(cfg, dist.detect(cfg.backend.device, cfg.backend.dist_backend))
    model = backend.build()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(
        json.dumps(
            {
                "imported_inside_zero_init": inside,
                "head_is_embedding": tied,
                "parameters": len(list(model.parameters())),
            }
        )
    )
    backend.close()


if __name__ == "__main__":
    main()
