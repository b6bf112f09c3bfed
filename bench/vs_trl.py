"""dtrain against TRL's SFTTrainer + PEFT on the same model, data, LoRA and batch shape, packing on
and off, assistant-only loss in both: real tokens/s per step (median after warm-up), peak RSS.

    .venv/bin/python bench/vs_trl.py --model smollm2-135m-instruct --steps 10 --warmup 3 --reps 2
    .venv/bin/python bench/vs_trl.py --model DIR --packing on --record

Data: generated two-turn chats (prompts 5-40 words, answers 5-120), written as `messages` records
for dtrain and as prompt-completion records for TRL (`completion_only_loss`); both render them with
the model's chat template. LoRA r 16 (alpha 32) on all linear layers, dropout 0, AdamW, fp32, one
process on every core; TRL packs with its default (best-fit) strategy and pads unpacked batches to
the longest row. Runs alternate dtrain / TRL, repeated `--reps` times. TRL is not a dtrain
dependency: install it aside, `pip install --no-deps --target .trl-site "trl==1.16.*"`, and name
that folder with `--trl-site` (default `.trl-site`); it is on the TRL worker's PYTHONPATH only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/vs_trl.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education"
).split()


def chats(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [(say(rng.randint(5, 40)), say(rng.randint(5, 120))) for _ in range(n)]


def write_data(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """(messages jsonl for dtrain, prompt-completion jsonl for TRL) of the same chats."""
    msgs, pc = work / "messages.jsonl", work / "prompt_completion.jsonl"
    pairs = chats(n, seed)
    msgs.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}) + "\n"
            for p, c in pairs
        )
    )
    pc.write_text(
        "".join(
            json.dumps(
                {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            )
            + "\n"
            for p, c in pairs
        )
    )
    return msgs, pc


def run_measured(cmd: list[str], env: dict, log: Path, timeout: int) -> tuple[int, float, str]:
    """(exit code, peak RSS MiB of the child, its output): os.wait4 reports that child's own rusage."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=common.REPO)
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, log.read_text(errors="replace")


def dtrain_overrides(a, msgs: Path, packing: bool, out: Path, work: Path) -> list[str]:
    return [
        f"data.path={msgs}",
        "data.format=messages",
        f"data.seq_len={a.seq_len}",
        f"data.packing={str(packing).lower()}",
        "data.eval_fraction=0.0",
        f"data.cache_dir={work / 'cache'}",
        f"lora.r={a.r}",
        f"lora.alpha={2 * a.r}",
        "lora.targets=all-linear",
        "lora.dropout=0.0",
        f"training.micro_batch_size={a.micro_batch}",
        f"training.max_steps={a.warmup + a.steps}",
        "training.warmup_steps=0",
        "training.min_lr_ratio=1.0",
        f"training.lr={a.lr}",
        "training.eval_every=0",
        f"training.seed={a.seed}",
        "backend.name=none",
        "backend.device=cpu",
        f"output.dir={out}",
        "output.overwrite=true",
        "logging.loss_curve=false",
        *a.set,
    ]


def dtrain_config(a, work: Path) -> Path:
    cfg = work / "dtrain.yaml"
    cfg.write_text(f"model:\n  path: {a.model}\n")
    return cfg


def run_dtrain(a, msgs: Path, packing: bool, work: Path, tag: str) -> dict:
    out = work / f"dtrain-{tag}"
    overrides = dtrain_overrides(a, msgs, packing, out, work)
    env = common.child_env(False) | {"OMP_NUM_THREADS": str(a.threads)}
    cmd = [common.PY, "-m", "dtrain", "train", str(dtrain_config(a, work)), *overrides]
    rc, rss, text = run_measured(cmd, env, work / f"{tag}.log", a.timeout)
    if rc != 0:
        return {"error": common.error_line(work / f"{tag}.log")}
    rows = [r for r in common.read_jsonl(out / "metrics.jsonl") if "loss" in r and "tokens_per_s" in r]
    timed = rows[a.warmup :]
    return {
        "tok_s": common.median([r["tokens_per_s"] for r in timed]),
        "rss_mib": rss,
        "real_share": common.median([1 - r["padding_fraction"] for r in timed]),
        "first_loss": rows[0]["loss"],
        "steps": len(timed),
    }


