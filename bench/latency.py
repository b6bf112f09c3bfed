"""Inference latency: base model vs merged LoRA vs unmerged LoRA (bench/run.py runs it too).

    python bench/latency.py --arch ARCH.json [--batch 1 --seq 256 --iters 30 --warmup 3]
                            [--dtype fp32|bf16] [--device auto|cpu|cuda] [--out RESULT.json]

Three models with the same random base weights (a Llama-shaped HF model built from the inline
config, seeded):

* ``base``: the model as built;
* ``unmerged``: a copy with dtrain's LoRA (``lora.inject``, r=8 on q_proj and v_proj) and a
  non-zero B, so every adapted layer computes ``W0 x + (alpha/r) B A x`` (the overhead LoRA adds
  when it is not merged);
* ``merged``: a copy of ``unmerged`` after ``lora.merge(model); lora.unwrap(model)``: the update is
  folded into W0 and every ``LoRALinear`` is replaced by its base ``nn.Linear``, so the module tree
  is exactly the base's (checked: same module names and types). The paper's claim is zero added
  latency: merged must equal base within noise.

Timing: ``torch.inference_mode``, a fixed batch of random token ids, ``warmup`` untimed passes of
each model, then ``iters`` rounds; each round times one forward of each model, in an order that
rotates every round, so that a load change on a shared machine hits all three alike. On CUDA each
pass is synchronized. Reported: the median (and min, p90) per model, and merged / base and
unmerged / base ratios of the medians. The merged logits are checked against the unmerged ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/latency.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, help="JSON file: the inline HF config (model_type + sizes)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=30, help="timed rounds (one pass of each model per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes of each model first")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")
    return p.parse_args(argv)


def module_tree(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def build(arch: dict, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.config.use_cache = False
    return model.eval()


def lora_models(base: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    """(unmerged, merged, names of the adapted layers): copies of `base` with a non-zero LoRA update."""
    from dtrain import lora

    unmerged = copy.deepcopy(base)
    names = lora.select_targets(unmerged, args.lora_targets.split(","), None)
    spec = lora.AdapterSpec(name="default", r=args.lora_r, alpha=args.lora_alpha, dropout=0.0, init_seed=args.seed)
    lora.inject(unmerged, names, spec)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for _, m in lora.lora_modules(unmerged):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)  # a trained-looking, non-zero update
    unmerged = unmerged.to(device).eval()
    merged = copy.deepcopy(unmerged)
    lora.merge(merged)
    lora.unwrap(merged)
    return unmerged, merged.eval(), names


def measure(models: dict, ids: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict:
    """Logit differences, then `iters` rounds in rotating order after `warmup` passes: seconds per model."""

    def forward(model: torch.nn.Module) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    def timed(model: torch.nn.Module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        forward(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        merged_logits = forward(models["merged"]).float()
        diff = (merged_logits - forward(models["unmerged"]).float()).abs().max().item()
        moved = (merged_logits - forward(models["base"]).float()).abs().max().item()  # the update is really there
        for _ in range(args.warmup):
            for model in models.values():
                forward(model)
        times: dict[str, list[float]] = {k: [] for k in models}
        order = list(models)
        for i in range(args.iters):
            rot = order[i % len(order) :] + order[: i % len(order)]
            for key in rot:
                times[key].append(timed(models[key]))
    return {
        "merged_vs_unmerged_max_abs_diff": diff,
        "merged_vs_base_max_abs_diff": moved,
        **{k: common.time_stats(v) for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else (args.device if args.device != "auto" else "cpu")
    )
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    arch = json.loads(Path(args.arch).read_text())

    base = build(arch, dtype, device, args.seed)
    base_tree = module_tree(base)
    unmerged, merged, names = lora_models(base, args, device)
    same_tree = module_tree(merged) == base_tree
    ids = torch.randint(
        3, int(arch["vocab_size"]), (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 2)
    ).to(device)
    measured = measure({"base": base, "merged": merged, "unmerged": unmerged}, ids, device, args)
    result = {
        "device": str(device),
        "dtype": dtype_name,
        "batch": args.batch,
        "seq": args.seq,
        "iters": args.iters,
        "warmup": args.warmup,
        "lora_layers": len(names),
        "r": args.lora_r,
        "threads": torch.get_num_threads(),
        "merged_tree_equals_base": same_tree,
        **measured,
    }
    result["merged_over_base"] = result["merged"]["median_s"] / result["base"]["median_s"]
    result["unmerged_over_base"] = result["unmerged"]["median_s"] / result["base"]["median_s"]
    text = common.write_json(args.out, result) if args.out else json.dumps(result, indent=1)
    print(text)
    if not same_tree:
        print("latency: the merged model's module tree differs from the base's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
