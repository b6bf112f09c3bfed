"""rsLoRA and DoRA against PEFT's own implementation on the same weights (forward, gradients, merge),
with a float and an 8-/4-bit base; what the LoRA forward keeps for backward."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from dtrain import lora
from dtrain.lora import dora
from dtrain.lora.layer import AdapterSpec, LoRALinear
from dtrain.model import quant

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
TINY, CORPUS = REPO / "configs" / "tiny.yaml", REPO / "dtrain" / "assets" / "tiny_corpus.txt"
ARCH = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
VARIANTS = {
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "dora+rslora": dict(use_dora=True, use_rslora=True),
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCH)).eval()


def peft_model(base: nn.Module, dropout: float = 0.0, **variant) -> nn.Module:
    """PEFT's LoRA on a copy of `base`, with random B and (DoRA) a magnitude moved off its init."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, **variant)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def dtrain_copy(base: nn.Module, theirs: nn.Module, dropout: float = 0.0, **variant) -> nn.Module:
    """dtrain's LoRA on a copy of `base` with PEFT's adapter tensors copied in (same names below the prefix)."""
    mine = copy.deepcopy(base)
    names = lora.select_targets(mine, TARGETS, None)
    lora.inject(mine, names, AdapterSpec(r=4, alpha=8, dropout=dropout, **variant))
    tensors = {k.removeprefix("base_model.model."): p for k, p in theirs.named_parameters() if "lora_" in k}
    ours = {n: p for n, p in mine.named_parameters() if lora.is_lora_param(n) and n.endswith(".weight")}
    assert ours.keys() == tensors.keys()
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(tensors[n])
    return mine


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model."): p.grad
        for n, p in model.named_parameters()
        if "lora_" in n and p.requires_grad
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_gradients_and_merge_equal_peft(variant):
    kw = VARIANTS[variant]
    base = tiny_llama()
    theirs = peft_model(base, **kw)
    mine = dtrain_copy(base, theirs, **kw)
    ours, want = mine(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    assert (want - base(input_ids=IDS).logits).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
    if kw.get("use_rslora"):
        assert all(m.scaling["default"] == 8 / 2 for _, m in lora.lora_modules(mine))  # alpha / sqrt(4)
    ours.square().mean().backward()
    want.square().mean().backward()
    mine_g, peft_g = lora_grads(mine), lora_grads(theirs)
    assert len(mine_g) == (3 if kw.get("use_dora") else 2) * 6
    for n, g in peft_g.items():
        torch.testing.assert_close(mine_g[n], g, atol=1e-6 * float(g.abs().max()), rtol=0)
    lora.merge(mine)
    merged = theirs.merge_and_unload()
    for name, m in lora.lora_modules(mine):
        torch.testing.assert_close(m.base_layer.weight, merged.get_submodule(name).weight, atol=1e-6, rtol=0)
    lora.unmerge(mine)
    for name, m in lora.lora_modules(mine):
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(name).weight, atol=1e-6, rtol=0)


