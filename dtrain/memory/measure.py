"""Measured memory: a per-rank breakdown taken from the real tensors of a running backend.

Categories (bytes on this rank):

* ``frozen_weights`` / ``trainable_params``: ``backend.local_tensors()`` (this rank's shards)
  of the parameters with ``requires_grad`` False / True.
* ``gradients``: ``backend.local_grads()``, taken after backward and before ``step()`` (which
  zeroes them), so it is what exists at the optimizer step: FSDP2's local DTensor shards,
  ZeRO-3's partitioned fp32 gradients.
* ``optimizer_state``: ``backend.local_optimizer_tensors()``: this rank's tensors in
  ``optimizer.state`` (Adam's m, v and its 4-byte ``step`` per parameter tensor) plus fp32
  master copies where the backend keeps them.
* ``activations``: tensors autograd saves for backward during one micro-batch's forward and
  loss, seen by ``torch.autograd.graph.saved_tensors_hooks`` (see ``SavedTensorCounter``).

Model-state categories count the bytes the tensors span (``held_bytes``: per storage, the union
of the tensors' byte ranges, so views and aliases count once and a shard that is a view into a
larger flat buffer counts only its own range). Activations count whole storages: a saved view
keeps its whole storage alive. Process memory: RSS now and its peak (VmHWM); on CUDA also
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` since ``reset_peaks``.

Collectives go through ``backend.all_reduce_sum`` only (``gather_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtrain.memory.process import process_memory
from dtrain.training import step as step_lib

if TYPE_CHECKING:
    from dtrain.backends.base import Backend
    from dtrain.training.trainer import Trainer  # the type only: measure_cli runs the trainer

MODEL_STATES = ("frozen_weights", "trainable_params", "gradients", "optimizer_state")
CATEGORIES = (*MODEL_STATES, "activations")
PROCESS = ("rss_bytes", "rss_peak_bytes", "cuda_allocated", "cuda_max_allocated", "cuda_max_reserved")
# Every numeric field of a per-rank row, in the order used by `gather_rows` (same on all ranks).
ROW_FIELDS = (*CATEGORIES, "model_states", "frozen_numel", "trainable_numel", "saved_param_bytes", *PROCESS)


# ---- tensor accounting ---------------------------------------------------------------------
def _storage(t: torch.Tensor) -> Any | None:
    """The untyped storage of a plain tensor, or None (meta, tensor subclasses without one)."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return s if s.nbytes() > 0 and s.data_ptr() != 0 else None


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[start, stop) bytes of `t` inside its storage (its strided extent)."""
    if t.numel() == 0:
        return 0, 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return start, start + span * t.element_size()


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes spanned by `tensors`, counting bytes shared by several tensors (views, aliases) once."""
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for t in tensors:
        s = None if t is None else _storage(t)
        if s is not None:
            ranges.setdefault((str(t.device), s.data_ptr()), []).append(_byte_range(t))
    total = 0
    for spans in ranges.values():
        end = -1
        for start, stop in sorted(spans):
            start = max(start, end)
            if stop > start:
                total += stop - start
                end = stop
    return total


def model_state_bytes(backend: "Backend") -> dict[str, int]:
    """This rank's frozen / trainable / gradient / optimizer bytes, and frozen / trainable numel."""
    trainable = {n: p.requires_grad for n, p in backend.model.named_parameters()}
    local = backend.local_tensors()
    frozen = [t for n, t in local.items() if not trainable.get(n, False)]
    train = [t for n, t in local.items() if trainable.get(n, False)]
    return {
        "frozen_weights": held_bytes(frozen),
        "trainable_params": held_bytes(train),
        "gradients": held_bytes(backend.local_grads().values()),
        "optimizer_state": held_bytes(backend.local_optimizer_tensors().values()),
        "frozen_numel": sum(t.numel() for t in frozen),
        "trainable_numel": sum(t.numel() for t in train),
    }


