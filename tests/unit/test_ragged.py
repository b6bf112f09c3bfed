"""Ragged examples: flat storage, micro-batches cut to their longest row (same loss and gradients as
rows padded to seq_len), best-fit packing (full rows, never splitting an example, the same loss as
unpacked)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dtrain import data
from dtrain.data import IGNORE, Ragged
from dtrain.data.packing import best_fit
from dtrain.training.loss import token_loss


def _seqs(n: int, seed: int, lo: int = 3, hi: int = 40, vocab: int = 300) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.randint(lo, hi), rng.randint(1, lo - 1)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_ragged_select_concat_and_cache_arrays() -> None:
    seqs = _seqs(7, seed=1)
    r = Ragged.from_seqs(seqs)
    assert r.ids.dtype == r.labels.dtype == torch.int32 and r.offsets.dtype == torch.int64
    assert r.offsets.tolist() == [0, *torch.tensor([len(s) for s, _ in seqs]).cumsum(0).tolist()]
    assert r.seqs() == seqs
    assert r.select(torch.tensor([4, 0, 4])).seqs() == [seqs[4], seqs[0], seqs[4]]
    assert Ragged.concat([r.select(torch.tensor([1])), r.select(torch.tensor([5, 2]))]).seqs() == [
        seqs[1],
        seqs[5],
        seqs[2],
    ]


def test_micro_batch_is_cut_to_its_longest_row() -> None:
    seqs = [([5] * n, [5] * n) for n in (3, 11, 20, 64)]
    ex = data.pad_rows(seqs, 64, pad_id=0)
    assert ex.take(torch.tensor([0, 1]))["input_ids"].shape == (2, 16)  # 11 -> a multiple of 8
    assert ex.take(torch.tensor([2]))["input_ids"].shape == (1, 24)
    assert ex.take(torch.tensor([3, 0]))["input_ids"].shape == (2, 64)
    assert data.pad_rows(seqs[:2], 13, 0).take(torch.tensor([0, 1]))["input_ids"].shape == (2, 13)  # <= seq_len
    b = ex.take(torch.tensor([1, 0]))
    assert b["attention_mask"].sum(1).tolist() == [11, 3] and b["labels"][1, 3:].eq(IGNORE).all()
    assert ex.real_tokens(torch.tensor([1, 0])) == 14 and ex.row_lengths().tolist() == [3, 11, 20, 64]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).float().train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    total, n = token_loss(logits, batch["labels"])
    total.backward()
    return float(total.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_trimmed_batch_equals_rows_padded_to_seq_len(tiny) -> None:
    ex = data.pad_rows(_seqs(4, seed=2), 128, pad_id=0)
    idx = torch.arange(4)
    trimmed, padded = ex.take(idx), ex.take(idx, width=128)
    longest = max(len(s) for s, _ in _seqs(4, seed=2))
    assert trimmed["input_ids"].shape[1] == -(-longest // 8) * 8 < 128 and padded["input_ids"].shape[1] == 128
    lt, nt, gt = _loss_and_grads(tiny, trimmed)
    lp, np_, gp = _loss_and_grads(tiny, padded)
    assert nt == np_ and abs(lt - lp) <= 1e-6 * abs(lp), (lt, lp)
    for k in gp:
        torch.testing.assert_close(gt[k], gp[k], rtol=1e-5, atol=1e-6)  # fp32 sums in another order


def test_best_fit_packed_equals_unpacked(tiny) -> None:
    seqs = _seqs(9, seed=3)
    packed = data.pack_rows(seqs, 96, pad_id=0)
    assert len(packed) < 9 and packed.real_tokens(torch.arange(len(packed))) == sum(len(s) for s, _ in seqs)
    lp, np_, gp = _loss_and_grads(tiny, packed.take(torch.arange(len(packed))))
    lu, nu, gu = _loss_and_grads(tiny, data.pad_rows(seqs, 96, pad_id=0).take(torch.arange(9)))
    assert np_ == nu and abs(lp - lu) <= 1e-5 * abs(lu), (lp, lu)
    for k in gu:
        torch.testing.assert_close(gp[k], gu[k], rtol=1e-5, atol=1e-5)


def _chat_like_lengths(n: int, seed: int) -> list[int]:
    """Two-turn chat lengths like the issue's data: template ~35 tokens, prompt 5-40 words, answer
    5-120 words, ~1.3 tokens a word."""
    rng = random.Random(seed)
    return [35 + round(1.3 * rng.randint(5, 40)) + round(1.3 * rng.randint(5, 120)) for _ in range(n)]


def test_best_fit_rows_are_full_and_deterministic() -> None:
    lengths = _chat_like_lengths(3000, seed=0)
    groups = best_fit(lengths, 512)
    assert sorted(i for g in groups for i in g) == list(range(3000))  # every example once, none split
    sums = [sum(lengths[i] for i in g) for g in groups]
    assert max(sums) <= 512
    fill = sum(lengths) / (512 * len(groups))
    assert fill >= 0.98, fill
    assert best_fit(lengths, 512) == groups
    # what sequential packing (a new row when the next example does not fit) reaches on the same data
    rows, used = 0, 513
    for n in lengths:
        rows, used = (rows, used + n) if used + n <= 512 else (rows + 1, n)
    assert sum(lengths) / (512 * rows) < 0.92


def test_attn_implementation_reaches_the_model_config() -> None:
    from dtrain.config import schema as config
    from dtrain.errors import ConfigError
    from dtrain.model import build as model
    from tests.helpers import TINY

    for impl in ("sdpa", "eager"):
        assert (
            model.hf_config(config.load(TINY, [f"model.attn_implementation={impl}"]).model)._attn_implementation == impl
        )
    if not torch.cuda.is_available():
        with pytest.raises(
            ConfigError,
            match=r"model.attn_implementation = flash_attention_2 needs CUDA and the "
            r"flash_attn package; use sdpa or eager here",
        ):
            config.load(TINY, ["model.attn_implementation=flash_attention_2"])
