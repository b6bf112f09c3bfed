"""The template a run trained with is the template it is evaluated with: a tiny model whose
tokenizer has no chat template (as Gemma 3's GGUF) but Gemma's turn tokens, trained on conversations
with data.chat_template = Gemma 3's turn format to answer "ok". Its adapter and saved tokenizer keep
that template and the stop tokens (EOS and <end_of_turn>); training.eval_generate and generation use
them (all answers exact; without <end_of_turn> as a stop token none would be), and answer exactly
as PEFT does when given that template and those stop tokens by hand."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dtrain.config import schema as config_lib
from dtrain.errors import ConfigError
from dtrain.inference import generate, merge as merge_lib
from dtrain.model import importer, templates
from dtrain.model.tokenizer import build_tokenizer
from tests.helpers import REPO, TINY, run_dtrain

DATES = REPO / "dtrain" / "assets" / "dates_train.jsonl"
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model dir, run dir, end-of-turn id, eval file): a tiny Llama with a template-less tokenizer,
    and a LoRA run on conversations rendered with Gemma 3's template from a .jinja file."""
    tmp = tmp_path_factory.mktemp("template")
    turns = [json.loads(x)["messages"][0] for x in DATES.read_text().splitlines()[:68]]
    for name, part in (("train", turns[:64]), ("eval", turns[64:])):  # one short answer: learned in 8 steps
        (tmp / f"{name}.jsonl").write_text(
            "".join(json.dumps({"messages": [t, {"role": "assistant", "content": "ok"}]}) + "\n" for t in part)
        )
    tok = build_tokenizer(REPO / "dtrain" / "assets" / "tiny_corpus.txt")
    tok.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    assert tok.chat_template is None
    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"], vocab_size=len(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    (tmp / "gemma.jinja").write_text(templates.GEMMA3)
    run_dtrain(
        [
            "train",
            str(TINY),
            "model.arch=null",
            f"model.path={tmp / 'model'}",
            f"data.path={tmp / 'train.jsonl'}",
            f"data.eval_path={tmp / 'eval.jsonl'}",
            "data.format=messages",
            f"data.chat_template={tmp / 'gemma.jinja'}",
            "data.seq_len=64",
            "training.max_steps=8",
            "training.lr=0.01",
            "training.warmup_steps=2",
            "training.eval_every=0",
            "training.eval_generate=4",
            f"output.dir={tmp / 'run'}",
        ]
    )
    return tmp / "model", tmp / "run", tok.convert_tokens_to_ids("<end_of_turn>"), tmp / "eval.jsonl"


def peft_answers(model_dir, adapter_dir, evals, stop: list[int]) -> list[list[int]]:
    """Greedy answers (token ids) of PEFT's base + adapter to the eval prompts, rendered with
    Gemma 3's template by hand and stopped at `stop`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir
    ).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for line in evals.read_text().splitlines():
        chat = json.loads(line)["messages"][:1]
        text = tok.apply_chat_template(chat, chat_template=templates.GEMMA3, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(
                ids, max_new_tokens=64, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id
            )[0, ids.shape[1] :]
        out.append(new.tolist())
    return out


def test_the_run_keeps_its_template_and_stop_tokens_and_is_evaluated_with_them(run):
    model_dir, out, eot, evals = run
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    for d in (out / "adapter", out / "tokenizer"):
        assert templates.read_settings(d) == (templates.GEMMA3, [eos, eot])
    assert AutoTokenizer.from_pretrained(out / "tokenizer").chat_template == templates.GEMMA3
    model, tok = generate.load(model_dir, [str(out / "adapter")])
    assert tok.chat_template == templates.GEMMA3 and model.generation_config.eos_token_id == [eos, eot]
    gen = generate.Generator(model, tok)
    assert gen.render("Hi") == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ref = peft_answers(model_dir, out / "adapter", evals, [eos, eot])
    rows = [json.loads(x) for x in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [r["got"] for r in rows] == [tok.decode(ids, skip_special_tokens=True).strip() for ids in ref]
    assert [r["got"] for r in rows] == ["ok"] * 4 and all(ids[-1] == eot for ids in ref), ref
    assert [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_exact_match" in r
    ] == [{"step": 8, "eval_exact_match": 1.0}]
    # without <end_of_turn> as a stop token the answers run on past the learned end of the turn
    assert all(len(ids) > len(r) for ids, r in zip(peft_answers(model_dir, out / "adapter", evals, [eos]), ref))
    merged = merge_lib.merge(model_dir, out / "adapter", out.parent / "merged")  # generates as the adapter did
    model, tok = generate.load(merged)
    assert tok.chat_template == templates.GEMMA3 and model.generation_config.eos_token_id == [eos, eot]


def test_chat_template_override_and_what_a_model_without_one_says(run, tmp_path, caplog):
    model_dir, out, eot, _ = run
    chatml = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>assistant {% endif %}"
    )
    model, tok = generate.load(model_dir, [str(out / "adapter")], chat_template=chatml)
    assert tok.chat_template == chatml and templates.turn_end_token(tok, chatml) == tok.eos_token_id
    assert model.generation_config.eos_token_id == [tok.eos_token_id, eot]  # the run's stop tokens stay
    _, plain = generate.load(model_dir)  # no adapter: the model's own (none)
    assert plain.chat_template is None and templates.turn_end_token(plain, None) is None
    with caplog.at_level(logging.WARNING, logger="dtrain.model.importer"):
        importer.complete_chat_settings(model, plain, "x.gguf", None, ())
    assert [r.getMessage() for r in caplog.records] == [
        "x.gguf has no chat template: set data.chat_template to train on conversations "
        "(and --chat-template for dtrain eval/generate/chat)"
    ]
    gguf = tmp_path / "m.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as e:
        config_lib.load(TINY, ["model.arch=null", f"model.path={gguf}"])
    assert str(e.value).endswith(
        f"model.path = '{gguf}' is a GGUF file; dtrain needs a model directory: "
        f"run `dtrain import {gguf} --out DIR` once and use DIR"
    )
