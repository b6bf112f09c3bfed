"""`dtrain analyze ADAPTER [ADAPTER2 ...] [--base MODEL] [--out DIR]`: the LoRA paper's Section 7
analyses of trained adapters (dtrain's or PEFT's), per adapted layer:

  * every pair of adapters: subspace similarity phi(i, j) of their A matrices (Sec. 7.2), a heatmap
    per layer type (averaged over layers, or --layer N) and a table;
  * every adapter: ΔW = (alpha/r) B A's singular values and effective rank, and with --base, how ΔW
    relates to W (Sec. 7.3): ||U^T W V||_F against W's own top-r directions and random ones, and the
    amplification factor ||ΔW||_F / ||U^T W V||_F.

The base is read one tensor at a time from its safetensors files (no model is built); --base-bits
8|4 dequantizes each weight as dtrain's quantized base computed with it. Writes analysis.json,
analysis.md and PNGs into --out (docs/analyze.md explains them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dtrain.errors import DtrainError


def add_parser(subparsers) -> None:
    """Register `dtrain analyze`."""
    p = subparsers.add_parser(
        "analyze",
        help="subspace similarity, effective rank and amplification of LoRA adapters (the LoRA paper's Sec. 7)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER",
        help="adapter directories (dtrain's or PEFT's); NAME=DIR names one in the tables",
    )
    p.add_argument("--base", help="base model (HF directory or built-in name): needed for Sec. 7.3's numbers")
    p.add_argument(
        "--base-bits",
        type=int,
        choices=(8, 4),
        help="the adapters were trained on dtrain's 8-/4-bit base: relate them to the dequantized weights",
    )
    p.add_argument("--quantized-head", action="store_true", help="with --base-bits: the head was quantized too")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    p.add_argument(
        "--layer",
        type=int,
        help="per-type numbers and heatmaps for this layer index only (default: the mean over all adapted layers)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (Sec. 7.3)")
    p.set_defaults(func=_run)


def labelled(specs: list[str]) -> list[tuple[str, Path]]:
    """(label, directory) per ADAPTER argument: NAME=DIR, else the directory's name (its parent's
    for a run's `adapter/`), made unique with a suffix."""
    out, seen = [], {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            name, path = "", spec
        p = Path(path)
        label = name or (p.resolve().parent.name if p.name == "adapter" else p.resolve().name) or "adapter"
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}-{seen[label]}", p))
    return out


def _base_dir(base: str) -> Path:
    from dtrain.model import hub

    return hub.model_dir(base, "--base")


def _run(args: argparse.Namespace) -> int:
    from dtrain.analysis import report, run
    from dtrain.analysis.weights import BaseWeights
    from dtrain.storage.outdir import check_target

    if (args.base_bits or args.quantized_head) and not args.base:
        raise DtrainError("--base-bits/--quantized-head need --base")
    if args.quantized_head and not args.base_bits:
        raise DtrainError("--quantized-head needs --base-bits 8 or 4")
    out = Path(args.out)
    check_target(out, "--out", args.overwrite, kind="dir")
    t0 = time.perf_counter()
    adapters = [run.load_adapter(p, label) for label, p in labelled(args.adapters)]
    base = BaseWeights(_base_dir(args.base), args.base_bits, args.quantized_head) if args.base else None
    result = run.analyze(adapters, base, args.layer, args.seed)
    written = report.write(result, out)
    print(report.markdown(result), end="")
    print(f"\n{len(written)} files written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0
