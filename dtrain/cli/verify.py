"""`dtrain verify CONFIG [overrides]`: the checks of dtrain/training/verify.py on this cluster, under the
launcher of the real job; prints a pass/fail table (rank 0) and exits 1 when a check fails."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dtrain.errors import ConfigError
from dtrain.storage import files


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check sharded training of a config against one process (run before a long job)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, typed by the schema")
    p.add_argument(
        "--steps", type=int, default=3, help="optimizer steps compared (at least 2: A's first gradient is 0)"
    )
    p.add_argument("--out", help="working directory (default: <output.dir>-verify; replaced)")
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from dtrain.model import sources
    from dtrain.training import preempt

    preempt.install()
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: at least 2 (B starts at zero, so A's first gradient is zero)")
    cfg = sources.load_config(args.config, args.overrides)
    out = Path(args.out or f"{cfg.output.dir.rstrip('/')}-verify")
    from dtrain.training import trainer, verify

    vcfg = verify.verify_config(cfg, args.steps, out)
    run = trainer.Trainer(vcfg)
    try:
        run.setup()
        checks = _checks(run, vcfg, args.steps, out)
    finally:
        run.cleanup()
    if run.env.is_main:
        print(
            table(
                checks,
                f"{args.config}, backend {cfg.backend.name}, {run.env.world_size} rank(s), "
                f"{args.steps} steps, {cfg.model.dtype}, {cfg.quantization.bits}-bit base",
            )
        )
        files.write_text_atomic(out / "verify.json", json.dumps([c.__dict__ for c in checks], indent=1))
    return 0 if all(c.ok for c in checks) else 1


def _checks(run, cfg, steps: int, out: Path) -> list:
    import torch  # here, not at the top: every `dtrain` command builds this parser

    from dtrain.lora import peft_format as adapter
    from dtrain.training import verify

    b, name = run.backend, cfg.lora.adapter_name
    before = adapter.gather_adapter(b, name)
    watch = verify.GradWatch(b)
    losses = verify.train_k(b, run.train_data, run.plan, steps, watch)
    after = adapter.gather_adapter(b, name)
    batch = run.train_data.take(torch.arange(min(cfg.training.micro_batch_size, len(run.train_data))))
    sharded = verify.logits(b, batch)  # collective
    adapter_dir = verify.save_adapter(b, cfg, out)
    moved = verify.gradients_and_moves(watch, before, after)
    optim = verify.optimizer_round_trip(b, cfg, Path(cfg.output.dir), steps, run.plan)
    tol = verify.TOL[cfg.model.dtype]
    bound = steps * cfg.training.lr * max(1.0, cfg.lora.loraplus_lr_ratio or 1.0)  # LoRA+: B's lr x ratio

    def on_rank0() -> list:
        solo, ref = verify.reference(cfg, run.env, run.train_data, run.plan, run.total_steps, steps)
        out_ = [
            verify.compare_losses(losses, ref, tol, b.world_size),
            verify.compare_adapters(after, adapter.gather_adapter(solo, name), tol, bound),
        ]
        out_ += [*moved, optim, *verify.reload_checks(solo, cfg, adapter_dir, sharded, batch, tol)]
        q = verify.quantization_error(solo, cfg)
        return out_ + ([q] if q is not None else [])

    return verify.together_result(b, on_rank0)


def table(checks: list, title: str) -> str:
    """The pass/fail table (docs/verify.md shows one)."""
    width = max(len(c.name) for c in checks)
    lines = [f"dtrain verify: {title}", f"{'check':<{width}}  result  numbers"]
    lines += [f"{c.name:<{width}}  {'pass' if c.ok else 'FAIL':<6}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    lines.append(
        f"verify: all {len(checks)} checks passed" if not failed else f"verify: FAILED {failed} of {len(checks)} checks"
    )
    return "\n".join(lines)
