"""Adapter-only checkpoints in PEFT's format, and training checkpoints for exact resume.

Nothing of the frozen base is ever written: only the LoRA A and B tensors (gathered by
`backend.full_state` with a LoRA-only filter, so ZeRO-3 gathers and FSDP2 unshards only those),
the optimizer state of the LoRA parameters, the scheduler, RNG states and the step.

An adapter directory (`<output.dir>/adapter/`, and `adapter/` inside each training checkpoint) is
what PEFT's `save_pretrained` writes: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's key names (`base_model.model.<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained(base, dir)` loads it, and `load_adapter` loads PEFT's adapters.

A training checkpoint, `<output.dir>/checkpoints/step-00000042/`:

    adapter/adapter_config.json        PEFT LoraConfig
    adapter/adapter_model.safetensors  LoRA A and B (full tensors, PEFT keys)
    trainer_state.json                 step, epoch, step_in_epoch, world size, backend, data plan
    optim-rank{r}.safetensors          rank r's optimizer-state tensors (its shard under FSDP2/ZeRO-3)
    optim-rank{r}.json                 rank r's optimizer + scheduler state (plain data; tensors by key)
    rng-rank{r}.safetensors            rank r's torch CPU (and its CUDA device's) generator states
    rng-rank{r}.json                   rank r's python `random` and numpy states
    COMPLETE                           written last: step, world size, sha256 of every file above

Writes are atomic: every rank writes into `checkpoints/.tmp-step-00000042/` (each file fsynced),
then rank 0 checksums, writes COMPLETE, fsyncs and renames the directory into place and fsyncs
`checkpoints/`. `training.resume: auto` takes the newest checkpoint whose COMPLETE marker lists
files that exist with matching checksums; a truncated or corrupted one is reported in one log
line and skipped. `training.keep_last` newest are kept. Only safetensors and JSON: no pickle.

On preemption (see trainer.PREEMPT_EXIT) rank 0 also writes `<output.dir>/PREEMPTED` (JSON: step,
checkpoint) once the checkpoint is complete, so a job script can tell a preemption from a failure
where a launcher (torchrun) replaces the worker's exit code 75 by its own; the next start removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dtrain import lora
from dtrain.config import Config
from dtrain.errors import ConfigError, DtrainError
from dtrain.files import fsync_path, write_text_atomic

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MARKER = "COMPLETE"
PREEMPTED = "PREEMPTED"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


# ---- files ----------------------------------------------------------------------------------

def write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file and fsync it. An empty tensor is refused, never written.

    An empty tensor in a state to save is an unmaterialized shard (a ZeRO-3 parameter read outside
    a gather is a shape-[0] placeholder): writing it would silently produce a broken file.
    """
    for key, t in tensors.items():
        if t.numel() == 0:
            raise ValueError(f"refusing to write '{key}' of shape {list(t.shape)} to {path.name}: an empty "
                             "(unmaterialized) tensor; gather the full parameter first")
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path), metadata)
    fsync_path(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(final: Path) -> Path:
    """The temporary directory, next to `final`, that is renamed to `final` when complete."""
    return final.parent / f".tmp-{final.name}"


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def publish(tmp: Path, final: Path, info: dict) -> None:
    """Write COMPLETE (info + sha256 of every file) into `tmp`, fsync, rename `tmp` to `final`."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
    sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        fsync_path(d)
    write_json(tmp / MARKER, {**info, "format": FORMAT_VERSION, "files": sums})
    fsync_path(tmp)
    old = None
    if final.exists():  # a stale or corrupt checkpoint of the same step: replace it
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _required_files(info: dict) -> list[str]:
    """The files a checkpoint of this kind must hold (every rank's, for a training checkpoint)."""
    adapter = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    if info.get("kind") != "training":
        return adapter
    ranks = [f for r in range(int(info.get("world_size", 1))) for f in _rank_files(r)]
    return [f"adapter/{f}" for f in adapter] + [TRAINER_STATE, *ranks]


def verify(directory: Path) -> str | None:
    """None when `directory` is complete and intact, else the reason it is not (one line)."""
    marker = directory / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (interrupted write?)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER} marker"
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    missing = [f for f in _required_files(info) if f not in files]
    if missing:
        return f"{MARKER} does not list {missing[0]}"
    for rel, digest in sorted(files.items()):
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its checksum (truncated or corrupted)"
    return None


# ---- adapters (PEFT format) -----------------------------------------------------------------

def _is_adapter_param(param_name: str, adapter: str) -> bool:
    return lora.is_lora_param(param_name) and param_name.endswith(f".{adapter}.weight")


def gather_adapter(backend, adapter: str) -> dict[str, torch.Tensor]:
    """Full CPU tensors of adapter `adapter`'s A and B only, by dtrain name (collective)."""
    return backend.full_state(lambda n: _is_adapter_param(n, adapter))


def target_modules(model: nn.Module, modules: list[str]) -> list[str] | str:
    """PEFT's `target_modules` for exactly `modules`: name suffixes when they select exactly these
    modules in `model`, else a regex that PEFT full-matches against module names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    same_suffix = {n for n in lora.linear_names(model) if n.rsplit(".", 1)[-1] in suffixes}
    if same_suffix == set(modules):
        return suffixes
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def peft_config(cfg: Config, targets: list[str] | str, base_name: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    }


def write_adapter(model: nn.Module, cfg: Config, tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Write gathered A/B tensors (dtrain names) into directory `out` in PEFT's format (one rank)."""
    name = cfg.lora.adapter_name
    peft = {lora.to_peft_key(k, name): t for k, t in tensors.items()}
    write_tensors(out / ADAPTER_WEIGHTS, peft, {"format": "pt"})
    modules = sorted({k.split(".lora_")[0] for k in tensors})
    write_json(out / ADAPTER_CONFIG, peft_config(cfg, target_modules(model, modules), cfg.model.path))


def save_adapter(backend, cfg: Config, out: Path) -> None:
    """Gather only the LoRA tensors of the adapter being trained; rank 0 writes `out` atomically."""
    tensors = gather_adapter(backend, cfg.lora.adapter_name)
    if not tensors:
        if backend.rank == 0:
            log.warning("no LoRA parameters for adapter '%s' (mode %s): no adapter written",
                        cfg.lora.adapter_name, cfg.mode)
        backend.barrier()
        return
    def write() -> None:
        tmp = staging_dir(out)
        _fresh_dir(tmp)
        write_adapter(backend.model, cfg, tensors, tmp)
        publish(tmp, out, {"kind": "adapter"})

    together(backend, write)


def together(backend, fn, every_rank: bool = False) -> None:
    """Run `fn` on rank 0 (or on every rank), then let all ranks learn whether it failed, so that a
    write error on one rank (disk full, permissions) ends every rank instead of leaving the others
    waiting at the next collective. Also a barrier."""
    error: BaseException | None = None
    if every_rank or backend.rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    failed = int(backend.all_reduce_sum(torch.tensor(1.0 if error else 0.0)).item())
    if error is not None:
        if isinstance(error, OSError):
            raise DtrainError(f"checkpoint write failed: {error}") from None
        raise error
    if failed:
        raise DtrainError(f"checkpoint write failed on {failed} other rank(s); see their error")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by PEFT key) of a PEFT LoRA adapter directory."""
    d = Path(directory)
    if not d.is_dir():
        raise DtrainError(f"adapter directory '{d}' not found")
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / f).is_file():
            raise DtrainError(f"adapter directory '{d}': no {f} (a PEFT LoRA adapter has "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads((d / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise DtrainError(f"{d / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    return config, load_file(str(d / ADAPTER_WEIGHTS))


_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out",
                "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters")


def adapter_spec_from_peft(config: dict, name: str, source: str | Path) -> lora.AdapterSpec:
    """The AdapterSpec of a PEFT LoraConfig dict; a clear error for what dtrain does not support."""
    if config.get("peft_type", "LORA") != "LORA":
        raise DtrainError(f"{source}: peft_type {config.get('peft_type')!r} is not LoRA")
    used = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']}")
    if used:
        raise DtrainError(f"{source}: PEFT option(s) {', '.join(used)} not supported by dtrain's LoRA layer")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
    return lora.AdapterSpec(name=name, r=r, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0))


def adapter_modules(tensors: dict[str, torch.Tensor], source: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A": A, "lora_B": B}} from PEFT-keyed adapter tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise DtrainError(f"{source}: tensor '{key}' is not a LoRA A/B weight of a linear layer")
        out.setdefault(m.group(1), {})[m.group(2)] = t
    for module, ab in out.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise DtrainError(f"{source}: module '{module}' has only {', '.join(ab)}")
    return out


def _check_shapes(model: nn.Module, modules: dict, spec: lora.AdapterSpec, source: str | Path) -> None:
    for name, ab in modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise DtrainError(f"{source}: the model has no module '{name}' (adapter for another base?)") from None
        if not hasattr(layer, "in_features"):
            raise DtrainError(f"{source}: module '{name}' is a {type(layer).__name__}, not a linear layer")
        want = {"lora_A": (spec.r, layer.in_features), "lora_B": (layer.out_features, spec.r)}
        for kind, t in ab.items():
            if tuple(t.shape) != want[kind]:
                raise DtrainError(f"{source}: {name}.{kind} has shape {list(t.shape)}, the model needs "
                                  f"{list(want[kind])} (adapter for another base?)")


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> lora.AdapterSpec:
    """Add the PEFT LoRA adapter in `directory` to `model` as adapter `name` (dtrain's or PEFT's).

    The model is a materialized plain (unsharded) model; the adapter's modules are wrapped in
    LoRALinear where not yet. The first adapter loaded becomes active; loading another keeps the
    active one (everywhere); `lora.set_adapter` switches (task switching).
    """
    config, tensors = read_adapter(directory)
    spec = adapter_spec_from_peft(config, name, directory)
    modules = adapter_modules(tensors, directory)
    _check_shapes(model, modules, spec, directory)
    for layer_name in modules:
        layer = model.get_submodule(layer_name)
        if isinstance(layer, lora.LoRALinear) and name in layer.lora_A:
            raise DtrainError(f"{directory}: the model already has an adapter named '{name}'")
    active = next((m.active_adapter for _, m in lora.lora_modules(model) if m.active_adapter), None)
    lora.inject(model, sorted(modules), spec)
    if active is not None and not any(m.merged_adapter for _, m in lora.lora_modules(model)):
        lora.set_adapter(model, active)  # layers new to this adapter must not switch on their own
    model.train(model.training)  # new LoRA modules (dropout) follow the model's train/eval mode
    with torch.no_grad():
        for layer_name, ab in modules.items():
            layer = model.get_submodule(layer_name)
            layer.lora_A[name].weight.copy_(ab["lora_A"])
            layer.lora_B[name].weight.copy_(ab["lora_B"])
    return spec


# ---- nested state <-> (JSON tree, tensors) --------------------------------------------------

def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, plain values) into a JSON-able tree and
    the tensors it references by key. Empty tensors are kept in the tree (shape, dtype), never
    in the tensor file. Dicts with non-string keys (optimizer state by index) keep their keys."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if x.numel() == 0:
                return {"__empty__": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            tensors[path] = x.detach().cpu().clone()
            return {"__tensor__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}/{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, f"{path}/key"), enc(v, f"{path}/{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if hasattr(x, "item") and callable(x.item):  # numpy scalars
            return x.item()
        raise TypeError(f"state at '{path or '/'}': cannot store a {type(x).__name__} (tensors and plain data only)")

    return enc(obj, ""), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten_state."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__empty__" in tree:
        return torch.empty(tree["__empty__"], dtype=getattr(torch, tree["dtype"]))
    if "__items__" in tree:
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in tree["__items__"]}
    if "__tuple__" in tree:
        return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
    if "__dtype__" in tree:
        return getattr(torch, tree["__dtype__"])
    return {k: unflatten_state(v, tensors) for k, v in tree.items()}


# ---- RNG ------------------------------------------------------------------------------------

def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's generator states: (python + numpy as plain data, torch CPU + CUDA tensors)."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only:
        tensors["torch_cuda"] = torch.cuda.get_rng_state()  # never create contexts on the others
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() returned."""
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"])  # the current (this rank's) device
        else:
            log.warning("checkpoint holds a CUDA RNG state but CUDA is not available: not restored")
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


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


