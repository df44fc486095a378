"""`distill-ray submit`: send a stage to a Ray cluster as a Ray job.

The resolved config travels in the job's environment (it holds no secrets by design);
the teacher API key must already be in the cluster's environment (a Kubernetes Secret),
never in the runtime env, which the dashboard shows to anyone who can open it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import yaml

from .config import Config
from .ray_session import worker_env

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"
CONFIG_ENV_VAR = "DISTILL_RAY_CONFIG_JSON"


def enable_token_auth() -> None:
    """Ray 2.59+ clusters expect a bearer token; use it when one is available, never turn auth off."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def job_runtime_env(cfg: Config) -> dict:
    env = yaml.safe_load(RUNTIME_ENV.read_text()) or {}
    env["working_dir"] = str(REPO_ROOT)
    env_vars = env.setdefault("env_vars", {})
    for key, value in worker_env(local_paths=False).items():
        env_vars.setdefault(key, value)
    env_vars[CONFIG_ENV_VAR] = json.dumps(cfg.model_dump(mode="json"))
    return env


def submit(args: argparse.Namespace, cfg: Config) -> int:
    # Before Ray is imported: its core reads RAY_AUTH_MODE once, when it loads.
    enable_token_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=f"python jobs/entrypoint.py {args.stage}",
        runtime_env=job_runtime_env(cfg),
        metadata={"run_name": cfg.run_name, "method": cfg.method.name},
    )
    print(f"submitted job {job_id} ({args.stage}) to {args.address}", flush=True)
    if not args.follow:
        print(f"follow it with: ray job logs --address {args.address} --follow {job_id}")
        return 0

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(_tail())
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
