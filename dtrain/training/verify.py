"""`dtrain verify`: checks a user runs on their own cluster before a long job (docs/verify.md).

With the config's model, backend and world size (under the launcher of the real job), every rank:
(1) trains K steps, and rank 0 trains the same K steps in one process on the same global batches
(the single backend, grad_accum x ranks micro-batches), comparing losses and the adapters;
(2) checks that every trainable LoRA tensor received a non-zero gradient and moved;
(3) saves the adapter and reloads it into the one-process model with dtrain and (when installed)
with PEFT on the same base, comparing logits with the N-rank model's;
(4) round-trips the optimizer state through a training checkpoint;
(5) reports the quantization error of a quantized base against its float weights.
Dropout is off (its masks differ per rank by design); the one-process copy holds the whole model,
so the model must fit one device (a slice of a larger model is not built yet).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dtrain import backends
from dtrain.backends import collectives
from dtrain.backends.env import DistEnv
from dtrain.config.schema import Config
from dtrain.data import BatchPlan
from dtrain.lora import base_weight, ops as lora, peft_format as adapter
from dtrain.model import build as model_lib, layers
from dtrain.training import checkpoint, step as step_lib

TOL = {"fp32": 1e-4, "bf16": 3e-2}  # relative loss / absolute logit tolerance per dtype
QUANT_TOL = {8: 0.02, 4: 0.15}  # largest relative Frobenius error of a quantized base layer
OUTLIER_SHARE = 1e-3  # adapter elements that may differ by more than TOL (see compare_adapters)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class GradWatch(step_lib.StepWatch):
    """Sum over steps of each trainable tensor's squared gradient (global: summed over ranks)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.names = [n for n, p in backend.model.named_parameters() if p.requires_grad]
        self.sq = torch.zeros(len(self.names), dtype=torch.float64)

    def before_optimizer_step(self) -> None:
        local = self.backend.local_grads()
        vec = torch.tensor(
            [float(local[n].double().pow(2).sum()) if n in local else 0.0 for n in self.names], dtype=torch.float64
        )
        self.sq += self.backend.all_reduce_sum(vec)


def verify_config(cfg: Config, steps: int, out: Path) -> Config:
    t = dataclasses.replace(
        cfg.training, max_steps=steps, eval_every=0, save_every=0, eval_generate=0, resume="never", memory_every=0
    )
    return dataclasses.replace(
        cfg,
        training=t,
        lora=dataclasses.replace(cfg.lora, dropout=0.0),
        output=dataclasses.replace(cfg.output, dir=str(out / "ranks"), overwrite=True),
        logging=dataclasses.replace(cfg.logging, backends=["jsonl"], loss_curve=False),
    )


def train_k(backend, data, plan: BatchPlan, steps: int, watch: GradWatch | None = None) -> list[float]:
    """`steps` optimizer steps of this rank's share of `plan`'s global batches; the losses."""
    out = []
    for s in range(steps):
        picks = [plan.indices(s, m, backend.rank) for m in range(plan.grad_accum)]
        out.append(step_lib.train_step(backend, [data.take(i) for i in picks], watch=watch)["loss"])
    return out


def reference(cfg: Config, env: DistEnv, data, plan: BatchPlan, total: int, steps: int):
    """The same steps in one process (single backend): (backend, losses). Rank 0 only."""
    one = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, name="none"))
    solo = backends.create(one, DistEnv(0, 1, 0, env.device, env.dist_backend))
    solo.build()
    solo.setup_optimizer(total)
    plan1 = BatchPlan(plan.n_examples, plan.micro_batch, plan.grad_accum * plan.world, 1, plan.seed)
    return solo, train_k(solo, data, plan1, steps)


def compare_losses(ours: list[float], theirs: list[float], tol: float, world: int) -> Check:
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))
    ok = all(math.isfinite(x) for x in ours) and rel <= tol
    return Check(
        f"losses, {world} rank(s) vs 1 process",
        ok,
        f"{len(ours)} steps, max relative difference {rel:.2e} (tolerance {tol:.0e}); "
        f"last loss {ours[-1]:.6f} vs {theirs[-1]:.6f}",
    )


def compare_adapters(ours: dict, theirs: dict, tol: float, step_bound: float) -> Check:
    """Every element within `tol`, but for at most OUTLIER_SHARE of them within `step_bound`, the
    most the K AdamW steps move an element (K x the largest lr). Why: the ranks sum gradients in
    another order (~1e-7 relative), and where an element's gradient is near AdamW's eps its update
    lr * m / (sqrt(v) + eps) hangs on those last bits, anywhere in [0, lr] (seen on SmolLM2 under
    ZeRO-3: 1.1e-4 at lr 1e-2). A real fault (a dropped or wrongly reduced gradient) moves whole
    tensors, far more than 0.1% of the elements."""
    if ours.keys() != theirs.keys():
        return Check(
            "adapter after training, N ranks vs 1 process",
            False,
            f"tensor names differ: {sorted(ours.keys() ^ theirs.keys())[:3]}",
        )
    diff = torch.cat([(ours[k].double() - theirs[k].double()).abs().flatten() for k in ours])
    top, over = float(diff.max()), int((diff > tol).sum())
    ok = over <= OUTLIER_SHARE * diff.numel() and top <= step_bound
    return Check(
        "adapter after training, N ranks vs 1 process",
        ok,
        f"{len(ours)} tensors, max absolute difference {top:.2e} (tolerance {tol:.0e}); {over} of "
        f"{diff.numel()} elements above it (allowed: {OUTLIER_SHARE:.1%}, each within K x lr = "
        f"{step_bound:.0e})",
    )


