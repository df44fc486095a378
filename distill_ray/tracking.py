"""MLflow: a real tracking server on loopback by default, any tracking URI otherwise.

The driver owns the server process and creates runs; Ray workers only ever talk to it
over HTTP (never to the sqlite file), which is what keeps it correct on many nodes.
"""
from __future__ import annotations

import numbers
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .config import Config


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now; the short window until a server binds it is acceptable locally."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    store_dir: Path
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def ui_command(self) -> str:
        """What a person types to browse the runs after this process is gone."""
        db = (self.store_dir / "mlflow.db").resolve()
        art = (self.store_dir / "artifacts").resolve()
        return (
            f"mlflow server --backend-store-uri sqlite:///{db} --artifacts-destination {art} "
            "--host 127.0.0.1 --port 5000 --workers 1"
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_mlflow_server(store_dir: str | Path, port: int = 0, timeout_s: float = 120.0) -> MlflowServer:
    """Start `mlflow server` (sqlite + proxied local artifacts) on 127.0.0.1 and wait for it."""
    store_dir = Path(store_dir)
    (store_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri", f"sqlite:///{(store_dir / 'mlflow.db').resolve()}",
        "--artifacts-destination", str((store_dir / "artifacts").resolve()),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    # The job runner and extra workers cost ~2.5 GB and 15 s at start; a single run needs neither.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_path = store_dir / "server.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    server = MlflowServer(uri=uri, store_dir=store_dir, process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}: {shlex.join(cmd)}\n{tail}")
        if _healthy(uri):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not become healthy on {uri} within {timeout_s:.0f}s (log: {log_path})")


def tracking_for(cfg: Config) -> MlflowServer:
    """The configured tracking URI, or a fresh local server under <storage.root>/mlflow."""
    store = Path(cfg.storage.root) / "mlflow"
    if cfg.tracking.uri:
        return MlflowServer(uri=cfg.tracking.uri, store_dir=store)
    return start_mlflow_server(store, port=cfg.tracking.port)


def flat_params(cfg: Config) -> dict[str, str]:
    """Every config value as a dotted MLflow param (values truncated to MLflow's limit)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)[:6000]

    walk("", cfg.model_dump(mode="json"))
    return out


# MLflow's per-request limits for log_batch.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Params in batches: a run's whole config is one or two requests, not one per key."""
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Numeric values of `metrics` in batches, one timestamp; anything else is skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, numbers.Real)]
    for i in range(0, len(items), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH])


def nested_run(target: tuple[str, str] | None, suffix: str, tags: dict[str, str] | None = None) -> tuple[str, str] | None:
    """A child of the run `target` = (tracking uri, run id), named `<parent name>/<suffix>`.

    Methods that train several times in one stage (curriculum stages, NesyCD's two students)
    give each training its own run, so step-indexed metrics never overwrite each other.
    """
    if target is None:
        return None
    import mlflow

    uri, parent_id = target
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}/{suffix}",
                            tags={"mlflow.parentRunId": parent_id, **(tags or {})})
    return uri, run.info.run_id


def end_run(target: tuple[str, str] | None) -> None:
    """Mark a run made by `nested_run` finished."""
    if target is not None:
        import mlflow

        mlflow.MlflowClient(tracking_uri=target[0]).set_terminated(target[1])
