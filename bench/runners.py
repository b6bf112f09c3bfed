"""One launch per variant: dtrain under torchrun, the PEFT + accelerate baseline, the latency script;
each read back into an `Outcome`. Also the synthetic data and the parameter count they share."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from bench.presets import LORA, DataFiles, Launch, Preset, Variant

# the LoRA settings every worker takes (the same adapter for dtrain, PEFT and TRL)
LORA_FLAGS = ["--lora-r", str(LORA.r), "--lora-alpha", str(LORA.alpha), "--lora-targets", ",".join(LORA.targets)]


@dataclass
class Outcome:
    variant: Variant
    status: str = "not run"  # ok | failed | skipped
    reason: str = ""
    median_step_s: float = math.nan
    tokens_per_step: int = 0
    world: int = 0
    peak_bytes: float = math.nan  # the largest rank's peak
    peak_kind: str = ""
    model_states_bytes: float = math.nan  # dtrain: frozen + trainable + grads + optimizer (largest rank)
    trainable: int | None = None
    total: int | None = None
    loss_first: float = math.nan
    loss_last: float = math.nan
    wall_s: float = 0.0
    step_times: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens_per_step / self.median_step_s if self.ok else math.nan

    @property
    def tok_s_rank(self) -> float:
        return self.tok_s / self.world if self.ok and self.world else math.nan

    @property
    def ok(self) -> bool:
        if self.variant.kind == "latency":
            return self.status == "ok"
        return self.status == "ok" and self.median_step_s > 0


def count_params(arch: Mapping) -> dict:
    """Total parameters and P (weights of linear layers, the head included) of the arch, on meta."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    a = dict(arch)
    config = AutoConfig.for_model(a.pop("model_type"), **a)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"total": total, "linear": linear}


def make_data(work: Path, vocab: int, seq_len: int, n: int, seed: int = 1234) -> DataFiles:
    """Random token ids, written for dtrain (words + a word-level tokenizer) and for the baseline (.pt).

    Word `w<i>` is token id i; ids 0-2 are <pad>, <s>, </s>, 3 is <unk>. Each paragraph of the text
    file holds seq_len - 1 words; dtrain's `format: text` appends EOS to each record and packs, so
    its sequence k is exactly row k of the id tensor (paragraph k + EOS).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab_map = {tok: i for i, tok in enumerate(specials)}
    vocab_map.update({f"w{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok_dir = work / "tokenizer"
    fast.save_pretrained(tok_dir)
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(len(specials), vocab, (n, seq_len - 1), generator=g)
    text = "\n\n".join(" ".join(f"w{i}" for i in row.tolist()) for row in words) + "\n"
    (work / "data.txt").write_text(text)
    ids = torch.cat([words, torch.full((n, 1), 2, dtype=words.dtype)], dim=1)
    torch.save(ids, work / "ids.pt")
    return DataFiles(tokenizer=tok_dir, text=work / "data.txt", ids=work / "ids.pt")


def variant_dir(v: Variant, launch: Launch) -> Path:
    vdir = launch.work / v.name
    vdir.mkdir(parents=True, exist_ok=True)
    return vdir


# ---- dtrain --------------------------------------------------------------------------------------
def dtrain_config(v: Variant, p: Preset, data: DataFiles, out: Path, dtype: str) -> dict:
    total = p.warmup + p.steps
    return {
        "model": {"arch": dict(p.arch), "dtype": dtype},
        "lora": {"r": LORA.r, "alpha": LORA.alpha, "dropout": 0.0, "targets": list(LORA.targets)},
        "data": {
            "path": str(data.text),
            "tokenizer": str(data.tokenizer),
            "format": "text",
            "seq_len": p.seq_len,
            "eval_fraction": 0.0,
        },
        "training": {
            "lr": LORA.lr,
            "warmup_steps": 1,
            "max_steps": total,
            "micro_batch_size": p.micro_batch,
            "grad_accum": 1,
            "max_grad_norm": 1.0,
            "eval_every": 0,
            "log_every": 1,
            # the memory snapshot (peak RSS / CUDA of every rank) in the last step's row
            "memory_every": total,
            "save_every": 0,
        },
        "backend": {"name": v.backend},
        "quantization": {"bits": v.bits},
        "mode": v.mode,
        "output": {"dir": str(out)},
    }


def read_dtrain_metrics(o: Outcome, rows: list[dict], log: Path, warmup: int, cuda: bool) -> None:
    """Fill `o` from dtrain's metrics rows and its log (timed steps are those after `warmup`)."""
    timed = [r["step_time_s"] for r in rows if r.get("step", 0) > warmup and "step_time_s" in r]
    o.step_times = timed
    o.median_step_s = common.median(timed) if timed else math.nan
    o.loss_first, o.loss_last = rows[0].get("loss", math.nan), rows[-1].get("loss", math.nan)
    mem = next((r["memory"] for r in reversed(rows) if "memory" in r), None)
    if mem:
        ranks = mem.get("ranks", [])
        key = "cuda_max_allocated" if cuda else "rss_peak_bytes"
        vals = [r[key] for r in ranks if r.get(key) is not None]
        o.peak_bytes, o.peak_kind = (max(vals) if vals else math.nan), key
        ms = [r["model_states"] for r in ranks if r.get("model_states") is not None]
        o.model_states_bytes = max(ms) if ms else math.nan
        o.extra["rss_peak_per_rank"] = [r.get("rss_peak_bytes") for r in ranks]
    m = re.search(r"trainable params: ([\d,]+) / ([\d,]+)", common.read_log(log))
    if m:
        o.trainable, o.total = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
    o.status = "ok" if timed else "failed"
    if not timed:
        o.reason = f"no timed steps (ran {len(rows)} steps, warm-up {warmup})"


