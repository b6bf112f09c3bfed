"""The `dtrain` command line: `app` builds the parser and dispatches; one module per command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """The entry point of the `dtrain` script and of `python -m dtrain`."""
    if (sys.argv[1:] if argv is None else argv)[:1] == ["train"]:
        from dtrain.training import preempt

        preempt.install()  # first of all: a SIGUSR1 while the CLI is still importing must not kill the rank
    from dtrain.cli.app import main as run

    return run(argv)