def first_batch(a, msgs: Path, packing: bool, work: Path) -> tuple[Path, int]:
    """dtrain's own first micro-batch (its tokens cache, its seeded plan, step 0, rank 0) as
    pre-tokenized records for TRL: (the jsonl, how many examples it holds). Packed, that is every
    example laid in the micro-batch's rows; TRL packs them padding-free again, and since a
    padding-free batch is one flat sequence with positions restarting per example, how they are
    grouped into rows does not change the maths as long as all of them are in TRL's first batch."""
    from dtrain import config as config_lib, data as data_lib
    from dtrain.model.tokenizer import corpus_file, load_tokenizer

    cfg = config_lib.load(dtrain_config(a, work), dtrain_overrides(a, msgs, packing, work / "unused", work))
    tok = load_tokenizer(cfg.model.path, corpus_file(cfg.data.path))
    train = data_lib.prepare(cfg.data, tok, cfg.training.seed).train
    plan = data_lib.BatchPlan(len(train), a.micro_batch, 1, 1, cfg.training.seed)
    seqs = train.subset(plan.indices(0, 0, 0)).tokens.seqs()
    path = work / f"first-batch-{'on' if packing else 'off'}.jsonl"
    path.write_text(
        "".join(
            json.dumps({"input_ids": ids, "completion_mask": [int(v != data_lib.IGNORE) for v in labels]}) + "\n"
            for ids, labels in seqs
        )
    )
    return path, len(seqs)


def trl_cmd(a, data: Path, packing: bool, out: Path, steps: int, micro_batch: int) -> list[str]:
    return [
        common.PY,
        str(common.BENCH / "trl_worker.py"),
        "--model",
        a.model,
        "--data",
        str(data),
        "--out",
        str(out),
        "--packing",
        str(int(packing)),
        "--steps",
        str(steps),
        "--seq-len",
        str(a.seq_len),
        "--micro-batch",
        str(micro_batch),
        "--r",
        str(a.r),
        "--lr",
        str(a.lr),
        "--seed",
        str(a.seed),
    ]


def run_trl_worker(a, cmd: list[str], work: Path, tag: str) -> tuple[dict | None, float, str]:
    """(the worker's VS_TRL record or None, its peak RSS MiB, an error line)."""
    env = common.child_env(False) | {"OMP_NUM_THREADS": str(a.threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(a.trl_site).resolve()), env["PYTHONPATH"]])
    rc, rss, text = run_measured(cmd, env, work / f"{tag}.log", a.timeout)
    line = next((ln for ln in text.splitlines() if ln.startswith("VS_TRL ")), None)
    if rc != 0 or line is None:
        return None, rss, text.strip().splitlines()[-1][:300] if text.strip() else f"exit {rc}"
    return json.loads(line[len("VS_TRL ") :]), rss, ""


def run_trl(a, pc: Path, packing: bool, work: Path, tag: str) -> dict:
    cmd = trl_cmd(a, pc, packing, work / f"trl-{tag}", a.warmup + a.steps, a.micro_batch)
    got, rss, err = run_trl_worker(a, cmd, work, tag)
    if got is None:
        return {"error": err}
    rates = [t / s for t, s in zip(got["tokens"], got["step_s"])][a.warmup :]
    share = [t / p for t, p in zip(got["tokens"], got["positions"])][a.warmup :]
    return {
        "tok_s": common.median(rates),
        "rss_mib": rss,
        "real_share": common.median(share),
        "first_loss": got["losses"][0],
        "steps": len(rates),
    }


def trl_first_loss(a, msgs: Path, packing: bool, work: Path) -> dict:
    """TRL's first-step loss on dtrain's first micro-batch (one step, all of it in one batch)."""
    data, n = first_batch(a, msgs, packing, work)
    key = "on" if packing else "off"
    got, _, err = run_trl_worker(
        a, trl_cmd(a, data, packing, work / f"trl-first-{key}", 1, n), work, f"trl-first-{key}"
    )
    return {"error": err} if got is None else {"loss": got["losses"][0], "tokens": got["tokens"][0], "examples": n}


def fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def same_batch(runs: dict) -> str:
    """'dtrain / TRL (diff)' first-step losses on the identical first batch, or why not."""
    first, d = runs.get("first"), [r for r in runs["dtrain"] if "first_loss" in r]
    if not first or not d:
        return "n/a"
    if "error" in first:
        return f"TRL failed: {first['error'][:80]}"
    diff = abs(d[0]["first_loss"] - first["loss"])
    return f"{d[0]['first_loss']:.6f} / {first['loss']:.6f} ({diff:.1e}{'' if diff <= 1e-4 else ', > 1e-4'})"


