"""The prose of docs/paper.md around bench/paper_report.py's tables: each verdict is computed from
the measured numbers, so a rerun on another machine rewrites it consistently."""

from __future__ import annotations

import numpy as np

NAMES = {
    "t5_q": "W_q",
    "t5_k": "W_k",
    "t5_v": "W_v",
    "t5_o": "W_o",
    "t5_qk": "W_q+W_k",
    "t5_qv": "W_q+W_v",
    "t5_all": "all four",
}


def _rank_key(x: dict) -> tuple:
    return (-x["exact_match"], x["eval_loss"])


def seed_noise(results: dict) -> tuple[float, float] | None:
    """(exact match, eval loss) differences between the two seeds of r=64: the noise of one run."""
    if "t6_r64" not in results or "t6_r64_seed2" not in results:
        return None
    a, b = results["t6_r64"], results["t6_r64_seed2"]
    return abs(a["exact_match"] - b["exact_match"]), abs(a["eval_loss"] - b["eval_loss"])


def seed_note(results: dict) -> str:
    noise = seed_noise(results)
    if noise is None:
        return ""
    b = results["t6_r64_seed2"]
    return (
        f"\n\n**Seed noise.** The same configuration (W_q+W_v, r=64) with other seeds (lora.init_seed=1, "
        f"training.seed=4321) reaches {b['exact_match']:.0%} and eval loss {b['eval_loss']:.4f}: one run's "
        f"result moves by {noise[0] * 100:.0f} points of exact match and {noise[1]:.4f} of eval loss with the "
        "seeds alone. Differences between configurations smaller than that are not resolved by one run each."
    )


def t5_verdict(results: dict) -> str:
    runs = [results[n] for n in NAMES if n in results]
    if len(runs) < 2:
        return "(Too few Table 5 runs to compare.)"
    order = sorted(runs, key=_rank_key)
    place = {x["name"]: i + 1 for i, x in enumerate(order)}
    n = len(runs)
    where = "; ".join(f"{NAMES[x['name']]} {place[x['name']]}" for x in runs)
    text = (
        f"Ranked by exact match, then eval loss ({n} of 7 configurations run), the best is "
        f"**{NAMES[order[0]['name']]}** ({order[0]['exact_match']:.0%}, loss {order[0]['eval_loss']:.4f}); "
        f"places: {where}. The paper (GPT-3) finds W_q+W_v and all four at the top and W_q or W_k alone at the "
        "bottom. "
    )
    multi = [results[k]["eval_loss"] for k in ("t5_qk", "t5_qv", "t5_all") if k in results]
    single = [results[k]["eval_loss"] for k in ("t5_q", "t5_k", "t5_v", "t5_o") if k in results]
    if multi and single:
        text += (
            f"Mean eval loss of the multi-type choices run: {np.mean(multi):.4f}, of the single types run: "
            f"{np.mean(single):.4f}: "
            + (
                "**agrees** that spreading the budget over several types helps"
                if np.mean(multi) < np.mean(single)
                else "**disagrees**: single types do as well or better on average"
            )
        )
    if "t5_qv" in place:
        text += (
            "; W_q+W_v among the top two (**agrees**)"
            if place["t5_qv"] <= 2
            else f"; W_q+W_v is not at the top here but {place['t5_qv']} of {n} (**disagrees**)"
        )
    qk = [place[k] for k in ("t5_q", "t5_k") if k in place]
    if qk:
        low = max(qk) > n / 2
        text += (
            "; W_q/W_k alone in the lower half (**agrees**)."
            if low
            else "; W_q/W_k alone in the upper half (**disagrees**)."
        )
    noise = seed_noise(results)
    if noise is not None:
        text += (
            f" Two seeds of one configuration differ by {noise[0] * 100:.0f} points of exact match and "
            f"{noise[1]:.4f} of eval loss (below): read these rankings with that margin."
        )
    return text


