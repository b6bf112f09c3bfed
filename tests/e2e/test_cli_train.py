"""`dtrain train` as the user runs it: the demo's loss falls, its files, a model from a local directory,
and every config error as one `dtrain: error:` line with exit code 2.

Cost: a fresh `python -m dtrain` pays ~3 s of torch/transformers/datasets imports (before `cli.py` even
loads the config) and ~3 s more of first-use warm-up. The demo and one error case run as fresh
`python -m dtrain` processes. Every other run goes through one warm process that imports those
modules once, then forks one child per run, which executes `python -m dtrain <argv>` (runpy of
`dtrain.__main__` with that argv) with its own stdout, stderr and exit status. The fresh processes
and the warm one start together when the module's first test asks for a result.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dtrain import data, lora
from dtrain.config import schema as config
from dtrain.model.tokenizer import build_tokenizer
from dtrain.training import loss as loss_lib
from tests.helpers import FAST, PY, REPO, TINY, env_for_tests, launch_cmd, metrics

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"
FRESH = ["demo", "unknown_key"]  # fresh `python -m dtrain` processes; the other runs are forked warm
KINDS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
TINY_ARCH = yaml.safe_load(TINY.read_text())["model"]["arch"]
START = re.compile(r"trainable params: ([\d,]+) / ([\d,]+) \(([\d.]+)%\)")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_cmd(1, "python") + args,
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )


FORK_RUNNER = r"""
import json, os, runpy, sys, traceback
import datasets, dtrain.cli.app, dtrain.config.schema, dtrain.data, dtrain.training.trainer  # what `dtrain train` imports
cases, outdir = json.load(open(sys.argv[1])), sys.argv[2]
results = {}
for name, argv in cases.items():
    paths = [os.path.join(outdir, f"{name}.{s}") for s in ("out", "err")]
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in zip((1, 2), paths):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["dtrain", *argv]
            runpy.run_module("dtrain", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out, err = (open(p).read() for p in paths)
    results[name] = {"rc": os.waitstatus_to_exitcode(status), "stdout": out, "stderr": err}
print(json.dumps(results))
"""


def _run_forked(cases: dict[str, list[str]], tmp: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run `python -m dtrain <argv>` for each case in a child forked from one warm process."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "forked").mkdir()
    proc = subprocess.run(
        [PY, "-c", FORK_RUNNER, str(tmp / "cases.json"), str(tmp / "forked")],
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        name: subprocess.CompletedProcess(["dtrain", *cases[name]], r["rc"], r["stdout"], r["stderr"])
        for name, r in json.loads(proc.stdout.splitlines()[-1]).items()
    }


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr
    return proc


def plain_llama(arch: dict, seed: int = 0) -> LlamaForCausalLM:
    arch = {k: v for k, v in arch.items() if k != "model_type"}
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**arch)).eval()


def lora_count(model: torch.nn.Module, kinds: list[str], r: int) -> int:
    """r (in + out) for every targeted linear layer, from the plain model's shapes."""
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in kinds and n != "lm_head"
    )


def start_line(stderr: str) -> tuple[int, int, float]:
    m = START.search(stderr)
    assert m, stderr[-3000:]
    return int(m[1].replace(",", "")), int(m[2].replace(",", "")), float(m[3])


# ---- the runs: every subprocess of this module, started together -------------------------------


