"""Pure parts of the preemptible run, in process: durations and the deadline's margin, SLURM's end
time, the resume checks line by line, non-finite counting, the generation eval's stop, and a
checkpoint save on a real full tmpfs (root only) leaving the previous checkpoint loadable."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dtrain.errors import ConfigError, DiskFull
from dtrain.model.tokenizer import load_tokenizer
from dtrain.training import checkpoint, deadline, preempt, resume_check, stopping
from tests.unit.test_checkpoint_files import PLAN, lora_state, make_backend, make_cfg, train_step

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("90", 90),
        ("90s", 90),
        ("45m", 2700),
        ("2h", 7200),
        ("1d", 86400),
        ("01:30:00", 5400),
        ("05:07", 307),
        ("1-02:00:00", 93600),
        ("1.5m", 90),
    ],
)
def test_durations(text, seconds):
    assert deadline.parse_duration(text) == seconds


def test_a_bad_duration_is_one_line():
    with pytest.raises(ConfigError, match=r"^training.time_limit = '1x': not a duration \(e.g. 90m"):
        deadline.parse_duration("1x")


def test_deadline_margin_follows_the_run_and_the_earlier_end_wins():
    d = deadline.Deadline(start=1000.0, limit_s=100.0, slurm_end=2000.0)
    assert d.end == 1100.0 and d.source == "training.time_limit" and d.margin == deadline.MIN_MARGIN_S
    d.saw("save", 7.0)
    d.saw("step", 2.0)
    d.saw("step", 1.0)  # the longest step counts
    d.saw("eval", 3.0)
    assert d.margin == 2 * 7.0 + 2.0 + 3.0
    assert not d.due(now=1100.0 - 19.5) and d.due(now=1100.0 - 18.5)
    s = deadline.Deadline(start=1000.0, limit_s=None, slurm_end=1050.0)
    assert s.end == 1050.0 and s.source == "SLURM job end"
    assert deadline.Deadline(start=0.0, limit_s=None, slurm_end=None).due(now=1e12) is False


def test_slurm_end_time_from_the_environment():
    assert deadline.slurm_end_time({"SLURM_JOB_END_TIME": "1764590000"}) == 1764590000.0
    assert deadline.slurm_end_time({}) is None


def _tok():
    return load_tokenizer(None, str(CORPUS))


TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


def test_every_changed_setting_is_one_line_and_dropout_may_change(tmp_path):
    """The settings a checkpoint records against a config with many changes at once: one line
    per change, naming the key, the checkpoint's value and this config's."""
    tok = _tok()
    base = ["data.format=messages", f"data.chat_template={TEMPLATE}"]
    saved = {"format": 2, "settings": resume_check.settings(make_cfg(tmp_path, *base), None, tok)}
    changed = make_cfg(
        tmp_path,
        "data.format=messages",
        "data.chat_template=x{{ messages }}",
        "lora.use_rslora=true",
        "lora.use_dora=true",
        "lora.loraplus_lr_ratio=16",
        "model.dtype=bf16",
        "data.seq_len=32",
        "lora.dropout=0.1",
        "training.seed=7",
    )
    lines = resume_check.mismatches(saved, resume_check.settings(changed, None, tok), tmp_path)
    keys = [line.split(" was trained with ")[1].split(" = ")[0] for line in lines]
    assert keys == [
        "lora.use_rslora",
        "lora.use_dora",
        "lora.loraplus_lr_ratio",
        "model.dtype",
        "data.chat_template_hash",
        "data.seq_len",
        "training.seed",
    ]
    assert lines[0] == (
        f"training.resume=auto: the checkpoint in {tmp_path} was trained with lora.use_rslora = "
        "false, this config has lora.use_rslora = true; resume with the same LoRA settings or "
        "start a new output.dir"
    )
    assert "lora.loraplus_lr_ratio = null, this config has lora.loraplus_lr_ratio = 16.0" in lines[2]
    with pytest.raises(ConfigError) as e:
        resume_check.check(saved, changed, None, None, tmp_path, tok)
    assert str(e.value).splitlines() == lines
    same = make_cfg(tmp_path, *base, "lora.dropout=0.1", "backend.name=fsdp", "training.lr=1e-3")
    resume_check.check(saved, same, None, None, tmp_path, tok)  # dropout, backend, lr: allowed
    old = {"format": 2, "settings": {"lora.r": 8}}  # an older checkpoint records fewer keys: those only
    resume_check.check(old, changed, None, None, tmp_path, tok)


def test_base_hash_follows_config_and_weight_index(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    first = resume_check.fingerprint.base(str(d))
    save_file({"w": torch.ones(2, 2)}, str(d / "model.safetensors"))  # same header: values are not read
    assert resume_check.fingerprint.base(str(d)) == first
    save_file({"w": torch.zeros(2, 3)}, str(d / "model.safetensors"))
    assert resume_check.fingerprint.base(str(d)) != first and len(first) == 12
    assert resume_check.fingerprint.base(None) is None


def test_nonfinite_counts_and_stops_after_n_in_a_row(tmp_path):
    nf = stopping.NonFinite(make_cfg(tmp_path, "training.nonfinite_max=2"))
    rows = [{"step": s, "loss": x, "grad_norm": x} for s, x in enumerate([1.0, float("nan"), 1.0, float("inf")], 1)]
    assert [nf.seen(r, w) for r, w in zip(rows[:3], ["", "loss and grad_norm", ""])] == [None, None, None]
    assert rows[1]["skipped"] and rows[1]["nonfinite_steps"] == 1 and "skipped" not in rows[2]
    assert nf.seen(rows[3], "loss") is None
    stop = nf.seen({"step": 5, "loss": float("nan"), "grad_norm": 0.5}, "loss")
    assert stop == (
        "step 5: non-finite loss (loss nan, grad norm 0.5) on every rank: step skipped, no update "
        "(2 in a row, 3 in all); stopping after 2 in a row (training.nonfinite_max=2)"
    )
    strict = stopping.NonFinite(make_cfg(tmp_path, "training.nonfinite=stop"))
    assert strict.seen({"step": 1, "loss": float("nan"), "grad_norm": 1.0}, "loss").endswith(
        "(training.nonfinite=stop)"
    )


def test_skipped_step_updates_nothing(tmp_path):
    backend = make_backend(make_cfg(tmp_path))
    train_step(backend, 0)
    before, sched = lora_state(backend), backend.scheduler.state_dict()
    for p in backend.trainable_parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert math.isnan(backend.step())  # reported, and nothing stepped
    assert all(torch.equal(lora_state(backend)[n], t) for n, t in before.items())
    assert backend.scheduler.state_dict() == sched


def test_generation_stops_at_the_next_batch():
    from dtrain.inference.generate import Generator

    g = Generator.__new__(Generator)  # no model needed: stop is asked before the first batch
    with pytest.raises(preempt.Preempted):
        g.generate(["a", "b"], stop=lambda: True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    """A real tmpfs with room for one checkpoint and a half: the second save fails in one line
    naming the directory, what it needs and what is free; the first stays complete and loads;
    keep_last=1 did not remove it; no partial directory is left."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = make_cfg(out, "training.keep_last=1", "training.resume=auto", "lora.r=32", "lora.targets=all-linear")
    backend = make_backend(cfg)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(out)], check=True)
    try:
        train_step(backend, 0)
        first = checkpoint.save_training(backend, cfg, out, 1, PLAN)
        size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
        used = shutil.disk_usage(out).used
        subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(out)], check=True)
        want = lora_state(backend)
        train_step(backend, 1)
        with pytest.raises(DiskFull) as e:
            checkpoint.save_training(backend, cfg, out, 2, PLAN)
        need = sum(t.numel() * t.element_size() for t in want.values()) * 3  # adapter + AdamW's two moments
        free = shutil.disk_usage(out).free
        assert str(e.value) == (
            f"checkpoint of step 2 not written: no space left on device in {out / 'checkpoints'} "
            f"(it needs about {need / 2**20:.2f} MiB, {free / 2**20:.2f} MiB free); the previous "
            f"checkpoint {first} is intact (training.resume=auto continues from it)"
        )
        assert e.value.exit_code == 1 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
        assert checkpoint.verify(first) is None
        assert checkpoint.maybe_resume(backend, cfg, out, PLAN) == 1
        assert all(torch.equal(lora_state(backend)[n], t) for n, t in want.items())
    finally:
        if subprocess.run(["umount", str(out)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(out)], check=False)  # busy for a moment: detach it
