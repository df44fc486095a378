"""`distill-ray run` end to end on a tiny config, read back from a real MLflow server.

The user's path exactly: the CLI in a subprocess, the oracle teacher on loopback, Ray
Data → LanceDB → Ray Train + DeepSpeed → Ray Serve → eval, tracked in `mlflow server`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow


REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--set", "tasks.synthetic.train_size=240", "--set", "tasks.synthetic.test_size=45",
    "--set", "train.max_steps=16", "--set", "train.checkpoint_every=8", "--set", "train.batch_size=16",
    "--set", "eval.max_new_tokens=48", "--set", "run_name=e2e",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "distill_ray.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def test_run_end_to_end_and_mlflow_readback(tmp_path, mlflow_server):
    common = [*TINY, "--set", f"storage.root={tmp_path}", "--set", f"tracking.uri={mlflow_server.uri}",
              "--set", "tracking.experiment=e2e-test"]
    out = run_cli("run", *common)
    assert "overall" in out.stdout and "synthetic/unit_conversion" in out.stdout
    assert "mlflow server --backend-store-uri" in out.stdout or mlflow_server.uri in out.stdout

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("e2e-test")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "e2e")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "16"
    assert parent.data.params["method.name"] == "std_cot"
    assert 0.0 <= parent.data.metrics["accuracy"] <= 1.0
    assert parent.data.metrics["n"] == 45
    assert any(k.startswith("lancedb.rationales") for k in parent.data.tags)

    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"collect", "train", "eval"}
    collect = children["collect"].data.metrics
    assert collect["rationales.examples"] == 240
    assert collect["rationales.kept"] + collect["rationales.failed"] == 240
    assert collect["rationales.http_requests"] >= 240

    train_metrics = client.get_metric_history(children["train"].info.run_id, "loss")
    assert len(train_metrics) >= 2, "rank 0 logs the loss as training goes"
    assert train_metrics[-1].value < train_metrics[0].value

    ev = children["eval"]
    assert ev.data.metrics["flops_total_mean"] > ev.data.metrics["flops_prefill_mean"] > 0
    assert ev.data.metrics["prompt_tokens_mean"] > 0
    files = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert "predictions.jsonl" in files
    local = client.download_artifacts(ev.info.run_id, "predictions.jsonl", str(tmp_path / "dl"))
    preds = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(preds) == 45 and {"prediction", "correct", "flops_total", "output"} <= set(preds[0])

    # A second collect over the same storage asks the teacher nothing: everything is cached.
    run_cli("collect", *common, "--set", "run_name=e2e-again")
    again = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "e2e-again/collect"][0]
    assert again.data.metrics["rationales.http_requests"] == 0
    assert again.data.metrics["rationales.cache_hits"] == 240
