"""DeepSpeed ZeRO stage 3: every parameter (frozen base and LoRA A/B) partitioned over the ranks.

Build. The model is constructed under `deepspeed.zero.Init`, so each module's parameters are
partitioned as soon as the module exists and no rank ever holds the whole model. The LoRA layers
are injected afterwards (outside zero.Init: their A is computed from a name-seeded generator, the
same on every rank) and immediately converted to ZeRO parameters with `zero.Init(module=...)`.
Then every parameter is filled from the model's `WeightSource` one module at a time: the
module's parameters are gathered (`GatheredParameters(modifier_rank=0)`), rank 0 copies the full
tensors, and on exit they are broadcast and partitioned again. Peak memory per rank: its
partitions plus one module's full parameters (plus, on rank 0, the tensors read for it).

Precision. dtrain's contract (the single-process backend's) is: the frozen base is stored in
`model.dtype`, LoRA A/B, their gradients and AdamW states are float32, compute runs under
`torch.autocast` when the dtype is bf16. zero.Init takes the base dtype from the config's
`bf16.enabled` (never from its `dtype=` argument: in deepspeed 0.19 `Init._set_dtype` evaluates
`dtype or fp16 if accel.is_fp16_supported() else bf16 if ...`, so on a CPU without fp16 support an
explicit `dtype=torch.float32` becomes bf16). LoRA parameters are converted to ZeRO parameters
without a cast and stay float32; the generated config reduces and accumulates gradients in fp32.

Step. The config sets `managed_gradient_accumulation: false`: `engine.backward(loss,
scale_wrt_gas=False)` only accumulates (the trainer already divides by the global token count),
and each `engine.step()` is an optimizer step: gradients are averaged over ranks, clipped to
`gradient_clipping` (DeepSpeed's and torch's clip both scale by max_norm / (norm + 1e-6)), AdamW
(`torch.optim.AdamW` via `torch_adam`) updates the fp32 partitions, the scheduler steps.

Schedule. dtrain's warmup + cosine (`optim.lr_factor`) is given to `deepspeed.initialize` as the
client `lr_scheduler` (a callable building `torch.optim.lr_scheduler.LambdaLR` on DeepSpeed's
basic optimizer), not DeepSpeed's `WarmupCosineLR`: in deepspeed/runtime/lr_schedules.py that
scheduler starts at `last_batch_iteration = -1`, where `get_lr()` returns 0, and at iteration 0
its warmup ratio is `warmup_min_ratio + (1 - warmup_min_ratio) * log(1) / log(warmup)` (log
warmup) or `0 / warmup` (linear), i.e. `warmup_min_ratio` (default 0): the first two optimizer
steps run at lr 0, where dtrain's first step runs at lr / warmup_steps.

Checkpointing never uses DeepSpeed's 16-bit consolidated save (it gathers every parameter of each
module, frozen ones included): `full_state` gathers only the parameters the filter selects, and
`optimizer_state` returns this rank's partition of the AdamW state keyed by parameter name.

Gradient checkpointing (`model.gradient_checkpointing`) is HF's non-reentrant checkpointing and
works under ZeRO-3 as is: transformers 5 checkpoints each decoder layer's `forward` (not its
`__call__`), so the layer's submodules are called again during recomputation and ZeRO-3's
pre-forward hooks gather their frozen weights to full size again: the recomputed tensors have
the metadata of the first forward. tests/distributed checks equal losses and updates with and
without it, and that the attention really runs twice.

Memory: zero.Init replaces torch.nn.functional.linear process-wide by DeepSpeed's
LinearFunctionForZeroStage3 (`memory_efficient_linear`, kept on): it saves the weight Parameter for
backward, so ZeRO-3 can release the gathered weight after the module's forward and gather it again
in backward. With plain F.linear autograd saves the view `weight.t()`, which pins every gathered
frozen weight until backward: each rank would hold the whole model during forward/backward.
How long gathered weights stay (for their reuse in backward) and how far ahead ZeRO-3 prefetches
is sized from the model once its architecture is known (`ds_config.gather_limits`: at most one
rank's share of the parameters kept gathered). On CPU, freed host memory goes back to the OS
after loading and when it piles up between steps (backends/heap.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from torch import nn

from dtrain import faults
from dtrain.backends import collectives, ds_config, env as dist_env, heap, zero3_state
from dtrain.backends.base import Backend
from dtrain.backends.collectives import ProcessGroupCollectives
from dtrain.backends.env import DistEnv
from dtrain.config.schema import Config
from dtrain.model import build as model_lib
from dtrain.model.shapes import logical_numel
from dtrain.training import optim

GATHER_BUDGET_BYTES = 256 * 2**20  # full_state gathers at most this much at a time
TRIM_EVERY_BYTES = 64 * 2**20  # _fill hands freed heap back to the OS after this much gathered (see heap.py)


def _import_deepspeed(device: torch.device):
    """Import deepspeed with the accelerator matching `device` (DeepSpeed picks it at import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if device.type == "cpu" and get_accelerator().device_name() != "cpu":
        # deepspeed was imported before with another accelerator: switch to the CPU one
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    if device.type == "cpu":
        _skip_shm_comm_op(deepspeed)
    return deepspeed


def _skip_shm_comm_op(deepspeed) -> None:
    """Keep init_distributed from JIT-compiling DeepSpeed's CPU shared-memory all-reduce.

    On the CPU accelerator, `deepspeed.comm.torch.TorchBackend` builds the `deepspeed_shm_comm` op
    (g++, 2-4 minutes on 2 cores, and seen rebuilt by later runs) whenever
    `deepspeed.ops.__compatible_ops__` says it can; the op serves only `inference_all_reduce`,
    which training never calls (ZeRO's all-gathers and reduce-scatters go through gloo). Marking it
    incompatible in that dict (documented as persistent in deepspeed/ops/__init__.py) makes
    `build_shm_op()` return None.
    """
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # a DeepSpeed without the dict: let it build
        pass


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class DeepSpeedBackend(ProcessGroupCollectives, Backend):
    """ZeRO-3 through a DeepSpeed engine; `self.model` is the bare module (names without `module.`)."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        super().__init__(cfg, env)
        self.ds = _import_deepspeed(env.device)
        self.ds_config = ds_config.build(cfg, env.world_size)
        dist_env.ensure_rendezvous(env)
        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = dist_env.pg_timeout(cfg)
            if collectives.restarted():  # torchrun restarted the group: the store needs a fresh prefix
                collectives.init_process_group(env.dist_backend, env.rank, env.world_size, timeout)
            self.ds.init_distributed(
                dist_backend=env.dist_backend, auto_mpi_discovery=False, timeout=timeout
            )  # wraps a group already started
        self.engine = None
        self._trimmer = heap.StepTrimmer()

    # ---- build ------------------------------------------------------------------------------
    def _build_empty(self, config) -> nn.Module:
        """Built inside `zero.Init`: each module's parameters are partitioned as it is constructed,
        so no rank ever holds the whole model."""
        cfg, ds = self.cfg, self.ds
        # no_init_weights: every weight is filled from the source below, so skip HF's random init
        # (transformers' own from_pretrained does the same under DeepSpeed).
        model_lib.import_model_code(config, cfg.model.trust_remote_code)  # nothing imports inside zero.Init
        with ds.zero.Init(config_dict_or_path=self.ds_config), _no_init_weights():
            model = model_lib.build_empty(
                config, model_lib.DTYPES[cfg.model.dtype], device="cpu", trust_remote_code=cfg.model.trust_remote_code
            )
        heap.trim()
        # gather limits sized from the model just built (zero.Init above does not read them)
        self.ds_config = ds_config.build(cfg, self.env.world_size, ds_config.ModelSize.of(model, config))
        return model

    def _shard(self, model: nn.Module) -> None:
        # what assembly added after the build (LoRA, quantized storage): partitioned from rank 0's values
        self.ds.zero.Init(module=model, config_dict_or_path=self.ds_config)

    def _materialize(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        model_lib.restore_buffers(model, self.device)
        for module in model.modules():  # zero.Init moves parameters only; the engine leaves buffers
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[key] = buf.to(self.device)
        self._fill(model, source)

    def _fill(self, model: nn.Module, source: model_lib.WeightSource) -> None:
        """Every parameter from `source`, one module at a time (rank 0 reads, all ranks keep a shard)."""
        names = {id(p): n for n, p in model.named_parameters()}  # first name of tied parameters
        done: set[int] = set()
        since_trim = 0
        for module in model.modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in done]
            if not params:
                continue
            done.update(id(p) for p in params)
            with self.ds.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                if self.rank == 0:
                    for p in params:
                        p.copy_(source.read(names[id(p)]).to(p.dtype))
            since_trim += sum(int(p.ds_numel) * p.element_size() for p in params)
            if since_trim >= TRIM_EVERY_BYTES:
                heap.trim()
                since_trim = 0
        heap.trim()

    # ---- optimizer --------------------------------------------------------------------------
    def _setup_optimizer(self, total_steps: int, schedule: Callable[[int], float]) -> None:
        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        # the engine builds AdamW from the config's "optimizer" section (torch's, see ds_config.py)
        # over these groups only: the LoRA parameters, so only they get Adam state; the scheduler
        # goes in as a factory because the optimizer it steps is created inside initialize
        engine, optimizer, _, scheduler = self.ds.initialize(
            model=self.model,
            model_parameters=optim.optimizer_groups(self.model, self.cfg),
            config=self.ds_config,
            lr_scheduler=make_scheduler,
            dist_init_required=False,
        )  # the process group exists already
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler

    # ---- per step ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.engine is None:  # the ZeRO-3 gather hooks are installed by deepspeed.initialize
            raise RuntimeError("DeepSpeedBackend.forward needs setup_optimizer() first")
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        with self.autocast():
            return self.engine(**batch, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        # the loss is already scaled to the global batch's mean (training/step.py): no 1/grad_accum
        self.engine.backward(loss, scale_wrt_gas=False)
        for name, g in self.local_grads().items():  # a planted fault (dtrain/faults.py) only
            if faults.dropped_grad(name):
                g.zero_()

    def step(self, skip: bool = False) -> float:
        # `skip` (a non-finite loss) needs no action: its gradients are non-finite too, and ZeRO-3
        # discards a step whose gradient norm is not finite (no update, no scheduler step)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if self.device.type == "cpu":
            self._trimmer.after_step()  # host RAM is where the model lives: see backends/heap.py
        return float(norm) if norm is not None else 0.0

    @contextlib.contextmanager
    def evaluating(self):
        with super().evaluating():
            yield
        self._release_gathered()

    def _release_gathered(self) -> None:
        """Wait for and release every gathered or prefetched weight.

        ZeRO-3 prefetches the modules its trace of a training step predicts. A forward-only pass
        (evaluation, where gradient checkpointing does not recompute) ends with the prefetched
        modules still in flight, and GatheredParameters on one of them then fails ("Cannot
        partition a param in flight"). Called after evaluation and before the gathers of
        checkpointing.
        """
        if self.engine is not None:
            self.engine.empty_partition_cache()

    # ---- state ------------------------------------------------------------------------------
    def full_state(self, names: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        chosen = [(n, p) for n, p in self.model.named_parameters() if names(n)]
        out: dict[str, torch.Tensor] = {}
        self._release_gathered()
        for chunk in _chunks(chosen, GATHER_BUDGET_BYTES):
            with self.ds.zero.GatheredParameters([p for _, p in chunk]):
                for n, p in chunk:
                    out[n] = p.detach().to("cpu", copy=True)
        return out

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set parameters (by model name) from full tensors; rank 0's values are broadcast.

        Before setup_optimizer (loading an adapter) the optimizer later copies its fp32 masters
        from the parameters. After it (resume: the trainer creates the optimizer first, then the
        checkpoint loads the adapter, then `load_optimizer_state`) the masters are refreshed from
        the parameters' partitions here: DeepSpeed keeps them as a separate fp32 copy (see
        `local_optimizer_tensors`) that would otherwise overwrite the loaded values at the next step.
        """
        params = dict(self.model.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise KeyError(f"no parameter named {missing[0]!r} in the model")
        chosen = [(n, params[n]) for n in sorted(tensors)]
        self._release_gathered()
        for chunk in _chunks(chosen, GATHER_BUDGET_BYTES):
            with self.ds.zero.GatheredParameters([p for _, p in chunk], modifier_rank=0), torch.no_grad():
                if self.rank == 0:
                    for n, p in chunk:
                        p.copy_(tensors[n].to(p.dtype))
        self._refresh_masters()

    def _refresh_masters(self) -> None:
        opt = self.optimizer
        if opt is None or not hasattr(opt, "fp32_partitioned_groups_flat"):
            return
        for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            if lp.data_ptr() != hp.data_ptr():
                hp.data.copy_(lp.data)

    def optimizer_state(self) -> dict:
        """This rank's ZeRO-3 partition of the AdamW state, by parameter name, plus the scheduler
        (zero3_state.rank_state; checkpoints use `full_optimizer_state`)."""
        return zero3_state.rank_state(self, _subgroups(self.optimizer))

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what `optimizer_state` returned on this rank (same world size and parameters)."""
        zero3_state.load_rank_state(self, _subgroups(self.optimizer), state)

    def full_optimizer_state(self) -> dict:
        return zero3_state.full_optimizer_state(self, _subgroups(self.optimizer))

    def load_full_optimizer_state(self, state: dict) -> None:
        zero3_state.load_full_optimizer_state(self, _subgroups(self.optimizer), state)

    @property
    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    # ---- collectives / teardown -------------------------------------------------------------
    def release(self) -> None:
        """Drop the engine too (it holds the module, the optimizer and the gradient buffers)."""
        if self.engine is not None:
            self.engine.destroy()  # removes ZeRO-3's hooks and frees the optimizer's buffers
        self.engine = None
        super().release()
        heap.trim()

    # ---- memory report ----------------------------------------------------------------------
    def local_tensors(self) -> dict[str, torch.Tensor]:
        """Each parameter's local partition on this rank (`p.ds_tensor`)."""
        return {n: getattr(p, "ds_tensor", p.data) for n, p in self.model.named_parameters()}

    def local_grads(self) -> dict[str, torch.Tensor]:
        """This rank's gradient partitions: ZeRO-3 (no offload) accumulates them in one flat
        `grad_accum_dtype` buffer, `grad_partitions_flat_buffer`, `partition_numel()` elements per
        trainable parameter in `fp16_groups` order; `.grad` stays None. The buffer exists from
        setup_optimizer on (zeroed after each step)."""
        opt = self.optimizer
        flat = getattr(opt, "grad_partitions_flat_buffer", None)
        if flat is None:
            return super().local_grads()
        names, out, offset = self._names, {}, 0
        for group in opt.fp16_groups:
            for p in group:
                n = p.partition_numel()
                out[names[id(p)]] = flat.narrow(0, offset, n)
                offset += n
        return out

    def local_optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """`param/exp_avg`, `param/exp_avg_sq`, `param/master` (views of this rank's flat fp32
        partitions) and `param/step` (one per flat group, keyed by its first parameter).

        The fp32 master is a real separate copy even for fp32 parameters: deepspeed 0.19's
        stage3 aliases it only when `partition.device == self.device`, which compares a
        torch.device with a string and is False in torch >= 2.11 (4 extra bytes per trainable
        parameter, on CPU and CUDA alike)."""
        opt = self.optimizer
        if opt is None or not hasattr(opt, "fp32_partitioned_groups_flat"):
            return {}
        names, out = self._names, {}
        for i, (group, flat) in enumerate(_subgroups(opt)):
            state = opt.optimizer.state.get(flat, {})
            separate_master = flat.data_ptr() != opt.fp16_partitioned_groups_flat[i].data_ptr()
            offset = 0
            for j, p in enumerate(group):
                name, n = names[id(p)], p.ds_tensor.ds_numel
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == flat.numel():
                        out[f"{name}/{key}"] = value.narrow(0, offset, n)
                    elif isinstance(value, torch.Tensor) and j == 0:
                        out[f"{name}/{key}"] = value
                if separate_master:
                    out[f"{name}/master"] = flat.narrow(0, offset, n)
                offset += n
        return out


def _subgroups(opt):
    """(params of sub-group i, its flat fp32 partition) for a ZeRO-3 optimizer."""
    return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat))


def _chunks(items: list[tuple[str, nn.Parameter]], budget: int):
    chunk, size = [], 0
    for n, p in items:
        nbytes = logical_numel(p) * p.element_size()
        if chunk and size + nbytes > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append((n, p))
        size += nbytes
    if chunk:
        yield chunk