def test_dora_with_dropout_equals_peft_in_train_mode():
    """Dropout on the LoRA input: PEFT runs the base layer again on the dropped input; so does dtrain."""
    base = tiny_llama()
    theirs = peft_model(base, dropout=0.3, use_dora=True).train()
    mine = dtrain_copy(base, theirs, dropout=0.3, use_dora=True).train()
    torch.manual_seed(11)
    want = theirs(input_ids=IDS).logits
    torch.manual_seed(11)  # the same masks, drawn in the same order
    ours = mine(input_ids=IDS).logits
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
    mine.eval()
    theirs.eval()
    torch.testing.assert_close(mine(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-6, rtol=0)


def test_dora_starts_as_the_base_and_its_magnitude_is_the_row_norm():
    base = tiny_llama()
    mine = copy.deepcopy(base)
    lora.inject(mine, lora.select_targets(mine, TARGETS, None), AdapterSpec(r=4, use_dora=True))
    for _, m in lora.lora_modules(mine):
        w = m.base_layer.weight
        torch.testing.assert_close(m.lora_magnitude_vector["default"].weight, w.norm(dim=1), atol=0, rtol=1e-6)
    torch.testing.assert_close(mine(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-6, rtol=0)
    lora.freeze_base(mine)
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert sum(".lora_magnitude_vector.default.weight" in n for n in trainable) == 6 and len(trainable) == 18


def test_adapted_norms_without_the_full_matrix():
    """||W0 + s B A||_row from ||W0||_row, W0 A^T, A and B equals the norm of the built matrix."""
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(37, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(37, 4, generator=g)
    whole = torch.linalg.vector_norm(w + 0.5 * b @ a, dim=1)
    got = dora.adapted_norms(dora.row_norms(w), (w @ a.t()).t(), a, b, 0.5)
    torch.testing.assert_close(got, whole, atol=0, rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_dora_on_a_quantized_base_equals_peft_on_the_dequantized_weights(bits):
    """dtrain's QuantLinear base is dequantized for DoRA's norm and magnitude: the same as PEFT's DoRA
    on a float base holding deq(q(W)), forward and merge."""
    base = tiny_llama()
    rounded = copy.deepcopy(base)
    with torch.no_grad():
        for n, m in rounded.named_modules():
            if isinstance(m, nn.Linear) and n != "lm_head":
                m.weight.copy_(quant.round_trip(m.weight, bits))
    theirs = peft_model(rounded, use_dora=True)
    quantized = copy.deepcopy(base)
    quant.quantize_model(quantized, bits)
    fresh = copy.deepcopy(quantized)
    lora.inject(fresh, lora.select_targets(fresh, TARGETS, None), AdapterSpec(r=4, alpha=8, use_dora=True))
    for name, m in lora.lora_modules(fresh):  # the initial magnitude: row norms of the dequantized weight
        want = rounded.get_submodule(name).weight.norm(dim=1)
        torch.testing.assert_close(m.lora_magnitude_vector["default"].weight, want, atol=0, rtol=1e-6)
    mine = dtrain_copy(quantized, theirs, use_dora=True)
    assert isinstance(mine.get_submodule("model.layers.0.self_attn.q_proj").base_layer, quant.QuantLinear)
    torch.testing.assert_close(mine(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
    lora.merge(mine)
    merged = theirs.merge_and_unload()
    for name, m in lora.lora_modules(mine):
        torch.testing.assert_close(m.base_layer.weight, merged.get_submodule(name).weight, atol=1e-6, rtol=0)


# ---- what the LoRA forward saves for backward ----------------------------------------------------

N_IN, N_OUT, R, TOKENS = 256, 96, 4, (8, 24)  # sizes chosen so that no weight has an activation's numel


def saved_tensors(layer: nn.Module, x: torch.Tensor, autocast: bool = False) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward during `layer(x)`."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        out = layer(x)
    out.float().sum().backward()
    return saved


def _layer(dropout: float) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(N_IN, N_OUT), "blocks.0.proj")
    layer.add_adapter(AdapterSpec(r=R, dropout=dropout))
    return layer.train()


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_forward_keeps_one_copy_of_its_input(autocast):
    """Dropout 0: the base layer and A share one saved input (x itself, or one bf16 cast of x under
    autocast); the only other activation kept is A x (r wide)."""
    x = torch.randn(*TOKENS, N_IN, requires_grad=True)
    tokens = TOKENS[0] * TOKENS[1]
    saved = saved_tensors(_layer(0.0), x, autocast)
    inputs = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert len(inputs) == 1
    assert (x.untyped_storage().data_ptr() in inputs) != autocast  # x itself, or its one bf16 cast
    assert sum(t.numel() == tokens * R for t in saved) == 1  # A x
    known = {x.numel(), tokens * R, N_IN * N_OUT, N_IN * R, R * N_OUT}  # activations, weights (views, casts)
    assert {t.numel() for t in saved} <= known
    # with dropout the dropped copy of x (and its mask) is kept as well: the count above is not vacuous
    dropped = {
        t.untyped_storage().data_ptr() for t in saved_tensors(_layer(0.1), x, autocast) if t.numel() == x.numel()
    }
    assert len(dropped) == 2


# ---- LoRA+ and the config keys ----------------------------------------------------------------


def test_loraplus_moves_B_by_lr_times_ratio():
    """LoRA+ (ratio 16): two parameter groups; after one step A moved by AdamW's first update at the
    scheduled lr and B (and DoRA's magnitude) at 16 x that lr."""
    from dtrain.backends import env as dist
    from dtrain.backends.single import SingleBackend
    from dtrain.config import schema as config_lib
    from dtrain.training.loss import token_loss

    cfg = config_lib.load(
        TINY,
        [
            f"data.path={CORPUS}",
            "lora.loraplus_lr_ratio=16",
            "lora.use_dora=true",
            "lora.targets=[q_proj,v_proj]",
            "training.max_grad_norm=0",
            "training.warmup_steps=2",
            "training.lr=1e-3",
        ],
    )
    backend = SingleBackend(cfg, dist.detect("cpu", "gloo"))
    backend.build()
    backend.setup_optimizer(4)
    groups = backend.optimizer.param_groups
    names = {id(p): n for n, p in backend.model.named_parameters()}
    slow, fast = ({names[id(p)].split(".")[-3] for p in g["params"]} for g in groups)
    assert slow == {"lora_A"} and fast == {"lora_B", "lora_magnitude_vector"}
    assert [g["lr"] for g in groups] == pytest.approx([0.5e-3, 16 * 0.5e-3])  # warmup step 1 of 2
    assert backend.lr == pytest.approx(0.5e-3)
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    total, n = token_loss(backend.forward({"input_ids": ids}), ids)
    backend.backward(total / n)
    grads = {n: p.grad.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    backend.step()
    eps = cfg.training.eps
    for name, p in backend.model.named_parameters():
        if name not in grads:
            continue
        lr = 0.5e-3 * (16 if lora.is_loraplus_fast(name) else 1)
        want = before[name] - lr * grads[name] / (grads[name].abs() + eps)  # AdamW's first step, no decay
        torch.testing.assert_close(p.detach(), want, atol=1e-9, rtol=1e-6)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 16e-3])  # the schedule scales both


@pytest.mark.parametrize("override", ["lora.use_dora=true", "lora.use_rslora=true", "lora.loraplus_lr_ratio=4"])
def test_variants_need_lora_mode(override):
    from dtrain.config import schema as config_lib
    from dtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora\.\w+ = .* needs mode: lora"):
        config_lib.load(TINY, [f"data.path={CORPUS}", "mode=full", override])
    config_lib.load(TINY, [f"data.path={CORPUS}", override])  # fine with LoRA
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        config_lib.load(TINY, [f"data.path={CORPUS}", "lora.loraplus_lr_ratio=0"])