def run_dtrain(v: Variant, p: Preset, launch: Launch) -> Outcome:
    import yaml

    o = Outcome(v, world=launch.nproc, tokens_per_step=p.micro_batch * p.seq_len * launch.nproc)
    vdir = variant_dir(v, launch)
    log = vdir / "log.txt"
    cfg_path = vdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dtrain_config(v, p, launch.data, vdir / "run", launch.dtype), sort_keys=False))
    cmd = common.torchrun(launch.nproc) + ["-m", "dtrain", "train", str(cfg_path), *launch.overrides]
    rc, o.wall_s = common.run_logged(cmd, log, common.child_env(launch.cuda), launch.timeout_s)
    rows = common.read_jsonl(vdir / "run" / "metrics.jsonl")
    if rc != 0 and rows and common.finished(log):
        # every step ran and the run logged its end; the exit code came at process teardown
        o.extra["exit_note"] = (
            f"all steps ran and dtrain logged 'done', but the launcher exited {rc} at "
            f"teardown: {common.error_line(log)}"
        )
    elif rc != 0 or not rows:
        o.status, o.reason = "failed", (f"exit {rc}: " if rc else "no metrics: ") + common.error_line(log)
        return o
    read_dtrain_metrics(o, rows, log, p.warmup, launch.cuda)
    return o


# ---- the PEFT + accelerate baseline --------------------------------------------------------------
def read_peft_result(o: Outcome, r: dict) -> None:
    o.step_times = r["step_times"]
    o.median_step_s = r["median_step_time_s"]
    o.tokens_per_step = r["tokens_per_step"]
    o.world = r["world_size"]
    o.peak_bytes = max(r["peak_bytes_per_rank"])
    o.peak_kind = "cuda_max_allocated" if r["memory_kind"] == "cuda_max_allocated" else "rss_peak_bytes"
    o.trainable, o.total = r["trainable_params"], r["total_params"]
    o.loss_first, o.loss_last = r["losses"][0], r["losses"][-1]
    o.extra.update(
        distributed_type=r["distributed_type"],
        accelerate_chose=r.get("accelerate_chose"),
        forced_fsdp=r.get("forced_fsdp"),
        rss_before_model=max(r["rss_before_model_per_rank"]),
        rss_peak_per_rank=r["peak_rss_bytes_per_rank"],
    )
    o.status = "ok"


def run_peft(v: Variant, p: Preset, launch: Launch, model: list[str] | None = None) -> Outcome:
    """`model`: the worker's model arguments (default `--arch` the run's arch file)."""
    o = Outcome(v, world=launch.nproc, tokens_per_step=p.micro_batch * p.seq_len * launch.nproc)
    vdir = variant_dir(v, launch)
    log, result = vdir / "log.txt", vdir / "result.json"
    model = model or ["--arch", str(launch.arch_file)]
    cmd = common.torchrun(launch.nproc) + [
        str(common.BENCH / "peft_baseline.py"),
        "--plugin",
        v.backend,
        "--mode",
        v.mode,
        *model,
        "--data",
        str(launch.data.ids),
        "--micro-batch",
        str(p.micro_batch),
        "--steps",
        str(p.steps),
        "--warmup",
        str(p.warmup),
        "--dtype",
        launch.dtype,
        *LORA_FLAGS,
        "--lr",
        str(LORA.lr),
        "--out",
        str(result),
    ]
    if v.backend == "fsdp" and not launch.cuda:
        cmd.append("--force-fsdp-on-cpu")
    rc, o.wall_s = common.run_logged(cmd, log, common.child_env(launch.cuda), launch.timeout_s)
    if not result.is_file():
        o.status, o.reason = "failed", (f"exit {rc}: " if rc else "no result: ") + common.error_line(log)
        return o
    if rc != 0:  # the result is written after the last step: the exit code came at teardown
        o.extra["exit_note"] = (
            f"all steps ran and the baseline wrote its result, but the launcher exited "
            f"{rc} at teardown: {common.error_line(log)}"
        )
    read_peft_result(o, json.loads(result.read_text()))
    return o


# ---- latency -------------------------------------------------------------------------------------
def run_latency(v: Variant, p: Preset, launch: Launch) -> Outcome:
    o = Outcome(v)
    vdir = variant_dir(v, launch)
    log, result = vdir / "log.txt", vdir / "result.json"
    lat = p.latency
    cmd = [
        common.PY,
        str(common.BENCH / "latency.py"),
        "--arch",
        str(launch.arch_file),
        "--batch",
        str(lat.batch),
        "--seq",
        str(lat.seq),
        "--iters",
        str(lat.iters),
        "--warmup",
        str(lat.warmup),
        "--dtype",
        launch.dtype,
        *LORA_FLAGS,
        "--out",
        str(result),
    ]
    rc, o.wall_s = common.run_logged(cmd, log, common.child_env(launch.cuda), launch.timeout_s)
    if rc != 0 or not result.is_file():
        o.status, o.reason = "failed", f"exit {rc}: " + common.error_line(log)
        return o
    o.extra = json.loads(result.read_text())
    o.status = "ok"
    return o


RUNNERS = {"dtrain": run_dtrain, "peft": run_peft, "latency": run_latency}


def run_variant(v: Variant, p: Preset, launch: Launch) -> Outcome:
    return RUNNERS[v.kind](v, p, launch)


def unavailable(v: Variant) -> str | None:
    """Why a variant cannot run in this environment (a missing package), or None."""
    need = []
    if v.backend == "deepspeed":
        need.append("deepspeed")
    if v.kind == "peft":
        need += ["peft", "accelerate"]
    if v.bits == 8:
        need.append("bitsandbytes")  # dtrain.model.quant computes the int8 storage with it
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None
