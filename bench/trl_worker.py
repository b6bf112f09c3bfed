"""One TRL run for bench/vs_trl.py: `SFTTrainer` + a PEFT `LoraConfig` on prompt-completion records
(`completion_only_loss`), or on pre-tokenized records (`input_ids` + `completion_mask`, which
SFTTrainer takes as they are), timing each optimizer step; prints one JSON line `VS_TRL {...}` with
each step's seconds, real tokens, computed positions and loss (unrounded: the Trainer's logged loss
is rounded to 4 decimals, too coarse for the 1e-4 first-batch comparison).

    PYTHONPATH=.trl-site python bench/trl_worker.py --model DIR --data pc.jsonl --packing 1 --steps 13

TRL is not a dtrain dependency: vs_trl.py puts a private install (`pip install --target .trl-site
--no-deps trl==1.16.*`) on this process's PYTHONPATH only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/trl_worker.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="prompt-completion jsonl")
    p.add_argument("--out", default="/tmp/vs_trl_trl")
    p.add_argument("--packing", type=int, default=1)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sft_config(a: argparse.Namespace, SFTConfig):
    """TRL's settings for the same run as dtrain's: LR, steps, micro-batch, packing, assistant-only loss."""
    return SFTConfig(
        output_dir=a.out,
        max_length=a.seq_len,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        max_steps=a.steps,
        logging_steps=1,
        use_cpu=True,
        packing=bool(a.packing),
        completion_only_loss=True,
        report_to=[],
        save_strategy="no",
        seed=a.seed,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        warmup_steps=0,
        weight_decay=0.0,
        bf16=False,
        fp16=False,
    )  # SFTConfig defaults to bf16 autocast: fp32 like dtrain (2e-3 off else)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []
    seen: dict[str, list] = {"tokens": [], "positions": [], "losses": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    class Recording(SFTTrainer):
        """SFTTrainer recording, per training forward, its loss and the tokens it saw."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")  # absent when padding-free (packed): every position is real
                seen["tokens"].append(int(mask.sum()) if mask is not None else ids.numel())
                seen["positions"].append(ids.numel())
                seen["losses"].append(float((out[0] if return_outputs else out).detach()))
            return out

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    cfg = sft_config(a, SFTConfig)
    lora = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Recording(
        model=model,
        args=cfg,
        train_dataset=load_dataset("json", data_files=a.data, split="train"),
        processing_class=tok,
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    trainer.train()
    print("VS_TRL " + json.dumps({"step_s": times, **seen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
