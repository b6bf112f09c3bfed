"""The real SmolLM2-135M-Instruct named by its Hub ID, resolved offline from a Hugging Face cache
built by hand in huggingface_hub's layout (tests/hub_cache.py): train, merge, generate and eval
give what the local directory gives; the run records the commit, and resume refuses another."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import REPO, losses, run_dtrain
from tests.hub_cache import add_snapshot

pytestmark = pytest.mark.slow
ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAIN, V2 = "1" * 40, "2" * 40
CONFIG = REPO / "configs" / "smollm2_dates.yaml"
EVAL = REPO / "dtrain" / "assets" / "dates_eval.jsonl"


@pytest.fixture(scope="module")
def hf_home(smollm2_dir, tmp_path_factory):
    """Two revisions of the model: MAIN (refs/main) and V2 (refs/v2), the same files."""
    home = tmp_path_factory.mktemp("hf")
    add_snapshot(home / "hub", ID, smollm2_dir, MAIN, refs=("main",))
    add_snapshot(home / "hub", ID, smollm2_dir, V2, refs=("v2",))
    return home


def _train(out, model, env, extra=(), check=True):
    args = [
        "train",
        str(CONFIG),
        f"model.path={model}",
        "training.max_steps=2",
        "training.warmup_steps=1",
        "training.eval_every=0",
        "data.seq_len=64",
        "lora.targets=[q_proj,v_proj]",
        "backend.name=none",
        "training.micro_batch_size=2",
        *extra,
        f"output.dir={out}",
    ]
    return run_dtrain(args, env=env, check=check, timeout=600)


@pytest.fixture(scope="module")
def runs(smollm2_dir, hf_home, tmp_path_factory):
    """2 steps from the local directory and from the Hub ID at revision v2."""
    tmp, env = tmp_path_factory.mktemp("runs"), {"HF_HOME": str(hf_home)}
    _train(tmp / "local", smollm2_dir, env)
    _train(tmp / "hub", f"{ID}@v2", env)
    return tmp, env


@pytest.mark.ondemand  # ~57 s of real-model runs; tests/unit/test_hub.py resolves and records IDs by default
def test_train_by_hub_id_records_the_commit_and_resume_refuses_another(runs):
    tmp_path, env = runs
    assert losses(tmp_path / "hub") == losses(tmp_path / "local") and len(losses(tmp_path / "local")) == 2
    saved = yaml.safe_load((tmp_path / "hub" / "config.yaml").read_text())
    assert saved["model"]["path"] == f"{ID}@{V2}"
    peft = json.loads((tmp_path / "hub" / "adapter" / "adapter_config.json").read_text())
    assert (peft["base_model_name_or_path"], peft["revision"]) == (ID, V2)
    state = json.loads(next((tmp_path / "hub").glob("checkpoints/*/trainer_state.json")).read_text())
    assert state["settings"]["model.path"] == f"{ID}@{V2}"
    refused = _train(tmp_path / "hub", ID, env, ["training.resume=auto", "training.max_steps=3"], check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1:] == [
        f"dtrain: error: training.resume=auto: the checkpoint in {tmp_path / 'hub' / 'checkpoints' / 'step-00000002'} "
        "was trained with "
        f"model.path = '{ID}@{V2}', this config has model.path = '{ID}@{MAIN}'; resume with the same model or "
        "start a new output.dir"
    ], refused.stderr[-2000:]


@pytest.mark.ondemand  # five more loads of the real model (about 2 minutes idle); run for this issue: passed
def test_merge_generate_eval_by_hub_id(smollm2_dir, runs, tmp_path):
    _, env = runs
    ad = str(runs[0] / "hub" / "adapter")
    for base, out in ((str(smollm2_dir), "m_local"), (ID, "m_hub")):
        run_dtrain(["merge", "--base", base, "--adapter", ad, "--out", str(tmp_path / out)], env=env)
    a, b = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("m_local", "m_hub"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    prompt = json.loads(EVAL.read_text().splitlines()[0])["messages"][0]["content"]
    said = [
        run_dtrain(
            ["generate", "--model", m, "--adapter", ad, "--prompt", prompt, "--max-new-tokens", "12"], env=env
        ).stdout
        for m in (str(smollm2_dir), f"{ID}@{MAIN}")
    ]
    assert said[0] == said[1] and said[0].strip()
    run_dtrain(
        [
            "eval",
            "--model",
            f"{ID}@{V2}",
            "--adapter",
            ad,
            "--data",
            str(EVAL),
            "--limit",
            "1",
            "--out",
            str(tmp_path / "eval.jsonl"),
        ],
        env=env,
    )
    got = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])["got"]
    assert got.strip() in said[0], (got, said[0])
