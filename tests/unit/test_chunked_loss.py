"""Chunked cross-entropy (dtrain/training/loss.py): the same loss and gradients as the logits path, and the
logits' activation bytes gone (counted by dtrain memory's SavedTensorCounter)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from dtrain import lora
from dtrain.backends import env as dist
from dtrain.backends.single import SingleBackend
from dtrain.config import schema as config
from dtrain.errors import ConfigError
from dtrain.memory.measure import SavedTensorCounter
from dtrain.training import loss as loss_lib
from tests.helpers import REPO, TINY

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"


def build(*overrides: str) -> SingleBackend:
    cfg = config.load(TINY, [f"data.path={CORPUS}", "backend.device=cpu", "lora.targets=[q_proj,v_proj]", *overrides])
    backend = SingleBackend(cfg, dist.detect("cpu", "gloo"))
    backend.build()
    return backend


def batch(seed: int, vocab: int, n: int = 3, seq: int = 24) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt carries no loss
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_ce_equals_cross_entropy(chunk: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 19, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(50, 16, generator=g).requires_grad_()
    b = torch.randn(50, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, 50, (2, 19), generator=g)
    labels[1, 3:9] = -100
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, 50), loss_lib.shift(labels).reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, [h, w] + ([b] if bias else []))
    got = loss_lib.chunked_token_loss(h, w, b, loss_lib.shift(labels), chunk)
    grads = torch.autograd.grad(got * 0.37, [h, w] + ([b] if bias else []))
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_backend_loss_and_lora_grads_equal_unchunked(tied: bool) -> None:
    arch = [f"model.arch.tie_word_embeddings={str(tied).lower()}"]
    chunked = build("training.chunked_loss=true", "training.loss_chunk_tokens=10", *arch)
    plain = build("training.chunked_loss=false", *arch)
    assert loss_lib.installed(chunked.model.get_output_embeddings())
    assert not loss_lib.installed(plain.model.get_output_embeddings())
    for seed in range(2):
        b = batch(seed, 512)
        (t1, n1), (t2, n2) = chunked.loss(b), plain.loss(b)
        assert n1 == n2 == 3 * 23 - 4  # labels 1..4 of row 0 are masked
        assert abs(t1.item() - t2.item()) <= 1e-6 * t2.item()
        t1.backward(), t2.backward()
        g1 = {n: p.grad for n, p in chunked.model.named_parameters() if lora.is_lora_param(n)}
        g2 = {n: p.grad for n, p in plain.model.named_parameters() if lora.is_lora_param(n)}
        assert g1.keys() == g2.keys() and len(g1) == 8
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-6, atol=1e-6)
    # outside the loss (evaluation logits, generation) the head still returns logits
    ids = batch(5, 512)["input_ids"]
    torch.testing.assert_close(chunked.forward({"input_ids": ids}), plain.forward({"input_ids": ids}))


def test_auto_is_on_for_lora_and_off_for_full_or_a_quantized_head() -> None:
    assert loss_lib.installed(build().model.get_output_embeddings())
    assert not loss_lib.installed(build("mode=full").model.get_output_embeddings())
    quantized_head = ["quantization.bits=8", "quantization.include_head=true"]
    assert not loss_lib.installed(build(*quantized_head).model.get_output_embeddings())
    with pytest.raises(ConfigError, match="chunked_loss = true needs a plain linear output head"):
        build("training.chunked_loss=true", *quantized_head)


def test_full_fine_tuning_head_gradient_equal() -> None:
    chunked = build("mode=full", "training.chunked_loss=true", "training.loss_chunk_tokens=16")
    plain = build("mode=full", "training.chunked_loss=false")
    b = batch(3, 512)
    chunked.loss(b)[0].backward(), plain.loss(b)[0].backward()
    for (n, p), (_, q) in zip(chunked.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def loss_activation_bytes(backend: SingleBackend, b: dict) -> int:
    """Activation bytes autograd saves in the step's forward and loss (dtrain memory's counter)."""
    params = [p.data for p in backend.model.parameters()]
    with SavedTensorCounter(backend.model, params) as counter:
        backend.loss(b)
    return counter.activation_bytes


def test_activation_bytes_drop_by_the_logits_at_a_128k_vocabulary() -> None:
    arch = [
        "model.arch.vocab_size=128256",
        "model.arch.num_hidden_layers=1",
        "model.arch.hidden_size=32",
        "model.arch.intermediate_size=64",
    ]
    b = batch(0, 128256, n=2, seq=64)
    plain = loss_activation_bytes(build("training.chunked_loss=false", *arch), b)
    chunked = loss_activation_bytes(build("training.chunked_loss=true", "training.loss_chunk_tokens=32", *arch), b)
    logits = 2 * 64 * 128256 * 4
    assert plain - chunked >= 0.99 * logits  # the log-softmax of all logits cross_entropy saves is gone
    assert chunked * 100 < logits  # what remains: hidden states and one float per token


def test_labelled_only_head_equals_full_head() -> None:
    """Gathering the labelled rows before the head gives the loss and gradients of running the
    head on every position (ChunkedCE over all rows, IGNORE rows masked inside)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 21, 16, generator=g).requires_grad_()
    w = torch.randn(70, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 70, (3, 21), generator=g)
    labels[:, :12] = -100  # prompts
    labels[2, 17:] = -100  # padding
    shifted = loss_lib.shift(labels)
    full = loss_lib.ChunkedCE.apply(h.reshape(-1, 16), w, None, shifted.reshape(-1), 8, torch.float32)
    full_grads = torch.autograd.grad(full, [h, w])
    got = loss_lib.chunked_token_loss(h, w, None, shifted, 8)
    grads = torch.autograd.grad(got, [h, w])
    assert abs(got.item() - full.item()) <= 1e-6 * abs(full.item())
    for a, r in zip(grads, full_grads):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    assert grads[0][:, :11].abs().sum() == 0  # unlabelled positions get no gradient


def test_chunk_from_the_vocabulary() -> None:
    assert [loss_lib.auto_chunk(v) for v in (49_152, 128_256, 262_144)] == [1365, 523, 256]
    head = torch.nn.Linear(16, 128_256, bias=False)
    loss_lib.install(head)
    assert head._dtrain_chunk == 523
    small = torch.nn.Linear(16, 50)
    loss_lib.install(small, chunk=7)  # training.loss_chunk_tokens overrides
    assert small._dtrain_chunk == 7
