"""bench/run.py's arithmetic (tokens/s, MFU), goal verdicts and the markdown it prints and records."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from bench.common import Device, overloaded
from bench.presets import GPU_PEAK_BF16, LORA, Preset
from bench.runners import Outcome


@dataclass(frozen=True)
class RunContext:
    """What the results record next to the table: the run's settings and its machine."""

    preset: Preset
    device: Device
    params: dict  # count_params: total, linear
    versions: dict
    date: str
    load_start: str
    load_end: str
    git: str
    command: str
    nproc: int
    dtype: str


def mib(b: float) -> str:
    if b is None or not math.isfinite(b):
        return "n/a"
    m = b / 2**20
    return f"{m:,.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def num(x: float, fmt: str = "{:,.1f}") -> str:
    return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)


def spread(o: Outcome) -> str:
    """(max - min) / median of the timed steps: how steady the timing was (load on a shared machine)."""
    if not o.ok or len(o.step_times) < 2:
        return "n/a"
    return f"{(max(o.step_times) - min(o.step_times)) / o.median_step_s * 100:.0f}%"


def flops_per_token(o: Outcome, params: dict) -> float:
    return (6 if o.variant.mode == "full" else 4) * params["linear"]


def mfu(o: Outcome, params: dict, dev: Device) -> float:
    if not dev.cuda or not o.ok:
        return math.nan
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in dev.name), None)
    if peak is None:
        return math.nan
    return flops_per_token(o, params) * o.tok_s / (peak * o.world)


@dataclass(frozen=True)
class Goal:
    text: str
    value: str
    status: str


class _Results:
    """The outcomes, looked up by name: only those that ran ok."""

    def __init__(self, res: dict[str, Outcome]):
        self.res = res

    def get(self, name: str) -> Outcome | None:
        o = self.res.get(name)
        return o if o is not None and o.ok else None

    def missing(self, *names: str) -> str:
        bad = [n for n in names if self.get(n) is None]
        return "n/a: " + ", ".join(f"{n} {self.res[n].status if n in self.res else 'not run'}" for n in bad)

    def peaks(self, *names: str) -> bool:
        return all(self.get(n) and math.isfinite(self.get(n).peak_bytes) for n in names)


def _backend_goals(r: _Results, b: str, cuda: bool) -> list[Goal]:
    lo, full, q8, peft = f"dtrain-{b}", f"dtrain-{b}-full", f"dtrain-{b}-8bit", f"peft-{b}"
    out = []
    # 1. speed LoRA vs full (GPU goal)
    if r.get(lo) and r.get(full):
        x = r.get(lo).tok_s / r.get(full).tok_s
        st = ("met" if x >= 1.25 else "missed") if cuda else "GPU-only goal (CPU value for information)"
        out.append(Goal(f"[{b}] LoRA >= 1.25x full-FT tokens/s", f"{x:.2f}x", st))
    else:
        out.append(Goal(f"[{b}] LoRA >= 1.25x full-FT tokens/s", "", r.missing(lo, full)))
    # 2./3. memory vs full
    for name, limit, label in (
        (lo, 1 / 3, "LoRA peak memory <= 1/3 of full FT"),
        (q8, 1 / 6, "8-bit LoRA peak memory <= 1/6 of full FT"),
    ):
        if r.peaks(name, full):
            x = r.get(name).peak_bytes / r.get(full).peak_bytes
            st = "met" if x <= limit else "missed"
            if not cuda:
                st += " (CPU peak RSS: includes the fixed runtime, see notes)"
            out.append(Goal(f"[{b}] {label}", f"{x:.3f} (limit {limit:.3f})", st))
        else:
            out.append(Goal(f"[{b}] {label}", "", r.missing(name, full)))
    # 4. dtrain vs PEFT speed
    if r.get(lo) and r.get(peft):
        x = r.get(lo).tok_s / r.get(peft).tok_s
        st = "met" if x >= 1.2 else ("missed the 1.2x goal, at least as fast" if x >= 1.0 else "missed")
        out.append(Goal(f"[{b}] dtrain >= PEFT+accelerate tokens/s (goal 1.2x)", f"{x:.2f}x", st))
    else:
        out.append(Goal(f"[{b}] dtrain >= PEFT+accelerate tokens/s (goal 1.2x)", "", r.missing(lo, peft)))
    # 5. dtrain vs PEFT memory
    if r.peaks(lo, peft):
        x = r.get(lo).peak_bytes / r.get(peft).peak_bytes
        out.append(Goal(f"[{b}] dtrain peak memory <= PEFT+accelerate", f"{x:.3f}", "met" if x <= 1.0 else "missed"))
    else:
        out.append(Goal(f"[{b}] dtrain peak memory <= PEFT+accelerate", "", r.missing(lo, peft)))
    return out


