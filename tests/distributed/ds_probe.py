"""Run under torchrun (2 ranks) by test_deepspeed.py: builds DeepSpeedBackend directly and writes
`<out>/rank<r>.json` with what the test asserts on.

  sharding   probe_backend.storage() of the freshly built backend: this rank's (partition) bytes of
             frozen and LoRA parameters, and the whole frozen base's bytes
  optimizer  names and bytes of this rank's optimizer-state tensors
  resume     losses/LoRA after step 3 of an uninterrupted run vs a fresh backend that loaded the
             step-2 adapter + optimizer state (same next step expected, bit for bit)
  ckpt       losses and LoRA after 2 steps with model.gradient_checkpointing on vs off, and how
             many times layer 0's attention ran forward (recomputation proves checkpointing ran)

usage: torchrun --nproc_per_node 2 tests/distributed/ds_probe.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from probe_backend import storage  # this folder is sys.path[0]: the file runs as a script

from dtrain import lora
from dtrain.backends import env as dist
from dtrain.backends.deepspeed import DeepSpeedBackend
from dtrain.config import schema as config_lib
from dtrain.training.loss import token_loss

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "backend.name=deepspeed",
    "backend.device=cpu",
    "lora.targets=[q_proj,v_proj]",
    "training.micro_batch_size=2",
    "training.grad_accum=2",
    "training.warmup_steps=2",
    "training.lr=1e-3",
    "data.seq_len=32",
]
STEPS = 4


def make_cfg(extra=()):
    return config_lib.load(REPO / "configs" / "tiny.yaml", OVERRIDES + list(extra))


def batches(step: int, rank: int, cfg) -> list[dict]:
    """grad_accum micro-batches of random tokens, different per (step, rank, micro)."""
    out = []
    for m in range(cfg.training.grad_accum):
        g = torch.Generator().manual_seed(1000 * step + 10 * rank + m)
        ids = torch.randint(
            0, cfg.model.arch["vocab_size"], (cfg.training.micro_batch_size, cfg.data.seq_len), generator=g
        )
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def train_step(backend, step: int) -> float:
    """One optimizer step with the trainer's loss normalisation; returns the global mean token loss."""
    cfg, world = backend.cfg, backend.world_size
    bs = batches(step, backend.rank, cfg)
    local = sum(int(b["labels"][:, 1:].numel()) for b in bs)
    global_tokens = int(backend.all_reduce_sum(torch.tensor(float(local))).item())
    total = torch.zeros(())
    for b in bs:
        s, _ = token_loss(backend.forward(b), b["labels"])
        backend.backward(s * world / global_tokens)
        total += s.detach()
    backend.step()
    return float(backend.all_reduce_sum(total).item()) / global_tokens


def make_backend(env, extra=()):
    b = DeepSpeedBackend(make_cfg(extra), env)
    b.build()
    b.setup_optimizer(STEPS)
    return b


def lora_state(backend) -> dict[str, torch.Tensor]:
    return backend.full_state(lora.is_lora_param)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def probe_checkpointing(env, cfg) -> dict:
    """Gradient checkpointing: same losses and LoRA after 2 steps, and layer 0's attention recomputed."""
    counts = {"layer0_forward": 0}
    c = make_backend(env, ["model.gradient_checkpointing=true"])
    attn0 = c.model.model.layers[0].self_attn  # runs inside the checkpointed layer forward
    attn0.register_forward_pre_hook(lambda *_: counts.__setitem__("layer0_forward", counts["layer0_forward"] + 1))
    ckpt_losses = [train_step(c, s) for s in range(2)]
    fresh = make_backend(env)
    plain_losses = [train_step(fresh, s) for s in range(2)]
    return {
        "losses_ckpt": ckpt_losses,
        "losses_plain": plain_losses,
        "lora_max_diff": max_diff(lora_state(c), lora_state(fresh)),
        "layer0_forwards_2_steps": counts["layer0_forward"],
        "micro_batches_2_steps": 2 * cfg.training.grad_accum,
    }


def main(out: Path) -> None:
    cfg = make_cfg()
    env = dist.detect("cpu", "gloo")
    report: dict = {"rank": env.rank, "world_size": env.world_size}

    # ---- sharding and optimizer state of a freshly built run --------------------------------
    a = make_backend(env)
    report["training_mode"] = a.model.training
    report["sharding"] = storage(a)

    # ---- two steps, save, third step (the uninterrupted reference) --------------------------
    losses = [train_step(a, s) for s in range(2)]
    saved_opt = a.optimizer_state()
    saved_lora = lora_state(a)
    tensors = {
        f"{param}.{key}": t for param, entry in saved_opt["optimizer"]["state"].items() for key, t in entry.items()
    }
    plain = {k: v for k, v in saved_opt.items() if k != "optimizer"}
    plain["optimizer"] = {k: v for k, v in saved_opt["optimizer"].items() if k != "state"}
    report["optimizer"] = {
        "names": sorted(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype) for t in tensors.values()}),
        "meta_is_json": _is_json(plain),
    }
    losses.append(train_step(a, 2))
    ref_lora, ref_lr = lora_state(a), a.lr

    # ---- resume: a fresh backend loads the step-2 adapter and optimizer state ---------------
    b = DeepSpeedBackend(cfg, env)
    b.build()
    b.load_full_state(saved_lora)  # adapter loading happens before setup_optimizer
    b.setup_optimizer(STEPS)
    b.load_optimizer_state(saved_opt)
    resumed_loss = train_step(b, 2)
    report["resume"] = {
        "loss_ref": losses[2],
        "loss_resumed": resumed_loss,
        "lora_max_diff": max_diff(ref_lora, lora_state(b)),
        "lr_ref": ref_lr,
        "lr_resumed": b.lr,
    }

    # load_full_state after the optimizer exists: the next step starts from the loaded values
    b.load_full_state(saved_lora)
    b.load_optimizer_state(saved_opt)
    again = train_step(b, 2)
    report["reload_after_setup"] = {"loss": again, "lora_max_diff": max_diff(ref_lora, lora_state(b))}

    report["ckpt"] = probe_checkpointing(env, cfg)
    report["losses"] = losses

    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env.rank}.json").write_text(json.dumps(report, indent=1))
    a.close()
    a.close()  # safe twice


def _is_json(x) -> bool:
    try:
        json.dumps(x)
        return True
    except TypeError:
        return False


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.exit_now(0)  # as `dtrain` does for a rank: no interpreter teardown (it can abort after gloo)
