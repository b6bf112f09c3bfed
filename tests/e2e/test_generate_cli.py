"""`dtrain generate`, `chat` and `eval` as a user runs them: a tiny Llama with SmolLM2's tokenizer
and chat template, two adapters trained by dtrain, answers compared with PEFT's greedy generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.helpers import REPO, TINY, run_dtrain

pytestmark = pytest.mark.slow
DATES = REPO / "dtrain" / "assets" / "dates_train.jsonl"
PROMPTS = ["Convert the date 2001-02-03.", "Convert the date 1977-07-07."]


@pytest.fixture(scope="module")
def setup(smollm2_dir, tmp_path_factory):
    """(model dir, adapter a, adapter b): the tiny Llama (vocab 49152) and two 3-step adapters."""
    tmp = tmp_path_factory.mktemp("gen")
    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"], vocab_size=49152)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    model.save_pretrained(tmp / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / f, tmp / "model" / f)
    for name, targets in (("a", "[q_proj,v_proj]"), ("b", "all-linear")):
        run_dtrain(
            [
                "train",
                str(TINY),
                "model.arch=null",
                f"model.path={tmp / 'model'}",
                f"lora.targets={targets}",
                f"data.path={DATES}",
                "data.format=messages",
                "data.seq_len=64",
                "training.max_steps=3",
                "training.lr=0.02",
                "training.eval_every=0",
                f"output.dir={tmp / name}",
            ]
        )
    return tmp / "model", tmp / "a" / "adapter", tmp / "b" / "adapter"


def peft_answers(model_dir, adapter_dir) -> list[str]:
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).input_ids
        with torch.no_grad():
            new = model.eval().generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


@pytest.mark.ondemand  # ~40 s; switching stays in test_chat_switches_adapters..., PEFT equality in the merge tests
def test_generate_switches_adapters_by_name_and_equals_peft(setup, tmp_path):
    model_dir, a, b = setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    got = {}
    for use in ("a", "b"):
        out = tmp_path / f"out-{use}.jsonl"
        run_dtrain(
            [
                "generate",
                "--model",
                str(model_dir),
                "--adapter",
                f"a={a}",
                "--adapter",
                f"b={b}",
                "--use",
                use,
                "--input",
                str(prompts),
                "--output",
                str(out),
                "--max-new-tokens",
                "8",
            ]
        )
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == [0, 1]  # each record kept, with its output added
        got[use] = [r["output"] for r in rows]
    base = run_dtrain(["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "8"])
    assert got["a"] == peft_answers(model_dir, a)
    assert got["b"] == peft_answers(model_dir, b)
    plain = peft_answers(model_dir, None)
    assert base.stdout.strip() == plain[0]
    assert got["a"] != got["b"] or got["a"] != plain  # the adapters change what the model says


def test_chat_switches_adapters_and_keeps_history(setup):
    model_dir, a, b = setup
    script = f"{PROMPTS[0]}\n/adapter b\n/reset\n{PROMPTS[0]}\n/base\n/reset\n{PROMPTS[0]}\n/quit\n"
    proc = run_dtrain(
        ["chat", "--model", str(model_dir), "--adapter", f"a={a}", "--adapter", f"b={b}", "--max-new-tokens", "8"],
        input=script,
    )
    answers = proc.stdout.strip().splitlines()
    assert answers == [peft_answers(model_dir, a)[0], peft_answers(model_dir, b)[0], peft_answers(model_dir, None)[0]]


def test_generate_and_eval_refuse_bad_input_in_one_line(setup, tmp_path):
    model_dir, a, _ = setup
    (tmp_path / "exists.jsonl").write_text('{"prompt": "hi"}\n')
    cases = {
        ("--use", "nope"): "--use 'nope': no adapter of that name (loaded: a)",
        ("--output", str(tmp_path / "exists.jsonl")): "file exists",
    }
    for extra, message in cases.items():
        args = [
            "generate",
            "--model",
            str(model_dir),
            "--adapter",
            f"a={a}",
            "--input",
            str(tmp_path / "exists.jsonl"),
            "--output",
            str(tmp_path / "new.jsonl"),
            *extra,
        ]
        proc = run_dtrain(args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    proc = run_dtrain(["eval", "--model", str(model_dir), "--data", str(bad)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dtrain: error: --data '{bad}': record 0: needs 'messages' ending "
        "with an assistant turn, or 'prompt' and 'response'"
    )


def test_training_ends_with_exact_match_on_held_out_prompts(setup, tmp_path):
    """training.eval_generate: the saved adapter answers the first N prompts of data.eval_path after
    the last step; the per-record file and the metrics row agree with `dtrain eval` on that adapter."""
    model_dir, _, _ = setup
    out = tmp_path / "run"
    evals = REPO / "dtrain" / "assets" / "dates_eval.jsonl"
    run_dtrain(
        [
            "train",
            str(TINY),
            "model.arch=null",
            f"model.path={model_dir}",
            f"data.path={DATES}",
            f"data.eval_path={evals}",
            "data.format=messages",
            "data.seq_len=64",
            "training.max_steps=2",
            "training.eval_every=0",
            "training.eval_generate=3",
            f"output.dir={out}",
        ]
    )
    rows = [json.loads(x) for x in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["correct"] == (r["got"] == r["expected"]) for r in rows)
    metric = [
        r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "eval_exact_match" in r
    ]
    assert metric == [{"step": 2, "eval_exact_match": sum(r["correct"] for r in rows) / 3}]
    run_dtrain(
        [
            "eval",
            "--model",
            str(model_dir),
            "--adapter",
            str(out / "adapter"),
            "--data",
            str(evals),
            "--limit",
            "3",
            "--max-new-tokens",
            "64",
            "--out",
            str(tmp_path / "eval.jsonl"),
        ]
    )
    again = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["got"] for r in again] == [r["got"] for r in rows]
    proc = run_dtrain(["train", str(TINY), "training.eval_generate=3", f"output.dir={tmp_path / 'bad'}"], check=False)
    assert proc.returncode == 2 and "training.eval_generate needs data.eval_path" in proc.stderr
