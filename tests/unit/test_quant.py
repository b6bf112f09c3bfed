"""Unit tests for dtrain.model.quant (QuantLinear, quantize_model, storage and error bounds).

Bounds used (see ``dtrain.model.quant.quant_error_bounds``):

* element-wise: int8 ``|w - deq(w)| <= absmax_row / 254`` (half a step); NF4
  ``|w - deq(w)| <= 0.1519 * absmax_block`` (half the largest NF4 code gap); both plus
  ``8 * eps32 * absmax`` of float32 slack.
* layer output: ``y_q - y = x @ (W_q - W)^T`` so ``|y_q - y| <= |x| @ B^T`` with ``B`` the
  element-wise bound, plus float32 accumulation slack of both matmuls,
  ``2 * in_features * eps32 * (|x| @ (|W| + B)^T)``.
* tiny Llama logits (random init, seed 0): relative L2 error ``||l_q - l|| / ||l||`` below 0.02
  for int8 (measured 0.007) and below 0.25 for NF4 (measured 0.12); int8 also max abs < 0.02.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.model.layers import HEAD_NAMES, is_head_name
from dtrain.model.quant import (
    NF4_BLOCKSIZE,
    QuantLinear,
    nf4_code,
    quantize_model,
    quantized_bytes,
)
from tests.unit.quant_bounds import quant_error_bound, quant_error_bounds

EPS32 = torch.finfo(torch.float32).eps
OUT, IN = 48, 128  # out * in divisible by 64 and by 2


def _linear(out_f: int = OUT, in_f: int = IN, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():  # gaussian weights plus one outlier
        lin.weight.copy_(torch.randn(out_f, in_f) * 0.05)
        lin.weight[0, in_f // 2] = 0.9
    return lin


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(OUT, IN), (5, 7), (3, 10), (1, 2), (130, 66)])
def test_elementwise_error_within_bound(bits: int, shape: tuple[int, int]) -> None:
    lin = _linear(*shape)
    w = lin.weight.detach()
    q = QuantLinear.from_linear(lin, bits)
    err = (q.dequantized_weight() - w).abs()
    bound = quant_error_bounds(w, bits)
    assert q.dequantized_weight().dtype == torch.float32
    assert q.dequantized_weight().shape == w.shape
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) <= quant_error_bound(w, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_bound_is_tight(bits: int) -> None:
    """The bound is not vacuous: some element comes close to it."""
    w = _linear(256, 256).weight.detach()
    err = (QuantLinear.from_weight(w, None, bits).dequantized_weight() - w).abs()
    assert float((err / quant_error_bounds(w, bits)).max()) > 0.8


def test_bound_constants() -> None:
    w = torch.zeros(2, NF4_BLOCKSIZE)
    w[0, 0], w[1, 5] = 2.0, -4.0
    b8 = quant_error_bounds(w, 8)
    assert torch.allclose(b8[:, 0], torch.tensor([2.0, 4.0]) / 254, rtol=1e-3)
    code = nf4_code()
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    assert abs(half_gap - (1 - 0.6961928009986877) / 2) < 1e-6
    b4 = quant_error_bounds(w, 4)
    assert torch.allclose(b4[:, 0], torch.tensor([2.0, 4.0]) * half_gap, rtol=1e-4)


def test_zero_rows_and_blocks_dequantize_to_zero() -> None:
    w = torch.randn(4, 64)
    w[1] = 0
    for bits in (8, 4):
        deq = QuantLinear.from_weight(w, None, bits).dequantized_weight()
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[1], torch.zeros(64))


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_output_within_bound(bits: int) -> None:
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits)
    torch.manual_seed(1)
    x = torch.randn(3, 5, IN)
    w = lin.weight.detach()
    bound_w = quant_error_bounds(w, bits)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    bound = x.abs() @ bound_w.T + 2 * IN * EPS32 * (x.abs() @ (w.abs() + bound_w).T)
    assert out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_storage_bytes(bits: int) -> None:
    q = QuantLinear.from_linear(_linear(), bits)
    got = quantized_bytes(q)
    if bits == 8:
        assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (OUT, IN)
        assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (OUT,)
        assert got["int_bytes"] == OUT * IN and got["scale_bytes"] == 4 * OUT
    else:
        assert q.weight_nf4.dtype == torch.uint8 and q.weight_nf4.shape == (OUT * IN // 2, 1)
        assert q.weight_absmax.dtype == torch.float32
        assert got["int_bytes"] == OUT * IN // 2 and got["scale_bytes"] == 4 * (OUT * IN // 64)
    assert got["bias_bytes"] == 4 * OUT and got["layers"] == 1
    assert q.in_features == IN and q.out_features == OUT and q.bits == bits
    for p in q.parameters():
        assert type(p) is nn.Parameter and not p.requires_grad


@pytest.mark.parametrize("bits", [8, 4])
def test_backward_to_input_matches_autograd_through_dequantized(bits: int) -> None:
    q = QuantLinear.from_linear(_linear(), bits)
    torch.manual_seed(2)
    x = torch.randn(2, 7, IN, requires_grad=True)
    g = torch.randn(2, 7, OUT)
    (q(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, q.dequantized_weight(), q.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in q.parameters())


@pytest.mark.parametrize("bits", [8, 4])
def test_autograd_saves_quantized_not_dequantized_weight(bits: int) -> None:
    q = QuantLinear.from_linear(_linear(), bits)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert {t.dtype for t in saved} == {q.qweight.dtype, torch.float32}
    assert not any(t.is_floating_point() and t.shape == (OUT, IN) for t in saved)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("bits", [8, 4])
def test_gradcheck_float64(bits: int) -> None:
    q = QuantLinear.from_linear(_linear(6, 64), bits)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert q(x).dtype == torch.float64
    assert torch.autograd.gradcheck(q, (x,), fast_mode=True)


def test_bias_grad_when_unfrozen() -> None:
    q = QuantLinear.from_linear(_linear(), 8)
    q.bias.requires_grad_(True)
    x = torch.randn(4, IN)
    q(x).sum().backward()
    torch.testing.assert_close(q.bias.grad, torch.full((OUT,), 4.0))


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_input(bits: int) -> None:
    q = QuantLinear.from_linear(_linear(), bits)
    x = torch.randn(4, IN)
    y16 = q(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), q(x), rtol=0.05, atol=0.05)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
def test_from_weight_matches_from_linear_and_state_dict_roundtrip(bits: int) -> None:
    lin = _linear()
    a = QuantLinear.from_linear(lin, bits)
    b = QuantLinear.from_weight(lin.weight.detach().to(torch.bfloat16).float(), lin.bias, bits)
    assert a.compute_dtype == torch.float32
    empty = QuantLinear(IN, OUT, bits, bias=True)
    empty.load_state_dict(a.state_dict())
    x = torch.randn(3, IN)
    torch.testing.assert_close(empty(x), a(x), rtol=0, atol=0)
    assert b.qweight.shape == a.qweight.shape and b.qscale.shape == a.qscale.shape
    nobias = QuantLinear.from_weight(lin.weight, None, bits)
    assert nobias.bias is None and nobias(x).shape == (3, OUT)


def test_sharded_storage_gives_clear_error() -> None:
    q = QuantLinear.from_linear(_linear(), 8)
    q.weight_int8 = nn.Parameter(q.weight_int8.data[: OUT // 2], requires_grad=False)
    with pytest.raises(RuntimeError, match="sharded"):
        q.dequantized_weight()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        QuantLinear.from_linear(_linear(), 3)
    with pytest.raises(ValueError):
        QuantLinear.from_weight(torch.empty(4, 4, device="meta"), None, 8)
    with pytest.raises(ValueError):
        QuantLinear.from_linear(_linear(), 8)(torch.randn(2, IN + 1))


def test_head_names_by_name() -> None:
    assert "lm_head" in HEAD_NAMES
    assert is_head_name("lm_head") and is_head_name("model.score")
    assert not is_head_name("model.layers.0.self_attn.q_proj")
    assert not is_head_name("bert.encoder.layer.0.output.dense")


class _FakeLoRA(nn.Module):
    """Duck-typed LoRA wrapper: base_layer plus trainable A/B."""

    def __init__(self, base: nn.Linear, r: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_quantize_model_replaces_lora_base_layer_only() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict(
        {
            "proj": _FakeLoRA(nn.Linear(8, 16)),
            "plain": nn.Linear(16, 8),
            "a": nn.Sequential(shared),
            "b": nn.Sequential(shared),
            "lm_head": _FakeLoRA(nn.Linear(8, 32)),
        }
    )
    n = quantize_model(model, 8)
    # proj.base_layer, plain and shared (once); not lm_head's base, not any lora_A / lora_B.
    assert n == 3
    for wrapper in (model["proj"], model["lm_head"]):
        assert type(wrapper.lora_A) is nn.Linear and type(wrapper.lora_B) is nn.Linear
    assert isinstance(model["proj"].base_layer, QuantLinear)
    assert isinstance(model["proj"], _FakeLoRA)
    assert isinstance(model["plain"], QuantLinear)
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], QuantLinear)
    assert type(model["lm_head"].base_layer) is nn.Linear
    assert n == len({id(m) for m in model.modules() if isinstance(m, QuantLinear)})
    x = torch.randn(2, 8, requires_grad=True)
    model["proj"](x).sum().backward()
    assert model["proj"].lora_A.weight.grad is not None and x.grad is not None


def test_quantize_model_custom_skip() -> None:
    model = nn.ModuleDict({"proj": _FakeLoRA(nn.Linear(8, 16)), "head": nn.Linear(16, 4), "keep": nn.Linear(4, 4)})
    n = quantize_model(model, 4, skip=lambda name: name == "keep")
    assert n == 2  # a custom skip replaces the default rule: "head" is quantized too
    assert isinstance(model["proj"].base_layer, QuantLinear)
    assert isinstance(model["head"], QuantLinear)
    assert type(model["keep"]) is nn.Linear
    assert quantize_model(model, 4, skip=lambda name: name == "keep") == 0  # idempotent


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bits,rel_tol", [(8, 0.02), (4, 0.25)])
def test_quantize_tiny_llama(bits: int, rel_tol: float) -> None:
    model = _tiny_llama()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    qmodel = copy.deepcopy(model)
    n = quantize_model(qmodel, bits)
    assert n == n_linear - 1 == 14
    assert type(qmodel.lm_head) is nn.Linear
    others = [m for name, m in qmodel.named_modules() if name != "lm_head"]
    assert not any(isinstance(m, nn.Linear) for m in others)
    with torch.no_grad():
        out = qmodel(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < rel_tol, rel
    if bits == 8:
        assert float((out - ref).abs().max()) < 0.02
    stats = quantized_bytes(qmodel)
    assert stats["layers"] == 14
    quant = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    n_weights = sum(m.in_features * m.out_features for m in quant)
    assert stats["int_bytes"] == (n_weights if bits == 8 else n_weights // 2)


@pytest.mark.parametrize("include_head", [False, True])
def test_merge_finds_the_layers_the_trainer_quantized(tmp_path, include_head: bool) -> None:
    """`dtrain merge --base-bits` (and --quantized-head) names exactly the weights that
    quantize_model quantized under the same quantization.include_head."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtrain.inference.merge import _quantized_keys
    from dtrain.model.quant import QuantLinear, quantize_model, skip_rule
    from tests.helpers import TINY

    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(config)
    quantize_model(model, 8, skip=skip_rule(include_head))  # as Backend.prepare does
    quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert ("lm_head.weight" in quantized) is include_head
    assert _quantized_keys(tmp_path, 8, include_head) == dict.fromkeys(quantized, 8)
