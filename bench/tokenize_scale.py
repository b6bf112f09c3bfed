"""Tokenization at scale: N generated two-turn conversations with the real SmolLM2-135M-Instruct
tokenizer and chat template (format messages).

  flock /work/locks/heavy.lock python bench/tokenize_scale.py --records 1000000 [--procs 1 2] [--write]

Prints, per row: records/s, CPU seconds (the process and its workers: records per CPU second do
not depend on the machine's other load as wall time does) and the peak RSS of the tokenizing process (VmHWM) and of its largest
worker; the per-record path dtrain had before (chat.encode_chat one conversation at a time) on the
first --baseline records; and a second run reading the token cache. Each measurement is its own
process (a fresh peak RSS). --write appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_results, device_info, loadavg, versions  # noqa: E402

WORDS = (
    "the a owl hen fox river stone light quick blue red green seven nine tree house why when "
    "which number answer question small large first last morning evening garden window"
).split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    """n conversations: a user question of 8-30 words, an assistant answer of 15-60 words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 60))) + "."
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )


def _cfg(data: Path, cache: Path, procs: int):
    from dtrain.config.schema import DataConfig

    return DataConfig(
        path=str(data), format="messages", seq_len=256, num_proc=procs, cache_dir=str(cache), eval_fraction=0.0
    )


def _tokenizer():
    from dtrain.model import importer
    from dtrain.model.tokenizer import load_tokenizer

    return load_tokenizer(importer.resolve("smollm2-135m-instruct"), None)


def _peaks() -> dict:
    self_kib = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
    return {
        "peak_rss_mib": round(self_kib / 1024, 1),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def worker(mode: str, data: Path, cache: Path, procs: int, limit: int) -> dict:
    """One measurement in this process: 'old' (per record), 'new' (cache.build), 'hit' (prepare on a hit)."""
    from dtrain import data as data_lib
    from dtrain.data import cache as cache_lib, chat

    tok, cfg = _tokenizer(), _cfg(data, cache, procs)
    recs = [json.loads(line) for _, line in zip(range(limit if mode == "old" else 0), open(data))]
    t0, c0 = time.perf_counter(), _cpu()
    if mode == "old":
        for r in recs:
            chat.encode_chat(tok, tok.chat_template, r["messages"])
        n = len(recs)
    elif mode == "new":
        k = cache_lib.key([cfg], tok)
        n = cache_lib.build(Path(cache), k, [cfg], tok, progress=False)[0].counts["records"]
    else:
        prep = data_lib.prepare(cfg, tok, seed=0)
        assert prep.cache_hit
        n = len(prep.train)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    return {
        "mode": mode,
        "num_proc": procs,
        "records": n,
        "seconds": round(dt, 2),
        "records_per_s": round(n / dt, 1),
        "cpu_s": round(cpu, 2),
        "records_per_cpu_s": round(n / cpu),
        **_peaks(),
    }


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the tokenizing workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def per_core(data: Path, n: int, rounds: int = 3) -> list[dict]:
    """Records per CPU second (time.process_time of this process, so other jobs on the machine do
    not enter the figure) of the per-record path and of encode_part (what a worker does to a chunk:
    render, tokenize, label, truncate, append), alternating, best of `rounds`, on the same n records."""
    from dtrain.data import chat
    from dtrain.data.encode import encode_part

    tok, cfg = _tokenizer(), _cfg(data, data.parent / "unused", 1)
    with open(data) as f:
        recs = [json.loads(line) for _, line in zip(range(n), f)]
    paths = {
        "per record": lambda: [chat.encode_chat(tok, tok.chat_template, r["messages"]) for r in recs],
        "batched": lambda: encode_part(cfg, recs, tok, 0),
    }
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, f in paths.items():
            t0 = time.process_time()
            f()
            best[name] = min(best[name], time.process_time() - t0)
    return [
        {
            "path": name,
            "records": n,
            "cpu_s": round(s, 3),
            "records_per_cpu_s": round(n / s),
            "vs_per_record": round(best["per record"] / s, 2),
        }
        for name, s in best.items()
    ]


def run(mode: str, data: Path, cache: Path, procs: int, limit: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--procs",
        str(procs),
        "--baseline",
        str(limit),
    ]
    # a fresh datasets cache per run: every first run pays the jsonl -> Arrow conversion, as a user's does
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(cache) + "-datasets",
        "HF_HUB_OFFLINE": "1",
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], n: int, load: str) -> str:
    lines = [
        f"## Tokenization at scale: {n:,} two-turn conversations, SmolLM2 tokenizer + chat template",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {device_info().name}; "
        f"load average at start {load}; `python bench/tokenize_scale.py --records {n}`; "
        f"versions {json.dumps(versions())}",
        "",
        "| path | num_proc | records | seconds | records/s | CPU s | records per CPU s | peak RSS MiB (main) "
        "| peak RSS MiB (worker) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"old": "per record (before)", "new": "batched, sharded", "hit": "second run: token cache hit"}
    for r in rows:
        lines.append(
            f"| {names[r['mode']]} | {r['num_proc']} | {r['records']:,} | {r['seconds']} | "
            f"{r['records_per_s']:,} | {r['cpu_s']} | {r['records_per_cpu_s']:,} | {r['peak_rss_mib']} | "
            f"{r['worker_peak_rss_mib']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--baseline", type=int, default=20_000, help="records timed on the per-record path")
    p.add_argument("--write", action="store_true")
    p.add_argument("--per-core", type=int, default=0, help="only the per-CPU-second comparison, on this many records")
    p.add_argument("--worker"), p.add_argument("--data"), p.add_argument("--cache")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), Path(args.cache), args.procs[0], args.baseline)))
        return
    load = loadavg()
    if args.per_core:
        with tempfile.TemporaryDirectory(prefix="dtrain-tokbench-") as tmp:
            make_data(Path(tmp) / "c.jsonl", args.per_core)
            for row in per_core(Path(tmp) / "c.jsonl", args.per_core):
                print(json.dumps(row), flush=True)
        print(f"load average at start {load}, at the end {loadavg()}")
        return
    with tempfile.TemporaryDirectory(prefix="dtrain-tokbench-") as tmp:
        data = Path(tmp) / "conversations.jsonl"
        make_data(data, args.records)
        rows = [run("old", data, Path(tmp) / "unused", 1, args.baseline)]
        for k, procs in enumerate(args.procs):
            rows.append(run("new", data, Path(tmp) / f"cache{procs}", procs, 0))
            if k == 0:  # the cache of the first run, read by a second run
                rows.append(run("hit", data, Path(tmp) / f"cache{procs}", procs, 0))
    text = table(rows, args.records, load)
    print(text)
    if args.write:
        append_results(text)


if __name__ == "__main__":
    main()
