"""bench/paper_study.py's second half: analyze the study's adapters with dtrain.analysis and write
docs/paper.md and docs/paper/*.png, next to the LoRA paper's own numbers (GPT-3 175B; Hu et al.
2021, arXiv:2106.09685, Tables 5-7 and Sec. 7.2), with a plain verdict on each question."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dtrain.analysis import report, run
from dtrain.analysis.weights import BaseWeights
from dtrain.model import importer

MODEL = "smollm2-135m-instruct"
# The paper's Table 5 (18M trainable parameters on GPT-3 175B): validation accuracy, %.
PAPER_T5 = {
    "t5_q": ("W_q", 8, 70.4, 91.0),
    "t5_k": ("W_k", 8, 70.0, 90.8),
    "t5_v": ("W_v", 8, 73.0, 91.0),
    "t5_o": ("W_o", 8, 73.2, 91.3),
    "t5_qk": ("W_q+W_k", 4, 71.4, 91.3),
    "t5_qv": ("W_q+W_v", 4, 73.7, 91.3),
    "t5_all": ("W_q+W_k+W_v+W_o", 2, 73.7, 91.7),
}
# The paper's Table 6, W_q+W_v row: (WikiSQL, MultiNLI) accuracy, %.
PAPER_T6 = {1: (73.4, 91.3), 2: (73.3, 91.4), 4: (73.7, 91.3), 8: (73.8, 91.6), 64: (73.5, 91.4)}
# The paper's Table 7 (ΔW_q, layer 48): ||ΔW||_F, ||U^T W V||_F for ΔW's, W's and random directions.
PAPER_T7 = {
    4: {"delta_norm": 6.91, "proj_delta": 0.32, "proj_w": 21.67, "proj_random": 0.02},
    64: {"delta_norm": 3.57, "proj_delta": 1.90, "proj_w": 37.71, "proj_random": 0.33},
}
# Sec. 7.2's comparisons: r=8 vs r=64 with the same lora.init_seed (dtrain's init then makes the
# r=8 A start as the first 8 rows of the r=64 A), r=8 vs r=64 from independent inits, two seeds of r=64.
PAIRS = (("t6_r8", "t6_r64"), ("t6_r8", "t6_r64_seed2"), ("t6_r64", "t6_r64_seed2"))
SAME_INIT = {"t6_r8_vs_t6_r64": ", same init seed"}
T6 = {"t6_r1": 1, "t6_r2": 2, "t6_r4": 4, "t6_r8": 8, "t6_r64": 64}


def analyze_runs(work: Path, results: dict) -> dict:
    """Every run's ΔW analysis (with the base) and the two comparisons of Sec. 7.2."""
    base = BaseWeights(importer.resolve(MODEL))
    adapters = {n: run.load_adapter(work / n / "adapter", n) for n in results}
    single = {n: run.analyze_one(ad, base) for n, ad in adapters.items()}
    pairs = {}
    for a, b in PAIRS:
        if a in adapters and b in adapters:
            pairs[f"{a}_vs_{b}"] = run.compare(adapters[a], adapters[b])
    for n, ad in adapters.items():
        results[n]["a_drift"] = a_drift(ad, results[n]["init_seed"])
    return {"single": single, "pairs": pairs}


def a_drift(ad: run.Adapter, init_seed: int) -> float:
    """Mean over modules of ||A - A_0||_F / ||A_0||_F: how far training moved A from dtrain's
    name-seeded init A_0 (lora.init_lora_A), which it recomputes exactly."""
    from dtrain import lora

    spec = lora.AdapterSpec(name="default", r=ad.r, alpha=ad.alpha, init_seed=init_seed)
    out = []
    for name, ab in ad.modules.items():
        a0 = lora.init_lora_A(name, spec, ab["lora_A"].shape[1])
        out.append(float((ab["lora_A"].float() - a0).norm() / a0.norm()))
    return float(np.mean(out))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _type_mean(analysis: dict, key: str) -> float:
    return float(np.mean([s[key] for s in analysis["by_type"].values()]))


