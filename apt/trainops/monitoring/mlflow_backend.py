"""MLflow: a run in a SQLite store inside the run directory, or a configured tracking URI.

Default URI ``sqlite:///<run dir>/mlflow.db`` (MLflow 3.x keeps the plain ``./mlruns`` file
store behind MLFLOW_ALLOW_FILE_STORE; SQLite needs no server and no flag). Browse it with
``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db``. Artifacts (the summary) go to
<run dir>/mlartifacts unless the tracking server decides otherwise.
"""
from __future__ import annotations

import time

from .backend import MetricsBackend


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class MLflowBackend(MetricsBackend):
    name = "mlflow"

    def open(self, run_dir, trainer) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from apt.core.config import config_to_dict
        cfg = trainer.config
        self.tracking_uri = cfg.monitoring.mlflow_tracking_uri or \
            f"sqlite:///{run_dir.resolve()}/mlflow.db"
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = cfg.monitoring.mlflow_experiment or cfg.output.experiment_name or cfg.name
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(name, artifact_location=(run_dir / "mlartifacts")
                                          .resolve().as_uri())
        run = self.client.create_run(self.experiment_id, run_name=run_dir.name,
                                     tags={"config_hash": cfg.config_hash,
                                           "apt.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in _flatten(config_to_dict(cfg)).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def close(self, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id)