def t6_verdict(results: dict) -> str:
    names = {1: "t6_r1", 2: "t6_r2", 4: "t6_r4", 8: "t6_r8", 64: "t6_r64"}
    rows = {r: results[n] for r, n in names.items() if n in results}
    if 1 not in rows or len(rows) < 2:
        return "(r=1 or the other ranks missing: no verdict.)"
    best_r = min(rows, key=lambda r: _rank_key(rows[r]))
    r1, best, top = rows[1], rows[best_r], max(rows)
    tol = max(0.1, (seed_noise(results) or (0.0, 0.0))[0])
    close = best["exact_match"] - r1["exact_match"] <= tol
    return (
        f"Best rank here: r={best_r} ({best['exact_match']:.0%}, loss {best['eval_loss']:.4f}); r=1 reaches "
        f"{r1['exact_match']:.0%} (loss {r1['eval_loss']:.4f}) with {r1['params']:,} trainable parameters against "
        f"{rows[top]['params']:,} for r={top} ({rows[top]['exact_match']:.0%}, loss {rows[top]['eval_loss']:.4f}). "
        "The paper finds r=1 on W_q+W_v within 0.5 points of the best rank (a very small r suffices): "
        + (
            f"**agrees** (r=1 within {tol * 100:.0f} points of exact match of the best rank, the larger of 10 "
            "points and the seed noise)."
            if close
            else f"**disagrees**: with this short training r=1 trails the best rank by more than {tol * 100:.0f} points "
            "of exact match (the larger of 10 points and the seed noise)."
        )
    )


def _phi_parts(p: dict, upto: str) -> str:
    return "; ".join(
        f"{t}: phi(1,1) = {s['phi_11']:.2f}, mean phi(i,i) over i <= {upto} = {s['phi_diag_mean']:.2f}, "
        f"phi(r_a, r_b) = {s['phi_full']:.2f} (chance {s['chance_full']:.2f})"
        for t, s in p["by_type"].items()
    )


def subspace_verdict(pairs: dict) -> str:
    out = []
    p = pairs.get("t6_r8_vs_t6_r64_seed2")
    if p:
        top = min(s["phi_11"] for s in p["by_type"].values())
        hi = max(s["phi_11"] for s in p["by_type"].values())
        out.append(
            "**r=8 vs r=64, independent inits** (the analogue of Fig. 3): "
            + _phi_parts(p, "8")
            + ". The paper finds the top direction shared (phi(1,1) > 0.5) and the others mostly not: "
            + (
                "**agrees** on the top direction."
                if top > 0.5
                else f"**disagrees**: phi(1,1) is {top:.2f} to {hi:.2f} here, below the paper's 0.5 "
                "(though above chance)."
            )
        )
    p = pairs.get("t6_r8_vs_t6_r64")
    if p:
        out.append(
            "**r=8 vs r=64, same lora.init_seed**: " + _phi_parts(p, "8") + ". dtrain draws A row by row "
            "from a generator seeded by (init_seed, module name), so the r=8 A starts as the first 8 rows "
            "of the r=64 A, and after this short training the whole r=8 row space still lies in the r=64 "
            "one (phi(8, 64) near 1): a shared-init effect, not something learned. Compare adapters from "
            "different init seeds (as above) to ask the paper's question."
        )
    p = pairs.get("t6_r64_vs_t6_r64_seed2")
    if p:
        bt = p["by_type"]
        q_more = "q_proj" in bt and "v_proj" in bt and bt["q_proj"]["phi_diag_mean"] > bt["v_proj"]["phi_diag_mean"]
        out.append(
            "**two seeds of r=64** (Fig. 4): " + _phi_parts(p, "64") + ". The paper finds a few top "
            "directions shared across seeds, more for ΔW_q than for ΔW_v (a higher 'intrinsic rank' of "
            "ΔW_q): "
            + (
                "**agrees** that ΔW_q shares more directions than ΔW_v."
                if q_more
                else "**disagrees**: here ΔW_v shares as many or more directions than ΔW_q."
            )
        )
    return "\n\n".join(out)


def drift_note(results: dict) -> str:
    drift = {
        x["r"]: x["a_drift"] for n, x in results.items() if n.startswith("t6_") and "seed" not in n and "a_drift" in x
    }
    if not drift:
        return ""
    parts = ", ".join(f"{d:.2f} at r={r}" for r, d in sorted(drift.items()))
    if max(drift.values()) >= 0.5:
        return f"\n\nHow far A moved from its random init A₀: ‖A−A₀‖/‖A₀‖ = {parts}."
    return (
        f"\n\nA is still dominated by its random init: ‖A−A₀‖/‖A₀‖ = {parts}. So ΔW = (alpha/r) B A reads the input "
        "through directions that are still mostly A₀'s random ones, and W's part on them is near what random "
        "directions give: with this short training, ΔW cannot yet pick out W's directions as the paper's "
        "adapters (trained far longer on GPT-3) did."
    )


