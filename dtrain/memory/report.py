"""The memory report of `dtrain memory`: measured bytes per rank, mode and category, the
estimator's figure beside each, full / LoRA ratios; written as markdown, JSON and a PNG chart.

`build(...)` makes the JSON-able report dict; `write(report, out)` writes
``memory_report.md``, ``memory_report.json`` and ``memory_report.png`` into `out`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.config.schema import Config
from dtrain.errors import DtrainError
from dtrain.memory.measure import CATEGORIES, MODEL_STATES, Measured

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REPORT_FILES = ("memory_report.md", "memory_report.json", "memory_report.png")
TOLERANCE = 0.10  # relative difference above which a category is flagged
LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_params": "trainable parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "model_states": "model states",
    "gathered_unit": "gathered unit (transient)",
    "total": "total (model states + activations)",
}
PROCESS_ROWS = (
    ("rss_peak_bytes", "peak RSS (process)"),
    ("cuda_max_allocated", "peak CUDA allocated"),
    ("cuda_max_reserved", "peak CUDA reserved"),
    ("saved_param_bytes", "params saved for backward (not activations)"),
)
COLORS = {
    "frozen_weights": "#8c8c8c",
    "trainable_params": "#1f77b4",
    "gradients": "#ff7f0e",
    "optimizer_state": "#d62728",
    "activations": "#2ca02c",
}
NOTES = (
    "Model states are measured in the last step after backward and before the optimizer step "
    "(gradients not yet zeroed, Adam state present); optimizer state includes Adam's 4-byte "
    "`step` tensor per parameter tensor.",
    "Activations: distinct storages of the tensors autograd saves for backward during one "
    "micro-batch's forward and loss; parameters saved for backward (and their gathered or "
    "cast copies) are not activations.",
    "Estimate flags: `!` a model-state category differs from the estimate by more than 10%; "
    "`~` activations differ by more than 10%: the activation formula (Korthikanti et al.) is "
    "an approximation of what the framework saves, so a looser agreement is expected there.",
    "The gathered unit (FSDP's unsharded unit, ZeRO-3's gathered module) is transient and "
    "not in the measured categories; only its estimate is shown. Not counted either: "
    "communication buckets (ZeRO-3's reduce bucket), allocator caches, the CUDA context; they "
    "show in peak RSS / peak CUDA reserved.",
)


# ---- estimate --------------------------------------------------------------------------------
def _arch(cfg: Config) -> dict[str, Any]:
    """The HF config dict of the model: model.arch, or model.path's config.json."""
    if cfg.model.arch is not None:
        return dict(cfg.model.arch)
    return json.loads((Path(cfg.model.path) / "config.json").read_text())


def estimates(cfg: Config, world_size: int, modes: dict[str, dict]) -> tuple[dict | None, str | None]:
    """Per-GPU estimate (bytes by category) for each mode, or (None, why it cannot be made)."""
    from dtrain.memory import estimate as est
    from dtrain.memory.model_spec import spec_from_config
    from dtrain.memory.plan_config import plan_from_config

    if cfg.lora.target_regex is not None:
        return None, "lora.target_regex: the estimator takes module-name suffixes only"
    try:
        spec = spec_from_config(_arch(cfg), "model")
        out = {}
        for mode, info in modes.items():
            plan = dataclasses.replace(plan_from_config(cfg, world_size), bits=info["bits"])
            if cfg.objective == "dpo":  # pairs of rows; full DPO with its reference copy
                from dtrain.memory.estimate_dpo import estimate_dpo

                result = estimate_dpo(spec, plan)
            else:
                result = est.estimate(spec, plan)
            out[mode] = (result.full if info["mode"] == "full" else result.lora).as_dict()
            if cfg.backend.name == "none":  # one process, nothing sharded: nothing gathered
                out[mode]["gathered_unit"] = 0
        return out, None
    except (DtrainError, ValueError, OSError, KeyError) as err:
        return None, " ".join(str(err).split())[:300]


# ---- report dict -----------------------------------------------------------------------------
def rel_diff(measured: float | None, estimate: float | None) -> float | None:
    """(estimate - measured) / measured; 0 when both are 0; None when either is missing or
    only the measurement is 0."""
    if measured is None or estimate is None or (measured == 0 and estimate != 0):
        return None
    return 0.0 if measured == 0 else (estimate - measured) / measured


