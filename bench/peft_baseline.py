"""The PEFT + accelerate baseline worker: one rank of a Hugging Face PEFT LoRA run, trained through
`accelerate` with its FSDP plugin (FSDP2) or its DeepSpeed plugin (ZeRO-3).

Launched by bench/run.py under torchrun (one process per rank); not part of the test suite:

    torchrun --nproc_per_node 2 bench/peft_baseline.py --plugin fsdp --arch ARCH.json \
        --data IDS.pt --micro-batch 4 --steps 10 --warmup 3 --out RESULT.json

What it does is what a PEFT user writes: a `LlamaForCausalLM` built from the same inline config
as dtrain's run (random weights), `get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
target_modules=[q_proj, v_proj]))` (or every weight trainable with `--mode full`), AdamW over the
trainable parameters, `accelerator.prepare(model, optimizer, scheduler)`, then per optimizer step:
forward with `labels` (HF's mean token loss), `accelerator.backward`, `clip_grad_norm_`,
`optimizer.step`, `scheduler.step`, `zero_grad`, and the loss averaged over ranks (a value on the
host, like dtrain's logged loss). The time of that whole step is what dtrain's metrics.jsonl
`step_time_s` covers too (batch selection, forward, backward, clip, step, the loss all-reduce).

The token ids come from the `.pt` file run.py wrote (the same sequences dtrain packs from the
generated text file): rank r of step s takes rows ((s * world + r) * mb ...) mod N.

Result (rank 0 writes it): JSON with per-step times, tokens per step, the distributed type
accelerate actually used, and per rank peak memory (VmHWM on CPU, max_memory_allocated on CUDA).

Accelerate 1.15 on CPU: an `FullyShardedDataParallelPlugin` is ignored on a MULTI_CPU run (the
FSDP switch in `AcceleratorState` is only taken for GPU-like device types); `prepare` then wraps the
model in DDP, every rank holding the whole model. The worker reports the distributed type it got
(`distributed_type`); with `--force-fsdp-on-cpu` it sets `DistributedType.FSDP` on the state after
construction so that `prepare` runs accelerate's own `fsdp2_prepare_model` (FSDP2 `fully_shard`
per decoder layer, then the root) over gloo: accelerate's FSDP2 code path, reached by one
attribute assignment that accelerate does not do itself on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script (under torchrun): import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plugin", choices=["fsdp", "deepspeed"], required=True)
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--arch", help="JSON file: the inline HF config (model_type + sizes)")
    p.add_argument("--model-path", help="a pretrained HF model directory, loaded instead of --arch")
    p.add_argument("--data", required=True, help=".pt file: LongTensor [N, seq_len] of token ids")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--force-fsdp-on-cpu",
        action="store_true",
        help="on CPU, make accelerate take its FSDP2 path instead of falling back to DDP",
    )
    p.add_argument("--out", required=True, help="result JSON (written by rank 0)")
    return p.parse_args(argv)


def host_memory() -> dict:
    """RSS now and its peak (VmHWM), read the way dtrain's own memory snapshot reads them."""
    import torch

    from dtrain.memory.measure import process_memory

    return process_memory(torch.device("cpu"))


T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[peft-baseline {time.perf_counter() - T0:7.1f}s] {msg}")


def make_accelerator(args: argparse.Namespace, use_cuda: bool):
    """(accelerator, the distributed type accelerate chose by itself) for the FSDP2 or ZeRO-3 plugin."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    mixed = "bf16" if args.dtype == "bf16" else "no"
    if args.plugin == "fsdp":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
        # On CPU, `cpu=True` is accelerate's documented way to a multi-process gloo run (MULTI_CPU).
        accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision=mixed, cpu=not use_cuda)
        chosen = str(accelerator.distributed_type)
        if accelerator.distributed_type != DistributedType.FSDP and args.force_fsdp_on_cpu and not use_cuda:
            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
            if accelerator.is_main_process:
                say(
                    f"accelerate chose {chosen} on CPU (FSDP plugin ignored); forcing "
                    "DistributedType.FSDP so that prepare() runs fsdp2_prepare_model"
                )
        return accelerator, chosen
    plugin = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1, gradient_clipping=1.0, zero3_init_flag=True)
    # No dataloader goes through prepare(): the micro batch must be in the DeepSpeed config.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.micro_batch
    handlers = []
    if not use_cuda:
        # Without a device type accelerate knows, it picks no process-group backend on CPU
        # (then reports 1 process while DeepSpeed runs on all): name gloo explicitly.
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(deepspeed_plugin=plugin, mixed_precision=mixed, kwargs_handlers=handlers)
    return accelerator, str(accelerator.distributed_type)


def build_model(args: argparse.Namespace, dtype):
    """The HF model (PEFT-wrapped for LoRA); (model, trainable count, total count)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # Under the DeepSpeed plugin with zero3_init_flag, transformers builds this under zero.Init.
    if args.model_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype)
    else:
        arch = json.loads(Path(args.arch).read_text())
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=args.lora_targets.split(","),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    n_trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    n_total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    return model, n_trainable, n_total


