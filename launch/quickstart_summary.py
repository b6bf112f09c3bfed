"""Print what the Quickstart measured: eval loss and held-out accuracy before and after, three
example answers, and the per-rank memory table.   usage: python launch/quickstart_summary.py OUT"""

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    steps = [r for r in rows if "loss" in r]
    before, after = (json.loads((out / f"accuracy_{w}.json").read_text()) for w in ("before", "after"))
    step_s = sorted(r["step_time_s"] for r in steps)[len(steps) // 2]
    print("\n== dtrain Quickstart: SmolLM2-135M-Instruct + LoRA on the date task")
    print(f"eval loss        {evals[0][1]:.4f} (step 0)  ->  {evals[-1][1]:.4f} (step {evals[-1][0]})")
    print(
        f"exact match      {before['correct']}/{before['total']} ({100 * before['exact_match']:.0f}%)  ->  "
        f"{after['correct']}/{after['total']} ({100 * after['exact_match']:.0f}%) on held-out dates"
    )
    print(f"steps            {len(steps)}, median {step_s:.1f} s per step")
    b = [json.loads(line) for line in (out / "eval_before.jsonl").read_text().splitlines()]
    a = [json.loads(line) for line in (out / "eval_after.jsonl").read_text().splitlines()]
    print("examples (prompt | expected | base | adapter):")
    for x, y in list(zip(b, a))[:3]:
        print(f"  {x['prompt']} | {x['expected']} | {x['got'][:50]!r} | {y['got']!r}")
    report = out / "memory" / "memory_report.md"
    if report.is_file():
        print(f"\nmemory ({report}):")
        print(report.read_text())
    print(f"adapter (PEFT format): {out / 'adapter'}   metrics: {out / 'metrics.jsonl'}")
    print(
        f"try it: .venv/bin/python -m dtrain generate --model smollm2-135m-instruct --adapter {out / 'adapter'} "
        "--prompt 'Convert the date 1999-12-31.'"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