def trainer_state(cfg: Config, backend, step: int, plan) -> dict:
    """Step, data position and the facts a resume must agree with."""
    position = plan.position(step) if plan is not None else {}
    data = {"n_examples": plan.n_examples, "global_batch": plan.global_batch, "seed": plan.seed} if plan else {}
    return {"format": FORMAT_VERSION, "step": step, **position, "world_size": backend.world_size,
            "backend": cfg.backend.name, "adapter_name": cfg.lora.adapter_name, "data": data,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _rank_files(rank: int) -> tuple[str, str, str, str]:
    return f"optim-rank{rank}.safetensors", f"optim-rank{rank}.json", f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"


def _write_rank_state(backend, tmp: Path) -> None:
    """This rank's optimizer/scheduler and RNG state into `tmp` (every rank)."""
    opt_tree, opt_tensors = flatten_state(backend.optimizer_state())
    rng_plain, rng_tensors = rng_state()
    opt_st, opt_js, rng_st, rng_js = _rank_files(backend.rank)
    write_tensors(tmp / opt_st, opt_tensors)
    write_json(tmp / opt_js, opt_tree)
    write_tensors(tmp / rng_st, rng_tensors)
    write_json(tmp / rng_js, rng_plain)


def save_training(backend, cfg: Config, out: Path, step: int, plan, preempted: bool = False) -> Path | None:
    """Training checkpoint of `step` (adapter, optimizer, scheduler, RNG, data position); every rank
    calls it. Returns its directory (None when there is no adapter to save: mode full)."""
    tensors = gather_adapter(backend, cfg.lora.adapter_name)
    if not tensors:
        if backend.rank == 0:
            log.warning("mode %s has no LoRA adapter: training checkpoint of step %d skipped", cfg.mode, step)
        return None
    final = checkpoint_dir(out, step)
    tmp = staging_dir(final)
    together(backend, lambda: _fresh_dir(tmp))
    together(backend, lambda: _write_rank_state(backend, tmp), every_rank=True)

    def write_shared() -> None:
        (tmp / "adapter").mkdir()
        write_adapter(backend.model, cfg, tensors, tmp / "adapter")
        write_json(tmp / TRAINER_STATE, trainer_state(cfg, backend, step, plan))

    def finish() -> None:
        publish(tmp, final, {"kind": "training", "step": step, "world_size": backend.world_size})
        log.info("checkpoint of step %d written: %s", step, final)
        prune(out, cfg.training.keep_last, step)
        if preempted:
            _write_preempted(out, step)

    together(backend, write_shared)
    together(backend, finish)
    return final


def _write_preempted(out: Path, step: int) -> None:
    write_json(Path(out) / PREEMPTED, {"step": step, "checkpoint": str(checkpoint_dir(out, step))})


def mark_preempted(backend, out: Path, step: int) -> None:
    """Write the PREEMPTED marker for the checkpoint of `step`, already saved (every rank calls it)."""
    together(backend, lambda: _write_preempted(out, step))


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


def _check_compatible(state: dict, cfg: Config, backend, plan, path: Path) -> None:
    saved = (state.get("world_size"), state.get("backend"), state.get("adapter_name"))
    now = (backend.world_size, cfg.backend.name, cfg.lora.adapter_name)
    if saved != now:
        raise ConfigError(f"training.resume = auto: {path} was written by {saved[0]} rank(s) of backend "
                          f"'{saved[1]}' for adapter '{saved[2]}', this run is {now[0]} rank(s) of '{now[1]}' "
                          f"for '{now[2]}'; launch it the same way, or use a new output.dir")
    data = state.get("data") or {}
    if plan is not None and data and data != {"n_examples": plan.n_examples,
                                              "global_batch": plan.global_batch, "seed": plan.seed}:
        log.warning("resume: the data plan differs from %s's (%s): batches after the resume differ "
                    "from an uninterrupted run's", path.name, data)


def load_training_state(backend, cfg: Config, path: Path) -> None:
    """Restore LoRA parameters, this rank's optimizer/scheduler and RNG from checkpoint `path`."""
    name = cfg.lora.adapter_name
    adapter = load_file(str(path / "adapter" / ADAPTER_WEIGHTS))
    backend.load_full_state({lora.from_peft_key(k, name): t for k, t in adapter.items()})
    opt_st, opt_js, rng_st, rng_js = _rank_files(backend.rank)
    tree = json.loads((path / opt_js).read_text())
    backend.load_optimizer_state(unflatten_state(tree, load_file(str(path / opt_st))))
    set_rng_state(json.loads((path / rng_js).read_text()), load_file(str(path / rng_st)))


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics rows of steps after `step` (written by the run that died after its last
    checkpoint; the resumed run writes them again), so metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(keep))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def maybe_resume(backend, cfg: Config, out: Path, plan=None) -> int:
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
    _check_compatible(state, cfg, backend, plan, path)
    load_training_state(backend, cfg, path)
    if backend.rank == 0:
        trim_metrics(out / "metrics.jsonl", step)
        log.info("resumed from %s: step %d (epoch %s, step %s of the epoch)", path, step,
                 state.get("epoch"), state.get("step_in_epoch"))
    return step

