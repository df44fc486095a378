"""Batched MLflow logging against the real tracking server: nothing lost past MLflow's per-request limits."""
from __future__ import annotations

import mlflow
import numpy as np

from distill_ray.config import Config
from distill_ray.tracking import flat_params, log_metrics, log_params


def test_a_whole_config_and_metrics_read_back_in_full(mlflow_server):
    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("tracking-batches")).info.run_id
    params = flat_params(Config())
    assert len(params) > 100  # more than one log_batch request takes
    log_params(client, run_id, params)
    log_metrics(client, run_id, {"accuracy": 0.25, "n": 30, "note": "not a number", "loss": np.float32(1.5)}, step=3)

    data = client.get_run(run_id).data
    assert data.params == params
    assert data.metrics == {"accuracy": 0.25, "n": 30.0, "loss": 1.5}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3]
