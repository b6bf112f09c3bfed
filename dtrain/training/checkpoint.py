"""Training checkpoints, for an exact resume.

Nothing of the frozen base is ever written: only the adapter (adapter.py, PEFT's format), the
optimizer state of the LoRA parameters, the scheduler, RNG states and the step.
A training checkpoint, `<output.dir>/checkpoints/step-00000042/`:

    adapter/adapter_config.json        PEFT LoraConfig
    adapter/adapter_model.safetensors  LoRA A and B (full tensors, PEFT keys)
    trainer_state.json                 step, epoch, step_in_epoch, world size, backend, data plan, and
                                       the settings a resume must match (resume_check.py)
    optimizer.safetensors              AdamW exp_avg / exp_avg_sq of every LoRA parameter, FULL tensors
                                       (unsharded, by parameter name: any backend, any world size)
    optimizer.json                     AdamW step per parameter, hyper-parameters, scheduler state
    rng-rank{r}.safetensors            rank r's torch CPU (and its CUDA device's) generator states
    rng-rank{r}.json                   rank r's python `random` and numpy states
    COMPLETE                           written last: step, world size, sha256 of every file above

Writes are atomic (files.publish): every rank writes into `checkpoints/.tmp-step-00000042/` (each
file fsynced), then rank 0 checksums, writes COMPLETE, fsyncs and renames the directory into place
and fsyncs `checkpoints/`. `training.resume: auto` takes the newest checkpoint whose COMPLETE marker
lists files that exist with matching checksums; a truncated or corrupted one is reported in one log
line and skipped. `training.keep_last` newest are kept. Only safetensors and JSON: no pickle.

On preemption (see trainer.PREEMPT_EXIT) rank 0 also writes `<output.dir>/PREEMPTED` (JSON: step,
checkpoint) once the checkpoint is complete, so a job script can tell a preemption from a failure
where a launcher (torchrun) replaces the worker's exit code 75 by its own; the next start removes it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dtrain.backends import collectives
from dtrain.config.schema import Config
from dtrain.errors import DiskFull
from dtrain.lora import ops as lora
from dtrain.lora.peft_format import ADAPTER_FILES, ADAPTER_WEIGHTS, gather_adapter, write_adapter
from dtrain.storage import files, outdir
from dtrain.training import resume_check
from dtrain.training.state_tree import flatten_state, rng_state, set_rng_state, unflatten_state

log = logging.getLogger(__name__)
PREEMPTED = "PREEMPTED"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 2  # 1: per-rank optimizer shards (refused on resume, see resume_check)
OPTIM_TENSORS, OPTIM_JSON = "optimizer.safetensors", "optimizer.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


# ---- training checkpoints -------------------------------------------------------------------


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step-XXXXXXXX` directory, oldest first (complete or not)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def trainer_state(cfg: Config, backend, step: int, plan, tokenizer=None) -> dict:
    """Step, data position and the facts a resume must agree with."""
    position = plan.position(step) if plan is not None else {}
    data = (
        {
            "n_examples": plan.n_examples,
            "global_batch": plan.global_batch,
            "seed": plan.seed,
            "micro_batch": plan.micro_batch,
            "grad_accum": plan.grad_accum,
            "world": plan.world,
            "group_by_length": plan.lengths is not None,
        }
        if plan
        else {}
    )
    return {
        "format": FORMAT_VERSION,
        "step": step,
        **position,
        "world_size": backend.world_size,
        "backend": cfg.backend.name,
        "adapter_name": cfg.lora.adapter_name,
        "data": data,
        "settings": resume_check.settings(cfg, backend.model, tokenizer),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"


def _required_files(info: dict) -> list[str]:
    """The files a checkpoint of this kind must hold (every rank's RNG, for a training checkpoint)."""
    if info.get("kind") != "training":
        return list(ADAPTER_FILES)
    world = range(int(info.get("world_size", 1)))
    if int(info.get("checkpoint_format", 1)) < 2:  # verified as written, so that resume can name the format
        ranks = [f"{k}-rank{r}.{e}" for r in world for k in ("optim", "rng") for e in ("safetensors", "json")]
        return [f"adapter/{f}" for f in ADAPTER_FILES] + [TRAINER_STATE, *ranks]
    ranks = [f for r in world for f in _rank_files(r)]
    return [f"adapter/{f}" for f in ADAPTER_FILES] + [TRAINER_STATE, OPTIM_TENSORS, OPTIM_JSON, *ranks]


def verify(directory: Path) -> str | None:
    """None when training checkpoint or adapter `directory` is complete and intact, else the
    reason it is not (one line)."""
    return files.verify(directory, _required_files)


def _write_rank_state(backend, tmp: Path) -> None:
    """This rank's RNG state into `tmp` (every rank)."""
    rng_plain, rng_tensors = rng_state()
    rng_st, rng_js = _rank_files(backend.rank)
    files.write_tensors(tmp / rng_st, rng_tensors)
    files.write_json(tmp / rng_js, rng_plain)


def save_training(
    backend,
    cfg: Config,
    out: Path,
    step: int,
    plan,
    preempted: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    extra: dict | None = None,
) -> Path | None:
    """Training checkpoint of `step` (adapter, optimizer, scheduler, RNG, data position); every rank
    calls it. Returns its directory (None when there is no adapter to save: mode full). `tensors`:
    the adapter's, when the caller has already gathered them; `extra`: more trainer state (JSON).
    Out of disk space, the partial directory is removed and the run ends in one line saying where
    and how much was needed; older checkpoints are pruned only after the new one is complete."""
    tensors = gather_adapter(backend, cfg.lora.adapter_name) if tensors is None else tensors
    if not tensors:
        if backend.rank == 0:
            log.warning("mode %s has no LoRA adapter: training checkpoint of step %d skipped", cfg.mode, step)
        return None
    final = checkpoint_dir(out, step)
    tmp = files.staging_dir(final)
    optim_tree, optim_tensors = flatten_state(backend.full_optimizer_state())  # collective: every rank

    def write_shared() -> None:
        (tmp / "adapter").mkdir()
        write_adapter(backend.model, cfg, tensors, tmp / "adapter")
        files.write_tensors(tmp / OPTIM_TENSORS, optim_tensors)
        files.write_json(tmp / OPTIM_JSON, optim_tree)
        files.write_json(tmp / TRAINER_STATE, {**trainer_state(cfg, backend, step, plan, tokenizer), **(extra or {})})

    def finish() -> None:
        files.publish(
            tmp,
            final,
            {"kind": "training", "step": step, "world_size": backend.world_size, "checkpoint_format": FORMAT_VERSION},
        )
        log.info("checkpoint of step %d written: %s", step, final)
        prune(out, cfg.training.keep_last, step)
        if preempted:
            _write_preempted(out, step)

    try:
        collectives.together(backend, lambda: files.fresh_dir(tmp))
        collectives.together(backend, lambda: _write_rank_state(backend, tmp), every_rank=True)
        collectives.together(backend, write_shared)
        collectives.together(backend, finish)
    except DiskFull as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial copy: give its space back
        need = sum(t.numel() * t.element_size() for t in [*tensors.values(), *optim_tensors.values()])
        error = DiskFull(_disk_full_line(out, step, final, need))
        error.local = e.local  # printed by the rank that ran out of space
        raise error from None
    return final


def _disk_full_line(out: Path, step: int, final: Path, need: int) -> str:
    free = shutil.disk_usage(final.parent).free
    older = [(s, p) for s, p in list_checkpoints(out) if s < step and verify(p) is None]
    keep = (
        f"the previous checkpoint {older[-1][1]} is intact (training.resume=auto continues from it)"
        if older
        else "no earlier checkpoint exists"
    )
    return (
        f"checkpoint of step {step} not written: no space left on device in {final.parent} (it needs "
        f"about {need / 2**20:.2f} MiB, {free / 2**20:.2f} MiB free); {keep}"
    )


def _write_preempted(out: Path, step: int, saved: bool = True) -> None:
    where = str(checkpoint_dir(out, step)) if saved else None
    files.write_json(Path(out) / PREEMPTED, {"step": step, "checkpoint": where})


def mark_preempted(backend, out: Path, step: int, saved: bool = True) -> None:
    """Write the PREEMPTED marker for the checkpoint of `step`, already saved (every rank calls it);
    `saved` False: preempted before the first step, no checkpoint (the marker's checkpoint is null)."""
    collectives.together(backend, lambda: _write_preempted(out, step, saved))


def read_state(out: Path, step: int) -> dict:
    """trainer_state.json of the checkpoint of `step`."""
    return json.loads((checkpoint_dir(out, step) / TRAINER_STATE).read_text())


def prune(out: Path, keep: int, current: int) -> None:
    """Keep the `keep` newest checkpoints up to `current`; remove newer (stale) ones and leftovers."""
    found = list_checkpoints(out)
    stale = [p for s, p in found if s > current]
    old = [p for s, p in found if s <= current][:-keep]
    for p in stale:
        log.warning("removing %s: newer than the checkpoint just written (left by an earlier run)", p)
    for p in stale + old:
        shutil.rmtree(p, ignore_errors=True)
    for p in (Path(out) / "checkpoints").glob(".*-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def find_latest(out: Path) -> tuple[int, Path] | None:
    """The newest complete, intact checkpoint; each one skipped is reported in one log line."""
    for step, path in reversed(list_checkpoints(out)):
        reason = verify(path)
        if reason is None:
            return step, path
        log.warning("checkpoint %s skipped: %s", path, reason)
    return None


def _agree_on_step(backend, step: int) -> int:
    """Rank 0's choice, on every rank (-1: none)."""
    mine = torch.tensor(float(step if backend.rank == 0 else 0), dtype=torch.float64)
    return int(round(float(backend.all_reduce_sum(mine).item())))


def load_training_state(backend, cfg: Config, path: Path, state: dict) -> None:
    """Restore LoRA parameters, the optimizer/scheduler (resharded for this run's backend and world
    size) and this rank's RNG from checkpoint `path`, whose trainer_state.json is `state`."""
    name = cfg.lora.adapter_name
    adapter = load_file(str(path / "adapter" / ADAPTER_WEIGHTS))
    backend.load_full_state({lora.from_peft_key(k, name): t for k, t in adapter.items()})
    optim = unflatten_state(json.loads((path / OPTIM_JSON).read_text()), load_file(str(path / OPTIM_TENSORS)))
    backend.load_full_optimizer_state({**optim, "step": state["step"], "world_size": state["world_size"]})
    saved_world = int(state["world_size"])
    if backend.rank < saved_world:
        rng_st, rng_js = _rank_files(backend.rank)
        set_rng_state(json.loads((path / rng_js).read_text()), load_file(str(path / rng_st)))
    if saved_world != backend.world_size and backend.rank == 0:
        log.warning(
            "resume: %d rank(s) wrote %s, this run has %d: optimizer state resharded; ranks without "
            "a saved RNG state keep their seed (dropout masks differ from an uninterrupted run's)",
            saved_world,
            path.name,
            backend.world_size,
        )


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics rows of steps after `step` (written by the run that died after its last
    checkpoint; the resumed run writes them again), so metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) != len(lines):
        files.write_text_atomic(path, "".join(keep))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def maybe_resume(backend, cfg: Config, out: Path, plan=None, tokenizer=None) -> int:
    """The step to start from: 0, or (resume auto) that of the newest complete checkpoint, whose
    LoRA parameters, optimizer, scheduler and RNG states are restored on every rank."""
    out = Path(out)
    if backend.rank == 0:
        (out / PREEMPTED).unlink(missing_ok=True)
    if cfg.training.resume != "auto":
        return 0
    found = find_latest(out) if backend.rank == 0 else None
    step = _agree_on_step(backend, found[0] if found else -1)
    if step < 0:
        if backend.rank == 0:
            log.info("resume: no complete checkpoint in %s; starting at step 0", out / "checkpoints")
        return 0
    path = checkpoint_dir(out, step)
    state = json.loads((path / TRAINER_STATE).read_text())
    resume_check.check(state, cfg, backend.model, plan, path, tokenizer)
    load_training_state(backend, cfg, path, state)
    if backend.rank == 0:
        trim_metrics(out / outdir.METRICS, step)
        log.info(
            "resumed from %s: step %d (epoch %s, step %s of the epoch)",
            path,
            step,
            state.get("epoch"),
            state.get("step_in_epoch"),
        )
    return step
