"""`dtrain import SOURCE [--out DIR]`: a GGUF file, or a built-in model's name, to a plain
Hugging Face safetensors directory that every dtrain command (and transformers) reads.

  dtrain import smollm2-135m-instruct            # into the cache; prints its directory
  dtrain import model.Q4_1.gguf --out models/m   # any GGUF file transformers can read
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dtrain.errors import DtrainError


def add_parser(subparsers) -> None:
    """Register `dtrain import`."""
    p = subparsers.add_parser(
        "import",
        help="a GGUF file or a built-in model -> HF safetensors directory",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("source", nargs="?", help="a .gguf file, or a built-in model name (see --list)")
    p.add_argument("--out", help="output directory (default for a built-in model: the cache)")
    p.add_argument("--list", action="store_true", help="list the built-in models and where they are cached")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dtrain.model import importer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list:
        for name in importer.BUILTIN:
            print(f"{name:28} {importer.cache_root() / name}")
        return 0
    if not args.source:
        raise DtrainError("dtrain import: give a .gguf file or a built-in model name (--list shows them)")
    if importer.is_builtin(args.source) and not args.out:
        print(importer.resolve(args.source))
        return 0
    if not args.out:
        raise DtrainError(f"dtrain import {args.source}: --out DIR is needed for a GGUF file")
    out = Path(args.out)
    if importer.is_builtin(args.source):
        out = importer.import_builtin(args.source, out)
    else:
        out = importer.import_gguf(Path(args.source), out)
    print(out)
    return 0