def gradients_and_moves(watch: GradWatch, before: dict, after: dict) -> list[Check]:
    lora_names = [n for n in watch.names if lora.is_lora_param(n)]
    no_grad = [n for n, v in zip(watch.names, watch.sq.tolist()) if n in lora_names and not v > 0]
    still = [n for n in lora_names if torch.equal(before[n], after[n])]
    norms = [math.sqrt(v) for n, v in zip(watch.names, watch.sq.tolist()) if n in lora_names]
    return [
        Check(
            "every LoRA tensor got a gradient",
            not no_grad,
            f"{len(lora_names) - len(no_grad)}/{len(lora_names)} non-zero (smallest norm {min(norms):.2e})"
            + (f"; none: {', '.join(no_grad[:3])}" + (" ..." if len(no_grad) > 3 else "") if no_grad else ""),
        ),
        Check(
            "every LoRA tensor moved",
            not still,
            f"{len(lora_names) - len(still)}/{len(lora_names)} changed"
            + (f"; unchanged: {', '.join(still[:3])}" + (" ..." if len(still) > 3 else "") if still else ""),
        ),
    ]


def optimizer_round_trip(backend, cfg: Config, out: Path, step: int, plan) -> Check:
    """Save a training checkpoint, reload it into the same backend, compare the full optimizer state."""
    before = backend.full_optimizer_state()
    path = checkpoint.save_training(backend, cfg, out, step, plan)
    checkpoint.load_training_state(backend, cfg, path, checkpoint.read_state(out, step))
    after = backend.full_optimizer_state()
    n, bad, empty = 0, [], 0
    for name, st in before["params"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            n += 1
            got = after["params"].get(name, {}).get(k)
            if got is None or not torch.equal(got, st[k]):
                bad.append(f"{name}/{k}")
            empty += int(not st[k].abs().sum() > 0)
    got_steps = {p: st["step"] for p, st in after["params"].items()}
    steps_ok = all(got_steps.get(p) == st["step"] for p, st in before["params"].items())
    ok = n > 0 and not bad and steps_ok and empty == 0 and after["scheduler"] == before["scheduler"]
    return Check(
        "optimizer state through a checkpoint",
        ok,
        f"{n - len(bad)}/{n} AdamW moments equal after reload, {empty} all-zero, steps "
        f"{'equal' if steps_ok else 'differ'}" + (f"; differ: {bad[0]}" if bad else ""),
    )


@torch.no_grad()
def logits(backend, batch: dict) -> torch.Tensor:
    with backend.evaluating():
        return backend.forward(batch).float().cpu()


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model with `model`'s base weights (quantized layers dequantized): for PEFT."""
    plain = copy.deepcopy(model)
    lora.unwrap(plain)
    for name, m in list(plain.named_modules()):
        if layers.is_quantized(m):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, base_weight.dequantized_linear(m))
    return plain.eval()


def reload_checks(solo, cfg: Config, adapter_dir: Path, sharded: torch.Tensor, batch: dict, tol: float) -> list[Check]:
    """The saved adapter in the one-process model (dtrain) and on the same base with PEFT."""
    _, tensors = adapter.read_adapter(adapter_dir)
    name = cfg.lora.adapter_name
    solo.load_full_state({lora.from_peft_key(k, name): t for k, t in tensors.items()})
    mine = logits(solo, batch)
    d = float((mine - sharded).abs().max())
    out = [
        Check(
            "adapter reloaded by dtrain: logits",
            d <= tol,
            f"max |difference| {d:.2e} vs the N-rank model (tolerance {tol:.0e})",
        )
    ]
    try:
        import peft
    except ImportError:
        return out + [Check("adapter reloaded by PEFT: logits", True, "skipped: peft is not installed")]
    theirs = peft.PeftModel.from_pretrained(plain_model(solo.model), str(adapter_dir)).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        got = theirs(**inputs).logits.float()
        with theirs.disable_adapter():
            effect = float((theirs(**inputs).logits.float() - got).abs().max())  # not a vacuous comparison
    d = float((got - mine).abs().max())
    return out + [
        Check(
            "adapter reloaded by PEFT: logits",
            d <= tol and effect > 0,
            f"max |difference| {d:.2e} vs dtrain's (tolerance {tol:.0e}); the adapter moves them by up to {effect:.2e}",
        )
    ]


def quantization_error(solo, cfg: Config) -> Check | None:
    """Relative Frobenius error of every quantized base layer against the float weight it came from."""
    bits = cfg.quantization.bits
    if bits >= 16:
        return None
    src = model_lib.base_source(cfg.model, solo.model, cfg.training.seed)
    src = getattr(src, "base", src)  # the float weights under the on-the-fly quantizer
    errs = []
    for name, m in solo.model.named_modules():
        if layers.is_quantized(m):
            w = src.read(f"{name}.weight").float()  # the source maps the wrapped name to its key
            errs.append(float((m.dequantized_weight() - w).norm() / w.norm().clamp_min(1e-12)))
    worst = max(errs)
    return Check(
        f"quantization error of the {bits}-bit base",
        worst <= QUANT_TOL[bits],
        f"{len(errs)} layers, relative error mean {sum(errs) / len(errs):.4f}, max {worst:.4f} "
        f"(tolerance {QUANT_TOL[bits]})",
    )


def save_adapter(backend, cfg: Config, out: Path) -> Path:
    path = out / "adapter"
    adapter.save_adapter(backend, cfg, path)
    return path


def together_result(backend, fn) -> list[Check]:
    """Run `fn` on rank 0 (the others wait; a failure ends every rank) and return its checks there."""
    box: list[Check] = []
    collectives.together(backend, lambda: box.extend(fn()), what="verify check")
    return box