def amp_verdict(single: dict) -> str:
    if "t6_r4" not in single or "t6_r64" not in single:
        return "(r=4 or r=64 missing.)"
    a4, a64 = single["t6_r4"]["by_type"], single["t6_r64"]["by_type"]
    lines = []
    for t in a4:
        s4, s64 = a4[t], a64[t]
        lines.append(
            f"{t}: amplification {s4['amplification']:.2f} at r=4 and {s64['amplification']:.2f} at r=64; "
            f"‖UᵀWV‖_F is {s4['proj_delta'] / s4['proj_random']:.2f}x the random directions' at r=4 "
            f"and {s64['proj_delta'] / s64['proj_random']:.2f}x at r=64, and "
            f"{s4['proj_w'] / s4['proj_delta']:.0f}x below W's own top-4 directions"
        )
    bigger = all(a4[t]["amplification"] > a64[t]["amplification"] for t in a4)
    large = all(a4[t]["amplification"] > 1 for t in a4)
    correlated = all(a4[t]["proj_delta"] > 1.2 * a4[t]["proj_random"] for t in a4)
    return (
        "; ".join(lines) + ". The paper (ΔW_q of GPT-3, layer 48) finds ΔW amplifying directions W does not "
        "emphasize, by about 21.5 at r=4 and 1.9 at r=64, with ‖UᵀWV‖_F well above random (ΔW correlates with "
        "W) and far below W's top directions. Here: "
        + (
            "**agrees** that the amplification is larger at r=4 than at r=64"
            if bigger
            else "**disagrees** on the amplification growing as r shrinks"
        )
        + (
            "; amplification above 1 at r=4 for every type, though far from 21.5"
            if large
            else "; **disagrees** on its size: at r=4 it is "
            + ", ".join(f"{a4[t]['amplification']:.2f} ({t})" for t in a4)
            + ", far from 21.5, and below 1 "
            "means ΔW is smaller than W's own part on ΔW's directions"
        )
        + (
            "; ΔW's directions correlate with W more than random ones (**agrees**)."
            if correlated
            else "; ΔW's directions carry no more of W than random ones do (**disagrees**: no correlation measured)."
        )
    )


def missing_note(meta: dict) -> str:
    if not meta.get("missing"):
        return ""
    return (
        "\n**Not run**: " + ", ".join(f"`{n}`" for n in meta["missing"]) + ". The shared machine ran each "
        "training step several times slower than when quiet (mean seconds per step of each run: "
        "results.json, `step_s`), and the study was cut at its time limit; `python bench/paper_study.py` "
        "runs what is missing and rewrites this page.\n"
    )


def document(results: dict, single: dict, pairs: dict, meta: dict, tables: dict) -> str:
    """docs/paper.md: the introduction and setup, then one section per question."""
    return intro(results, single, meta) + sections(results, single, pairs, tables)


def intro(results: dict, single: dict, meta: dict) -> str:
    secs = meta["run_time_s"]
    return f"""# The LoRA paper's Section 7, reproduced on SmolLM2-135M with dtrain

The LoRA paper (Hu et al. 2021, arXiv:2106.09685) asks, on GPT-3 175B, which weights to adapt
(Table 5), how small the rank can be (Table 6), how the subspaces adapters of different ranks and
seeds learn relate (Sec. 7.2, Figures 3-4), and how the update ΔW relates to the frozen W (Sec. 7.3,
Table 7). This page asks the same questions of a real 135M model, SmolLM2-135M-Instruct, learning
dtrain's date task (ISO date -> DD.MM.YYYY, which the prompt never states), with adapters trained by
`dtrain train` and analyzed by `dtrain analyze` (docs/analyze.md). It is one small model on one
small task with one short training per configuration: where it differs from the paper, that is a
finding about this setting, not a refutation.

Made by:

```bash
{meta["command"]}
```

Run time on this machine: {secs:.0f} s ({secs / 60:.1f} min) summed over the {len(results)} trainings and
evaluations ({meta["wall_s"] / 60:.0f} min from the first run's start to the last one's end{meta.get("note", "")}), {meta["analysis_s"]} s for the analyses (every adapted layer of {len(single)} adapters, with the base's
singular values), the figures and this page. Machine: {meta["machine"]}. The machine was shared
with other jobs while this ran (a training step took {np.mean([x.get("step_s", 0) for x in results.values()]):.0f} s
on average, {min(x.get("step_s", 0) for x in results.values()):.0f} s in the quietest run): the run times are upper bounds, not benchmarks.
{missing_note(meta)}
**Setup.** Each configuration: `dtrain train configs/smollm2_dates.yaml` with `backend.name=none`
(one process), {meta["steps"]} steps of 8 conversations (training.micro_batch_size=8), lr
{meta["lr"]:g} (3 warm-up steps, cosine), alpha = 16 for every r (as the paper: alpha fixed while r
varies), dropout 0, seeds lora.init_seed = 0 and training.seed = 1234 unless stated. Eval loss: the
mean over the first 32 of the 50 held-out conversations (4 batches of 8; metrics.jsonl, after the
last step; the base's own loss there is {next(iter(results.values()))["base_eval_loss"]:.4f}). Exact match: `dtrain eval --model
smollm2-135m-instruct --adapter RUN/adapter --data dtrain/assets/dates_eval.jsonl
--max-new-tokens 12` (greedy; the base model scores 0%). {meta["steps"]} steps rather than the Quickstart's 16
so the task is not solved by every configuration and the comparison can say something. The paper's
GPT-3 numbers are validation accuracies on WikiSQL and MultiNLI-matched, quoted for the pattern,
not for the values.

![Tables 5 and 6](paper/tables.png)
"""


