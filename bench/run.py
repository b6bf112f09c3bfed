"""dtrain benchmark: LoRA vs full fine-tuning vs PEFT + accelerate, and merged-model latency.

    python bench/run.py [--preset cpu|gpu] [--steps N] [--warmup N] [--only a,b,...] [--quick]

One run, one process tree, on whatever device is there (CUDA when available, else CPU with gloo):

  dtrain-fsdp, dtrain-fsdp-full, dtrain-fsdp-8bit     dtrain, FSDP2 backend: LoRA, mode=full,
                                                      LoRA over an 8-bit base (quantization.bits=8)
  dtrain-ds,   dtrain-ds-full,   dtrain-ds-8bit       the same with DeepSpeed ZeRO-3
  peft-fsdp, peft-ds                                  HF PEFT LoRA trained through accelerate's
                                                      FSDP2 plugin / DeepSpeed ZeRO-3 plugin
  latency                                             bench/latency.py: base vs merged vs unmerged

(`peft-fsdp-full` and `peft-ds-full` also exist, but only run when named in --only.)

Every training variant uses the same model (a Llama-shaped model with random weights, built from
one inline config), the same synthetic data (random token ids: run.py writes them once as a text
file of words plus a word-level tokenizer for dtrain, and as the identical id tensor for the
baseline), the same micro batch, sequence length, number of ranks and steps. dtrain runs are
`torchrun --nproc_per_node N -m dtrain train <generated yaml>`; the baseline is
`torchrun --nproc_per_node N bench/peft_baseline.py ...`. Each variant is a separate launch, one
after the other, never in parallel.

What is counted (see bench/README.md): step time is the median over the timed steps (after
`--warmup` untimed ones) of one optimizer step (batch, forward, backward, clip, optimizer and
scheduler step, the loss all-reduce): dtrain's metrics.jsonl `step_time_s`, and the same span in
the baseline. tokens/s = global tokens per step / median step time (per rank: / ranks). Peak
memory per rank = the largest rank's peak: CUDA `max_memory_allocated`, CPU peak RSS (VmHWM).
MFU (CUDA only) = FLOPs per token x tokens/s / (peak FLOPS x GPUs) with 6P FLOPs per token for
full fine-tuning and 4P for LoRA (the frozen weights get no weight gradient), P = the weights of
every linear layer (the output head included, the embedding lookup not; attention-score FLOPs and
the LoRA matmuls not counted).

Results are printed and appended to bench/RESULTS.md (`--quick` runs only with `--record`).
A benchmark: its timings are never asserted by the test suite (tests/bench runs `--quick` only to
check that every part still runs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "RESULTS.md"
PY = sys.executable

# ---- presets -------------------------------------------------------------------------------------
LLAMA_58M = {  # the NOTES peer baseline's shape: 58.1M parameters
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
    "max_position_embeddings": 1024, "tie_word_embeddings": False,
}
LLAMA_1B = {  # TinyLlama-1.1B's shape: 1.10B parameters
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
LLAMA_TINY = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}


@dataclass
class Preset:
    name: str
    arch: dict
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    n_sequences: int          # distinct sequences in the synthetic data set (cycled)
    lat_batch: int
    lat_seq: int
    lat_iters: int
    lat_warmup: int
    timeout_s: int            # per variant


PRESETS = {
    "cpu": Preset("cpu", LLAMA_58M, seq_len=256, micro_batch=4, steps=12, warmup=3, n_sequences=96,
                  lat_batch=1, lat_seq=256, lat_iters=30, lat_warmup=3, timeout_s=3600),
    "gpu": Preset("gpu", LLAMA_1B, seq_len=1024, micro_batch=8, steps=20, warmup=5, n_sequences=256,
                  lat_batch=1, lat_seq=1024, lat_iters=50, lat_warmup=5, timeout_s=3600),
    "quick": Preset("quick", LLAMA_TINY, seq_len=64, micro_batch=2, steps=3, warmup=1, n_sequences=32,
                    lat_batch=1, lat_seq=32, lat_iters=5, lat_warmup=1, timeout_s=900),
}
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, ["q_proj", "v_proj"]
LR = 3e-4
# Dense bf16 peak of known GPUs, FLOP/s (no sparsity).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str                 # dtrain | peft | latency
    backend: str | None = None  # fsdp | deepspeed
    mode: str = "lora"        # lora | full
    bits: int = 16
    default: bool = True


VARIANTS = [
    Variant("dtrain-fsdp", "dtrain", "fsdp"),
    Variant("dtrain-fsdp-full", "dtrain", "fsdp", mode="full"),
    Variant("dtrain-fsdp-8bit", "dtrain", "fsdp", bits=8),
    Variant("peft-fsdp", "peft", "fsdp"),
    Variant("dtrain-ds", "dtrain", "deepspeed"),
    Variant("dtrain-ds-full", "dtrain", "deepspeed", mode="full"),
    Variant("dtrain-ds-8bit", "dtrain", "deepspeed", bits=8),
    Variant("peft-ds", "peft", "deepspeed"),
    Variant("latency", "latency"),
    Variant("peft-fsdp-full", "peft", "fsdp", mode="full", default=False),
    Variant("peft-ds-full", "peft", "deepspeed", mode="full", default=False),
]
BY_NAME = {v.name: v for v in VARIANTS}
SHORT = {"fsdp": "fsdp", "deepspeed": "ds"}


@dataclass
class Outcome:
    variant: Variant
    status: str = "not run"   # ok | failed | skipped
    reason: str = ""
    median_step_s: float = math.nan
    tokens_per_step: int = 0
    world: int = 0
    peak_bytes: float = math.nan       # the largest rank's peak
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


# ---- environment -----------------------------------------------------------------------------------
def device_info() -> dict:
    import torch

    info = {"cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpus"] = torch.cuda.device_count()
        info["name"] = torch.cuda.get_device_name(0)
        info["text"] = f"{info['gpus']} x {info['name']}"
    else:
        model = platform.processor() or "unknown CPU"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        info["name"] = model
        info["text"] = f"CPU: {model}, {os.cpu_count()} logical cores"
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["text"] += f", {int(mem) / 2**20:.0f} GiB RAM"
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "accelerate", "dtrain", "bitsandbytes"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, errors="replace", timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, errors="replace", timeout=10).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def count_params(arch: dict) -> dict:
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


# ---- data ----------------------------------------------------------------------------------------
def make_data(work: Path, vocab: int, seq_len: int, n: int, seed: int = 1234) -> dict:
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
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    tok_dir = work / "tokenizer"
    fast.save_pretrained(tok_dir)
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(len(specials), vocab, (n, seq_len - 1), generator=g)
    text = "\n\n".join(" ".join(f"w{i}" for i in row.tolist()) for row in words) + "\n"
    (work / "data.txt").write_text(text)
    ids = torch.cat([words, torch.full((n, 1), 2, dtype=words.dtype)], dim=1)
    torch.save(ids, work / "ids.pt")
    return {"tokenizer": tok_dir, "text": work / "data.txt", "ids": work / "ids.pt"}


# ---- launching -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cuda: bool) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: 2 ranks on 2 cores
    return env


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def run_logged(cmd: list[str], log: Path, env: dict, timeout: int) -> tuple[int, float]:
    """Run `cmd` with stdout+stderr into `log`; (exit code, wall seconds). 124 on timeout."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()
            rc = 124
    return rc, time.perf_counter() - t0


