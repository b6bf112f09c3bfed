"""`dtrain` command line: train | memory | estimate | merge | slurm | config | env."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dtrain.backends import launcher
from dtrain.errors import DtrainError

Command = Callable[[argparse.Namespace], int]


def _train(args: argparse.Namespace) -> int:
    from dtrain.model import sources  # the preemption handler is in place already (dtrain.cli.main)

    cfg = sources.load_config(args.config, args.overrides)  # light imports: config errors come back fast
    from dtrain.storage import outdir

    outdir.check_run_dir(cfg)  # every rank, before any writes: an earlier run is never lost
    from dtrain.training import trainer

    return trainer.run(cfg)


def _config(args: argparse.Namespace) -> int:
    from dtrain.config import schema as config
    from dtrain.model import sources

    if args.config:
        cfg = sources.load_config(args.config, args.overrides)
        print(config.yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
        return 0
    for key, default, help_ in config.describe_schema():
        print(f"{key:32} {default:28} {help_}")
    return 0


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, typed by the schema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description="Distributed LoRA training.")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed`
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA adapter (or fully fine-tune) from a config")
    _add_config_args(p)
    p.set_defaults(func=_train)
    p = sub.add_parser("config", help="print the resolved config, or the schema with defaults")
    _add_config_args(p, required=False)
    p.set_defaults(func=_config)
    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands() -> list[Callable]:
    """Subcommands living in their own modules: each registers a sub-parser that sets `func`."""
    from dtrain.cli import (
        analyze as analyze_cli,
        download as download_cli,
        env as env_cli,
        estimate as estimate_cli,
        generate as generate_cli,
        import_model as import_cli,
        memory as measure_cli,
        merge as merge_cli,
        plan as plan_cli,
        slurm,
        verify as verify_cli,
    )

    return [
        measure_cli.add_parser,
        estimate_cli.add_estimate_parser,
        plan_cli.add_parser,
        merge_cli.add_parser,
        slurm.add_slurm_parser,
        import_cli.add_parser,
        generate_cli.add_parsers,
        env_cli.add_parser,
        analyze_cli.add_parser,
        verify_cli.add_parser,
        download_cli.add_parser,
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = 1
    try:
        code = _run(args)
    finally:
        if launcher.is_multi_process():
            import traceback

            from dtrain.backends.env import exit_now

            if sys.exc_info()[0] is not None:
                traceback.print_exc()  # a bug in dtrain: show it, then leave without the teardown
            exit_now(code)  # a rank of a multi-process run: skip the interpreter teardown
    return code


def _run(args: argparse.Namespace) -> int:
    """The command's exit code; errors a user can cause become one line on stderr."""
    try:
        return int(args.func(args) or 0)
    except DtrainError as e:
        if launcher.rank() == 0 or e.local:  # every rank raises the same error: one line, not one per rank
            for line in str(e).splitlines() or [""]:  # several findings (resume checks): one line each
                print(f"dtrain: error: {line}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("dtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
