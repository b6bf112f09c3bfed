"""`dtrain generate` (one prompt, or a jsonl of prompts -> a jsonl of outputs) and `dtrain chat`
(interactive) on a base model, the base plus adapters, or a merged model.

  dtrain generate --model smollm2-135m-instruct --adapter runs/quickstart/adapter --prompt "Hi"
  dtrain generate --model DIR --adapter a=DIR_A --adapter b=DIR_B --use b --input p.jsonl --output o.jsonl
  dtrain chat --model DIR --adapter DIR         (commands: /adapter NAME, /base, /reset, /quit)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dtrain.errors import DtrainError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base or merged model: HF directory or built-in name")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="LoRA adapter to load (dtrain's or PEFT's); repeat for several",
    )
    p.add_argument("--use", help="name of the adapter to activate (default: the first loaded)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system prompt (default: the template's own)")
    p.add_argument(
        "--chat-template",
        metavar="TEMPLATE",
        help="Jinja chat template or .jinja file (default: the one the adapter was trained with, else the model's)",
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")


def add_parsers(subparsers) -> None:
    """Register `dtrain generate` and `dtrain chat`."""
    p = subparsers.add_parser("generate", help="generate from a model (+ adapters) for a prompt or a jsonl")
    _common(p)
    p.add_argument("--prompt", help="one prompt (the user turn)")
    p.add_argument("--input", help="jsonl of records with 'prompt' (or 'messages'); with --output")
    p.add_argument("--output", help="jsonl written with each record plus 'output'")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_generate)
    p = subparsers.add_parser("chat", help="interactive chat with a model (+ adapters)")
    _common(p)
    p.set_defaults(func=_chat)
    p = subparsers.add_parser("eval", help="exact-match accuracy of a model (+ adapters) on held-out prompts")
    _common(p)
    p.add_argument(
        "--data",
        required=True,
        help="jsonl: 'messages' ending with the expected assistant turn, or 'prompt' + 'response'",
    )
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--out", help="jsonl written with prompt, expected, got, correct per record")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_eval)


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise DtrainError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise DtrainError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.chat_template is not None and args.no_chat_template:
        raise DtrainError("--chat-template and --no-chat-template: give one of them")
    if (
        args.chat_template is not None
        and args.chat_template.endswith(".jinja")
        and not Path(args.chat_template).is_file()
    ):
        raise DtrainError(f"--chat-template '{args.chat_template}': file not found")


def _load(args: argparse.Namespace):
    from dtrain.inference import generate
    from dtrain.model import hub

    _check(args)
    model_dir = hub.model_dir(args.model, "--model")
    model, tok = generate.load(model_dir, args.adapter, args.use, args.dtype, chat_template=args.chat_template)
    sampling = generate.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return generate.Generator(model, tok, not args.no_chat_template, args.system), sampling


def _generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input is None):
        raise DtrainError("dtrain generate: give either --prompt TEXT or --input FILE.jsonl")
    if args.input is not None and args.output is None:
        raise DtrainError("--input needs --output FILE.jsonl")
    if args.output is not None and Path(args.output).exists():
        raise DtrainError(f"--output '{args.output}': file exists (choose a new name)")
    records = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(Path(args.input))
    gen, sampling = _load(args)
    outputs = gen.generate([r.get("messages") or r["prompt"] for r in records], sampling, args.batch_size)
    if args.output is None:
        print(outputs[0])
        return 0
    from dtrain.storage import files

    lines = [json.dumps({**r, "output": o}, ensure_ascii=False) for r, o in zip(records, outputs)]
    files.write_text_atomic(Path(args.output), "\n".join(lines) + "\n")
    print(f"{len(outputs)} output(s) written to {args.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dtrain.inference import evaluate
    from dtrain.storage import files

    if args.out is not None and Path(args.out).exists():
        raise DtrainError(f"--out '{args.out}': file exists (choose a new name)")
    records = evaluate.read_jsonl(Path(args.data), args.limit)
    evaluate.expected_pairs(records, f"--data '{args.data}'")  # bad records fail before the model loads
    gen, sampling = _load(args)
    result = evaluate.exact_match(gen, records, sampling, f"--data '{args.data}'")
    if args.out is not None:
        lines = [json.dumps(r, ensure_ascii=False) for r in result.records]
        files.write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print(json.dumps({"exact_match": result.accuracy, "correct": result.correct, "total": result.total}))
    return 0


def read_prompts(path: Path) -> list[dict]:
    """Records of a prompts jsonl: each needs a non-empty 'prompt' string or a 'messages' list."""
    if not path.is_file():
        raise DtrainError(f"--input '{path}': file not found")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DtrainError(f"--input '{path}': line {i}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not (
            isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)
        ):
            raise DtrainError(f"--input '{path}': line {i}: needs a 'prompt' string or a 'messages' list")
        records.append(rec)
    if not records:
        raise DtrainError(f"--input '{path}': no records")
    return records


def _chat(args: argparse.Namespace) -> int:
    from dtrain.lora import ops as lora

    gen, sampling = _load(args)
    history: list[dict] = []
    print("dtrain chat: /adapter NAME, /base, /reset, /quit", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            continue
        if text.startswith("/adapter ") or text == "/base":
            _switch(gen.model, lora, text)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = gen.generate([history], sampling)[0]
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def _switch(model, lora, command: str) -> None:
    layers = [m for _, m in lora.lora_modules(model)]
    if command == "/base":
        for m in layers:
            m.active_adapter = None
        print("(base model)", file=sys.stderr)
        return
    name = command.split(maxsplit=1)[1]
    try:
        lora.set_adapter(model, name)
        print(f"(adapter {name})", file=sys.stderr)
    except DtrainError as e:
        print(f"dtrain: {e}", file=sys.stderr)
