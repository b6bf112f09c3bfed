"""The LoRA paper's Section 7 on a real model: SmolLM2-135M-Instruct learning the shipped date task.

    .venv/bin/python bench/paper_study.py [--steps 10] [--work runs/paper_study] [--docs docs]
    .venv/bin/python bench/paper_study.py --report-only     # re-analyze finished runs, rewrite the doc
    .venv/bin/python bench/paper_study.py --only t6_r8,t6_r64 --no-report & ...  # several workers

Trains one adapter per configuration with `dtrain train configs/smollm2_dates.yaml` (one process,
`backend.name=none`, 8 conversations per step), evaluates each with `dtrain eval` (greedy exact
match on the 50 held-out dates of dtrain/assets/dates_eval.jsonl) and reads the final eval loss from
its metrics.jsonl. Then `dtrain.analysis` compares adapters (subspace similarity, Sec. 7.2) and
relates each update to the base weights (amplification, Sec. 7.3). Writes docs/paper.md and
docs/paper/*.png. A finished run (adapter + eval result in the work dir) is not trained again.

Configurations (alpha = 16 everywhere, as the paper keeps alpha fixed while r varies):
  * Table 5, one budget of 11,520 trainable parameters per layer (345,600 in all): q_proj and
    o_proj are 576 -> 576 (r (576 + 576) = 1,152 r), k_proj and v_proj 576 -> 192 (768 r):
    W_q r=10, W_k r=15, W_v r=15, W_o r=10, W_q+W_k r=6, W_q+W_v r=6, all four r=3;
  * Table 6, W_q+W_v with r in {1, 2, 4, 8, 64};
  * a second r=64 run with other seeds (lora.init_seed and training.seed) for Fig. 4's comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
CONFIG = REPO / "configs" / "smollm2_dates.yaml"
EVAL_DATA = "dtrain/assets/dates_eval.jsonl"
MODEL = "smollm2-135m-instruct"
QV, ALL4 = ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]
DIMS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)}
LAYERS = 30

# name: (table, targets, r, lora.init_seed, training.seed), in the order they run: the runs the
# analyses need first (a study cut short still answers Sec. 7.2 and 7.3)
RUNS = {
    "t6_r8": ("6", QV, 8, 0, 1234),
    "t6_r64": ("6", QV, 64, 0, 1234),
    "t6_r64_seed2": ("seed", QV, 64, 1, 4321),
    "t6_r4": ("6", QV, 4, 0, 1234),
    "t6_r1": ("6", QV, 1, 0, 1234),
    "t5_q": ("5", ["q_proj"], 10, 0, 1234),
    "t5_qv": ("5", QV, 6, 0, 1234),
    "t5_all": ("5", ALL4, 3, 0, 1234),
    "t5_v": ("5", ["v_proj"], 15, 0, 1234),
    "t5_k": ("5", ["k_proj"], 15, 0, 1234),
    "t5_o": ("5", ["o_proj"], 10, 0, 1234),
    "t5_qk": ("5", ["q_proj", "k_proj"], 6, 0, 1234),
    "t6_r2": ("6", QV, 2, 0, 1234),
}


def budget(targets: list[str], r: int) -> int:
    """Trainable parameters of LoRA rank r on `targets` in all LAYERS layers: r (in + out) each."""
    return LAYERS * r * sum(sum(DIMS[t]) for t in targets)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (8 conversations each)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--work", default="runs/paper_study", help="run directories and results.json")
    p.add_argument("--docs", default="docs", help="where paper.md and paper/*.png are written")
    p.add_argument("--only", help="comma-separated run names (default: all)")
    p.add_argument("--report-only", action="store_true", help="no training: analyze the finished runs")
    p.add_argument("--note", default="", help="a sentence for the page on how the runs were made")
    p.add_argument("--no-report", action="store_true", help="train and evaluate only (a worker of several)")
    return p.parse_args(argv)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def _dtrain(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dtrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def train_and_eval(name: str, out: Path, steps: int, lr: float) -> dict:
    """Train run `name` into `out`, evaluate it; its row of the results."""
    table, targets, r, init_seed, seed = RUNS[name]
    t0 = time.time()
    _dtrain(
        [
            "train",
            str(CONFIG),
            "backend.name=none",
            f"lora.targets=[{','.join(targets)}]",
            f"lora.r={r}",
            f"lora.init_seed={init_seed}",
            f"training.seed={seed}",
            f"training.max_steps={steps}",
            f"training.lr={lr}",
            "training.micro_batch_size=8",
            f"training.eval_every={steps}",
            "training.eval_batches=4",
            f"output.dir={out}",
            "output.overwrite=true",
        ]
    )
    t1 = time.time()
    ev = out / "eval.jsonl"
    ev.unlink(missing_ok=True)
    proc = _dtrain(
        [
            "eval",
            "--model",
            MODEL,
            "--adapter",
            str(out / "adapter"),
            "--data",
            EVAL_DATA,
            "--max-new-tokens",
            "12",
            "--batch-size",
            "25",
            "--out",
            str(ev),
        ]
    )
    acc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "name": name,
        "table": table,
        "targets": targets,
        "r": r,
        "init_seed": init_seed,
        "seed": seed,
        "params": budget(targets, r),
        **losses(out),
        "step_s": step_seconds(out),
        "exact_match": acc["exact_match"],
        "correct": acc["correct"],
        "total": acc["total"],
        "train_s": round(t1 - t0, 1),
        "eval_s": round(time.time() - t1, 1),
    }


def losses(out: Path) -> dict:
    """The run's eval loss before training and at the end, and its last training loss (metrics.jsonl)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if "eval_loss" in x]
    return {
        "base_eval_loss": evals[0]["eval_loss"],
        "eval_loss": evals[-1]["eval_loss"],
        "train_loss": [x["loss"] for x in rows if "loss" in x][-1],
    }


