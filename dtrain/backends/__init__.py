"""Backends: how the model is placed, sharded and stepped. The trainer sees only `Backend`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtrain.config.schema import Config
from dtrain.errors import ConfigError

if TYPE_CHECKING:  # the package itself stays light: dtrain.backends.launcher is read before torch
    from dtrain.backends.base import Backend
    from dtrain.backends.env import DistEnv


def create(cfg: Config, env: DistEnv) -> Backend:
    """The backend named by `backend.name`."""
    name = cfg.backend.name
    if name == "none":
        if env.world_size > 1:
            raise ConfigError(
                f"backend.name = none runs on one process, but the launcher started {env.world_size}; "
                "use fsdp or deepspeed"
            )
        from dtrain.backends.single import SingleBackend

        return SingleBackend(cfg, env)
    if name == "fsdp":
        from dtrain.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, env)
    from dtrain.backends.deepspeed import DeepSpeedBackend

    return DeepSpeedBackend(cfg, env)
