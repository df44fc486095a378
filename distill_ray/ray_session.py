"""Start or join Ray with the environment every worker process needs."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .config import Config


# Set by Ray in the driver of a submitted job, whose runtime env then governs every worker.
JOB_ENV_MARKER = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env(local_paths: bool = True) -> dict[str, str]:
    """Env vars shipped to every Ray worker (no secrets here: runtime envs are visible in the dashboard).

    `local_paths=False` leaves out paths of this machine, for a job bound for another one.
    """
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        # Stages print their own progress lines; per-operator bars from every worker drown them.
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    if local_paths:
        # DeepSpeed's JIT-built CPU comm op is cached here by `make install`; reuse it.
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return env


def init_ray(cfg: Config) -> None:
    """Start Ray here, or join the configured cluster (or the one a Ray job runs in)."""
    import ray

    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
    kwargs: dict = {"namespace": cfg.cluster.namespace, "log_to_driver": True}
    if JOB_ENV_MARKER not in os.environ:
        # Inside a job Ray refuses a second runtime env: `submit` put these into the job's.
        kwargs["runtime_env"] = {"env_vars": worker_env()}
    # Inside a Ray job, RAY_ADDRESS points at the cluster the job was submitted to.
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        # A Ray started here is this machine alone: nothing in it gets preempted, and Ray
        # Train's preemption watcher would only be one more process to start per fit.
        # Ray Train passes the driver's setting on to its controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The dashboard also backs the State API, which Ray Train's cleanup thread polls.
        kwargs.update(num_cpus=cfg.cluster.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    context = ray.init(**kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if context.dashboard_url:
        print(f"[distill-ray] Ray dashboard: http://{context.dashboard_url}", flush=True)


def ensure_ray(cfg: Config) -> None:
    """For a stage called on its own: reuse a running Ray, else start one that stays up."""
    import ray

    if not ray.is_initialized():
        init_ray(cfg)


@contextmanager
def ray_session(cfg: Config):
    """`ray.init` for the run and `ray.shutdown` after, unless Ray was already up (tests, jobs)."""
    import ray

    if ray.is_initialized():
        yield
        return
    init_ray(cfg)
    try:
        yield
    finally:
        ray.shutdown()