def train(args: argparse.Namespace, accelerator, model, optimizer, scheduler, ids) -> tuple[list, list]:
    """warmup + steps optimizer steps; (per-step seconds, per-step loss averaged over ranks)."""
    import torch

    rank, world = accelerator.process_index, accelerator.num_processes
    n = ids.shape[0]
    mb, device = args.micro_batch, accelerator.device
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them by DTensors

    def batch(step: int) -> torch.Tensor:
        start = (step * world + rank) * mb
        return ids[torch.arange(start, start + mb) % n]

    times, losses = [], []
    total = args.warmup + args.steps
    for step in range(total):
        t0 = time.perf_counter()
        x = batch(step).to(device)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(trainable, 1.0)  # DeepSpeed: the engine clips (gradient_clipping)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(out.loss.detach(), reduction="mean").item())
        elapsed = time.perf_counter() - t0
        times.append(elapsed)
        losses.append(loss)
        if accelerator.is_main_process:
            say(f"step {step + 1}/{total} loss {loss:.4f} time {elapsed:.3f}s")
    return times, losses


def gather_memory(accelerator, use_cuda: bool, rss_before_model: int):
    """[world, 3]: per rank peak (CUDA or RSS), peak RSS, RSS before the model was built."""
    import torch

    device, world = accelerator.device, accelerator.num_processes
    host_peak = host_memory()["rss_peak_bytes"]
    peak = torch.cuda.max_memory_allocated(device) if use_cuda else host_peak
    mem = torch.tensor([float(peak), float(host_peak), float(rss_before_model)], dtype=torch.float64)
    return accelerator.gather(mem.to(device).reshape(1, -1)).cpu().reshape(world, -1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator, chosen = make_accelerator(args, use_cuda)
    rank, world = accelerator.process_index, accelerator.num_processes
    distributed_type = str(accelerator.distributed_type)  # what prepare() will use
    if accelerator.is_main_process:
        say(f"accelerate distributed_type={distributed_type} device={accelerator.device} world={world}")

    torch.manual_seed(args.seed)
    rss_before_model = host_memory()["rss_bytes"]
    model, n_trainable, n_total = build_model(args, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    if accelerator.is_main_process:
        say(f"prepared {type(model).__name__}; trainable {n_trainable:,} / {n_total:,}")

    ids = torch.load(args.data, weights_only=True)
    # Peak memory is counted from process start (model build included), as dtrain's snapshot does.
    times, losses = train(args, accelerator, model, optimizer, scheduler, ids)
    gathered = gather_memory(accelerator, use_cuda, rss_before_model)
    if accelerator.is_main_process:
        timed, mb, seq_len = times[args.warmup :], args.micro_batch, ids.shape[1]
        common.write_json(
            args.out,
            {
                "plugin": args.plugin,
                "mode": args.mode,
                "distributed_type": distributed_type,
                "accelerate_chose": chosen,
                "forced_fsdp": chosen != distributed_type,
                "world_size": world,
                "device": str(accelerator.device),
                "dtype": args.dtype,
                "tokens_per_step": mb * seq_len * world,
                "micro_batch": mb,
                "seq_len": seq_len,
                "step_times": timed,
                "warmup_times": times[: args.warmup],
                "median_step_time_s": common.median(timed) if timed else math.nan,
                "losses": losses,
                "trainable_params": n_trainable,
                "total_params": n_total,
                **memory_fields(gathered, use_cuda),
            },
        )
        say(f"result written to {args.out}")
    finish(accelerator, rank)
    return 0


def memory_fields(gathered, use_cuda: bool) -> dict:
    """The per-rank peaks of gather_memory, as the result file records them."""
    return {
        "peak_bytes_per_rank": [int(v) for v in gathered[:, 0].tolist()],
        "peak_rss_bytes_per_rank": [int(v) for v in gathered[:, 1].tolist()],
        "rss_before_model_per_rank": [int(v) for v in gathered[:, 2].tolist()],
        "memory_kind": "cuda_max_allocated" if use_cuda else "rss_peak",
    }


def finish(accelerator, rank: int) -> None:
    """Wait for every rank, end accelerate's run and destroy the process group."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        say("process group destroyed")


if __name__ == "__main__":
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    # A rank leaves without the interpreter teardown, as dtrain's own ranks do: after the gloo
    # process group, C++ teardown can abort ("terminate called without an active exception").
    from dtrain.backends.env import exit_now

    exit_now(code)
