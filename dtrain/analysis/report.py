"""`dtrain analyze`'s output: analysis.json (every number), analysis.md (the tables) and PNGs:
subspace_<a>_vs_<b>_<type>.png (phi heatmaps, as the paper's Figures 3 and 4) and
spectrum_<label>.png (ΔW's singular values and effective rank per layer)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

ZOOM = 8  # the paper's Figure 3 shows the top-left 8 x 8 of each phi next to the whole


def _finite(x):
    """JSON has no inf/nan: those become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(result: dict) -> str:
    """The summary tables (per layer type: means over the layers, or the chosen --layer)."""
    where = "all adapted layers (means)" if result["layer"] is None else f"layer {result['layer']}"
    lines = [
        f"# LoRA adapter analysis ({where})",
        "",
        f"Base: `{result['base']}`" + (f" dequantized from {result['base_bits']} bits" if result["base_bits"] else ""),
        "",
        "## ΔW = (alpha/r) B A: size, effective rank, relation to W (Sec. 7.3)",
        "",
        "| adapter | r | type | layers | ‖ΔW‖_F | ‖UᵀWV‖_F (ΔW's top r) | ‖U_WᵀWV_W‖_F (W's top r) "
        "| random | amplification | effective rank | σ > 1% σ₁ |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ad in result["adapters"]:
        for t, s in ad["by_type"].items():
            lines.append(
                f"| {ad['label']} | {ad['r']} | {t} | {s['layers']} | {_fmt(s.get('delta_norm'))} "
                f"| {_fmt(s.get('proj_delta'))} | {_fmt(s.get('proj_w'))} | {_fmt(s.get('proj_random'))} "
                f"| {_fmt(s.get('amplification'))} | {_fmt(s['effective_rank'])} | {_fmt(s['rank_1pct'])} |"
            )
    if result["pairs"]:
        lines += [
            "",
            "## Subspace similarity of the A matrices (Sec. 7.2)",
            "",
            "phi(i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖²_F / min(i, j); chance: max(r_a, r_b) / d_in for random subspaces.",
            "",
            "| a | b | type | phi(1,1) | mean phi(i,i) | phi(r_a, r_b) | chance | heatmap |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for p in result["pairs"]:
            for t, s in p["by_type"].items():
                lines.append(
                    f"| {p['a']} (r={p['r_a']}) | {p['b']} (r={p['r_b']}) | {t} | {s['phi_11']:.3f} "
                    f"| {s['phi_diag_mean']:.3f} | {s['phi_full']:.3f} | {s['chance_full']:.3f} "
                    f"| {heatmap_name(p, t)} |"
                )
    return "\n".join(lines) + "\n"


def heatmap_name(pair: dict, layer_type: str) -> str:
    return f"subspace_{safe_name(pair['a'])}_vs_{safe_name(pair['b'])}_{safe_name(layer_type)}.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(pair: dict, layer_type: str, path: Path, where: str) -> None:
    """phi over i <= r_a (rows), j <= r_b (columns): whole, and the top-left ZOOM x ZOOM."""
    plt = _plt()
    p = np.asarray(pair["by_type"][layer_type]["phi"])
    zoom = p.shape[0] > ZOOM or p.shape[1] > ZOOM
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(9 if zoom else 4.8, 4), squeeze=False)
    panels = [(p, "all directions")] + ([(p[:ZOOM, :ZOOM], f"top {ZOOM}")] if zoom else [])
    for ax, (m, title) in zip(axes[0], panels):
        im = ax.imshow(
            m,
            vmin=0,
            vmax=1,
            cmap="viridis",
            origin="upper",
            aspect="auto",
            extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5),
        )
        ax.set_xlabel(f"j ({pair['b']}, r={pair['r_b']})")
        ax.set_ylabel(f"i ({pair['a']}, r={pair['r_a']})")
        ax.set_title(f"{layer_type}: phi(i, j), {title}", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85)
    fig.suptitle(f"subspace similarity, {where}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectrum(ad: dict, path: Path) -> None:
    """Left: ΔW's singular values over the top one, mean over layers per type (log scale).
    Right: the entropy effective rank of ΔW per layer."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    types = sorted({m["type"] for m in ad["modules"].values()})
    for t in types:
        rows = [m for m in ad["modules"].values() if m["type"] == t]
        sv = np.array([np.asarray(m["singular_values"]) / max(m["singular_values"][0], 1e-300) for m in rows])
        left.semilogy(np.arange(1, sv.shape[1] + 1), np.maximum(sv.mean(axis=0), 1e-12), marker=".", label=t)
        xs = [m["layer"] if m["layer"] is not None else k for k, m in enumerate(rows)]
        right.plot(xs, [m["effective_rank"] for m in rows], marker=".", label=t)
    left.set_xlabel("index i")
    left.set_ylabel("σ_i / σ_1 (mean over layers)")
    left.set_title(f"{ad['label']}: spectrum of ΔW (r={ad['r']})", fontsize=9)
    right.set_xlabel("layer")
    right.set_ylabel("effective rank exp(H(σ/Σσ))")
    right.set_ylim(0, ad["r"] * 1.05 + 0.5)
    right.set_title("effective rank of ΔW per layer", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> list[Path]:
    """analysis.json, analysis.md and the PNGs into `out` (created); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "analysis.json", out / "analysis.md"]
    written[0].write_text(json.dumps(_finite(result), indent=1) + "\n")
    written[1].write_text(markdown(result))
    where = "mean over adapted layers" if result["layer"] is None else f"layer {result['layer']}"
    for pair in result["pairs"]:
        for t in pair["by_type"]:
            written.append(out / heatmap_name(pair, t))
            plot_heatmap(pair, t, written[-1], where)
    for ad in result["adapters"]:
        written.append(out / f"spectrum_{safe_name(ad['label'])}.png")
        plot_spectrum(ad, written[-1])
    return written
