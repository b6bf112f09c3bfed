"""User-facing errors: one clear line, exit code 2, no traceback."""


class DtrainError(Exception):
    """An error the user can fix (bad config, missing file, bad data). Printed as one line."""

    exit_code = 2


class ConfigError(DtrainError):
    """A config file or override is invalid."""
