"""The preemptible run through the CLI, one chain of launches serving every assert:

1. an uninterrupted reference run (evaluation every 2 steps, a long one: 1 sequence per batch);
2. the same run with `training.time_limit=1s`: the deadline is due at the first step boundary
   (never before a step: a checkpoint there would save nothing), so it checkpoints step 1, exit 75;
3. its resume, SIGUSR1 as soon as the evaluation of step 2 starts: checkpoint at its next batch,
   exit 75, that step's metrics row not written (the evaluation was cut short);
4. the resume of that: it redoes the evaluation of step 2 and finishes with the reference's
   adapter bit for bit and the same metrics history (losses and eval losses, each step once).
Also: a resume with rsLoRA, DoRA, other targets and another chat template is refused in one line each.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dtrain.training import checkpoint
from dtrain.training.trainer import PREEMPT_EXIT
from tests.distributed.runs import assert_same_adapter
from tests.helpers import FAST, REPO, TINY, env_for_tests, launch_cmd, metrics, train

STEPS = 4
RUN = [
    *FAST,
    "training.micro_batch_size=1",
    f"training.max_steps={STEPS}",
    "training.eval_every=2",
    "training.eval_batches=400",
    "data.eval_fraction=0.5",
    "logging.loss_curve=false",
]


def _start(out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = launch_cmd(1, "python") + ["train", str(TINY), *RUN, *extra, f"output.dir={out}"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env_for_tests(),
        stdout=subprocess.DEVNULL,
        stderr=open(out.parent / f"{out.name}.log", "a"),
        text=True,
    )


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def _wait_for(proc: subprocess.Popen, out: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in _log(out):
        assert proc.poll() is None, f"exited {proc.returncode} before '{text}'\n{_log(out)[-3000:]}"
        assert time.monotonic() < deadline, f"no '{text}' after {timeout} s"
        time.sleep(0.01)


def _eval_rows(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in metrics(out) if "eval_loss" in r]


@pytest.mark.ondemand  # ~54 s, four runs; test_preemptible holds the time limit, test_slurm_train an exact resume
def test_time_limit_then_sigusr1_inside_an_evaluation_then_resume_is_exact(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    out.mkdir()
    assert _start(ref, []).wait(timeout=300) == 0, _log(ref)[-3000:]

    rc = _start(out, ["training.time_limit=1s"]).wait(timeout=300)
    log = _log(out)
    assert rc == PREEMPT_EXIT, log[-3000:]
    assert "preempted: checkpoint at step 1 written (training.time_limit ended " in log, log[-3000:]
    assert json.loads((out / checkpoint.PREEMPTED).read_text())["step"] == 1

    proc = _start(out, ["training.resume=auto"])
    _wait_for(proc, out, "step 2: evaluating, 168 batch(es) per rank")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == PREEMPT_EXIT, _log(out)[-3000:]
    took = time.monotonic() - signalled
    log = _log(out)
    assert "preempted: checkpoint at step 2 written (SIGUSR1 during evaluation)" in log, log[-3000:]
    state = checkpoint.read_state(out, 2)
    assert state["pending_row"]["step"] == 2 and "eval_loss" not in state["pending_row"]
    assert [s for s, _ in _eval_rows(out)] == [0]  # step 2's evaluation was cut short
    print(f"SIGUSR1 -> exit 75 in {took:.2f} s (save and exit included)")

    proc = _start(out, ["training.resume=auto"])
    assert proc.wait(timeout=300) == 0, _log(out)[-3000:]
    assert_same_adapter(out, ref)
    assert _eval_rows(out) == _eval_rows(ref) and [s for s, _ in _eval_rows(ref)] == [0, 2, 4]
    losses = [[(r["step"], r["loss"]) for r in metrics(x) if "loss" in r] for x in (out, ref)]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, STEPS + 1))


TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
CHAT = [
    f"data.path={REPO / 'dtrain/assets/tiny_messages.jsonl'}",
    "data.format=messages",
    "data.seq_len=64",
    "training.max_steps=1",
    "training.warmup_steps=1",
    "logging.loss_curve=false",
]


def test_resume_with_rslora_dora_targets_and_template_changed_is_refused_one_line_each(tmp_path):
    out = tmp_path / "chat"
    train(out, [*CHAT, f"data.chat_template={TEMPLATE}"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = train(
        out,
        [
            *CHAT,
            "data.chat_template={% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}",
            "lora.use_rslora=true",
            "lora.use_dora=true",
            "lora.targets=[q_proj]",
            "training.resume=auto",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("dtrain: error:")]
    path = checkpoint.checkpoint_dir(out, 1)
    tail = "or start a new output.dir"
    assert [x.split(" was trained with ")[1] for x in lines] == [
        f"lora.use_rslora = false, this config has lora.use_rslora = true; resume with the same LoRA settings {tail}",
        f"lora.use_dora = false, this config has lora.use_dora = true; resume with the same LoRA settings {tail}",
        f"lora.targets = [q_proj, v_proj], this config has lora.targets = [q_proj]; resume with the same LoRA settings {tail}",
        lines[3].split(" was trained with ")[1],
    ]
    assert all(x.startswith(f"dtrain: error: training.resume=auto: the checkpoint in {path} ") for x in lines)
    assert lines[3].split(" was trained with ")[1].startswith("data.chat_template_hash = '")
    assert lines[3].endswith(f"; resume with the same chat template {tail}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