def goals(res: dict[str, Outcome], dev: Device) -> list[Goal]:
    r = _Results(res)
    out = [g for b in ("fsdp", "ds") for g in _backend_goals(r, b, dev.cuda)]
    lat = r.get("latency")
    if lat:
        x = lat.extra["merged_over_base"]
        # zero added latency: merged no more than 2% slower than base (faster is noise, not a miss)
        out.append(
            Goal(
                "merged latency within 2% of base",
                f"{x:.3f}x (unmerged {lat.extra['unmerged_over_base']:.3f}x)",
                "met" if x <= 1.02 else "missed",
            )
        )
    else:
        out.append(Goal("merged latency within 2% of base", "", r.missing("latency")))
    out.append(Goal("MFU reported", "", "CUDA only" if not dev.cuda else "see table"))
    return out


# ---- the markdown --------------------------------------------------------------------------------
def _header(ctx: RunContext) -> list[str]:
    p, dev, params = ctx.preset, ctx.device, ctx.params
    title = f"## {ctx.date}: preset `{p.name}` on {'GPU' if dev.cuda else 'CPU'}"
    if p.name == "quick":
        title += " (plumbing check: tiny model, not a measurement)"
    a = p.arch
    return [
        title,
        "",
        f"- device: {dev.text}",
        f"- load average at start: {ctx.load_start} (at end: {ctx.load_end}); this machine may be shared",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in ctx.versions.items()) + f"; dtrain at {ctx.git}",
        f"- command: `{ctx.command}`",
        f"- model: {a['model_type']} random weights, hidden {a['hidden_size']}, {a['num_hidden_layers']} layers, "
        f"intermediate {a['intermediate_size']}, {a['num_attention_heads']} heads ({a['num_key_value_heads']} kv), "
        f"vocab {a['vocab_size']}: {params['total'] / 1e6:.1f}M parameters, P = {params['linear'] / 1e6:.1f}M in linear "
        f"layers; {ctx.dtype}",
        f"- batch: {p.micro_batch} x {p.seq_len} tokens per rank x {ctx.nproc} rank(s) = "
        f"{p.micro_batch * p.seq_len * ctx.nproc} tokens per optimizer step; {p.warmup} warm-up + {p.steps} timed "
        f"steps; synthetic random token ids (same sequences for every variant); LoRA r={LORA.r}, "
        f"alpha={LORA.alpha:g}, {'+'.join(LORA.targets)}; AdamW lr {LORA.lr}",
        "",
    ]


