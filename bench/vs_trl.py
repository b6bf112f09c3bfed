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

WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government number "
         "night point home water room mother area money story fact month lot right study book eye job word "
         "business issue side kind head house service friend father power hour game line end member law car "
         "city community name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason research girl guy "
         "moment air teacher force education").split()


def chats(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [(say(rng.randint(5, 40)), say(rng.randint(5, 120))) for _ in range(n)]


def write_data(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """(messages jsonl for dtrain, prompt-completion jsonl for TRL) of the same chats."""
    msgs, pc = work / "messages.jsonl", work / "prompt_completion.jsonl"
    pairs = chats(n, seed)
    msgs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": c}]}) + "\n" for p, c in pairs))
    pc.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                      "completion": [{"role": "assistant", "content": c}]}) + "\n" for p, c in pairs))
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


def run_dtrain(a, msgs: Path, packing: bool, work: Path, tag: str) -> dict:
    out = work / f"dtrain-{tag}"
    cfg = work / "dtrain.yaml"
    cfg.write_text(f"model:\n  path: {a.model}\n")
    overrides = [f"data.path={msgs}", "data.format=messages", f"data.seq_len={a.seq_len}",
                 f"data.packing={str(packing).lower()}", "data.eval_fraction=0.0", f"data.cache_dir={work / 'cache'}",
                 f"lora.r={a.r}", f"lora.alpha={2 * a.r}", "lora.targets=all-linear", "lora.dropout=0.0",
                 f"training.micro_batch_size={a.micro_batch}", f"training.max_steps={a.warmup + a.steps}",
                 "training.warmup_steps=0", "training.min_lr_ratio=1.0", f"training.lr={a.lr}", "training.eval_every=0",
                 f"training.seed={a.seed}", "backend.name=none", "backend.device=cpu", f"output.dir={out}",
                 "output.overwrite=true", "logging.loss_curve=false", *a.set]
    env = common.child_env(False) | {"OMP_NUM_THREADS": str(a.threads)}
    rc, rss, text = run_measured([common.PY, "-m", "dtrain", "train", str(cfg), *overrides], env, work / f"{tag}.log",
                                 a.timeout)
    if rc != 0:
        return {"error": common.error_line(work / f"{tag}.log")}
    rows = [r for r in common.read_jsonl(out / "metrics.jsonl") if "loss" in r and "tokens_per_s" in r]
    timed = rows[a.warmup:]
    return {"tok_s": common.median([r["tokens_per_s"] for r in timed]), "rss_mib": rss,
            "real_share": common.median([1 - r["padding_fraction"] for r in timed]), "first_loss": rows[0]["loss"],
            "steps": len(timed)}


def run_trl(a, pc: Path, packing: bool, work: Path, tag: str) -> dict:
    env = common.child_env(False) | {"OMP_NUM_THREADS": str(a.threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(a.trl_site).resolve()), env["PYTHONPATH"]])
    cmd = [common.PY, str(common.BENCH / "trl_worker.py"), "--model", a.model, "--data", str(pc), "--out",
           str(work / f"trl-{tag}"), "--packing", str(int(packing)), "--steps", str(a.warmup + a.steps),
           "--seq-len", str(a.seq_len), "--micro-batch", str(a.micro_batch), "--r", str(a.r), "--lr", str(a.lr),
           "--seed", str(a.seed)]
    rc, rss, text = run_measured(cmd, env, work / f"{tag}.log", a.timeout)
    line = next((ln for ln in text.splitlines() if ln.startswith("VS_TRL ")), None)
    if rc != 0 or line is None:
        return {"error": text.strip().splitlines()[-1][:300] if text.strip() else f"exit {rc}"}
    got = json.loads(line[len("VS_TRL "):])
    rates = [t / s for t, s in zip(got["tokens"], got["step_s"])][a.warmup:]
    share = [t / (a.micro_batch * a.seq_len) for t in got["tokens"]][a.warmup:] if packing else None
    return {"tok_s": common.median(rates), "rss_mib": rss, "real_share": common.median(share) if share else None,
            "first_loss": got["losses"][0], "steps": len(rates)}


def fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: dict, a) -> str:
    """Markdown: per packing setting, each repetition's rates, the medians' ratio, RSS, real share."""
    lines = ["| packing | dtrain real tok/s | TRL real tok/s | dtrain / TRL | peak RSS MiB dtrain / TRL | "
             "real-token share dtrain / TRL | first-step loss dtrain / TRL |", "|---|---:|---:|---:|---:|---:|---:|"]
    for packing, runs in results.items():
        d = [r for r in runs["dtrain"] if "tok_s" in r]
        t = [r for r in runs["trl"] if "tok_s" in r]
        if not d or not t:
            errs = [r["error"] for r in runs["dtrain"] + runs["trl"] if "error" in r]
            lines.append(f"| {packing} | failed: {errs[:1]} | | | | | |")
            continue
        dm, tm = common.median([r["tok_s"] for r in d]), common.median([r["tok_s"] for r in t])
        lines.append(
            f"| {packing} | {', '.join(fmt(r['tok_s']) for r in d)} | {', '.join(fmt(r['tok_s']) for r in t)} | "
            f"{dm / tm:.2f}x | {max(r['rss_mib'] for r in d):,.0f} / {max(r['rss_mib'] for r in t):,.0f} "
            f"({max(r['rss_mib'] for r in d) / max(r['rss_mib'] for r in t):.2f}x) | "
            f"{fmt(d[0]['real_share'], '.1%')} / {fmt(t[0]['real_share'], '.1%')} | "
            f"{d[0]['first_loss']:.4f} / {t[0]['first_loss']:.4f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name or a model directory")
    p.add_argument("--packing", choices=["on", "off", "both"], default="both")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
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
    head = (f"## vs_trl: dtrain against TRL SFTTrainer + PEFT, {Path(a.model).name} "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"{common.device_info().text}; load average at start {load_start}, at end {common.loadavg()}; "
            f"{a.threads} threads, one process, fp32; seq_len {a.seq_len}, micro-batch {a.micro_batch}, LoRA r {a.r} "
            f"all linear layers, {a.records} generated two-turn chats, medians of {a.steps} steps after {a.warmup}, "
            f"{a.reps} repetition(s) alternating the tools; git {common.git_rev()}; "
            + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n\n")
    print(head + text)
    if a.record:
        common.append_results(head + text)
    common.write_json(work / "results.json", results)
    print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
