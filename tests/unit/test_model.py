"""dtrain.model.build + SingleBackend: weight sources, deterministic base, training touches only A and B."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dtrain import lora
from dtrain.backends import env as dist
from dtrain.backends.single import SingleBackend
from dtrain.config import schema as config
from dtrain.errors import ConfigError
from dtrain.model import build as model_lib
from dtrain.training import loss as loss_lib
from tests.helpers import REPO, TINY

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"
ARCH = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def make_cfg(*overrides: str) -> config.Config:
    return config.load(TINY, [f"data.path={CORPUS}", "backend.device=cpu", *overrides])


def build(*overrides: str) -> SingleBackend:
    cfg = make_cfg(*overrides)
    backend = SingleBackend(cfg, dist.detect(cfg.backend.device, cfg.backend.dist_backend))
    backend.build()
    return backend


def batch(seed: int, n: int = 4, seq: int = 16, vocab: int = 512) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A tiny random LlamaForCausalLM saved as one safetensors file and as index + shards."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**ARCH)).eval()
    root = tmp_path_factory.mktemp("saved")
    hf.save_pretrained(root / "single", safe_serialization=True)
    hf.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="100KB")
    return {"model": hf, "single": root / "single", "sharded": root / "sharded"}


# ---- weight sources -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_safetensors_source_reads_the_state_dict(saved, layout: str) -> None:
    d = saved[layout]
    if layout == "sharded":
        assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 2
    else:
        assert (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").exists()
    src = model_lib.SafetensorsSource(d)
    sd = saved["model"].state_dict()
    assert set(src.files) == set(sd)
    for name, t in sd.items():
        assert torch.equal(src.read(name), t), name
        rows = slice(1, 1 + max(1, t.shape[0] // 3))
        assert torch.equal(src.read(name, rows), t[rows]), name
    # names of the LoRA-wrapped model map to the checkpoint keys
    key = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(src.read("model.layers.1.self_attn.q_proj.base_layer.weight", slice(5, 9)), sd[key][5:9])
    with pytest.raises(ConfigError, match="checkpoint has no tensor 'model.nope.weight'"):
        src.read("model.nope.weight")


def test_safetensors_source_needs_weights(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no model.safetensors or index file"):
        model_lib.SafetensorsSource(tmp_path)


def test_random_source_is_name_seeded() -> None:
    shapes = {
        "a.weight": torch.Size([6, 4]),
        "a.base_layer.weight": torch.Size([6, 4]),
        "n.norm.weight": torch.Size([4]),
        "a.bias": torch.Size([6]),
    }
    s1, s2 = model_lib.RandomSource(5, 0.02, shapes), model_lib.RandomSource(5, 0.02, shapes)
    assert torch.equal(s1.read("a.weight"), s2.read("a.weight"))
    assert torch.equal(s1.read("a.weight"), s1.read("a.base_layer.weight"))  # LoRA wrapping: same tensor
    assert torch.equal(s1.read("a.weight", slice(2, 5)), s1.read("a.weight")[2:5])
    assert not torch.equal(s1.read("a.weight"), model_lib.RandomSource(6, 0.02, shapes).read("a.weight"))
    assert torch.equal(s1.read("n.norm.weight"), torch.ones(4))
    assert torch.equal(s1.read("a.bias"), torch.zeros(6))
    assert 0.005 < float(s1.read("a.weight").std()) < 0.05


# ---- building -------------------------------------------------------------------------------


def test_base_is_deterministic_and_matches_a_plain_build() -> None:
    b1, b2 = build("training.max_steps=4"), build("training.max_steps=4")
    p1, p2 = dict(b1.model.named_parameters()), dict(b2.model.named_parameters())
    assert list(p1) == list(p2)
    assert all(torch.equal(p1[n], p2[n]) for n in p1)
    # the base, rebuilt without LoRA via build_empty + fill_full, equals the LoRA model's base
    cfg = make_cfg()
    plain = model_lib.build_empty(model_lib.hf_config(cfg.model), torch.float32)
    src = model_lib.base_source(cfg.model, plain, cfg.training.seed)
    plain.to_empty(device="cpu")
    model_lib.restore_buffers(plain, "cpu")
    model_lib.fill_full(plain, src)
    base = {model_lib.checkpoint_key(n): p for n, p in p1.items() if not lora.is_lora_param(n)}
    assert base.keys() == dict(plain.named_parameters()).keys()
    assert all(torch.equal(base[n], p) for n, p in plain.named_parameters())
    # the LoRA model (B = 0) computes the same logits as the plain one
    ids = batch(0)["input_ids"]
    with torch.no_grad():
        assert torch.equal(b1.model(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    # another seed, another base
    p3 = dict(build("training.seed=99").model.named_parameters())
    assert not torch.equal(p3["model.embed_tokens.weight"], p1["model.embed_tokens.weight"])


def test_build_from_local_dir(saved) -> None:
    hf, sd = saved["model"], saved["model"].state_dict()
    for layout in ("single", "sharded"):
        b = build(f"model.path={saved[layout]}", "model.arch=null", "lora.targets=[q_proj,v_proj]")
        params = dict(b.model.named_parameters())
        base = {model_lib.checkpoint_key(n): p for n, p in params.items() if not lora.is_lora_param(n)}
        assert base.keys() == sd.keys()
        assert all(torch.equal(base[k], sd[k]) for k in sd)
        ids = batch(1)["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(b.model(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="no config.json in that directory"):
        model_lib.hf_config(config.ModelConfig(path=str(saved["single"].parent)))


def test_tied_embeddings_build(tmp_path) -> None:
    """A tied head is read once, as the embedding (the checkpoint of a tied model has no lm_head)."""
    b = build("model.arch.tie_word_embeddings=true")
    m = b.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(m.named_parameters())
    untied = dict(build().model.named_parameters())
    assert lora.count_parameters(m)[1] == sum(p.numel() for p in untied.values()) - 512 * 64
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**ARCH, "tie_word_embeddings": True})).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "lm_head.weight" not in model_lib.SafetensorsSource(tmp_path).files
    b = build(f"model.path={tmp_path}", "model.arch=null")
    assert b.model.lm_head.weight is b.model.model.embed_tokens.weight
    ids = batch(2)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(b.model(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for gc in ("false", "true"):
        backend = build(f"model.gradient_checkpointing={gc}", "lora.targets=[q_proj,v_proj,down_proj]")
        b = batch(3)
        total, _ = loss_lib.token_loss(backend.forward(b), b["labels"])
        backend.backward(total)
        grads.append({n: p.grad for n, p in backend.model.named_parameters() if p.requires_grad})
    assert any(getattr(m, "gradient_checkpointing", False) for m in backend.model.modules())
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        assert grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


# ---- training touches only LoRA ---------------------------------------------------------------


def test_training_changes_only_A_and_B() -> None:
    backend = build("lora.targets=all-linear", "lora.dropout=0.1", "training.max_steps=3", "training.warmup_steps=1")
    backend.setup_optimizer(3)
    model = backend.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_names = {n for n in before if lora.is_lora_param(n)}
    assert lora_names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.count_nonzero(before[n]) == 0 for n in lora_names if ".lora_B." in n)

    losses = []
    for step in range(3):
        b = batch(step)
        total, n_tok = loss_lib.token_loss(backend.forward(b), b["labels"])
        assert n_tok == 4 * 15
        backend.backward(total / n_tok)
        losses.append(float(total.detach()) / n_tok)
        backend.step()
    assert all(torch.isfinite(torch.tensor(losses)))

    for n, p in model.named_parameters():
        if n in lora_names:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
            assert p.grad is None
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if ".lora_B." in n)

    # the optimizer holds only the LoRA parameters, and state only for them
    opt_params = [p for g in backend.optimizer.param_groups for p in g["params"]]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_id[id(p)] for p in opt_params) == sorted(lora_names)
    assert {by_id[id(p)] for p in backend.optimizer.state} == lora_names
    assert all(set(s) >= {"exp_avg", "exp_avg_sq"} for s in backend.optimizer.state.values())


def test_token_loss_is_summed_cross_entropy() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, 3, -100, -100], [-100, 4, 5, 6, 0]])
    total, n = loss_lib.token_loss(logits, labels)
    pairs = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    expect = sum(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b, t in pairs)
    assert n == len(pairs) == 6
    torch.testing.assert_close(total, expect, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("include_head", [False, True])
def test_quantization_include_head(include_head: bool) -> None:
    from dtrain.model.quant import QuantLinear

    model = build("quantization.bits=8", f"quantization.include_head={str(include_head).lower()}").model
    assert isinstance(model.lm_head, QuantLinear) is include_head
    assert isinstance(model.model.layers[0].mlp.down_proj.base_layer, QuantLinear)  # LoRA-wrapped
