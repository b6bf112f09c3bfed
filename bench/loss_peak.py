"""Peak memory of a training step at a 128k vocabulary, chunked loss against unchunked: one
`dtrain train` process per setting (so each peak is its own), a random Llama with vocab 128,256
(hidden 512, 8 layers, untied head), 2 x 1,024 tokens per micro-batch, LoRA on q_proj and v_proj,
fp32, 2 steps; the peak RSS is the one dtrain reports at the end of the run.

    .venv/bin/python bench/loss_peak.py [--steps 2] [--write]

The goal (issue: throughput on real chat data): chunked <= 1.3x (unchunked peak - its logits), that
is, the loss adds little above the model and its activations. The logits are batch x seq x vocab
fp32 values.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/loss_peak.py`: import `bench` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.loss_memory import ARCH_128K  # noqa: E402

BATCH, SEQ, VOCAB = 2, 1024, 128256
PEAK = re.compile(r"rank 0: .*?peak RSS ([0-9.]+) MiB")


def peak_mib(chunked: bool, steps: int, out: Path) -> float:
    """Peak RSS (MiB) of one `dtrain train` run with the chunked loss on or off."""
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "train",
        str(common.REPO / "configs" / "tiny.yaml"),
        *ARCH_128K,
        "backend.name=none",
        "backend.device=cpu",
        "lora.targets=[q_proj,v_proj]",
        f"data.seq_len={SEQ}",
        f"training.micro_batch_size={BATCH}",
        f"training.max_steps={steps}",
        "training.warmup_steps=0",
        "training.eval_every=0",
        f"training.chunked_loss={str(chunked).lower()}",
        f"output.dir={out}",
        "output.overwrite=true",
    ]
    proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, timeout=1800)
    found = PEAK.search(proc.stderr + proc.stdout)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"dtrain train (chunked_loss={chunked}) failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return float(found.group(1))


def table(chunked: float, unchunked: float, load: tuple[str, str], steps: int) -> str:
    logits = BATCH * SEQ * VOCAB * 4 / 2**20
    bound = 1.3 * (unchunked - logits)
    verdict = "met" if chunked <= bound else "not met"
    return (
        f"## loss_peak: peak RSS at vocab 128k, chunked vs unchunked ({common.git_rev()})\n\n"
        f"Load at start {load[0]}, at end {load[1]}; {steps} steps, {BATCH} x {SEQ} tokens, fp32, one process; "
        + ", ".join(f"{k} {v}" for k, v in common.versions().items())
        + "\n\n"
        "| loss | peak RSS MiB |\n|---|---:|\n"
        f"| unchunked | {unchunked:,.0f} |\n| chunked | {chunked:,.0f} |\n\n"
        f"The logits: {logits:,.0f} MiB. Goal: chunked <= 1.3 x (unchunked - logits) = {bound:,.0f} MiB: "
        f"{verdict} (chunked / (unchunked - logits) = {chunked / (unchunked - logits):.2f}).\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args(argv)
    start = common.loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        unchunked = peak_mib(False, a.steps, Path(tmp) / "unchunked")
        chunked = peak_mib(True, a.steps, Path(tmp) / "chunked")
    text = table(chunked, unchunked, (start, common.loadavg()), a.steps)
    print(text)
    if a.write:
        common.append_results(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
