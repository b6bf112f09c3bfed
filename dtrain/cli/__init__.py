"""The `dtrain` command line: `app` builds the parser and dispatches; one module per command."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `dtrain` script's entry point (pyproject's `dtrain.cli:main`)."""
    from dtrain.cli.app import main as run  # imported on call: the package import stays free of torch

    return run(argv)
