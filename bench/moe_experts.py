"""Expert compute of a tiny-width, many-expert MoE (Qwen3-MoE shape, 64 experts, top-8), one process.

Tokens/s of a training step (forward, backward, AdamW) and the forward time spent inside the experts
modules, for: frozen experts (LoRA on attention only; transformers' own experts forward, its
`grouped_mm` path and its `eager` per-expert loop), dtrain's expert LoRA (tokens sorted by expert,
grouped matmuls for W and for A, B; W + BA never built), PEFT 0.21's expert LoRA (ParamWrapper,
which materialises W + BA for the whole expert stack every forward) and full fine-tuning of the
experts; dtrain's expert LoRA with torch's grouped_mm off (its per-expert loop, as before); and
dtrain's expert LoRA on int8 expert weights (dtrain/model/expert_quant.py). Prints a
markdown table and appends it, with the machine, versions and load, to bench/RESULTS.md (--no-write
to skip).

    python bench/moe_experts.py [--steps 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain import lora
from dtrain.lora import experts  # noqa: E402

ARCH = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=64,
    num_experts_per_tok=8,
    decoder_sparse_step=1,
    max_position_embeddings=256,
)
BATCH, SEQ, RANK = 4, 128, 8


def build(variant: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", **ARCH)
    cfg._experts_implementation = "eager" if variant == "frozen (HF eager loop)" else "grouped_mm"
    model = AutoModelForCausalLM.from_config(cfg)
    spec = lora.AdapterSpec(r=RANK, alpha=2.0 * RANK)
    attention = [n for n in lora.linear_names(model) if ".self_attn." in n]
    if variant.startswith("PEFT"):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model,
            LoraConfig(
                r=RANK,
                lora_alpha=2 * RANK,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            ),
        )
    lora.inject(model, attention, spec)
    if variant.startswith("dtrain expert LoRA"):
        experts.inject(
            model, experts.select_parameters(model, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), spec
        )
        if "int8" in variant:  # quantization.bits=8 on the experts: dequantized one expert at a time
            experts.quantize(model, 8)
    lora.freeze_base(model)
    if variant.startswith("full FT"):
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad or ".experts." in name)
    return model


def measure(variant: str, steps: int) -> dict:
    from dtrain.lora import expert_forward

    grouped_mm = expert_forward._GROUPED_MM
    if "loop" in variant and variant.startswith("dtrain"):  # the per-expert loop grouped_mm replaced
        expert_forward._GROUPED_MM = None
    try:
        return _measure(variant, steps)
    finally:
        expert_forward._GROUPED_MM = grouped_mm


def _measure(variant: str, steps: int) -> dict:
    model = build(variant)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ARCH["vocab_size"], (BATCH, SEQ), generator=g)
    spent = [0.0]
    starts: dict[int, float] = {}
    for m in model.modules():
        if type(m).__name__ == "Qwen3MoeExperts":  # the experts' own call (dtrain's forward runs inside it)
            m.register_forward_pre_hook(lambda mod, *_: starts.__setitem__(id(mod), time.perf_counter()))
            m.register_forward_hook(
                lambda mod, *_: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(mod)])
            )
    times = []
    for i in range(steps + 2):  # 2 warm-up steps
        spent[0] = 0.0
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append((time.perf_counter() - t0, spent[0]))
    times.sort()
    step, in_experts = times[len(times) // 2]
    trainable = sum(p.numel() for p in params)
    return {
        "variant": variant,
        "tok_s": BATCH * SEQ / step,
        "step_s": step,
        "experts_fwd_s": in_experts,
        "trainable": trainable,
        "loss": float(loss),
    }


VARIANTS = [
    "frozen (HF grouped_mm)",
    "frozen (HF eager loop)",
    "dtrain expert LoRA (grouped)",
    "dtrain expert LoRA (per-expert loop, before grouped_mm)",
    "dtrain expert LoRA, int8 experts (grouped)",
    "PEFT expert LoRA (W + BA per forward)",
    "full FT of the experts",
]


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | tok/s | median step s | forward in experts s | trainable params |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['tok_s']:.0f} | {r['step_s']:.3f} | {r['experts_fwd_s']:.3f} | {r['trainable']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    load = os.getloadavg()[0]
    rows = [measure(v, args.steps) for v in VARIANTS]
    import peft
    import transformers

    head = (
        f"## Expert compute, {ARCH['num_experts']} experts top-{ARCH['num_experts_per_tok']} "
        f"(bench/moe_experts.py)\n\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, load {load:.2f} at start; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}. Qwen3-MoE shape: hidden {ARCH['hidden_size']}, "
        f"expert width {ARCH['moe_intermediate_size']}, {ARCH['num_hidden_layers']} layers, {BATCH} x {SEQ} "
        f"tokens per step, fp32, LoRA r={RANK} (attention in every variant, experts where named); "
        f"median of {args.steps} steps after 2 warm-up.\n"
    )
    text = head + "\n" + table(rows) + f"\n\nLoad at the end: {os.getloadavg()[0]:.2f}.\n"
    print(text)
    if not args.no_write:
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
