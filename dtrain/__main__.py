"""`python -m dtrain` runs the CLI."""

import sys

if sys.argv[1:2] == ["train"]:
    from dtrain.training import preempt

    preempt.install()  # as early as possible: a SIGUSR1 during start-up must not kill the rank

from dtrain.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
