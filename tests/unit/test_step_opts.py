"""Checkpointing policy (every N-th block, attention only) and compiled blocks (dtrain/training/step_options.py):
the same losses and LoRA gradients as the plain model, and exactly the chosen modules recompute."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dtrain import lora
from dtrain.backends import env as dist
from dtrain.backends.single import SingleBackend
from dtrain.config import schema as config
from dtrain.errors import ConfigError
from dtrain.model import layers
from dtrain.training import step_options as step_opts
from tests.helpers import REPO, TINY

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"
FOUR = "model.arch.num_hidden_layers=4"


def build(*overrides: str) -> SingleBackend:
    cfg = config.load(
        TINY, [f"data.path={CORPUS}", "backend.device=cpu", "lora.targets=[q_proj,v_proj]", FOUR, *overrides]
    )
    backend = SingleBackend(cfg, dist.detect("cpu", "gloo"))
    backend.build()
    return backend


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def run_counting(backend: SingleBackend) -> tuple[float, dict, dict]:
    """One forward + backward; (loss, LoRA grads, forward calls of each block's q_proj and mlp)."""
    counts: dict[str, int] = {}
    for i, block in enumerate(layers.decoder_blocks(backend.model)):
        for part in ("self_attn.q_proj", "mlp"):
            module = block.get_submodule(part)
            key = f"{i}.{part.split('.')[0]}"
            module.register_forward_pre_hook(lambda *_, k=key: counts.__setitem__(k, counts.get(k, 0) + 1))
    total, n = backend.loss(batch(0))
    (total / n).backward()
    grads = {k: p.grad.clone() for k, p in backend.model.named_parameters() if lora.is_lora_param(k)}
    return float(total.detach()) / n, grads, counts


@pytest.fixture(scope="module")
def plain():
    return run_counting(build())


@pytest.mark.parametrize(
    "policy, every, attn_twice, mlp_twice",
    [
        ("true", 1, [0, 1, 2, 3], [0, 1, 2, 3]),
        ("true", 2, [0, 2], [0, 2]),
        ("attention", 1, [0, 1, 2, 3], []),
        ("attention", 3, [0, 3], []),
    ],
)
def test_policy_recomputes_the_chosen_modules_with_equal_results(plain, policy, every, attn_twice, mlp_twice):
    loss, grads, counts = run_counting(
        build(f"model.gradient_checkpointing={policy}", f"model.gradient_checkpointing_every={every}")
    )
    ref_loss, ref_grads, ref_counts = plain
    assert ref_counts == {f"{i}.{p}": 1 for i in range(4) for p in ("self_attn", "mlp")}
    assert counts == {
        f"{i}.{p}": 1 + (i in (attn_twice if p == "self_attn" else mlp_twice))
        for i in range(4)
        for p in ("self_attn", "mlp")
    }
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7)


def test_attention_policy_needs_an_attention_submodule() -> None:
    block = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="has no self_attn"):
        step_opts._attention(block)


@pytest.mark.ondemand  # torch.compile of every block: ~13 s idle
def test_compiled_blocks_equal_eager() -> None:
    """torch.compile (inductor; on CPU it builds C++ with g++) of each block: same loss and LoRA
    gradients as eager to 1e-5 relative (fused kernels reorder float sums)."""
    eager = build("model.arch.num_hidden_layers=2")
    compiled = build("model.arch.num_hidden_layers=2", "model.compile_blocks=true")
    for backend in (eager, compiled):
        backend.result = run_counting(backend)[:2]
    (l1, g1), (l2, g2) = eager.result, compiled.result
    assert abs(l1 - l2) <= 1e-5 * l1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5)
    block = layers.decoder_blocks(compiled.model)[0]
    assert hasattr(block.forward, "_torchdynamo_orig_callable") or "compile" in type(block.forward).__name__.lower()