def step_seconds(out: Path) -> float:
    """Mean seconds per training step of the run in `out` (metrics.jsonl)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [x["step_time_s"] for x in rows if "step_time_s" in x]
    return round(sum(times) / max(len(times), 1), 1)


def wall_seconds(work: Path, results: dict) -> float:
    """From the first run's start (its config.yaml) to the last one's end (its result.json)."""
    if not results:
        return 0.0
    start = min((work / n / "config.yaml").stat().st_mtime for n in results)
    return round(max((work / n / "result.json").stat().st_mtime for n in results) - start, 0)


def run_all(args: argparse.Namespace, work: Path) -> dict:
    results = {}
    for name in RUNS:  # each run's row sits next to it: several study processes may share `work`
        if (work / name / "result.json").is_file() and (work / name / "adapter").is_dir():
            results[name] = json.loads((work / name / "result.json").read_text())
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        if name in results:
            continue
        if args.report_only:
            print(f"run {name} not finished in {work}: left out", flush=True)
            continue
        row = train_and_eval(name, work / name, args.steps, args.lr)
        results[name] = row
        (work / name / "result.json").write_text(json.dumps(row, indent=2) + "\n")
        print(
            f"{name}: eval loss {row['eval_loss']:.4f}, exact match {row['exact_match']:.0%} "
            f"(train {row['train_s']} s, eval {row['eval_s']} s)",
            flush=True,
        )
    return results


def machine() -> str:
    import torch
    import transformers

    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} CPU cores (shared with other jobs; load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = run_all(args, work)
    if args.no_report:
        return 0
    train_time = sum(r["train_s"] + r["eval_s"] for r in results.values())
    import paper_report  # bench/paper_report.py

    t1 = time.time()
    analyses = paper_report.analyze_runs(work, results)
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--note" in shown:  # the note is printed on the page, not in its command
        del shown[shown.index("--note") : shown.index("--note") + 2]
    meta = {
        "command": " ".join(["python bench/paper_study.py", *shown]),
        "steps": args.steps,
        "lr": args.lr,
        "missing": [n for n in RUNS if n not in results],
        "machine": machine(),
        "run_time_s": round(train_time, 0),
        "wall_s": wall_seconds(work, results),
        "note": args.note,
        "analysis_s": round(time.time() - t1, 1),
        "this_call_s": round(time.time() - t0, 0),
    }
    out = paper_report.write_doc(REPO / args.docs, results, analyses, meta)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