def table5(results: dict, single: dict) -> list[str]:
    lines = [
        "| weights | r | trainable params | eval loss | exact match (50) | mean eff. rank of ΔW "
        "| paper: r | paper: WikiSQL | paper: MultiNLI |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (label, pr, wiki, mnli) in PAPER_T5.items():
        if name not in results:
            continue
        x = results[name]
        lines.append(
            f"| {label} | {x['r']} | {x['params']:,} | {x['eval_loss']:.4f} | {_pct(x['exact_match'])} "
            f"| {_type_mean(single[name], 'effective_rank'):.2f} | {pr} | {wiki} | {mnli} |"
        )
    return lines


def table6(results: dict, single: dict) -> list[str]:
    lines = [
        "| r (W_q+W_v) | trainable params | eval loss | exact match (50) | eff. rank ΔW_q / ΔW_v "
        "| σ > 1% σ₁ (q / v) | ‖A−A₀‖/‖A₀‖ | paper: WikiSQL | paper: MultiNLI |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in T6.items():
        if name not in results:
            continue
        x, bt = results[name], single[name]["by_type"]
        lines.append(
            f"| {r} | {x['params']:,} | {x['eval_loss']:.4f} | {_pct(x['exact_match'])} "
            f"| {bt['q_proj']['effective_rank']:.2f} / {bt['v_proj']['effective_rank']:.2f} "
            f"| {bt['q_proj']['rank_1pct']:.1f} / {bt['v_proj']['rank_1pct']:.1f} "
            f"| {x.get('a_drift', float('nan')):.2f} | {PAPER_T6[r][0]} | {PAPER_T6[r][1]} |"
        )
    return lines


def table7(single: dict) -> list[str]:
    lines = [
        "| r | type | ‖ΔW‖_F | ‖UᵀWV‖_F: ΔW's top r | W's top r | random | amplification "
        "| paper (ΔW_q): ‖ΔW‖_F, ΔW, W, random | paper amplification |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in (("t6_r4", 4), ("t6_r64", 64)):
        if name not in single:
            continue
        p = PAPER_T7[r]
        for t, s in single[name]["by_type"].items():
            paper = f"{p['delta_norm']}, {p['proj_delta']}, {p['proj_w']}, {p['proj_random']}" if t == "q_proj" else ""
            amp = f"{p['delta_norm'] / p['proj_delta']:.1f}" if t == "q_proj" else ""
            lines.append(
                f"| {r} | {t} | {s['delta_norm']:.3f} | {s['proj_delta']:.3f} | {s['proj_w']:.2f} "
                f"| {s['proj_random']:.3f} | {s['amplification']:.2f} | {paper} | {amp} |"
            )
    return lines


def subspace_table(pairs: dict) -> list[str]:
    lines = [
        "| adapters | type | phi(1,1) | mean phi(i,i), i ≤ min r | phi(r_a, r_b) | chance (random subspaces) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, p in pairs.items():
        for t, s in p["by_type"].items():
            lines.append(
                f"| r={p['r_a']} ({p['a']}) vs r={p['r_b']} ({p['b']}){SAME_INIT.get(key, '')} | {t} | {s['phi_11']:.3f} "
                f"| {s['phi_diag_mean']:.3f} | {s['phi_full']:.3f} | {s['chance_full']:.3f} |"
            )
    return lines


def plot_tables(results: dict, path: Path) -> None:
    """Table 5 and Table 6 as bars: exact match and eval loss."""
    plt = report._plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, names, labels, title in (
        (
            axes[0],
            [n for n in PAPER_T5 if n in results],
            [PAPER_T5[n][0].replace("W_", "") for n in PAPER_T5 if n in results],
            "Table 5: which weights, same parameter budget",
        ),
        (
            axes[1],
            [n for n in T6 if n in results],
            [f"r={T6[n]}" for n in T6 if n in results],
            "Table 6: rank on W_q+W_v",
        ),
    ):
        x = np.arange(len(names))
        ax.bar(x - 0.2, [100 * results[n]["exact_match"] for n in names], 0.4, label="exact match %", color="tab:blue")
        ax2 = ax.twinx()
        ax2.bar(x + 0.2, [results[n]["eval_loss"] for n in names], 0.4, label="eval loss", color="tab:orange")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("exact match on 50 held-out dates (%)")
        ax2.set_ylabel("eval loss")
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diag(pairs: dict, path: Path) -> None:
    """phi(i, i) against i for each comparison and layer type, with the chance level."""
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, p in pairs.items():
        for t, s in p["by_type"].items():
            d = np.diag(np.asarray(s["phi"]))
            ax.plot(
                np.arange(1, len(d) + 1),
                d,
                marker=".",
                label=f"r={p['r_a']} vs r={p['r_b']}" + (" (other seed)" if "seed2" in p["b"] else "") + f", {t}",
            )
    ax.plot([1, 64], [64 / 576, 64 / 576], "k:", label="chance for r=64 vs r=64 (64/576)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("i")
    ax.set_ylabel("phi(i, i), mean over the 30 layers")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(docs: Path, results: dict, analyses: dict, meta: dict) -> Path:
    """docs/paper.md, docs/paper/*.png and docs/paper/results.json."""
    from paper_text import document  # bench/paper_text.py: the prose around the tables

    pics = docs / "paper"
    pics.mkdir(parents=True, exist_ok=True)
    single, pairs = analyses["single"], analyses["pairs"]
    plot_tables(results, pics / "tables.png")
    plot_diag(pairs, pics / "subspace_diagonal.png")
    for key, p in pairs.items():
        for t in p["by_type"]:
            report.plot_heatmap(p, t, pics / f"subspace_{key}_{t}.png", "mean over the 30 layers")
    if "t6_r64" in single:
        report.plot_spectrum(single["t6_r64"], pics / "spectrum_r64.png")
    slim = {
        "meta": meta,
        "runs": results,
        "by_type": {n: a["by_type"] for n, a in single.items()},
        "pairs": {
            k: {t: {x: v for x, v in s.items() if x != "phi"} for t, s in p["by_type"].items()}
            for k, p in pairs.items()
        },
    }
    (pics / "results.json").write_text(json.dumps(report._finite(slim), indent=1) + "\n")
    tables = {
        "t5": table5(results, single),
        "t6": table6(results, single),
        "t7": table7(single),
        "sub": subspace_table(pairs),
    }
    out = docs / "paper.md"
    out.write_text(document(results, single, pairs, meta, {k: "\n".join(v) for k, v in tables.items()}))
    return out
