"""`dtrain memory CONFIG [overrides]`: measure full fine-tuning vs LoRA on the real backend.

Launched like `dtrain train` (directly for one process, under torchrun / deepspeed / srun for N
ranks). Each mode runs in the same processes one after the other, with the same backend, world
size, batch and sequence length: build, a few optimizer steps, measure, gather, release the
model and optimizer (the process group stays up). Modes: `full` (every base weight trainable,
same AdamW), `lora` (as configured), and with `--with-8bit` `lora_8bit` (an int8 frozen base).
Every rank measures; rank 0 writes memory_report.md / .json / .png into `--out` (default:
output.dir/memory).
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

from dtrain.config.schema import Config
from dtrain.errors import ConfigError
from dtrain.model import sources

log = logging.getLogger("dtrain")
DEFAULT_STEPS = 3


def add_parser(subparsers: Any) -> None:
    """Register `memory` on an argparse sub-parsers object; sets ``func=run``."""
    p = subparsers.add_parser(
        "memory",
        help="measure memory by category: full fine-tuning vs LoRA, beside the estimate",
        description="Runs the config for a few steps as full fine-tuning and as LoRA (optionally "
        "with an 8-bit base) on the configured backend and world size, measures each "
        "rank's memory by category from the real tensors, and writes "
        "memory_report.md/.json/.png. Launch it like `dtrain train`.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, typed by the schema")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per mode, >= 2 (default {DEFAULT_STEPS})"
    )
    p.add_argument("--out", default=None, help="report directory (default: output.dir/memory)")
    p.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    p.add_argument("--with-8bit", action="store_true", help="also measure LoRA on an int8 base")
    p.set_defaults(func=run)


def mode_configs(cfg: Config, out: Path, steps: int, with_8bit: bool) -> dict[str, tuple[Config, dict]]:
    """name -> (config, {"label", "mode", "bits"}) for each mode to measure, in run order.

    Full fine-tuning always uses the float base (bits 16); LoRA keeps the configured bits; the
    8-bit LoRA run is added when asked, available and not already the configured LoRA run.
    """
    lora_bits = cfg.quantization.bits
    lora_name = "lora" if lora_bits == 16 else f"lora_{lora_bits}bit"
    wanted = {
        "full": ("full", 16, "full FT"),
        lora_name: ("lora", lora_bits, "LoRA" if lora_bits == 16 else f"LoRA {lora_bits}-bit"),
    }
    if with_8bit and lora_bits != 8:
        wanted["lora_8bit"] = ("lora", 8, "LoRA 8-bit")
    if cfg.objective == "dpo":  # the same modes of a preference step (dpo_reference_copy adds full DPO's copy)
        wanted = {
            k: (m, b, label.replace("full FT", "full DPO").replace("LoRA", "LoRA DPO"))
            for k, (m, b, label) in wanted.items()
        }
    return {
        name: (_derive(cfg, mode, bits, out / "runs" / name, steps), {"label": label, "mode": mode, "bits": bits})
        for name, (mode, bits, label) in wanted.items()
    }


def _derive(cfg: Config, mode: str, bits: int, run_dir: Path, steps: int) -> Config:
    """A copy of `cfg` for one mode: mode, bits, a short run, no eval/saves/resume."""
    c = copy.deepcopy(cfg)
    c.mode, c.quantization.bits = mode, bits
    t = c.training
    t.max_steps, t.eval_every, t.memory_every, t.save_every, t.resume = steps, 0, 0, 0, "never"
    c.output.dir = str(run_dir)
    return c


def check_report_dir(out: Path, overwrite: bool) -> None:
    """`out` can take the report: a directory (or none yet) without report files, or --overwrite."""
    from dtrain.memory.report import REPORT_FILES
    from dtrain.storage.outdir import check_target

    check_target(out, "--out", overwrite=True, kind="dir")
    found = [name for name in REPORT_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"--out '{out}': holds an earlier report ({', '.join(found)}); pass --overwrite "
            "to replace it, or another --out"
        )


def run(args: argparse.Namespace) -> int:
    """Measure each mode, then (rank 0) write the report; returns 0."""
    from dtrain.memory import report

    cfg = sources.load_config(args.config, args.overrides)
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: needs >= 2 (Adam's state appears at the first step)")
    out = Path(args.out) if args.out else Path(cfg.output.dir) / "memory"
    check_report_dir(out, args.overwrite)
    modes = mode_configs(cfg, out, args.steps, args.with_8bit)
    measured = measure_modes({name: c for name, (c, _) in modes.items()}, args.steps)
    if cfg.objective == "dpo":
        dpo_reference_copy(measured)
    if measured.rank == 0:
        data = report.build(cfg, measured, {name: info for name, (_, info) in modes.items()}, args.steps)
        if cfg.objective == "dpo":
            data["notes"].append(DPO_NOTE)
        paths = report.write(data, out)
        print(report.markdown(data))
        log.info("memory report: %s, %s, %s", paths["md"], paths["json"], paths["png"])
    return 0


DPO_NOTE = (
    "objective dpo: micro-batch = pairs (2 rows each), each step also runs the reference forward "
    "under no_grad. LoRA DPO's reference is the base with the adapter off: nothing more is held. Full "
    "DPO needs a frozen reference copy of the model; it is not built here (the reference forward ran "
    "through the policy itself) and its frozen weights are counted as one more copy of the policy's "
    "parameters on each rank, sharded alike"
)


def dpo_reference_copy(measured) -> None:
    """Full DPO's frozen reference model: as many bytes per rank as its trainable parameters."""
    for row in measured.modes.get("full", []):
        row["frozen_weights"] = (row.get("frozen_weights") or 0) + row["trainable_params"]
        row["model_states"] = row["model_states"] + row["trainable_params"]


def measure_modes(cfgs: dict, steps: int):
    """Each mode's config in turn in these processes: set up, `steps` steps, gather, release.

    The process group stays up between modes (`backend.release()`); it is torn down after
    the last mode, or on error. Every rank returns every rank's rows.
    """
    from dtrain.memory.measure import Measured, gather_rows, measured_steps
    from dtrain.memory.process import reset_peaks
    from dtrain.training.trainer import Trainer

    modes: dict[str, list[dict[str, float | None]]] = {}
    trainer = None
    try:
        for mode, cfg in cfgs.items():
            if trainer is not None:
                trainer.backend.release()
            trainer = Trainer(cfg)
            reset_peaks(trainer.env.device)
            trainer.setup()
            modes[mode] = gather_rows(trainer.backend, measured_steps(trainer, steps))
        env = trainer.env
        return Measured(env.rank, env.world_size, env.device.type, modes)
    finally:
        if trainer is not None:
            trainer.backend.release()
            trainer.cleanup()
