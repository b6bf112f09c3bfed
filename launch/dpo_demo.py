"""DPO on the real SmolLM2-135M-Instruct (docs/dpo.md): preference pairs from the shipped date task,
chosen = the correct answer, rejected = the base model's own (wrong) greedy answer (its first 12 tokens); DPO from the
base and from an SFT adapter; held-out preference accuracy and exact match before and after.

    python launch/dpo_demo.py [OUT]      (default runs/dpo_demo; about 10-30 minutes on 2 CPU cores, by load)

Preference accuracy: the share of held-out pairs whose chosen completion has the higher summed
log-probability under the model (the tokenizer's chat template, completion tokens only), computed
here with transformers + PEFT-format adapters loaded by dtrain.generate, not with dtrain's trainer.
Writes OUT/dpo_demo.json and prints one line per model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TRAIN, EVAL = REPO / "dtrain/assets/dates_train.jsonl", REPO / "dtrain/assets/dates_eval.jsonl"
N_TRAIN, N_EVAL = 64, 32  # pairs built; kept small so that the demo runs in minutes on 2 busy CPU cores
COMMON = ["lora.r=8", "lora.alpha=16", "lora.targets=[q_proj,k_proj,v_proj,o_proj]", "data.seq_len=64",
          "training.micro_batch_size=4", "training.warmup_steps=2", "training.eval_batches=8",
          "logging.loss_curve=false", "output.overwrite=true"]


def records(path: Path, n: int | None = None) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def answers(model_dir: Path, adapter: Path | None, prompts: list[str]) -> list[str]:
    from dtrain import generate

    model, tok = generate.load(model_dir, [str(adapter)] if adapter else [])
    return generate.Generator(model, tok).generate(prompts, generate.Sampling(max_new_tokens=12), batch_size=32)


def pairs_file(recs: list[dict], rejected: list[str], path: Path) -> int:
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["response"]}],
             "rejected": [{"role": "assistant", "content": bad}]}
            for r, bad in zip(recs, rejected) if bad.strip() and bad.strip() != r["response"]]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return len(rows)


@torch.no_grad()
def completion_logp(model, tok, prompt: list[dict], completion: list[dict]) -> float:
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    c_text = tok.apply_chat_template(prompt + completion, tokenize=False)[len(p_text):].rstrip()
    p_ids, c_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (p_text, c_text))
    ids = torch.tensor([p_ids + c_ids])
    logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(p_ids) - 1:].sum())


def evaluate(model_dir: Path, adapter: Path | None, pairs: Path) -> dict:
    from dtrain import evaluate as ev, generate

    model, tok = generate.load(model_dir, [str(adapter)] if adapter else [])
    model.eval()
    rows = records(pairs)
    wins = sum(completion_logp(model, tok, r["prompt"], r["chosen"]) > completion_logp(model, tok, r["prompt"],
                                                                                      r["rejected"]) for r in rows)
    em = ev.exact_match(generate.Generator(model, tok), records(EVAL, N_EVAL), generate.Sampling(max_new_tokens=12))
    return {"preference_accuracy": wins / len(rows), "pairs": len(rows), "exact_match": em.accuracy,
            "exact_correct": em.correct, "exact_total": em.total, "examples": em.records[:3]}


def train(out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "dtrain", "train", str(REPO / "configs/smollm2_dates.yaml"), "backend.name=none",
           *COMMON, *overrides, f"output.dir={out}"]
    subprocess.run(cmd, cwd=REPO, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"first": rows[0], "last": rows[-1]}


def main(out: Path) -> dict:
    from dtrain import importer

    out.mkdir(parents=True, exist_ok=True)
    base = importer.resolve("smollm2-135m-instruct")
    train_recs, eval_recs = records(TRAIN, N_TRAIN), records(EVAL, N_EVAL)
    got = answers(base, None, [r["prompt"] for r in train_recs + eval_recs])
    n_train = pairs_file(train_recs, got[:N_TRAIN], out / "train_pairs.jsonl")
    n_eval = pairs_file(eval_recs, got[N_TRAIN:], out / "eval_pairs.jsonl")
    dpo = ["objective=dpo", "data.format=preference", f"data.path={out / 'train_pairs.jsonl'}",
           f"data.eval_path={out / 'eval_pairs.jsonl'}", "dpo.beta=0.1", "training.lr=1e-3",
           "training.max_steps=16", "training.eval_every=16"]
    result = {"train_pairs": n_train, "eval_pairs": n_eval, "base": evaluate(base, None, out / "eval_pairs.jsonl")}
    print("base:", json.dumps(result["base"]), flush=True)
    result["dpo_from_base_run"] = train(out / "dpo_base", *dpo)
    result["dpo_from_base"] = evaluate(base, out / "dpo_base/adapter", out / "eval_pairs.jsonl")
    print("dpo from base:", json.dumps(result["dpo_from_base"]), flush=True)
    result["sft_run"] = train(out / "sft", "training.max_steps=12", "training.lr=2e-3", "training.eval_every=12",
                              "training.micro_batch_size=8")
    result["sft"] = evaluate(base, out / "sft/adapter", out / "eval_pairs.jsonl")
    print("sft:", json.dumps(result["sft"]), flush=True)
    sft = out / "sft/adapter"
    result["dpo_from_sft_run"] = train(out / "dpo_sft", *dpo, f"lora.init_from={sft}", f"dpo.reference=adapter:{sft}")
    result["dpo_from_sft"] = evaluate(base, out / "dpo_sft/adapter", out / "eval_pairs.jsonl")
    print("dpo from sft:", json.dumps(result["dpo_from_sft"]), flush=True)
    (out / "dpo_demo.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs" / "dpo_demo")
