"""Packing: a packed row (position ids restarting per example, no attention mask) gives the loss and
gradients of the same examples one per padded row (sdpa and eager): transformers detects the packed
format from the position ids and keeps attention inside examples. Real SmolLM2 tokens and template;
the model is a tiny random Llama with SmolLM2's vocabulary (the real 135M model takes ~80 s per
attention implementation on 2 CPU cores, and gave the same result when tried)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dtrain import data
from dtrain.data import IGNORE, chat
from dtrain.training.loss import token_loss

CONVS = [
    [("user", "What is 2+2?"), ("assistant", "4.")],
    [
        ("system", "Be kind."),
        ("user", "Name a colour."),
        ("assistant", "Blue, like the sea."),
        ("user", "Another?"),
        ("assistant", "Green."),
    ],
    [("user", "Say hi."), ("assistant", "Hi there! How can I help you today?")],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def seqs(tok):
    out = []
    for c in CONVS:
        ids, learn = chat.encode_chat(tok, tok.chat_template, [{"role": r, "content": t} for r, t in c])
        out.append((ids, [t if m else IGNORE for t, m in zip(ids, learn)]))
    return out


def test_pack_rows_layout(seqs, tok) -> None:
    lengths = [len(s) for s, _ in seqs]
    assert lengths[0] < min(lengths[1:])  # the first conversation is the shortest
    L = lengths[1] + lengths[2] + 5  # best fit: the two longest share a row, the shortest is alone
    ex = data.pack_rows(seqs, L, tok.pad_token_id)
    assert len(ex) == 2 and ex.row_lengths().tolist() == [lengths[0], lengths[1] + lengths[2]]
    assert ex.position_ids[1].tolist() == [*range(lengths[1]), *range(lengths[2]), *range(5)]
    assert ex.input_ids[1, : lengths[1] + lengths[2]].tolist() == seqs[1][0] + seqs[2][0]
    assert ex.labels[1, lengths[1]] == IGNORE  # an example's first token is never a target
    assert ex.labels[1, lengths[1] + 1 : lengths[1] + lengths[2]].tolist() == seqs[2][1][1:]
    assert int(ex.attention_mask.sum()) == sum(lengths) and ex.real_tokens(torch.tensor([0])) == lengths[0]
    batch = ex.take(torch.tensor([0, 1]))
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: the model sees the packing
    assert batch["input_ids"].shape == (2, min(L, -(-(lengths[1] + lengths[2]) // 8) * 8))  # cut to the longest row


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    total, n = token_loss(logits, batch["labels"])
    (total / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(total.detach() / n), n, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(seqs, tok, attn) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg).float()
    model.train()
    lengths = [len(s) for s, _ in seqs]
    unpacked = data.pad_rows(seqs, max(lengths), tok.pad_token_id).take(torch.arange(3))
    # the full row, with a padding tail (its own position segment): take() alone would cut the row to 136
    packed = data.pack_rows(seqs, sum(lengths) + 7, tok.pad_token_id).take(torch.tensor([0]), width=sum(lengths) + 7)
    assert packed["input_ids"].shape == (1, sum(lengths) + 7)
    lu, nu, gu = loss_and_grads(model, unpacked)
    lp, np_, gp = loss_and_grads(model, packed)
    assert nu == np_ == sum(sum(v != IGNORE for v in lab[1:]) for _, lab in seqs)
    assert abs(lu - lp) <= 1e-5 * abs(lu), (lu, lp)
    assert gu.keys() == gp.keys() and len(gu) == len(list(model.parameters()))
    for k in gu:
        torch.testing.assert_close(gp[k], gu[k], rtol=1e-5, atol=1e-5)
    # without the position ids the examples would see each other: a different loss
    crossed = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    assert abs(loss_and_grads(model, crossed)[0] - lu) > 1e-3