def _error_cases(tmp: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (dtrain args, file the error must name, expected text after 'dtrain: error: ')."""
    bad_records = tmp / "bad.jsonl"
    bad_records.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prompt": "a", "response": " b"},
                {"prompt": "c", "response": ""},
                {"prompt": "d", "response": " e"},
            ]
        )
    )

    def ov(args: list[str], expected: str) -> tuple[list[str], str, str]:
        """A case whose error comes from the override args[-1]: the line names that override."""
        where = f"override '{args[-1]}'"
        return args, where, f"{where}: {expected}"

    return {
        "unknown_key": ov(["lora.rnak=4"], "unknown key 'lora.rnak'; did you mean 'lora.r'? (allowed: "),
        "unknown_section": ov(["trainig.lr=1"], "unknown key 'trainig'; did you mean 'training'?"),
        "wrong_type": ov(["training.lr=fast"], "training.lr = 'fast': expected a float"),
        "wrong_type_bool": ov(
            ["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing = 'maybe': expected a bool"
        ),
        "r_zero": ov(["lora.r=0"], "lora.r = 0 is out of range: must be >= 1"),
        "alpha_zero": ov(["lora.alpha=0"], "lora.alpha = 0.0 is out of range: must be > 0"),
        "dropout_one": ov(["lora.dropout=1.0"], "lora.dropout = 1.0 is out of range: must be in [0.0, 1.0)"),
        "dropout_neg": ov(["lora.dropout=-0.1"], "lora.dropout = -0.1 is out of range: must be >= 0.0 and < 1.0"),
        "lr_zero": ov(["training.lr=0"], "training.lr = 0.0 is out of range: must be > 0"),
        "missing_config": ([], str(tmp / "none.yaml"), f"{tmp / 'none.yaml'}: config file not found"),
        "missing_data": ov([f"data.path={tmp / 'none.txt'}"], f"data.path = '{tmp / 'none.txt'}': file not found"),
        "missing_model_dir": ov(
            ["model.arch=null", f"model.path={tmp / 'nodir'}"], f"model.path = '{tmp / 'nodir'}': directory not found"
        ),
        "bad_record": (
            [f"data.path={bad_records}", "data.format=instruction", "data.bad_records=error"],
            str(bad_records),
            f"data.path = '{bad_records}': record 1 has a missing or empty 'response'",
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cli")
    hf = plain_llama(TINY_ARCH, seed=0)
    hf.save_pretrained(tmp / "hf_single", safe_serialization=True)
    hf.save_pretrained(tmp / "hf_sharded", safe_serialization=True, max_shard_size="100KB")
    assert len(list((tmp / "hf_sharded").glob("model-*.safetensors"))) > 2
    assert not list(tmp.glob("hf_*/tokenizer*"))  # no tokenizer: the built-in one must fit vocab 512

    jobs: dict[str, tuple[list[str], Path | None]] = {
        "demo": (["train", str(TINY), f"output.dir={tmp / 'demo'}"], tmp / "demo"),
    }
    cases = _error_cases(tmp)
    for name, (args, file, _) in cases.items():
        cfg_file = file if name == "missing_config" else str(TINY)
        jobs[name] = (["train", cfg_file, *args, f"output.dir={tmp / name}"], None)
    for layout in ("single", "sharded"):  # = tests.helpers.train(out, overrides)
        out = tmp / f"run_{layout}"
        overrides = [f"model.path={tmp / f'hf_{layout}'}", "model.arch=null", "training.max_steps=2"]
        jobs[layout] = (["train", str(TINY), *FAST, *overrides, f"output.dir={out}"], out)
    pool = ThreadPoolExecutor(max_workers=3)
    futures: dict[str, Future] = {name: pool.submit(_run, jobs[name][0]) for name in FRESH}
    futures["forked"] = pool.submit(_run_forked, {n: a for n, (a, _) in jobs.items() if n not in FRESH}, tmp)
    yield {"tmp": tmp, "hf": hf, "futures": futures, "jobs": jobs, "cases": cases}
    pool.shutdown(wait=True, cancel_futures=True)


def result(runs: dict, name: str) -> tuple[subprocess.CompletedProcess, Path | None]:
    futures = runs["futures"]
    proc = futures[name].result() if name in futures else futures["forked"].result()[name]
    return proc, runs["jobs"][name][1]


# ---- config errors through the real CLI ---------------------------------------------------------

ERROR_CASES = [
    "unknown_key",
    "unknown_section",
    "wrong_type",
    "wrong_type_bool",
    "r_zero",
    "alpha_zero",
    "dropout_one",
    "dropout_neg",
    "lr_zero",
    "missing_config",
    "missing_data",
    "missing_model_dir",
    "bad_record",
]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_cli_config_error_is_one_line(runs, name: str) -> None:
    proc, _ = result(runs, name)
    _, file, expected = runs["cases"][name]
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    line = lines[0]
    assert line.startswith("dtrain: error: "), line
    assert line.removeprefix("dtrain: error: ").startswith(expected), line
    assert file in line
    key = re.search(r"(lora|training|model|data)\.\w+|unknown key|config file", expected)
    assert key and key[0] in line
    if name != "bad_record":  # config errors: nothing written (data errors come after the output dir)
        assert not (runs["tmp"] / name).exists()


def test_error_cases_all_listed(runs) -> None:
    assert sorted(ERROR_CASES) == sorted(runs["cases"])


# ---- the demo ----------------------------------------------------------------------------------


def test_demo_loss_falls(runs) -> None:
    proc, out = result(runs, "demo")
    _ok(proc)
    everything = metrics(out)
    rows = [r for r in everything if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 61))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    # a random init predicts about uniformly: the first loss is near ln(vocab)
    assert abs(losses[0] - math.log(TINY_ARCH["vocab_size"])) < 0.1, losses[0]
    last5 = sum(losses[-5:]) / 5
    assert last5 < losses[0] - 0.4, (losses[0], last5)
    evals = [(r["step"], r["eval_loss"]) for r in everything if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 20, 40, 60]  # before training, every eval_every, the last step
    ev = [v for _, v in evals]
    assert abs(ev[0] - math.log(TINY_ARCH["vocab_size"])) < 0.1, ev[0]
    assert ev[0] > ev[1] > ev[2] > ev[3] and ev[3] < ev[1] - 0.1, ev
    assert rows[0]["lr"] == pytest.approx(1e-2 / 5)  # warmup 5 steps to lr 1e-2
    assert all(r["grad_norm"] > 0 for r in rows)


def test_demo_files(runs, monkeypatch) -> None:
    proc, out = result(runs, "demo")
    _ok(proc)
    assert {"adapter", "config.yaml", "metrics.jsonl", "tokenizer"} <= {p.name for p in out.iterdir()}
    # config.yaml: the resolved config, loading back to the same Config
    monkeypatch.chdir(REPO)  # tiny.yaml's data.path is relative to the working directory
    assert config.load(out / "config.yaml") == config.load(TINY, [f"output.dir={out}"])
    # adapter: PEFT keys for every linear of both layers, A and B, trained
    adapter_dir = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    plain = plain_llama(TINY_ARCH)
    linears = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    expect = {f"base_model.model.{n}.lora_{k}.weight" for n in linears for k in "AB"}
    assert set(tensors) == expect and len(expect) == 28
    spec = lora.AdapterSpec(r=8, alpha=16.0, init_seed=0)
    for name, m in linears.items():
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (8, m.in_features) and b.shape == (m.out_features, 8)
        assert a.dtype == b.dtype == torch.float32
        assert torch.count_nonzero(b) > 0  # B started at zero
        assert not torch.equal(a, lora.init_lora_A(name, spec, m.in_features))  # A moved from its init
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    assert cfg["target_modules"] == KINDS
    # tokenizer: the built-in one, saved; loads back and encodes as built
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    built = build_tokenizer(CORPUS)
    assert len(tok) == len(built) <= TINY_ARCH["vocab_size"]
    text = "Every morning the hare counts to eleven."
    assert tok(text)["input_ids"] == built(text, add_special_tokens=False)["input_ids"]


def test_demo_prints_parameter_counts(runs) -> None:
    proc, _ = result(runs, "demo")
    trainable, total, pct = start_line(_ok(proc).stderr)
    plain = plain_llama(TINY_ARCH)
    expect_lora = lora_count(plain, KINDS, r=8)
    assert expect_lora == 2 * 8 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64)
    assert trainable == expect_lora
    assert total == sum(p.numel() for p in plain.parameters()) + expect_lora
    assert pct == pytest.approx(100 * trainable / total, abs=1e-4)
    assert "0 record(s) skipped; 60 steps on 1 rank(s)" in proc.stderr


# ---- a model from a local directory ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_train_from_local_dir(runs, layout: str) -> None:
    proc, out = result(runs, layout)
    _ok(proc)
    hf = runs["hf"]
    trainable, total, _ = start_line(proc.stderr)
    assert trainable == lora_count(hf, ["q_proj", "v_proj"], r=8) == 2 * 8 * (128 + 96)
    assert total == sum(p.numel() for p in hf.parameters()) + trainable
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        runs["tmp"] / f"hf_{layout}"
    )
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)) <= 512
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_local_dir_weights_are_the_saved_ones(runs) -> None:
    """Step 1's loss (before any update, B = 0) equals the saved HF model's loss on the same batch."""
    (single, out1), (sharded, out2) = result(runs, "single"), result(runs, "sharded")
    _ok(single), _ok(sharded)
    m1, m2 = metrics(out1), metrics(out2)
    assert [r["loss"] for r in m1] == [r["loss"] for r in m2]  # one file or shards: the same weights
    cfg = config.load(
        TINY,
        [
            *FAST,
            f"data.path={CORPUS}",
            f"model.path={runs['tmp'] / 'hf_single'}",
            "model.arch=null",
            "training.max_steps=2",
        ],
    )
    tok = build_tokenizer(cfg.data.path)
    ex = data.tokenize(cfg.data, data.load_records(cfg.data), tok)
    train_ex, _ = ex.split(cfg.data.eval_fraction, cfg.training.seed)
    t = cfg.training
    plan = data.BatchPlan(len(train_ex), t.micro_batch_size, t.grad_accum, 1, t.seed)
    batch = train_ex.take(plan.indices(0, 0, 0))
    with torch.no_grad():
        logits = runs["hf"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = loss_lib.token_loss(logits, batch["labels"])
    assert m1[0]["loss"] == pytest.approx(float(total) / n, rel=1e-5, abs=1e-6)
    assert m1[1]["loss"] != m1[0]["loss"]
