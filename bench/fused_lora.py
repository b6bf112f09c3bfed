"""Fused LoRA A where inputs are shared: q/k/v (and gate/up) read the same x, so their A matrices
could be one concatenated matmul. Times forward + backward of the separate A products against one
concatenated product (the B products and the frozen weights are the same either way), and checks
that both give the same outputs and gradients.

    .venv/bin/python bench/fused_lora.py --tokens 1024 --hidden 576 --r 16 --reps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/fused_lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def separate(x, As):
    return [x @ A.t() for A in As]


def fused(x, As):
    import torch

    return list((x @ torch.cat(As).t()).split([A.shape[0] for A in As], dim=-1))


def timed(fn, x, As, reps: int) -> float:
    import torch

    out = []
    for i in range(reps + 3):
        for A in As:
            A.grad = None
        t0 = time.perf_counter()
        ys = fn(x, As)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        if i >= 3:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--shared", type=int, default=3, help="projections reading the same x (q/k/v: 3, gate/up: 2)")
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args(argv)
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.hidden, generator=g).requires_grad_()
    As = [torch.randn(a.r, a.hidden, generator=g).requires_grad_() for _ in range(a.shared)]
    ys, yf = separate(x, As), fused(x, As)
    assert all(torch.allclose(s, f, rtol=1e-5, atol=1e-5) for s, f in zip(ys, yf))
    ts, tf = timed(separate, x, As, a.reps), timed(fused, x, As, a.reps)
    print(
        f"tokens {a.tokens}, hidden {a.hidden}, r {a.r}, {a.shared} shared projections, "
        f"{torch.get_num_threads()} threads: separate {ts * 1e3:.3f} ms, fused {tf * 1e3:.3f} ms "
        f"(fused / separate {tf / ts:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
