"""MLflow: one run per training run, in a local file store (<output.dir>/mlruns) unless
logging.mlflow_uri names another tracking store (sqlite:///..., http://...).

MLflow 3 keeps its file store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE
is set; dtrain sets it (only when unset) for its own default store, which needs no database.
The run's parameters are the flattened dtrain config (values cut to MLflow's 500 characters).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dtrain.loggers.base import scalars

PARAM_MAX = 500


class MlflowLogger:
    def __init__(
        self, uri: str | None, default_dir: Path, experiment: str, run_name: str, params: dict[str, Any]
    ) -> None:
        if uri is None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = default_dir.resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        found = self._client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self._client.create_experiment(experiment)
        self.run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        flat = _flatten_params(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, row: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(row).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _flatten_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:PARAM_MAX]
    return out