def _training_table(ctx: RunContext, res: dict[str, Outcome]) -> list[str]:
    lines = [
        "| variant | status | median step s | step spread | tok/s/rank | tok/s total | peak mem/rank MiB | "
        "model states MiB | MFU | trainable / total params | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, o in res.items():
        if o.variant.kind == "latency":
            continue
        status = o.status if o.status == "ok" else f"{o.status}: {o.reason}"
        m = mfu(o, ctx.params, ctx.device)
        tp = f"{o.trainable:,} / {o.total:,}" if o.trainable is not None and o.total else "n/a"
        lines.append(
            f"| {name} | {status} | {num(o.median_step_s, '{:.3f}')} | {spread(o)} | {num(o.tok_s_rank)} | {num(o.tok_s)} | "
            f"{mib(o.peak_bytes)} | {mib(o.model_states_bytes)} | {num(m * 100, '{:.1f}%') if math.isfinite(m) else 'n/a'} | "
            f"{tp} | {num(o.loss_first, '{:.3f}')} -> {num(o.loss_last, '{:.3f}')} |"
        )
    return lines


def _latency_table(lat: Outcome) -> list[str]:
    if not lat.ok:
        return ["", f"Inference latency: {lat.status}: {lat.reason}"]
    e = lat.extra
    lines = [
        "",
        f"Inference latency ({e['device']}, {e['dtype']}, batch {e['batch']} x {e['seq']} tokens, "
        f"{e['threads']} thread(s), median of {e['iters']} interleaved rounds after {e['warmup']} warm-up):",
        "",
        "| model | median ms | min ms | p90 ms | / base |",
        "|---|---|---|---|---|",
    ]
    for key in ("base", "merged", "unmerged"):
        s = e[key]
        lines.append(
            f"| {key} | {s['median_s'] * 1e3:.2f} | {s['min_s'] * 1e3:.2f} | {s['p90_s'] * 1e3:.2f} | "
            f"{s['median_s'] / e['base']['median_s']:.3f} |"
        )
    lines.append("")
    lines.append(
        f"Merged module tree equals the base's: {e['merged_tree_equals_base']}; max |merged - "
        f"unmerged| logits {e['merged_vs_unmerged_max_abs_diff']:.2e} (merged vs base "
        f"{e['merged_vs_base_max_abs_diff']:.2e}: the update is non-zero)."
    )
    return lines


def _notes(ctx: RunContext, res: dict[str, Outcome]) -> list[str]:
    cuda, notes = ctx.device.cuda, []
    if overloaded(ctx.load_start):
        notes.append(
            f"The load average at start ({ctx.load_start}) exceeded the {os.cpu_count()} cores: other "
            "jobs shared the CPU, so every time here is inflated and comparisons between variants (run "
            "one after the other) are noisy; see the step spread column."
        )
    for name, o in res.items():
        if o.variant.kind == "peft" and o.ok and o.extra.get("forced_fsdp"):
            notes.append(
                f"{name}: accelerate {ctx.versions['accelerate']} chose `{o.extra['accelerate_chose']}` on CPU "
                "(its FSDP plugin is only honoured for GPU-like devices; prepare() would wrap the model in "
                "DDP); the worker set `DistributedType.FSDP` so that prepare() ran accelerate's "
                "fsdp2_prepare_model (FSDP2 per decoder layer, then the root)."
            )
    peft_rss = [
        o.extra["rss_before_model"]
        for o in res.values()
        if o.variant.kind == "peft" and o.ok and o.extra.get("rss_before_model")
    ]
    if not cuda and peft_rss:
        notes.append(
            f"Fixed runtime per rank on CPU: the baseline worker's RSS just before it builds the model "
            f"(torch, transformers, accelerate, peft, the process group) is {mib(max(peft_rss))} MiB: every "
            "peak RSS above includes such a floor, which no training mode can remove."
        )
    if not cuda:
        notes.append(
            "Model states = frozen + trainable + gradients + optimizer state of the largest rank, from "
            "dtrain's memory snapshot in the last step's metrics row (taken after step(): FSDP gradients "
            "already freed, ZeRO-3's flat gradient buffer still there)."
        )
    for name, o in res.items():
        if o.extra.get("exit_note"):
            notes.append(f"{name}: {o.extra['exit_note']}")
        if o.status in ("failed", "skipped"):
            notes.append(f"{name} {o.status}: {o.reason}")
    mem_kind = "peak CUDA max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    notes.append(f"Memory column: {mem_kind} of the largest rank since process start (model build included).")
    return notes


def render(ctx: RunContext, res: dict[str, Outcome], gl: list[Goal]) -> str:
    lines = _header(ctx) + _training_table(ctx, res)
    if "latency" in res:
        lines += _latency_table(res["latency"])
    lines += ["", "| goal | measured | status |", "|---|---|---|"]
    lines += [f"| {g.text} | {g.value} | {g.status} |" for g in gl]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in _notes(ctx, res)] + [""]
    return "\n".join(lines)
