"""Recipes in configs/: each builds from its shipped config.json on the meta device with the
published parameter count, its LoRA targets resolve, the estimator counts the same trainable
parameters, `dtrain estimate` runs on it, and configs/README.md's table is the generated one."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain import lora
from dtrain.config import schema as config_lib
from dtrain.config.schema import ModelConfig
from dtrain.lora import experts
from dtrain.model import build as model_lib, hub
from tests.helpers import REPO, run_dtrain
from tools import recipes_table

RECIPES = {r.path.name: r for r in recipes_table.find_recipes()}
# Parameter counts of the published checkpoints (embeddings and head counted once when tied).
PUBLISHED = {
    "Llama-3.1-8B-Instruct": 8_030_261_248,
    "Llama-3.1-70B-Instruct": 70_553_706_496,
    "Qwen2.5-7B-Instruct": 7_615_616_512,
    "Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "smollm2-135m-instruct": 134_515_008,
    "gemma3-270m": 268_098_176,
    "Qwen3-30B-A3B-Instruct-2507": 30_532_122_624,
    "Mixtral-8x7B-Instruct-v0.1": 46_702_792_704,
}
PER_LAYER = {
    "attention-qv": 2,
    "attention": 4,
    "mlp": 3,
    "all-linear": 7,
    "all": 6,
}  # MoE: q, k, v, o and the fused gate_up_proj, down_proj (the router is no nn.Linear)


def test_every_recipe_is_found():
    assert set(RECIPES) == {
        "smollm2_dates.yaml",
        "llama3.1-8b_lora_fsdp.yaml",
        "llama3.1-8b_qlora_24gb.yaml",
        "llama3.1-70b_qlora_fsdp.yaml",
        "llama3.1-70b_qlora_zero3.yaml",
        "qwen2.5-7b_lora_fsdp.yaml",
        "mistral-7b_lora_zero3.yaml",
        "gemma3-270m_dates.yaml",
        "qwen3-30b-a3b_qlora_fsdp.yaml",
        "mixtral-8x7b_qlora_zero3.yaml",
    }
    for r in RECIPES.values():
        assert r.command.endswith(f"dtrain train configs/{r.path.name}")


def test_launch_shapes():
    shape = {name: recipes_table.launch_shape(r.command) for name, r in RECIPES.items()}
    assert shape["llama3.1-8b_qlora_24gb.yaml"] == (1, 1) and shape["llama3.1-8b_lora_fsdp.yaml"] == (8, 1)
    assert shape["llama3.1-70b_qlora_fsdp.yaml"] == shape["llama3.1-70b_qlora_zero3.yaml"] == (8, 2)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_on_meta_and_targets_resolve(name, monkeypatch):
    recipe = RECIPES[name]
    monkeypatch.chdir(REPO)
    if recipe.model in {"smollm2-135m-instruct", "gemma3-270m"}:  # a built-in: loading would import the real model
        assert recipe.raw["model"]["path"] == recipe.model
    else:
        repo_id, revision = hub.parse(recipe.raw["model"]["path"])  # a Hub ID, fetched into the HF cache
        assert repo_id.split("/")[1] == recipe.model and revision is None
        # every key valid, data files present (model.path: the shipped architecture, no weights)
        cfg = config_lib.load(REPO / recipe.path, [f"model.path={recipe.model_dir}"])
        assert cfg.lora.targets == recipe.get("lora", "targets")
    hf = model_lib.hf_config(ModelConfig(path=str(recipe.model_dir)))
    model = model_lib.build_empty(hf, torch.bfloat16, "meta")
    assert lora.count_parameters(model)[1] == PUBLISHED[recipe.model]
    targets = recipe.get("lora", "targets")
    names, params = experts.resolve(model, targets, None, None)  # what assembly.assemble adapts
    per_layer = PER_LAYER[targets] if isinstance(targets, str) else len(targets)
    assert len(names) + len(params) == per_layer * hf.num_hidden_layers
    lora.inject(model, names, lora.AdapterSpec(r=recipe.get("lora", "r")))
    if params:
        experts.inject(model, params, lora.AdapterSpec(r=recipe.get("lora", "r")))
    lora.freeze_base(model)
    est = recipes_table.run_estimate(recipes_table.estimate_argv(recipe))
    assert lora.count_parameters(model)[0] == est.lora_params


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["llama3.1-8b_qlora_24gb.yaml", pytest.param("llama3.1-70b_qlora_zero3.yaml", marks=pytest.mark.ondemand)]
)
def test_dtrain_estimate_command_on_a_recipe(name):
    recipe = RECIPES[name]
    proc = run_dtrain(["estimate", *recipes_table.estimate_argv(recipe), "--json"], timeout=600)
    out = json.loads(proc.stdout)
    est = recipes_table.run_estimate(recipes_table.estimate_argv(recipe))
    assert out["per_gpu"]["lora"]["total"] == est.lora.total
    assert out["plan"]["bits"] == recipe.get("quantization", "bits") == 4
    assert out["plan"]["world_size"] == {"llama3.1-8b_qlora_24gb.yaml": 1, "llama3.1-70b_qlora_zero3.yaml": 16}[name]


def test_readme_table_is_generated():
    readme = (REPO / "configs" / "README.md").read_text()
    assert recipes_table.section(readme) == recipes_table.render()
    assert recipes_table.main(["--check"]) == 0
