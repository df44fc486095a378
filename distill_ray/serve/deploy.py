"""Start Ray Serve, deploy a student behind the OpenAI API, and hand back its base URL."""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
from ray import serve
from ray.serve.deployment import Application

from distill_ray.config import Config, ServeConfig
from distill_ray.ray_session import ensure_ray
from distill_ray.serve.app import build_app
from distill_ray.tracking import free_port

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")


def _client_host(host: str) -> str:
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _route_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise ValueError(f"serve.route_prefix: must start with '/' (got {prefix!r})")
    return "/" + prefix.strip("/") if prefix.strip("/") else "/"


def _resolve_model_dir(cfg: Config, model_dir: str) -> str:
    """An absolute path for a local directory (replicas do not share our working dir)."""
    if not model_dir:
        raise ValueError("model_dir: empty")
    path = os.path.abspath(os.path.expanduser(model_dir))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model_dir {model_dir}: no config.json; expected a directory saved with save_pretrained")
        return path
    looks_like_hub_id = model_dir.count("/") == 1 and not model_dir.startswith((".", "/", "~"))
    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")) and not looks_like_hub_id:
        raise FileNotFoundError(f"model_dir {model_dir}: no such directory")
    return model_dir  # a hub id, or a path that exists on the cluster's nodes


def _serve_client():
    """The running Serve's client, or None when no controller is up."""
    try:
        return serve.context._get_global_client(raise_if_no_controller_running=False)
    except Exception:  # a stale client from a dead cluster: treat as not running
        return None


def _start_serve(cfg: ServeConfig) -> int:
    """The port Serve's proxy listens on; an already running Serve keeps its own options."""
    client = _serve_client()
    if client is not None:
        port = client.http_config.port
        if cfg.port not in (0, port):
            logger.warning("Serve already listens on port %d; serve.port=%d is ignored", port, cfg.port)
        return port
    port = cfg.port or free_port(cfg.host)
    serve.start(http_options={"host": cfg.host, "port": port})
    return port


def _failure_reason(app_name: str) -> str:
    """The replica's own exception line(s), which Serve buries under a generic message."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the status is only a better message; never hide the original failure
        return ""
    for deployment in app.deployments.values() if app else ():
        lines = (deployment.message or "").strip().splitlines()
        starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
        if starts:
            return " ".join(line.strip() for line in lines[starts[-1]:])[:600]
    return ""


def _wait_until_running(app_name: str, timeout_s: float) -> None:
    """Every deployment of the app up, not just its ingress: a composed app's front answers
    /models while the student behind it may still wait for CPUs that never free up."""
    deadline = time.monotonic() + timeout_s
    waiting = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"student server {app_name!r} failed to start: {_failure_reason(app_name) or app.message}")
        if app is not None:
            waiting = ", ".join(f"{name} {d.status}" for name, d in app.deployments.items() if d.status != "HEALTHY")
        time.sleep(0.25)
    raise TimeoutError(f"Serve app {app_name!r} not running within {timeout_s:.0f} s (waiting for: {waiting or 'the app'}); "
                       "are there enough free CPUs/GPUs for every replica (serve.replica_cpus, serve.num_replicas)?")


def _wait_until_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/models", timeout=5.0)
            if reply.status_code == 200:
                return
            last = f"HTTP {reply.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise TimeoutError(f"student server at {url} did not answer /models within {timeout_s:.0f} s ({last})")


def deploy_student(
    cfg: Config,
    model_dir: str,
    *,
    app_name: str = "student",
    blocking: bool = False,
    route_prefix: str | None = None,
    app: Callable[[Config, str], Application] | None = None,
) -> str:
    """Serve `model_dir` as `cfg.serve.model_name`; returns the base URL, e.g. http://127.0.0.1:8000/v1.

    `route_prefix` (default `cfg.serve.route_prefix`) lets several students share one Serve
    instance under different prefixes. `app` builds a method's own application around the
    student (a recipe's `serve_app`); default the plain student. With `blocking`, serves until Ctrl-C, then removes the app.
    """
    model_dir = _resolve_model_dir(cfg, model_dir)
    prefix = _route_prefix(route_prefix or cfg.serve.route_prefix)
    ensure_ray(cfg)
    port = _start_serve(cfg.serve)
    try:
        application = app(cfg, model_dir) if app is not None else build_app(cfg.serve, model_dir)
        serve.run(application, name=app_name, route_prefix=prefix, blocking=False)
    except RuntimeError as e:
        raise RuntimeError(f"student server {app_name!r} for {model_dir} failed to start: {_failure_reason(app_name) or e}") from e
    url = f"http://{_client_host(cfg.serve.host)}:{port}{prefix.rstrip('/')}/v1"
    _wait_until_running(app_name, READY_TIMEOUT_S)
    _wait_until_ready(url, READY_TIMEOUT_S)
    logger.info("serving %s as %r at %s", model_dir, cfg.serve.model_name, url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(app_name)
    return url


def shutdown_serve() -> None:
    """Stop every Serve app and the proxy; Ray itself keeps running."""
    serve.shutdown()


def remove_student(app_name: str = "student") -> None:
    """Take one app down, leaving Serve (and anyone else's apps) running."""
    serve.delete(app_name)


_session_depth = 0


@contextmanager
def serve_session() -> Iterator[None]:
    """Serve started inside stays up until the outermost session ends, then stops.

    A comparison deploys one student per method: starting Serve's controller and proxy
    once instead of once per method saves seconds each. A Serve that was already running
    (a shared cluster, a test's) is left as it was.
    """
    global _session_depth
    was_running = _session_depth > 0 or _serve_client() is not None
    _session_depth += 1
    try:
        yield
    finally:
        _session_depth -= 1
        if not was_running and _serve_client() is not None:
            serve.shutdown()
