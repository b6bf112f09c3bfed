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
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run.py`: import `bench` and `dtrain` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.presets import BY_NAME, PRESETS, VARIANTS, Launch, Preset, Variant  # noqa: E402
from bench.report import RunContext, goals, mib, render  # noqa: E402
from bench.runners import Outcome, count_params, make_data, run_variant, unavailable  # noqa: E402


class BadArgs(Exception):
    """A command line the benchmark cannot run: one line on stderr, exit 2."""


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
    p.add_argument(
        "--record",
        dest="record",
        action="store_true",
        default=None,
        help="append to bench/RESULTS.md (default: yes, except with --quick)",
    )
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--results", type=Path, default=common.RESULTS, help="results file (default bench/RESULTS.md)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dtrain config override for every dtrain variant (repeatable), e.g. backend.deepspeed_config=ds.json",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, logs, metrics)")
    return p.parse_args(argv)


def choose_preset(args: argparse.Namespace, dev: common.Device) -> Preset:
    name = "quick" if args.quick else (args.preset or ("gpu" if dev.cuda else "cpu"))
    p = PRESETS[name].with_overrides(
        steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch, seq_len=args.seq_len
    )
    if not p.valid():
        raise BadArgs("need --steps >= 1, --warmup >= 0, --micro-batch >= 1, --seq-len >= 2")
    return p


def choose_variants(only: str | None) -> list[Variant]:
    if not only:
        return [v for v in VARIANTS if v.default]
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        raise BadArgs(f"unknown variant(s) {', '.join(bad)}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def say(o: Outcome, work: Path) -> None:
    name = o.variant.name
    if o.variant.kind == "latency" and o.ok:
        print(
            f"bench: latency: base {o.extra['base']['median_s'] * 1e3:.2f} ms, merged x{o.extra['merged_over_base']:.3f}, "
            f"unmerged x{o.extra['unmerged_over_base']:.3f} ({o.wall_s:.0f}s)",
            flush=True,
        )
    elif o.ok:
        print(
            f"bench: {name}: median step {o.median_step_s:.3f}s, {o.tok_s_rank:.1f} tok/s/rank, "
            f"peak {mib(o.peak_bytes)} MiB/rank ({o.wall_s:.0f}s)",
            flush=True,
        )
    else:
        print(f"bench: {name}: {o.status}: {o.reason} (log: {work / name / 'log.txt'})", flush=True)


def run_all(chosen: list[Variant], p: Preset, launch: Launch) -> dict[str, Outcome]:
    res: dict[str, Outcome] = {}
    for v in chosen:
        why = unavailable(v)
        if why:
            res[v.name] = Outcome(v, status="skipped", reason=why)
            print(f"bench: {v.name}: skipped ({why})", flush=True)
            continue
        print(f"bench: {v.name} ...", flush=True)
        res[v.name] = run_variant(v, p, launch)
        say(res[v.name], launch.work)
    return res


def prepare(args: argparse.Namespace, p: Preset, dev: common.Device, nproc: int, dtype: str) -> Launch:
    """The work dir, the model's arch file and the synthetic data: what every variant launches with."""
    work = Path(tempfile.mkdtemp(prefix="dtrain-bench-"))
    arch_file = work / "arch.json"
    arch_file.write_text(json.dumps(dict(p.arch)))
    data = make_data(work, p.arch["vocab_size"], p.seq_len, p.n_sequences)
    return Launch(
        work=work,
        data=data,
        arch_file=arch_file,
        nproc=nproc,
        dtype=dtype,
        cuda=dev.cuda,
        timeout_s=args.timeout or p.timeout_s,
        overrides=tuple(args.overrides),
    )


def finish(args: argparse.Namespace, text: str, res: dict[str, Outcome], work: Path) -> int:
    print("\n" + text)
    (work / "result.md").write_text(text)
    if args.record if args.record is not None else not args.quick:
        common.append_results(text, args.results)
        print(f"bench: appended to {args.results}")
    failed = [n for n, o in res.items() if o.status == "failed"]
    if args.keep_workdir or failed:
        print(f"bench: logs, configs and metrics kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = common.loadavg()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev = common.device_info()
    try:
        p, chosen = choose_preset(args, dev), choose_variants(args.only)
    except BadArgs as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    dtype, nproc = "bf16" if dev.cuda else "fp32", args.nproc or (dev.gpus if dev.cuda else 2)
    print(f"bench: {dev.text}; preset {p.name}; {nproc} rank(s); {dtype}; load average {load_start}", flush=True)
    if common.overloaded(load_start):
        print(
            f"bench: warning: load average {load_start} is above the {os.cpu_count()} cores: the machine is "
            "busy, timings will be slow and noisy",
            flush=True,
        )
    params = count_params(p.arch)
    launch = prepare(args, p, dev, nproc, dtype)
    print(f"bench: work dir {launch.work}; model {params['total'] / 1e6:.1f}M parameters", flush=True)
    res = run_all(chosen, p, launch)
    ctx = RunContext(
        preset=p,
        device=dev,
        params=params,
        versions=common.versions(),
        date=date,
        load_start=load_start,
        load_end=common.loadavg(),
        git=common.git_rev(),
        command="python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        nproc=launch.nproc,
        dtype=launch.dtype,
    )
    return finish(args, render(ctx, res, goals(res, dev)), res, launch.work)


if __name__ == "__main__":
    sys.exit(main())