def sections(results: dict, single: dict, pairs: dict, tables: dict) -> str:
    return _tables_5_6(results, tables) + _sections_7(single, pairs, tables, results)


def _tables_5_6(results: dict, tables: dict) -> str:
    return f"""
## Which weights to adapt, at one parameter budget (Table 5)

In GPT-3 every attention projection is d x d, so one r per type fixes the budget. In SmolLM2
(hidden 576, 9 query and 3 key/value heads of 64) W_q and W_o are 576 -> 576 (1,152 r parameters per
layer) but W_k and W_v are 576 -> 192 (768 r). The budget here is 11,520 parameters per layer
(345,600 over the 30 layers), the smallest that every choice meets exactly: W_q r=10, W_k r=15,
W_v r=15, W_o r=10, W_q+W_k r=6 (1,920 r), W_q+W_v r=6, all four r=3 (3,840 r).

{tables["t5"]}

{t5_verdict(results)}

## Rank (Table 6, W_q+W_v)

{tables["t6"]}

{t6_verdict(results)}{seed_note(results)}

Effective rank: exp of the entropy of ΔW's normalized singular values (k for k equal singular values);
σ > 1% σ₁ counts the singular values above 1% of the largest; ‖A−A₀‖/‖A₀‖ is how far training moved
A from its random init (mean over layers; dtrain's init is recomputed exactly from the seed). The spectrum of the r=64 adapter:

![spectrum of the r=64 update](paper/spectrum_r64.png)
"""


def _sections_7(single: dict, pairs: dict, tables: dict, results: dict) -> str:
    return f"""
## Subspace similarity (Sec. 7.2, Figures 3 and 4)

phi(i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖²_F / min(i, j), with U the right-singular vectors of each
adapter's A (the input directions it reads), averaged over the 30 layers; the chance level for two
random subspaces is max(i, j) / 576.

{tables["sub"]}

{subspace_verdict(pairs)}

![phi(i, i)](paper/subspace_diagonal.png)

| | W_q | W_v |
|---|---|---|
| r=8 vs r=64, independent inits | ![](paper/subspace_t6_r8_vs_t6_r64_seed2_q_proj.png) | ![](paper/subspace_t6_r8_vs_t6_r64_seed2_v_proj.png) |
| r=8 vs r=64, same init seed | ![](paper/subspace_t6_r8_vs_t6_r64_q_proj.png) | ![](paper/subspace_t6_r8_vs_t6_r64_v_proj.png) |
| r=64, two seeds | ![](paper/subspace_t6_r64_vs_t6_r64_seed2_q_proj.png) | ![](paper/subspace_t6_r64_vs_t6_r64_seed2_v_proj.png) |

## How ΔW relates to W (Sec. 7.3, Table 7)

U, V: the top-r left and right singular vectors of ΔW = (alpha/r) B A; ‖UᵀWV‖_F is W's part on
ΔW's directions, against W's own top-r directions (‖σ_1..r(W)‖) and random orthonormal directions;
amplification = ‖ΔW‖_F / ‖UᵀWV‖_F. Means over the 30 layers (the paper: layer 48 of 96). Sizes do
not transfer between the models: random k-dimensional directions keep about k / √(out·in) of ‖W‖_F
in expectation (squared: k² / (out·in)), a far larger share of a 576-wide layer than of GPT-3's
12,288-wide one, so the same ΔW has a smaller amplification here; compare ΔW's column with the
random one and with W's own, as the paper does.

{tables["t7"]}

{amp_verdict(single)}{drift_note(results)}

## Reproduce, and every number

`python bench/paper_study.py` (add `--report-only` to re-analyze finished runs in `runs/paper_study`
and rewrite this page). All numbers, per run and per layer type: [paper/results.json](paper/results.json).
Per layer: `dtrain analyze runs/paper_study/t6_r8/adapter runs/paper_study/t6_r64/adapter --base
smollm2-135m-instruct --out DIR` writes analysis.json with every module.
"""