def _vs_estimate(row: dict, est: dict | None) -> dict[str, dict]:
    """Per category: measured, estimate, relative difference and the >10% flag."""
    out = {}
    for cat in (*CATEGORIES, "model_states"):
        e = None if est is None else est.get(cat)
        d = rel_diff(row.get(cat), e)
        off = abs(d) > TOLERANCE if d is not None else bool(e) and row.get(cat) == 0
        out[cat] = {"measured": row.get(cat), "estimate": e, "rel_diff": d, "flag": off}
    if est is not None:
        out["gathered_unit"] = {"measured": None, "estimate": est.get("gathered_unit"), "rel_diff": None, "flag": False}
    return out


def _ratios(full: dict, lora: dict) -> dict[str, float | None]:
    """full / LoRA per category, model states and total; None where LoRA is 0."""
    keys = (*CATEGORIES, "model_states", "total")
    return {k: (full[k] / lora[k] if lora.get(k) else None) for k in keys}


def build(cfg: Config, measured: Measured, modes: dict[str, dict], steps: int) -> dict[str, Any]:
    """The report as plain data (bytes). `modes`: name -> {"label", "mode", "bits"}."""
    est, why = estimates(cfg, measured.world_size, modes)
    ranks = []
    for r in range(measured.world_size):
        rows = {m: dict(measured.modes[m][r]) for m in modes}
        for row in rows.values():
            row["total"] = row["model_states"] + row["activations"]
        entry = {
            "rank": r,
            "measured": rows,
            "vs_estimate": {m: _vs_estimate(rows[m], est and est.get(m)) for m in modes},
        }
        lora = next((m for m in modes if modes[m]["mode"] == "lora"), None)
        if "full" in rows and lora:
            entry["ratio_full_over_lora"] = _ratios(rows["full"], rows[lora])
        ranks.append(entry)
    return {
        "units": "bytes",
        "setup": _setup(cfg, measured, steps),
        "modes": modes,
        "ranks": ranks,
        "estimate": est,
        "estimate_error": why,
        "tolerance": TOLERANCE,
        "notes": list(NOTES),
    }


def _setup(cfg: Config, measured: Measured, steps: int) -> dict[str, Any]:
    """What was measured: backend, world, dtype, batch shape, LoRA, steps."""
    t = cfg.training
    return {
        "backend": cfg.backend.name,
        "world_size": measured.world_size,
        "device": measured.device,
        "dtype": cfg.model.dtype,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "grad_accum": t.grad_accum,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "lora_r": cfg.lora.r,
        "lora_targets": cfg.lora.target_regex or cfg.lora.targets,
        "optimizer": "AdamW",
        "steps": steps,
    }


# ---- markdown --------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    """Binary units with two decimals ('1.50 MiB'); 'n/a' for None."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _est_cell(c: dict, cat: str) -> str:
    """'<estimate> (+d%)', flagged '!' (model states) or '~' (activations) beyond 10%."""
    if c["estimate"] is None:
        return "—"
    text = fmt_bytes(c["estimate"])
    if c["rel_diff"] is not None:
        text += f" ({c['rel_diff']:+.1%})"
    if c["flag"]:
        text += " ~" if cat == "activations" else " **!**"
    return text


def _rank_table(entry: dict, modes: dict[str, dict]) -> list[str]:
    """Markdown rows of one rank: category x (measured, estimate) per mode, full / LoRA."""
    ratio = entry.get("ratio_full_over_lora", {})
    head = "| category | " + " | ".join(f"{modes[m]['label']} | est." for m in modes) + " | full / LoRA |"
    lines = [head, "|---|" + "---:|---:|" * len(modes) + "---:|"]
    for cat in (*MODEL_STATES, "model_states", "activations", "gathered_unit", "total"):
        cells = []
        for m in modes:
            c = entry["vs_estimate"][m].get(cat)
            measured = entry["measured"][m].get(cat)
            cells += ["—" if measured is None else fmt_bytes(measured), _est_cell(c, cat) if c else "—"]
        r = ratio.get(cat)
        name = f"**{LABELS[cat]}**" if cat in ("model_states", "total") else LABELS[cat]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if r is None else f'{r:.2f}x'} |")
    for key, label in PROCESS_ROWS:
        vals = [entry["measured"][m].get(key) for m in modes]
        if any(v is not None for v in vals):
            lines.append(f"| {label} | " + "".join(f"{fmt_bytes(v)} | | " for v in vals) + " |")
    return lines