EXC_RE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:|^[\w.]*Error$|dtrain: error:|error: ")
SIGNS = ("terminate called", "Killed", "Signal ", "exitcode")


def error_line(log: Path) -> str:
    """The most telling line of a failed run's log: the last exception line, else an abort line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if "Warning" not in ln and "ChildFailedError" not in ln]
    for ln in reversed(lines):
        if EXC_RE.search(ln):
            return ln[:300]
    for sign in SIGNS:
        for ln in lines:
            if sign in ln:
                return ln[:300]
    return lines[-1][:300] if lines else "empty log"


def finished(log: Path) -> bool:
    """dtrain logged the end of its run ('done: adapter in ...')."""
    try:
        return "INFO dtrain: done:" in log.read_text(errors="replace")
    except OSError:
        return False


# ---- variants ------------------------------------------------------------------------------------
def dtrain_config(v: Variant, p: Preset, data: dict, out: Path, dtype: str) -> dict:
    total = p.warmup + p.steps
    cfg = {
        "model": {"arch": dict(p.arch), "dtype": dtype},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": list(LORA_TARGETS)},
        "data": {"path": str(data["text"]), "tokenizer": str(data["tokenizer"]), "format": "text",
                 "seq_len": p.seq_len, "eval_fraction": 0.0},
        "training": {"lr": LR, "warmup_steps": 1, "max_steps": total, "micro_batch_size": p.micro_batch,
                     "grad_accum": 1, "max_grad_norm": 1.0, "eval_every": 0, "log_every": 1,
                     # the memory snapshot (peak RSS / CUDA of every rank) in the last step's row
                     "memory_every": total, "save_every": 0},
        "backend": {"name": v.backend},
        "quantization": {"bits": v.bits},
        "mode": v.mode,
        "output": {"dir": str(out)},
    }
    return cfg


def run_dtrain(v: Variant, p: Preset, data: dict, work: Path, nproc: int, dtype: str, cuda: bool,
               timeout: int, overrides: list[str] = ()) -> Outcome:
    import yaml

    o = Outcome(v, world=nproc, tokens_per_step=p.micro_batch * p.seq_len * nproc)
    vdir = work / v.name
    vdir.mkdir(parents=True, exist_ok=True)
    cfg_path = vdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dtrain_config(v, p, data, vdir / "run", dtype), sort_keys=False))
    cmd = torchrun(nproc) + ["-m", "dtrain", "train", str(cfg_path), *overrides]
    rc, o.wall_s = run_logged(cmd, vdir / "log.txt", child_env(cuda), timeout)
    metrics = vdir / "run" / "metrics.jsonl"
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    if rc != 0 and rows and finished(vdir / "log.txt"):
        # every step ran and the run logged its end; the exit code came at process teardown
        o.extra["exit_note"] = (f"all steps ran and dtrain logged 'done', but the launcher exited {rc} at "
                                f"teardown: {error_line(vdir / 'log.txt')}")
    elif rc != 0 or not rows:
        o.status, o.reason = "failed", (f"exit {rc}: " if rc else "no metrics: ") + error_line(vdir / "log.txt")
        return o
    timed = [r["step_time_s"] for r in rows if r.get("step", 0) > p.warmup and "step_time_s" in r]
    o.step_times = timed
    o.median_step_s = statistics.median(timed) if timed else math.nan
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
    m = re.search(r"trainable params: ([\d,]+) / ([\d,]+)", (vdir / "log.txt").read_text(errors="replace"))
    if m:
        o.trainable, o.total = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
    o.status = "ok" if timed else "failed"
    if not timed:
        o.reason = f"no timed steps (ran {len(rows)} steps, warm-up {p.warmup})"
    return o


def run_peft(v: Variant, p: Preset, data: dict, work: Path, nproc: int, dtype: str, cuda: bool,
             timeout: int, arch_file: Path) -> Outcome:
    o = Outcome(v, world=nproc, tokens_per_step=p.micro_batch * p.seq_len * nproc)
    vdir = work / v.name
    vdir.mkdir(parents=True, exist_ok=True)
    result = vdir / "result.json"
    cmd = torchrun(nproc) + [str(BENCH / "peft_baseline.py"), "--plugin", v.backend, "--mode", v.mode,
                             "--arch", str(arch_file), "--data", str(data["ids"]),
                             "--micro-batch", str(p.micro_batch), "--steps", str(p.steps),
                             "--warmup", str(p.warmup), "--dtype", dtype, "--lora-r", str(LORA_R),
                             "--lora-alpha", str(LORA_ALPHA), "--lora-targets", ",".join(LORA_TARGETS),
                             "--lr", str(LR), "--out", str(result)]
    if v.backend == "fsdp" and not cuda:
        cmd.append("--force-fsdp-on-cpu")
    rc, o.wall_s = run_logged(cmd, vdir / "log.txt", child_env(cuda), timeout)
    if not result.is_file():
        o.status, o.reason = "failed", (f"exit {rc}: " if rc else "no result: ") + error_line(vdir / "log.txt")
        return o
    if rc != 0:  # the result is written after the last step: the exit code came at teardown
        o.extra["exit_note"] = (f"all steps ran and the baseline wrote its result, but the launcher exited "
                                f"{rc} at teardown: {error_line(vdir / 'log.txt')}")
    r = json.loads(result.read_text())
    o.step_times = r["step_times"]
    o.median_step_s = r["median_step_time_s"]
    o.tokens_per_step = r["tokens_per_step"]
    o.world = r["world_size"]
    o.peak_bytes = max(r["peak_bytes_per_rank"])
    o.peak_kind = "cuda_max_allocated" if r["memory_kind"] == "cuda_max_allocated" else "rss_peak_bytes"
    o.trainable, o.total = r["trainable_params"], r["total_params"]
    o.loss_first, o.loss_last = r["losses"][0], r["losses"][-1]
    o.extra.update(distributed_type=r["distributed_type"], accelerate_chose=r.get("accelerate_chose"),
                   forced_fsdp=r.get("forced_fsdp"), rss_before_model=max(r["rss_before_model_per_rank"]),
                   rss_peak_per_rank=r["peak_rss_bytes_per_rank"])
    o.status = "ok"
    return o


def run_latency(v: Variant, p: Preset, work: Path, dtype: str, cuda: bool, timeout: int,
                arch_file: Path) -> Outcome:
    o = Outcome(v)
    vdir = work / v.name
    vdir.mkdir(parents=True, exist_ok=True)
    result = vdir / "result.json"
    cmd = [PY, str(BENCH / "latency.py"), "--arch", str(arch_file), "--batch", str(p.lat_batch),
           "--seq", str(p.lat_seq), "--iters", str(p.lat_iters), "--warmup", str(p.lat_warmup),
           "--dtype", dtype, "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA),
           "--lora-targets", ",".join(LORA_TARGETS), "--out", str(result)]
    rc, o.wall_s = run_logged(cmd, vdir / "log.txt", child_env(cuda), timeout)
    if rc != 0 or not result.is_file():
        o.status, o.reason = "failed", f"exit {rc}: " + error_line(vdir / "log.txt")
        return o
    o.extra = json.loads(result.read_text())
    o.status = "ok"
    return o


def unavailable(v: Variant, cuda: bool) -> str | None:
    """Why a variant cannot run in this environment (a missing package), or None."""
    need = []
    if v.backend == "deepspeed":
        need.append("deepspeed")
    if v.kind == "peft":
        need += ["peft", "accelerate"]
    if v.bits == 8:
        need.append("bitsandbytes")  # dtrain.quant computes the int8 storage with it
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


# ---- report --------------------------------------------------------------------------------------
def mib(b: float) -> str:
    if b is None or not math.isfinite(b):
        return "n/a"
    m = b / 2**20
    return f"{m:,.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def num(x: float, fmt: str = "{:,.1f}") -> str:
    return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)


def spread(o: Outcome) -> str:
    """(max - min) / median of the timed steps: how steady the timing was (load on a shared machine)."""
    if not o.ok or len(o.step_times) < 2:
        return "n/a"
    return f"{(max(o.step_times) - min(o.step_times)) / o.median_step_s * 100:.0f}%"


def flops_per_token(o: Outcome, params: dict) -> float:
    return (6 if o.variant.mode == "full" else 4) * params["linear"]


def mfu(o: Outcome, params: dict, dev: dict) -> float:
    if not dev["cuda"] or not o.ok:
        return math.nan
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in dev["name"]), None)
    if peak is None:
        return math.nan
    return flops_per_token(o, params) * o.tok_s / (peak * o.world)


@dataclass
class Goal:
    text: str
    value: str
    status: str


def goals(res: dict[str, Outcome], dev: dict) -> list[Goal]:
    cuda = dev["cuda"]
    out = []

    def get(name: str) -> Outcome | None:
        o = res.get(name)
        return o if o is not None and o.ok else None

    def missing(*names: str) -> str:
        bad = [n for n in names if get(n) is None]
        return "n/a: " + ", ".join(f"{n} {res[n].status if n in res else 'not run'}" for n in bad)

    for b in ("fsdp", "ds"):
        lo, full, q8, peft = f"dtrain-{b}", f"dtrain-{b}-full", f"dtrain-{b}-8bit", f"peft-{b}"
        # 1. speed LoRA vs full (GPU goal)
        if get(lo) and get(full):
            r = get(lo).tok_s / get(full).tok_s
            st = ("met" if r >= 1.25 else "missed") if cuda else "GPU-only goal (CPU value for information)"
            out.append(Goal(f"[{b}] LoRA >= 1.25x full-FT tokens/s", f"{r:.2f}x", st))
        else:
            out.append(Goal(f"[{b}] LoRA >= 1.25x full-FT tokens/s", "", missing(lo, full)))
        # 2./3. memory vs full
        for name, limit, label in ((lo, 1 / 3, "LoRA peak memory <= 1/3 of full FT"),
                                   (q8, 1 / 6, "8-bit LoRA peak memory <= 1/6 of full FT")):
            if get(name) and get(full) and math.isfinite(get(name).peak_bytes) and math.isfinite(get(full).peak_bytes):
                r = get(name).peak_bytes / get(full).peak_bytes
                st = "met" if r <= limit else "missed"
                if not cuda:
                    st += " (CPU peak RSS: includes the fixed runtime, see notes)"
                out.append(Goal(f"[{b}] {label}", f"{r:.3f} (limit {limit:.3f})", st))
            else:
                out.append(Goal(f"[{b}] {label}", "", missing(name, full)))
        # 4. dtrain vs PEFT speed
        if get(lo) and get(peft):
            r = get(lo).tok_s / get(peft).tok_s
            st = "met" if r >= 1.2 else ("missed the 1.2x goal, at least as fast" if r >= 1.0 else "missed")
            out.append(Goal(f"[{b}] dtrain >= PEFT+accelerate tokens/s (goal 1.2x)", f"{r:.2f}x", st))
        else:
            out.append(Goal(f"[{b}] dtrain >= PEFT+accelerate tokens/s (goal 1.2x)", "", missing(lo, peft)))
        # 5. dtrain vs PEFT memory
        if get(lo) and get(peft) and math.isfinite(get(lo).peak_bytes) and math.isfinite(get(peft).peak_bytes):
            r = get(lo).peak_bytes / get(peft).peak_bytes
            out.append(Goal(f"[{b}] dtrain peak memory <= PEFT+accelerate", f"{r:.3f}",
                            "met" if r <= 1.0 else "missed"))
        else:
            out.append(Goal(f"[{b}] dtrain peak memory <= PEFT+accelerate", "", missing(lo, peft)))
    lat = get("latency")
    if lat:
        r = lat.extra["merged_over_base"]
        # zero added latency: merged no more than 2% slower than base (faster is noise, not a miss)
        out.append(Goal("merged latency within 2% of base", f"{r:.3f}x (unmerged {lat.extra['unmerged_over_base']:.3f}x)",
                        "met" if r <= 1.02 else "missed"))
    else:
        out.append(Goal("merged latency within 2% of base", "", missing("latency")))
    out.append(Goal("MFU reported", "", "CUDA only" if not cuda else "see table"))
    return out


def render(ctx: dict, res: dict[str, Outcome], gl: list[Goal]) -> str:
    p: Preset = ctx["preset"]
    dev, params, v = ctx["device"], ctx["params"], ctx["versions"]
    cuda = dev["cuda"]
    mem_kind = "peak CUDA max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    title = f"## {ctx['date']}: preset `{p.name}` on {'GPU' if cuda else 'CPU'}"
    if p.name == "quick":
        title += " (plumbing check: tiny model, not a measurement)"
    a = p.arch
    lines = [
        title, "",
        f"- device: {dev['text']}",
        f"- load average at start: {ctx['load_start']} (at end: {ctx['load_end']}); this machine may be shared",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; dtrain at {ctx['git']}",
        f"- command: `{ctx['command']}`",
        f"- model: {a['model_type']} random weights, hidden {a['hidden_size']}, {a['num_hidden_layers']} layers, "
        f"intermediate {a['intermediate_size']}, {a['num_attention_heads']} heads ({a['num_key_value_heads']} kv), "
        f"vocab {a['vocab_size']}: {params['total'] / 1e6:.1f}M parameters, P = {params['linear'] / 1e6:.1f}M in linear "
        f"layers; {ctx['dtype']}",
        f"- batch: {p.micro_batch} x {p.seq_len} tokens per rank x {ctx['nproc']} rank(s) = "
        f"{p.micro_batch * p.seq_len * ctx['nproc']} tokens per optimizer step; {p.warmup} warm-up + {p.steps} timed "
        f"steps; synthetic random token ids (same sequences for every variant); LoRA r={LORA_R}, "
        f"alpha={LORA_ALPHA:g}, {'+'.join(LORA_TARGETS)}; AdamW lr {LR}",
        "",
        "| variant | status | median step s | step spread | tok/s/rank | tok/s total | peak mem/rank MiB | model states MiB | MFU | trainable / total params | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, o in res.items():
        if o.variant.kind == "latency":
            continue
        status = o.status if o.status == "ok" else f"{o.status}: {o.reason}"
        m = mfu(o, params, dev)
        tp = f"{o.trainable:,} / {o.total:,}" if o.trainable is not None and o.total else "n/a"
        lines.append(
            f"| {name} | {status} | {num(o.median_step_s, '{:.3f}')} | {spread(o)} | {num(o.tok_s_rank)} | {num(o.tok_s)} | "
            f"{mib(o.peak_bytes)} | {mib(o.model_states_bytes)} | {num(m * 100, '{:.1f}%') if math.isfinite(m) else 'n/a'} | "
            f"{tp} | {num(o.loss_first, '{:.3f}')} -> {num(o.loss_last, '{:.3f}')} |")
    lat = res.get("latency")
    if lat is not None:
        lines.append("")
        if lat.ok:
            e = lat.extra
            lines += [
                f"Inference latency ({e['device']}, {e['dtype']}, batch {e['batch']} x {e['seq']} tokens, "
                f"{e['threads']} thread(s), median of {e['iters']} interleaved rounds after {e['warmup']} warm-up):",
                "",
                "| model | median ms | min ms | p90 ms | / base |",
                "|---|---|---|---|---|",
            ]
            for key in ("base", "merged", "unmerged"):
                s = e[key]
                lines.append(f"| {key} | {s['median_s'] * 1e3:.2f} | {s['min_s'] * 1e3:.2f} | {s['p90_s'] * 1e3:.2f} | "
                             f"{s['median_s'] / e['base']['median_s']:.3f} |")
            lines.append("")
            lines.append(f"Merged module tree equals the base's: {e['merged_tree_equals_base']}; max |merged - "
                         f"unmerged| logits {e['merged_vs_unmerged_max_abs_diff']:.2e} (merged vs base "
                         f"{e['merged_vs_base_max_abs_diff']:.2e}: the update is non-zero).")
        else:
            lines.append(f"Inference latency: {lat.status}: {lat.reason}")
    lines += ["", "| goal | measured | status |", "|---|---|---|"]
    lines += [f"| {g.text} | {g.value} | {g.status} |" for g in gl]
    notes = []
    with contextlib.suppress(ValueError, IndexError):
        if float(ctx["load_start"].split()[0]) > (os.cpu_count() or 1):
            notes.append(f"The load average at start ({ctx['load_start']}) exceeded the {os.cpu_count()} cores: other "
                         "jobs shared the CPU, so every time here is inflated and comparisons between variants (run "
                         "one after the other) are noisy; see the step spread column.")
    for name, o in res.items():
        if o.variant.kind == "peft" and o.ok and o.extra.get("forced_fsdp"):
            notes.append(f"{name}: accelerate {v['accelerate']} chose `{o.extra['accelerate_chose']}` on CPU (its FSDP "
                         "plugin is only honoured for GPU-like devices; prepare() would wrap the model in DDP); the "
                         "worker set `DistributedType.FSDP` so that prepare() ran accelerate's fsdp2_prepare_model "
                         "(FSDP2 per decoder layer, then the root).")
    peft_rss = [o.extra["rss_before_model"] for o in res.values()
                if o.variant.kind == "peft" and o.ok and o.extra.get("rss_before_model")]
    if not cuda and peft_rss:
        notes.append(f"Fixed runtime per rank on CPU: the baseline worker's RSS just before it builds the model "
                     f"(torch, transformers, accelerate, peft, the process group) is {mib(max(peft_rss))} MiB: every "
                     "peak RSS above includes such a floor, which no training mode can remove.")
    if not cuda:
        notes.append("Model states = frozen + trainable + gradients + optimizer state of the largest rank, from "
                     "dtrain's memory snapshot in the last step's metrics row (taken after step(): FSDP gradients "
                     "already freed, ZeRO-3's flat gradient buffer still there).")
    for name, o in res.items():
        if o.extra.get("exit_note"):
            notes.append(f"{name}: {o.extra['exit_note']}")
        if o.status in ("failed", "skipped"):
            notes.append(f"{name} {o.status}: {o.reason}")
    notes.append(f"Memory column: {mem_kind} of the largest rank since process start (model build included).")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


RESULTS_HEADER = """# dtrain benchmark results

