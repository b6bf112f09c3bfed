"""User-facing errors: one clear line, exit code 2, no traceback."""


class DtrainError(Exception):
    """An error the user can fix (bad config, missing file, bad data). Printed as one line."""

    exit_code = 2
    # Under a launcher every rank reads the same config and data and raises the same error, so
    # only rank 0 prints it. An error that happened on this rank alone sets `local` (backends/collectives.together).
    local = False


class ConfigError(DtrainError):
    """A config file or override is invalid."""


class DiskFull(DtrainError):
    """No space left on the device a checkpoint is written to (exit 1: not a config error)."""

    exit_code = 1