def table(results: dict, a) -> str:
    """Markdown: per packing setting, each repetition's rates, the medians' ratio, RSS, real share,
    the first-step losses of each tool's own first batch and of the identical first batch."""
    lines = [
        "| packing | dtrain real tok/s | TRL real tok/s | dtrain / TRL | peak RSS MiB dtrain / TRL | "
        "real-token share dtrain / TRL | first-step loss, own batch dtrain / TRL | "
        "first-step loss, same batch dtrain / TRL (diff) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for packing, runs in results.items():
        d = [r for r in runs["dtrain"] if "tok_s" in r]
        t = [r for r in runs["trl"] if "tok_s" in r]
        if not d or not t:
            errs = [r["error"] for r in runs["dtrain"] + runs["trl"] if "error" in r]
            lines.append(f"| {packing} | failed: {errs[:1]} | | | | | | |")
            continue
        dm, tm = common.median([r["tok_s"] for r in d]), common.median([r["tok_s"] for r in t])
        lines.append(
            f"| {packing} | {', '.join(fmt(r['tok_s']) for r in d)} | {', '.join(fmt(r['tok_s']) for r in t)} | "
            f"{dm / tm:.2f}x | {max(r['rss_mib'] for r in d):,.0f} / {max(r['rss_mib'] for r in t):,.0f} "
            f"({max(r['rss_mib'] for r in d) / max(r['rss_mib'] for r in t):.2f}x) | "
            f"{fmt(d[0]['real_share'], '.1%')} / {fmt(t[0]['real_share'], '.1%')} | "
            f"{d[0]['first_loss']:.4f} / {t[0]['first_loss']:.4f} | {same_batch(runs)} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name or a model directory")
    p.add_argument("--packing", choices=["on", "off", "both"], default="both")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--trl-site", default=str(common.REPO / ".trl-site"))
    p.add_argument("--set", action="append", default=[], help="extra dtrain override, repeatable")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from dtrain.model import importer

    a.model = str(importer.resolve(a.model)) if importer.is_builtin(a.model) else a.model
    load_start = common.loadavg()
    work = Path(tempfile.mkdtemp(prefix="vs_trl."))
    msgs, pc = write_data(work, a.records, a.seed)
    settings = {"on": [True], "off": [False], "both": [True, False]}[a.packing]
    results = {("on" if p else "off"): {"dtrain": [], "trl": []} for p in settings}
    for packing in settings:  # first: it writes the token cache the dtrain runs then hit
        results["on" if packing else "off"]["first"] = r = trl_first_loss(a, msgs, packing, work)
        print(f"packing {'on' if packing else 'off'}: TRL on dtrain's first batch: {r}", flush=True)
    for rep in range(a.reps):
        for packing in settings:
            key = "on" if packing else "off"
            for tool, fn, data in (("dtrain", run_dtrain, msgs), ("trl", run_trl, pc)):
                r = fn(a, data, packing, work, f"{tool}-{key}-{rep}")
                print(f"rep {rep} packing {key} {tool}: {r}", flush=True)
                results[key][tool].append(r)
    text = table(results, a)
    v = common.versions()
    try:
        import importlib.metadata as md

        sys.path.insert(0, a.trl_site)
        v["trl"] = md.version("trl")
    except Exception:  # noqa: BLE001 - reported, not needed
        v["trl"] = "not found"
    head = (
        f"## vs_trl: dtrain against TRL SFTTrainer + PEFT, {Path(a.model).name} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        f"{common.device_info().text}; load average at start {load_start}, at end {common.loadavg()}; "
        f"{a.threads} thread(s), one process, fp32 in both (TRL's SFTConfig bf16 default turned off); seq_len {a.seq_len}, micro-batch {a.micro_batch}, LoRA r {a.r} "
        f"all linear layers, {a.records} generated two-turn chats, medians of {a.steps} steps after {a.warmup}, "
        f"{a.reps} repetition(s) alternating the tools; same-batch loss: TRL run 1 step on dtrain's first "
        f"micro-batch as pre-tokenized input_ids + completion_mask; git {common.git_rev()}; "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + "\n\n"
    )
    print(head + text)
    if a.record:
        common.append_results(head + text)
    common.write_json(work / "results.json", results)
    print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
