"""The generated DeepSpeed config and the merge of a user JSON over it (no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.backends import ds_config
from dtrain.config import schema as config_lib
from dtrain.errors import ConfigError
from tests.helpers import TINY


def cfg_with(tmp_path, overrides=(), user: dict | None = None, name: str = "ds.json"):
    extra = []
    if user is not None:
        path = tmp_path / name
        path.write_text(json.dumps(user))
        extra.append(f"backend.deepspeed_config={path}")
    return config_lib.load(TINY, ["backend.name=deepspeed", *overrides, *extra])


def test_generated_from_yaml(tmp_path):
    cfg = cfg_with(
        tmp_path,
        [
            "training.micro_batch_size=3",
            "training.grad_accum=5",
            "training.max_grad_norm=0.5",
            "training.lr=2e-4",
            "training.betas=[0.8,0.95]",
            "training.eps=1e-6",
            "training.weight_decay=0.1",
        ],
    )
    c = ds_config.generate(cfg, world_size=4)
    assert c["train_micro_batch_size_per_gpu"] == 3
    assert c["gradient_accumulation_steps"] == 5
    assert c["train_batch_size"] == 3 * 5 * 4
    assert c["gradient_clipping"] == 0.5
    assert c["bf16"] == {"enabled": False}
    z = c["zero_optimization"]
    assert z["stage"] == 3
    assert z["stage3_param_persistence_threshold"] == 0  # small parameters are partitioned too
    assert c["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True},
    }
    assert "scheduler" not in c  # dtrain's own warmup + cosine is the client lr_scheduler
    assert c["managed_gradient_accumulation"] is False
    assert c["communication_data_type"] == "fp32"
    assert c["data_types"] == {"grad_accum_dtype": "fp32"}
    json.dumps(c)  # plain JSON


def test_bf16_follows_model_dtype(tmp_path):
    assert ds_config.generate(cfg_with(tmp_path, ["model.dtype=bf16"]))["bf16"] == {"enabled": True}
    assert ds_config.generate(cfg_with(tmp_path, ["model.dtype=fp32"]))["bf16"] == {"enabled": False}


def test_no_user_file_is_the_generated_config(tmp_path):
    cfg = cfg_with(tmp_path)
    assert ds_config.build(cfg, 2) == ds_config.generate(cfg, 2)


def test_user_keys_we_do_not_set_pass_through_and_defaults_can_be_tuned(tmp_path):
    user = {
        "zero_optimization": {"offload_param": {"device": "cpu"}, "stage3_prefetch_bucket_size": 123, "stage": 3},
        "wall_clock_breakdown": True,
        "flops_profiler": {"enabled": False},
        "train_micro_batch_size_per_gpu": 8,
    }
    cfg = cfg_with(tmp_path, ["training.micro_batch_size=8"], user)
    c = ds_config.build(cfg, 2)
    z = c["zero_optimization"]
    assert z["offload_param"] == {"device": "cpu"}
    assert z["stage3_prefetch_bucket_size"] == 123
    assert z["stage3_param_persistence_threshold"] == 0  # untouched default kept
    assert c["wall_clock_breakdown"] is True and c["flops_profiler"] == {"enabled": False}
    assert c["optimizer"]["params"]["lr"] == cfg.training.lr


def test_gather_limits_sized_from_the_model(tmp_path):
    """Live / reuse limits = one rank's share of the parameters (at most DeepSpeed's 1e9);
    prefetch = 0.9 x hidden^2; without a size nothing is kept gathered."""
    from dtrain.model import build as model_lib

    cfg = cfg_with(tmp_path)
    config = model_lib.hf_config(cfg.model)
    size = ds_config.ModelSize.of(model_lib.build_empty(config, torch.float32), config)
    arch = cfg.model.arch
    assert size.hidden == arch["hidden_size"]
    # the tiny Llama: embeddings, untied head, per layer q k v o (k/v by kv heads), MLP, 2 norms; final norm
    h, inter, vocab, layers = (
        arch["hidden_size"],
        arch["intermediate_size"],
        arch["vocab_size"],
        arch["num_hidden_layers"],
    )
    kv = h * arch["num_key_value_heads"] // arch["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    assert size.params == 2 * vocab * h + layers * per_layer + h
    z = ds_config.generate(cfg, world_size=2, size=size)["zero_optimization"]
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == -(-size.params // 2)
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert ds_config.gather_limits(ds_config.ModelSize(hidden=8192, params=70_000_000_000), 8) == {
        "stage3_prefetch_bucket_size": int(0.9 * 8192**2),
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
    }
    assert set(ds_config.gather_limits(size, 1).values()) == {0}  # one rank: nothing to gather
    z0 = ds_config.generate(cfg, world_size=2)["zero_optimization"]
    assert (z0["stage3_prefetch_bucket_size"], z0["stage3_max_live_parameters"], z0["stage3_max_reuse_distance"]) == (
        0,
        0,
        0,
    )
    user = {"zero_optimization": {"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}}
    z = ds_config.build(cfg_with(tmp_path, [], user), 2, size)["zero_optimization"]
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 0  # the user's JSON wins
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * h * h)


def test_equal_values_in_another_spelling_are_not_conflicts(tmp_path):
    user = {
        "gradient_clipping": 1,
        "optimizer": {"type": "adamw", "params": {"lr": 0.01, "betas": [0.9, 0.999]}},
        "bfloat16": {"enabled": False},
    }
    c = ds_config.build(cfg_with(tmp_path, [], user), 2)
    assert c["bf16"] == {"enabled": False} and "bfloat16" not in c


@pytest.mark.parametrize(
    "user, overrides, message",
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            ["training.micro_batch_size=4"],
            "ds.json: train_micro_batch_size_per_gpu = 8 conflicts with training.micro_batch_size = 4",
        ),
        (
            {"gradient_accumulation_steps": 2},
            [],
            "ds.json: gradient_accumulation_steps = 2 conflicts with training.grad_accum = 1",
        ),
        (
            {"gradient_clipping": 0.3},
            ["training.max_grad_norm=1.0"],
            "ds.json: gradient_clipping = 0.3 conflicts with training.max_grad_norm = 1.0",
        ),
        (
            {"bf16": {"enabled": True}},
            ["model.dtype=fp32"],
            "ds.json: bf16.enabled = true conflicts with model.dtype = fp32",
        ),
        ({"fp16": {"enabled": True}}, [], "ds.json: fp16.enabled = true conflicts with model.dtype = fp32"),
        (
            {"optimizer": {"params": {"lr": 0.001}}},
            ["training.lr=0.01"],
            "ds.json: optimizer.params.lr = 0.001 conflicts with training.lr = 0.01",
        ),
        (
            {"optimizer": {"params": {"betas": [0.9, 0.95]}}},
            [],
            "ds.json: optimizer.params.betas = [0.9, 0.95] conflicts with training.betas = [0.9, 0.999]",
        ),
        (
            {"optimizer": {"params": {"weight_decay": 0.1}}},
            [],
            "ds.json: optimizer.params.weight_decay = 0.1 conflicts with training.weight_decay = 0.0",
        ),
        (
            {"optimizer": {"type": "Adam"}},
            [],
            "ds.json: optimizer.type = Adam conflicts with training (dtrain trains with AdamW)",
        ),
        (
            {"zero_optimization": {"stage": 2}},
            [],
            "ds.json: zero_optimization.stage = 2 conflicts with backend.name = deepspeed",
        ),
        (
            {"train_batch_size": 64},
            ["training.micro_batch_size=4", "training.grad_accum=2"],
            "ds.json: train_batch_size = 64 conflicts with training.micro_batch_size x training.grad_accum x ranks = 16",
        ),
        (
            {"scheduler": {"type": "WarmupCosineLR"}},
            [],
            "ds.json: scheduler conflicts with training.warmup_steps / training.min_lr_ratio",
        ),
    ],
)
def test_conflicting_values_name_file_key_both_values_and_yaml_key(tmp_path, user, overrides, message):
    cfg = cfg_with(tmp_path, overrides, user)
    with pytest.raises(ConfigError) as e:
        ds_config.build(cfg, world_size=2)
    text = str(e.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_bad_user_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    cfg = config_lib.load(TINY, ["backend.name=deepspeed", f"backend.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        ds_config.build(cfg, 2)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="broken.json: top level must be a JSON object"):
        ds_config.build(cfg, 2)


def test_warmup_cosine_lr_claim_in_deepspeed():
    """The reason the schedule is a client LambdaLR: DeepSpeed's WarmupCosineLR runs its first two
    optimizer steps at lr 0 (checked against the installed DeepSpeed)."""
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed picks its accelerator at import
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedules.WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=5)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the next optimizer step uses
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == 0.0 and lrs[2] > 0.0
