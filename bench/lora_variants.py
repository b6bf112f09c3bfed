"""One adapted linear layer, forward + backward: plain LoRA, dtrain's DoRA and PEFT's DoRA.

    python bench/lora_variants.py [--in 2048 --out 2048 --r 16 --tokens 2048 --iters 10]

Printed per variant: median wall time of forward + backward (rounds rotate the order, so a load
change on a shared machine hits all alike) and the bytes autograd keeps for backward (saved
tensors with one row per token, by storage; weights and their views are not counted). Transient
temporaries (PEFT's [out, in] B A and eye(in)) are not measured. Also: max |dtrain - PEFT| of the
DoRA outputs. Machine, date and versions are printed with the table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python bench/lora_variants.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from dtrain import lora  # noqa: E402


def build(args, variant: str):
    torch.manual_seed(0)
    base = nn.Linear(args.in_features, args.out_features, bias=False)
    if variant == "peft_dora":
        import peft

        class Wrap(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = base

            def forward(self, x):
                return self.proj(x)

        model = peft.get_peft_model(
            Wrap(), peft.LoraConfig(r=args.r, lora_alpha=args.r, use_dora=True, target_modules=["proj"])
        )
        layer = model.base_model.model.proj
    else:
        layer = lora.LoRALinear(base, "proj")
        layer.add_adapter(lora.AdapterSpec(r=args.r, alpha=args.r, use_dora=variant == "dora"))
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    return layer.train()


def saved_bytes(layer, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.dim() > 1 and t.shape[0] == x.shape[0]:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--in", dest="in_features", type=int, default=2048)
    p.add_argument("--out", dest="out_features", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    variants = ["lora", "dora", "peft_dora"]
    layers = {v: build(args, v) for v in variants}
    with torch.no_grad():  # the same A everywhere (B is seeded alike; m starts at ||W0||_row in both)
        for v in ("lora", "peft_dora"):
            layers[v].lora_A["default"].weight.copy_(layers["dora"].lora_A["default"].weight)
    x = torch.randn(args.tokens, args.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    times = {v: [] for v in variants}
    for i in range(args.iters + 2):
        for v in variants[i % 3 :] + variants[: i % 3]:
            t0 = time.perf_counter()
            layers[v](x).sum().backward()
            if i >= 2:
                times[v].append(time.perf_counter() - t0)
    with torch.no_grad():
        diff = (layers["dora"](x) - layers["peft_dora"](x)).abs().max().item()
    print(
        f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
        f"threads={torch.get_num_threads()} torch {torch.__version__}"
    )
    print(
        f"# in={args.in_features} out={args.out_features} r={args.r} tokens={args.tokens} fp32, "
        f"{args.iters} rounds; max |dtrain DoRA - PEFT DoRA| = {diff:.2e}"
    )
    print(f"{'variant':<10} {'fwd+bwd ms (median)':>20} {'saved for backward MiB':>24}")
    for v in variants:
        print(f"{v:<10} {1e3 * common.median(times[v]):>20.1f} {saved_bytes(layers[v], x) / 2**20:>24.2f}")


if __name__ == "__main__":
    main()