Appended by `python bench/run.py` (newest last); how to run and what is counted: bench/README.md.
"""


def append_results(text: str, path: Path) -> None:
    if not path.is_file():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as f:
        f.write("\n" + text + "\n")


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dtrain benchmark (see the module docstring)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--steps", type=int, help="timed optimizer steps per training variant")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps before them")
    p.add_argument("--micro-batch", type=int, help="sequences per rank per step (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--only", help="comma-separated variants: " + ",".join(v.name for v in VARIANTS))
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps: checks the plumbing")
    p.add_argument("--nproc", type=int, help="ranks (default: GPUs with CUDA, else 2)")
    p.add_argument("--timeout", type=int, help="seconds per variant")
    p.add_argument("--record", dest="record", action="store_true", default=None,
                   help="append to bench/RESULTS.md (default: yes, except with --quick)")
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--results", type=Path, default=RESULTS, help="results file (default bench/RESULTS.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a dtrain config override for every dtrain variant (repeatable), e.g. "
                        "backend.deepspeed_config=ds.json")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, logs, metrics)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = loadavg()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev = device_info()
    cuda = dev["cuda"]
    preset_name = "quick" if args.quick else (args.preset or ("gpu" if cuda else "cpu"))
    p = PRESETS[preset_name]
    if args.steps is not None:
        p.steps = args.steps
    if args.warmup is not None:
        p.warmup = args.warmup
    if args.micro_batch is not None:
        p.micro_batch = args.micro_batch
    if args.seq_len is not None:
        p.seq_len = args.seq_len
    if p.steps < 1 or p.warmup < 0 or p.micro_batch < 1 or p.seq_len < 2:
        print("bench: need --steps >= 1, --warmup >= 0, --micro-batch >= 1, --seq-len >= 2", file=sys.stderr)
        return 2
    if p.seq_len > p.arch.get("max_position_embeddings", p.seq_len):
        p.arch = {**p.arch, "max_position_embeddings": p.seq_len}
    nproc = args.nproc or (dev.get("gpus", 1) if cuda else 2)
    dtype = "bf16" if cuda else "fp32"
    timeout = args.timeout or p.timeout_s
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in BY_NAME]
        if bad:
            print(f"bench: unknown variant(s) {', '.join(bad)}; known: {', '.join(BY_NAME)}", file=sys.stderr)
            return 2
        chosen = [BY_NAME[n] for n in names]
    else:
        chosen = [v for v in VARIANTS if v.default]
    record = args.record if args.record is not None else not args.quick
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])

    print(f"bench: {dev['text']}; preset {preset_name}; {nproc} rank(s); {dtype}; load average {load_start}",
          flush=True)
    with contextlib.suppress(ValueError, IndexError):
        if float(load_start.split()[0]) > (os.cpu_count() or 1):
            print(f"bench: warning: load average {load_start} is above the {os.cpu_count()} cores: the machine is "
                  "busy, timings will be slow and noisy", flush=True)
    params = count_params(p.arch)
    work = Path(tempfile.mkdtemp(prefix="dtrain-bench-"))
    arch_file = work / "arch.json"
    arch_file.write_text(json.dumps(p.arch))
    data = make_data(work, p.arch["vocab_size"], p.seq_len, p.n_sequences)
    print(f"bench: work dir {work}; model {params['total'] / 1e6:.1f}M parameters", flush=True)

    res: dict[str, Outcome] = {}
    for v in chosen:
        why = unavailable(v, cuda)
        if why:
            res[v.name] = Outcome(v, status="skipped", reason=why)
            print(f"bench: {v.name}: skipped ({why})", flush=True)
            continue
        print(f"bench: {v.name} ...", flush=True)
        if v.kind == "dtrain":
            o = run_dtrain(v, p, data, work, nproc, dtype, cuda, timeout, args.overrides)
        elif v.kind == "peft":
            o = run_peft(v, p, data, work, nproc, dtype, cuda, timeout, arch_file)
        else:
            o = run_latency(v, p, work, dtype, cuda, timeout, arch_file)
        res[v.name] = o
        if o.variant.kind == "latency" and o.ok:
            print(f"bench: latency: base {o.extra['base']['median_s'] * 1e3:.2f} ms, merged x{o.extra['merged_over_base']:.3f}, "
                  f"unmerged x{o.extra['unmerged_over_base']:.3f} ({o.wall_s:.0f}s)", flush=True)
        elif o.ok:
            print(f"bench: {v.name}: median step {o.median_step_s:.3f}s, {o.tok_s_rank:.1f} tok/s/rank, "
                  f"peak {mib(o.peak_bytes)} MiB/rank ({o.wall_s:.0f}s)", flush=True)
        else:
            print(f"bench: {v.name}: {o.status}: {o.reason} (log: {work / v.name / 'log.txt'})", flush=True)

    ctx = {"preset": p, "device": dev, "params": params, "versions": versions(), "date": date,
           "load_start": load_start, "load_end": loadavg(), "git": git_rev(), "command": command,
           "nproc": nproc, "dtype": dtype}
    gl = goals(res, dev)
    text = render(ctx, res, gl)
    print("\n" + text)
    (work / "result.md").write_text(text)
    if record:
        append_results(text, args.results)
        print(f"bench: appended to {args.results}")
    failed = [n for n, o in res.items() if o.status == "failed"]
    if args.keep_workdir or failed:
        print(f"bench: logs, configs and metrics kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
