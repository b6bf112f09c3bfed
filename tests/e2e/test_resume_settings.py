"""`training.resume=auto` after a change of the settings a checkpoint depends on, through the real
CLI: one `dtrain: error:` line naming the key, the checkpoint's value and this config's, exit 2,
nothing loaded (no traceback) and nothing of the earlier run touched. lora.dropout may change.
"""

from __future__ import annotations

import re

import pytest

from dtrain.training import checkpoint
from tests.helpers import run_dtrain, train

STEPS = 2
BASE = [f"training.max_steps={STEPS}", "training.warmup_steps=1"]  # lora.r 8, alpha 16, targets [q_proj, v_proj]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-process run: its last checkpoint is step 2."""
    out = tmp_path_factory.mktemp("resume-settings") / "run"
    train(out, BASE)
    return out


def _refusal(proc, finished, key: str, saved: str, now: str, keep: str) -> None:
    path = checkpoint.checkpoint_dir(finished, STEPS)
    want = (
        f"dtrain: error: training.resume=auto: the checkpoint in {path} was trained with {key} = {saved}, "
        f"this config has {key} = {now}; resume with the same {keep} or start a new output.dir"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert want in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert proc.stderr.count("dtrain: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


CHANGES = {
    "r": (["lora.r=4"], "lora.r", "8", "4", "LoRA settings"),
    "alpha": (["lora.alpha=32"], "lora.alpha", "16.0", "32.0", "LoRA settings"),
    "targets": (["lora.targets=[q_proj]"], "lora.targets", "[q_proj, v_proj]", "[q_proj]", "LoRA settings"),
    "regex": (["lora.target_regex=.*q_proj"], "lora.target_regex", "null", "'.*q_proj'", "LoRA settings"),
    "arch": (["model.arch.intermediate_size=96"], "model intermediate_size", "128", "96", "model"),
    "bits": (["quantization.bits=8"], "quantization.bits", "16", "8", "quantization"),
}


# the others launch a process each too (~10 s) and are on request: tests/unit/test_preemptible.py
# refuses every recorded key in process, this file shows the CLI's line for two of them
QUICK = ("r", "targets")


@pytest.mark.parametrize(
    "case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.ondemand) for c in sorted(CHANGES)]
)
def test_resume_with_a_changed_setting_is_refused_in_one_line(case, finished):
    overrides, key, saved, now, keep = CHANGES[case]
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    proc = train(finished, [*BASE, "training.resume=auto", *overrides], check=False)
    _refusal(proc, finished, key, saved, now, keep)
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_resume_with_another_global_batch_is_refused_in_one_line(finished):
    proc = train(finished, [*BASE, "training.resume=auto", "training.micro_batch_size=2"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("dtrain: error:")]
    assert line == [
        f"dtrain: error: training.resume=auto: the checkpoint in {checkpoint.checkpoint_dir(finished, STEPS)} "
        "was trained with a global batch of 4 sequences (training.micro_batch_size x "
        "training.grad_accum x ranks = 4 x 1 x 1 rank(s)), this run's is 2 (2 x 1 x 1 rank(s)); "
        "keep the product equal (e.g. half the ranks, twice the micro-batch) or start a new output.dir"
    ]


@pytest.mark.ondemand  # a resume with another dropout also runs in test_loggers (the TensorBoard purge)
def test_resume_with_another_dropout_is_allowed(tmp_path):
    out = tmp_path / "run"
    train(out, ["training.max_steps=3", "training.warmup_steps=1", "training.save_every=1"])
    ckpt = checkpoint.checkpoint_dir(out, 3)
    assert checkpoint.verify(ckpt) is None
    proc = train(out, ["training.max_steps=3", "training.warmup_steps=1", "training.resume=auto", "lora.dropout=0.1"])
    assert "lora.dropout 0.0 -> 0.1" in proc.stderr and "resumed from" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.ondemand  # the refusal itself is in the 1-process cases above
@pytest.mark.distributed
def test_resume_with_a_changed_rank_on_2_ranks_is_refused_in_one_line(finished):
    """The 1-process checkpoint, resumed by 2 ZeRO-3 ranks (another world size is allowed; lora.r is
    not): rank 0 prints the line, every rank exits 2, torchrun then fails the job."""
    pytest.importorskip("deepspeed")
    args = [
        "train",
        "configs/tiny.yaml",
        "lora.targets=[q_proj,v_proj]",
        *BASE,
        "training.micro_batch_size=2",
        "training.eval_every=0",
        "data.seq_len=32",
        "backend.name=deepspeed",
        "lora.r=4",
        "training.resume=auto",
        f"output.dir={finished}",
    ]
    proc = run_dtrain(args, nproc=2, launcher="torchrun", check=False)
    assert proc.returncode != 0
    _refusal_lines = [x for x in proc.stderr.splitlines() if x.startswith("dtrain: error:")]
    assert len(_refusal_lines) == 1 and "exitcode: 2" in proc.stderr, proc.stderr[-3000:]
    assert (
        "was trained with lora.r = 8, this config has lora.r = 4; resume with the same LoRA settings"
        in _refusal_lines[0]
    )
    assert not re.search(r'File ".*/dtrain/', proc.stderr), proc.stderr[-3000:]  # torchrun's own traceback only
