"""`dtrain download ID [--revision R] [--dataset]`: fetch a Hub model (or dataset) into the
Hugging Face cache, for a login node with network before a job on offline compute nodes.

  dtrain download HuggingFaceTB/SmolLM2-135M-Instruct            # the files training needs
  dtrain download HuggingFaceTB/SmolLM2-135M-Instruct --revision v1.0
  dtrain download HuggingFaceH4/ultrachat_200k --dataset         # a dataset repository, whole

Models fetch only what dtrain reads (config, safetensors and index, tokenizer and chat template,
generation config); the cache is HF_HUB_CACHE (else HF_HOME/hub, else ~/.cache/huggingface/hub).
"""

from __future__ import annotations

import argparse

from dtrain.errors import DtrainError


def add_parser(subparsers) -> None:
    """Register `dtrain download`."""
    p = subparsers.add_parser(
        "download", help="fetch a Hub model (or --dataset) into the HF cache", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("repo_id", help="org/name (or org/name@revision)")
    p.add_argument("--revision", help="branch, tag or commit hash (default: main, or the @revision)")
    p.add_argument("--dataset", action="store_true", help="a dataset repository (all its files)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dtrain.model import hub

    value = args.repo_id
    if args.revision:
        if "@" in value:
            raise DtrainError(f"'{value}' already names a revision; drop --revision {args.revision} or the @")
        value = f"{value}@{args.revision}"
    if not hub.is_hub_id(value):
        raise DtrainError(f"'{value}': not a Hugging Face Hub ID (org/name[@revision])")
    path = hub.resolve(value, "dtrain download", repo_type="dataset" if args.dataset else "model")
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        print(f"{f.stat().st_size:>14,}  {f.relative_to(path)}")
    print(f"{hub.display(path)} -> {path}")
    return 0
