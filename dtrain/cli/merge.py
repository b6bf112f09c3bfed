"""`dtrain merge --base MODEL --adapter DIR --out DIR [--dtype bf16|fp32]`: fold a LoRA adapter
into its base and write a plain Hugging Face model (safetensors) that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(out)`, no PEFT and no dtrain needed. The streamed merge
itself is dtrain/inference/merge.py's."""

from __future__ import annotations

import argparse

from dtrain.errors import DtrainError
from dtrain.inference.merge import DTYPES  # a light import: the merge imports torch only when it runs


def add_parser(subparsers) -> None:
    """Register `dtrain merge`."""
    p = subparsers.add_parser(
        "merge", help="fold a LoRA adapter into its base: a plain HF model", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--base", required=True, help="base model directory (HF format, safetensors)")
    p.add_argument("--adapter", required=True, help="adapter directory (dtrain's or PEFT's LoRA)")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what a non-empty --out holds (only once the merge has succeeded)",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="dtype of the merged weights (default: the base's)"
    )
    p.add_argument(
        "--base-bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="the adapter was trained on dtrain's 8-/4-bit base: merge into the dequantized "
        "weights it saw (every linear but the head) and write bf16",
    )
    p.add_argument(
        "--quantized-head",
        action="store_true",
        help="with --base-bits: the run had quantization.include_head = true (the head was quantized too)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dtrain.inference.merge import merge

    if args.quantized_head and not args.base_bits:
        raise DtrainError("--quantized-head needs --base-bits 8 or 4")
    out = merge(args.base, args.adapter, args.out, args.dtype, args.base_bits, args.quantized_head, args.overwrite)
    print(f"merged model written to {out}")
    return 0
