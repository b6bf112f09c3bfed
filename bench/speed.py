"""Where a step spends memory and time: dtrain against PEFT + accelerate on a real model and on a
128k-vocabulary shape, with the chunked loss, compiled blocks and checkpointing policies switched.

    .venv/bin/python bench/speed.py                       # both presets, the default variants
    .venv/bin/python bench/speed.py --preset smollm2 --only dtrain,peft --steps 4
    .venv/bin/python bench/speed.py --only dtrain,dtrain-ckpt,dtrain-ckpt-attn,dtrain-ckpt-every4

Presets (LoRA r=8, alpha 16 on q_proj, v_proj, dropout 0, fp32, 2 ranks, FSDP2 for both dtrain and
PEFT + accelerate, the same random token ids for both):
  smollm2    the real SmolLM2-135M-Instruct (`importer.resolve`), vocab 49,152, tied head
  llama128k  a random Llama: hidden 512, 8 layers, intermediate 1376, 8 heads, vocab 128,256
Each variant is one launch (bench/run.py's runners and result format); the table gives tokens/s and
the largest rank's peak RSS, each with its ratio to PEFT + accelerate. Appends to bench/RESULTS.md
with --record.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/speed.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, runners  # noqa: E402  (bench/run.py's runners, data and environment)
from bench.presets import LLAMA_58M, DataFiles, LatencyShape, Launch, Preset, Variant  # noqa: E402
from bench.report import mib  # noqa: E402
from bench.runners import Outcome  # noqa: E402

LLAMA_128K = {**LLAMA_58M, "vocab_size": 128256}


@dataclass(frozen=True)
class SpeedVariant:
    name: str
    kind: str  # dtrain | peft
    mode: str = "lora"
    overrides: tuple[str, ...] = ()
    default: bool = True


VARIANTS = [
    SpeedVariant("dtrain", "dtrain"),  # chunked loss on (auto, LoRA)
    SpeedVariant("dtrain-nochunk", "dtrain", overrides=("training.chunked_loss=false",)),
    SpeedVariant("dtrain-full", "dtrain", mode="full"),
    SpeedVariant("peft", "peft"),
    SpeedVariant("dtrain-compile", "dtrain", overrides=("model.compile_blocks=true",), default=False),
    SpeedVariant("dtrain-ckpt", "dtrain", overrides=("model.gradient_checkpointing=true",), default=False),
    SpeedVariant(
        "dtrain-ckpt-every4",
        "dtrain",
        default=False,
        overrides=("model.gradient_checkpointing=true", "model.gradient_checkpointing_every=4"),
    ),
    SpeedVariant("dtrain-ckpt-attn", "dtrain", overrides=("model.gradient_checkpointing=attention",), default=False),
]
BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class SpeedPreset:
    name: str
    arch: Mapping | None  # None: the real model at `model_path`
    vocab: int
    model_path: str | None = None
    seq_len: int = 128
    micro_batch: int = 4
    steps: int = 3
    warmup: int = 1

    def as_run_preset(self) -> Preset:
        return Preset(
            self.name,
            self.arch or {},
            seq_len=self.seq_len,
            micro_batch=self.micro_batch,
            steps=self.steps,
            warmup=self.warmup,
            n_sequences=0,
            latency=LatencyShape(batch=1, seq=1, iters=1, warmup=0),
            timeout_s=1800,
        )

    def launch(self, work: Path, data: DataFiles, nproc: int) -> Launch:
        """fp32 on CPU, 30 minutes per variant."""
        return Launch(
            work=work, data=data, arch_file=work / "arch.json", nproc=nproc, dtype="fp32", cuda=False, timeout_s=1800
        )


def presets() -> dict[str, SpeedPreset]:
    from dtrain.model import importer

    return {
        "smollm2": SpeedPreset("smollm2", None, 49152, model_path=str(importer.resolve("smollm2-135m-instruct"))),
        "llama128k": SpeedPreset("llama128k", LLAMA_128K, 128256),
    }


def run_dtrain(v: SpeedVariant, p: SpeedPreset, data: DataFiles, work: Path, nproc: int) -> Outcome:
    rv = Variant(v.name, "dtrain", "fsdp", mode=v.mode)
    extra = [*v.overrides] + ([f"model.path={p.model_path}", "model.arch=null"] if p.model_path else [])
    launch = dataclasses.replace(p.launch(work, data, nproc), overrides=tuple(extra))
    return runners.run_dtrain(rv, p.as_run_preset(), launch)


def run_peft(v: SpeedVariant, p: SpeedPreset, data: DataFiles, work: Path, nproc: int) -> Outcome:
    model = ["--model-path", p.model_path] if p.model_path else ["--arch", str(work / "arch.json")]
    return runners.run_peft(
        Variant(v.name, "peft", "fsdp", mode=v.mode), p.as_run_preset(), p.launch(work, data, nproc), model=model
    )


def run_preset(p: SpeedPreset, names: list[str], nproc: int, work: Path) -> dict[str, Outcome]:
    work.mkdir(parents=True, exist_ok=True)
    if p.arch:
        (work / "arch.json").write_text(json.dumps(dict(p.arch)))
    n_seq = nproc * p.micro_batch * (p.steps + p.warmup)
    data = runners.make_data(work, p.vocab, p.seq_len, n_seq)
    out = {}
    for name in names:
        v = BY_NAME[name]
        print(f"[speed] {p.name}: {name} ...", flush=True)
        out[name] = (run_peft if v.kind == "peft" else run_dtrain)(v, p, data, work, nproc)
        o = out[name]
        print(
            f"[speed] {p.name}: {name} {o.status} {o.reason} median {o.median_step_s:.3f}s "
            f"peak {mib(o.peak_bytes)} MiB",
            flush=True,
        )
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b else "n/a"


def table(p: SpeedPreset, res: dict[str, Outcome]) -> str:
    peft = res.get("peft")
    rows = [
        f"**{p.name}** ({'SmolLM2-135M-Instruct, real weights' if p.model_path else 'random Llama'}, "
        f"vocab {p.vocab:,}, {p.micro_batch} x {p.seq_len} tokens per rank, 2 ranks, "
        f"{p.warmup} warm-up + {p.steps} timed steps)",
        "",
        "| variant | median step s | tokens/s | vs PEFT | peak RSS/rank MiB | vs PEFT | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, o in res.items():
        if not o.ok:
            rows.append(f"| {name} | {o.status}: {o.reason[:80]} | | | | | |")
            continue
        rows.append(
            f"| {name} | {o.median_step_s:.3f} | {o.tok_s:,.0f} | "
            f"{ratio(o.tok_s, peft.tok_s) if peft and peft.ok else 'n/a'} | {mib(o.peak_bytes)} | "
            f"{ratio(o.peak_bytes, peft.peak_bytes) if peft and peft.ok else 'n/a'} | "
            f"{o.loss_first:.3f} -> {o.loss_last:.3f} |"
        )
    lora, full = res.get("dtrain"), res.get("dtrain-full")
    if lora and full and lora.ok and full.ok:
        rows += [
            "",
            f"LoRA vs full fine-tuning (dtrain): tokens/s {ratio(lora.tok_s, full.tok_s)}, "
            f"peak RSS {ratio(lora.peak_bytes, full.peak_bytes)}.",
        ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["smollm2", "llama128k", "both"], default="both")
    ap.add_argument(
        "--only", help="comma-separated variants (default: " + ",".join(v.name for v in VARIANTS if v.default) + ")"
    )
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else [v.name for v in VARIANTS if v.default]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {sorted(BY_NAME)}")
    chosen = presets()
    chosen = chosen if args.preset == "both" else {args.preset: chosen[args.preset]}
    header = (
        f"### bench/speed.py, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {common.device_info().text}; load average at start {common.loadavg()} (shared, "
        f"contended machine: noisy). Versions: {json.dumps(common.versions())}. dtrain {common.git_rev()}.\n"
    )
    parts = [header]
    with tempfile.TemporaryDirectory(prefix="dtrain-speed-") as tmp:
        for key, p in chosen.items():
            p = dataclasses.replace(
                p, steps=args.steps or p.steps, warmup=args.warmup if args.warmup is not None else p.warmup
            )
            parts.append(table(p, run_preset(p, names, 2, Path(tmp) / key)))
            print(parts[-1], flush=True)
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.record:
        common.append_results(text, common.RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
