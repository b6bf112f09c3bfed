"""DPO's loss against an independent computation: a PEFT model with a non-zero adapter, enabled
(the policy) and disabled (the reference), the tokenizer's own chat template, and the summed
log-probabilities of the completion tokens (averaged per token for ipo, as TRL does). dtrain,
started with `lora.init_from` that adapter on the same pairs, logs the same first loss (1e-5) and
the same TRL metrics; the chunked head and the logits path agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dtrain.config import schema as config_lib
from dtrain.training import trainer

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "dtrain" / "assets" / "tiny_preferences.jsonl"
N_PAIRS = 6
BETA = 0.2


@pytest.fixture(scope="module")
def setup(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer (a plain HF dir), a PEFT adapter
    with random A and B on it, and N_PAIRS preference records."""
    d = tmp_path_factory.mktemp("dpo")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():  # PEFT's random B is small: make the adapter move the logps clearly
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    model.save_pretrained(d / "adapter")
    records = [json.loads(line) for line in PAIRS.read_text().splitlines()[:N_PAIRS]]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d, tok, model, records


def completion_logp(model, tok, prompt, completion) -> tuple[float, int]:
    """Sum of log p of the completion's tokens (content + <|im_end|>), and their count."""
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    assert full.startswith(p_text)
    c_text = full[len(p_text) :].rstrip()  # the newline after <|im_end|> is the template's, not the answer's
    p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
    c_ids = tok(c_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logp[torch.arange(len(targets)), targets][len(p_ids) - 1 :]
    return float(picked.double().sum()), len(c_ids)


def independent_loss(model, tok, records, loss: str) -> tuple[float, dict]:
    z, acc, cs, rs = [], [], [], []
    for rec in records:
        vals = {}
        for side in ("chosen", "rejected"):
            pol, n = completion_logp(model, tok, rec["prompt"], rec[side])
            with model.disable_adapter():
                ref, _ = completion_logp(model, tok, rec["prompt"], rec[side])
            vals[side] = (pol / n, ref / n) if loss == "ipo" else (pol, ref)
        (pc, rc), (pr, rr) = vals["chosen"], vals["rejected"]
        z.append((pc - pr) - (rc - rr))
        cs.append(BETA * (pc - rc))
        rs.append(BETA * (pr - rr))
        acc.append(float(cs[-1] > rs[-1]))
    zt = torch.tensor(z, dtype=torch.float64)
    per = -F.logsigmoid(BETA * zt) if loss == "sigmoid" else (zt - 1 / (2 * BETA)) ** 2
    metrics = {
        "rewards/chosen": sum(cs) / len(cs),
        "rewards/rejected": sum(rs) / len(rs),
        "rewards/accuracies": sum(acc) / len(acc),
        "rewards/margins": (sum(cs) - sum(rs)) / len(cs),
    }
    return float(per.mean()), metrics


def dtrain_first_row(d: Path, out: Path, loss: str, *extra: str) -> dict:
    cfg = config_lib.load(
        None,
        [
            f"model.path={d / 'base'}",
            "objective=dpo",
            "data.format=preference",
            f"data.path={d / 'pairs.jsonl'}",
            f"data.eval_path={d / 'pairs.jsonl'}",
            f"data.cache_dir={out / 'cache'}",
            "data.seq_len=64",
            f"dpo.loss={loss}",
            f"dpo.beta={BETA}",
            f"lora.init_from={d / 'adapter'}",
            "lora.r=4",
            "lora.alpha=8",
            "training.max_steps=1",
            f"training.micro_batch_size={N_PAIRS}",
            "training.eval_every=0",
            "logging.loss_curve=false",
            f"output.dir={out}",
            *extra,
        ],
    )
    assert trainer.run(cfg) == 0
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_first_logged_loss_equals_peft_computation(setup, tmp_path, loss):
    d, tok, model, records = setup
    want, metrics = independent_loss(model, tok, records, loss)
    row = dtrain_first_row(d, tmp_path / "run", loss)
    print(f"{loss}: independent {want:.8f}, dtrain {row['loss']:.8f}")
    assert want > 0 and abs(row["loss"] - want) < 1e-5
    for k, v in metrics.items():
        assert abs(row[k] - v) < 1e-5, (k, row[k], v)
    if loss == "sigmoid":  # the logits path (no chunked head) gives the same numbers
        plain = dtrain_first_row(d, tmp_path / "plain", loss, "training.chunked_loss=false")
        assert abs(plain["loss"] - want) < 1e-5 and abs(plain["grad_norm"] - row["grad_norm"]) < 1e-5