# ---- activations -----------------------------------------------------------------------------
@dataclass
class SavedTensorCounter:
    """Counts the tensors autograd saves for backward inside the `with` block.

    Every saved tensor passes through a `saved_tensors_hooks` pack hook. It is a parameter, not
    an activation, when (1) it or the tensor it is a view of is an ``nn.Parameter`` (FSDP2's
    unsharded parameters and ZeRO-3's gathered ones are the module's registered Parameters
    during forward; ``weight.t()`` saved by a linear is a view of one), (2) its storage is a
    parameter's local storage (``exclude``), or (3) it is a dtype cast of a trainable parameter
    (autocast's cached copy: ``ToCopyBackward0`` straight from the parameter's AccumulateGrad).
    Those go to ``param_bytes``; the rest are activations, each distinct storage counted once
    (``activation_bytes``). With non-reentrant gradient checkpointing the checkpointed layers'
    saves are replaced by recomputation; the tensors passed into such a layer (kept for the
    recompute) are counted instead, by a forward pre-hook on ``GradientCheckpointingLayer``s.
    """

    model: nn.Module
    exclude: Iterable[torch.Tensor] = ()
    storages: dict[tuple[str, int], int] = field(default_factory=dict)
    params: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Storages of `exclude`, the hooks context, no module hooks yet."""
        self._param_ptrs = {s.data_ptr() for s in map(_storage, self.exclude) if s is not None}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._handles: list = []

    @property
    def activation_bytes(self) -> int:
        """Bytes of the distinct activation storages seen so far."""
        return sum(self.storages.values())

    @property
    def param_bytes(self) -> int:
        """Bytes of the distinct parameter storages saved for backward (not activations)."""
        return sum(self.params.values())

    def __enter__(self) -> SavedTensorCounter:
        """Install the pack hook and the checkpointed-layer input hooks."""
        self._handles = [
            m.register_forward_pre_hook(self._layer_inputs, with_kwargs=True) for m in _checkpointed_layers(self.model)
        ]
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove every hook (before backward, so recomputation is not counted)."""
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack: record, keep the tensor itself."""
        self.record(t)
        return t

    def _layer_inputs(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a checkpointed layer: its tensor inputs are kept for recompute."""
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    self.record(t)

    def record(self, t: torch.Tensor) -> None:
        """File `t` under parameters or activations, by storage."""
        s = _storage(t)
        if s is None:
            return
        key = (str(t.device), s._cdata)  # the StorageImpl: views share it; FSDP2 keeps its own
        (self.params if self._is_param(t, s) else self.storages)[key] = s.nbytes()

    def _is_param(self, t: torch.Tensor, s: Any) -> bool:
        """The rule of the class docstring: a Parameter (or view), a parameter's storage, or a
        dtype cast of a trainable Parameter."""
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or s.data_ptr() in self._param_ptrs:
            return True
        fn = base.grad_fn
        if fn is None or type(fn).__name__ != "ToCopyBackward0":
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        return len(nxt) == 1 and isinstance(getattr(nxt[0], "variable", None), nn.Parameter)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    """The saved tensor, unchanged (the pack hook only records)."""
    return t


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """HF layers that run under (non-reentrant) activation checkpointing."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return []
    return [
        m
        for m in model.modules()  # HF's layers, and attention modules dtrain checkpoints (step_opts.py)
        if (isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False))
        or getattr(m, "_dtrain_checkpointed", False)
    ]


# ---- gathering -------------------------------------------------------------------------------
def gather_rows(backend: "Backend", row: dict[str, float]) -> list[dict[str, float | None]]:
    """Every rank's `row` (ROW_FIELDS), on every rank, with one all_reduce_sum. Collective."""
    world = backend.world_size
    table = torch.zeros(world, len(ROW_FIELDS), dtype=torch.float64)
    table[backend.rank] = torch.tensor([float(row.get(k, math.nan)) for k in ROW_FIELDS], dtype=torch.float64)
    table = backend.all_reduce_sum(table)
    return [{k: (None if math.isnan(v) else int(v)) for k, v in zip(ROW_FIELDS, values.tolist())} for values in table]


def snapshot(backend: "Backend") -> dict[str, Any]:
    """Memory now, for metrics.jsonl: model states of every rank plus process memory.

    Collective (every rank must call it at the same point). Gradients are whatever exists at
    the call (0 after `step()` has zeroed them); activations are not measured here.
    """
    row = {**model_state_bytes(backend), **process_memory(backend.device)}
    row["model_states"] = sum(row[k] for k in MODEL_STATES)
    rows = gather_rows(backend, row)
    keep = (*MODEL_STATES, "model_states", *PROCESS)
    return {"ranks": [{k: r[k] for k in keep if r[k] is not None} for r in rows]}


def summary_line(snap: dict[str, Any]) -> str:
    """One log line from a `snapshot`: per rank model states and peak RSS / CUDA, in MiB."""
    parts = []
    for i, r in enumerate(snap["ranks"]):
        text = (
            f"rank {i}: frozen {_mib(r['frozen_weights'])}, trainable "
            f"{_mib(r['trainable_params'])}, optimizer {_mib(r['optimizer_state'])}, "
            f"peak RSS {_mib(r.get('rss_peak_bytes'))}"
        )
        if r.get("cuda_max_allocated") is not None:
            text += f", peak CUDA {_mib(r['cuda_max_allocated'])}"
        parts.append(text)
    return "; ".join(parts)


def _mib(n: float | None) -> str:
    """Bytes as MiB with two decimals, or 'n/a'."""
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


# ---- measured runs ---------------------------------------------------------------------------
@dataclass
class Measured:
    """Rows of every rank for each mode (same on all ranks), and this process's rank."""

    rank: int
    world_size: int
    device: str
    modes: dict[str, list[dict[str, float | None]]]


def measured_steps(trainer: "Trainer", steps: int) -> dict[str, float]:
    """Run `steps` (>= 2) optimizer steps of a set-up Trainer (dtrain.training.step.train_step, as
    training runs them); this rank's row.

    Model states are taken in the last step after backward and before the optimizer step (Adam's
    state exists from the first step on, and the gradients are not yet zeroed); activations during
    that step's first micro-batch forward and loss.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (Adam's state appears at the first step), got {steps}")
    backend = trainer.backend
    watch = _Probe(backend)
    for step in range(steps):
        batches, _ = trainer.step_batches(step)
        step_lib.train_step(backend, batches, watch=watch if step == steps - 1 else None, objective=trainer.objective)
    row = {**watch.row, **process_memory(backend.device)}
    row["model_states"] = sum(row[k] for k in MODEL_STATES)
    return row


class _Probe(step_lib.StepWatch):
    """Saved tensors of the first micro-batch's forward, model states before the optimizer step."""

    def __init__(self, backend: "Backend") -> None:
        self.backend, self.row = backend, {}
        self.counter: SavedTensorCounter | None = None

    def forward(self):
        self.counter = SavedTensorCounter(self.backend.model, list(self.backend.local_tensors().values()))
        return self.counter

    def before_optimizer_step(self) -> None:
        self.row = {
            **model_state_bytes(self.backend),
            "activations": self.counter.activation_bytes,
            "saved_param_bytes": self.counter.param_bytes,
        }