def markdown(report: dict) -> str:
    """The report as markdown: setup, one table per rank, the saving, notes."""
    s, modes = report["setup"], report["modes"]
    lines = [
        "# Memory report: full fine-tuning vs LoRA",
        "",
        f"Backend **{s['backend']}**, {s['world_size']} rank(s) on {s['device']}, {s['dtype']}, "
        f"micro-batch {s['micro_batch_size']} x {s['seq_len']} tokens, grad_accum {s['grad_accum']}, "
        f"gradient checkpointing {_ckpt_words(s['gradient_checkpointing'])}, AdamW; "
        f"LoRA r={s['lora_r']} on {s['lora_targets']}. {s['steps']} steps per mode; bytes per rank.",
        "",
    ]
    if report["estimate_error"]:
        lines += [f"No estimate: {report['estimate_error']}", ""]
    for entry in report["ranks"]:
        lines += [f"## Rank {entry['rank']}", "", *_rank_table(entry, modes), ""]
        ratio = entry.get("ratio_full_over_lora", {}).get("model_states")
        if ratio:
            lines += [
                f"Model-state saving on rank {entry['rank']}: full fine-tuning needs "
                f"**{ratio:.2f}x** the memory of LoRA.",
                "",
            ]
    lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


# ---- chart -----------------------------------------------------------------------------------
def chart(report: dict, path: Path) -> None:
    """Stacked bars by category, one measured bar (and a hatched estimate bar) per mode, one
    panel per rank; MiB on the y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks, modes = report["ranks"], list(report["modes"])
    cols = min(len(ranks), 2)
    rows = -(-len(ranks) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.5 + 2.4 * len(modes) * cols, 0.8 + 3.6 * rows), squeeze=False, sharey=True
    )
    for ax, entry in zip(axes.flat, ranks):
        _panel(ax, entry, report)
    for ax in list(axes.flat)[len(ranks) :]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[c]) for c in CATEGORIES]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
    fig.legend(
        handles,
        [LABELS[c] for c in CATEGORIES] + ["estimate (hatched)"],
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    s = report["setup"]
    fig.suptitle(
        f"Memory per rank: {s['backend']}, {s['world_size']} rank(s), {s['dtype']}, "
        f"batch {s['micro_batch_size']} x {s['seq_len']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.6 / (0.8 + 3.6 * rows), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: "Axes", entry: dict, report: dict) -> None:
    """One rank's bars: for each mode, measured (solid) and estimate (hatched) side by side."""
    modes, est = report["modes"], report["estimate"]
    labels = []
    for i, m in enumerate(modes):
        _stack(ax, i - 0.2, entry["measured"][m], hatch=None)
        if est and m in est:
            _stack(ax, i + 0.2, est[m], hatch="//")
        labels.append(modes[m]["label"])
    ax.set_xticks(range(len(modes)), labels, fontsize=9)
    ax.set_ylabel("MiB")
    ratio = entry.get("ratio_full_over_lora", {}).get("model_states")
    title = f"rank {entry['rank']}" + (f"  (model states full/LoRA {ratio:.1f}x)" if ratio else "")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _stack(ax: "Axes", x: float, values: dict, hatch: str | None) -> None:
    """One stacked bar of the categories at `x`, total written above it."""
    bottom = 0.0
    for cat in CATEGORIES:
        h = (values.get(cat) or 0) / 2**20
        ax.bar(
            x,
            h,
            width=0.38,
            bottom=bottom,
            color=COLORS[cat],
            hatch=hatch,
            edgecolor="black" if hatch else COLORS[cat],
            alpha=0.55 if hatch else 1.0,
            linewidth=0.5,
        )
        bottom += h
    ax.text(x, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=7)


# ---- files -----------------------------------------------------------------------------------
def write(report: dict, out: Path) -> dict[str, Path]:
    """memory_report.md / .json / .png into `out` (created); returns the paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in zip(("md", "json", "png"), REPORT_FILES)}
    paths["md"].write_text(markdown(report))
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    chart(report, paths["png"])
    return paths


def _ckpt_words(policy) -> str:
    return "on" if policy is True else "off" if not policy else str(policy)
