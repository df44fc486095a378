"""The run: tasks → teacher stage → LanceDB → train → serve → eval, under one MLflow parent run.

Each stage is a function the CLI can also call on its own; stages hand each other data
only through storage (LanceDB tables, checkpoint dirs), so any of them can be rerun.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from .config import Config, ConfigError
from .methods import get_recipe
from .methods.recipe import MethodContext, Recipe, TrainJob
from .ray_session import ray_session
from .tasks.record import Example
from .tasks.sources import load_tasks
from .teacher.endpoint import teacher_endpoint
from .tracking import MlflowServer, flat_params, log_metrics, log_params, tracking_for


STUDENT_POINTER = "student.json"


@dataclass
class RunContext:
    cfg: Config
    tracking: MlflowServer
    client: mlflow.MlflowClient
    experiment_id: str
    parent_run_id: str
    recipe: Recipe
    train: list[Example]
    test: list[Example]
    summary: dict = field(default_factory=dict)

    def child_run(self, stage: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.cfg.run_name}/{stage}",
            tags={"mlflow.parentRunId": self.parent_run_id, "stage": stage},
        )
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        log_metrics(self.client, run_id, metrics)


def _experiment(client: mlflow.MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def serve_session():
    """`serve.deploy.serve_session`, imported late: Serve's import is heavy and collect and
    train need none of it."""
    from .serve.deploy import serve_session as session

    return session()


@contextmanager
def run_context(cfg: Config):
    """Ray, the tracking server and the parent MLflow run, torn down in reverse order."""
    try:
        train, test = load_tasks(cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tasks: {e}") from None
    with ExitStack() as stack:
        stack.enter_context(teacher_endpoint(cfg))  # first: a bad teacher URL fails before Ray starts
        stack.enter_context(ray_session(cfg))
        stack.enter_context(serve_session())
        server = stack.enter_context(tracking_for(cfg))
        client = mlflow.MlflowClient(server.uri)
        experiment_id = _experiment(client, cfg.tracking.experiment)
        parent = client.create_run(experiment_id, run_name=cfg.run_name, tags={"method": cfg.method.name})
        log_params(client, parent.info.run_id, flat_params(cfg))
        ctx = RunContext(cfg, server, client, experiment_id, parent.info.run_id, get_recipe(cfg.method.name), train, test)
        status = "FAILED"
        try:
            yield ctx
            status = "FINISHED"
        finally:
            client.set_terminated(ctx.parent_run_id, status=status)


def stage_collect(ctx: RunContext) -> MethodContext:
    """Everything the recipe needs from the teacher, keyed by need then example id."""
    from .teacher.needs import collect_need

    outputs: dict[str, dict[str, dict]] = {}
    tables: dict[str, str] = {}
    run_id = ctx.child_run("collect")
    for need in ctx.recipe.needs:
        result = collect_need(need, ctx.cfg, ctx.train)
        outputs[need], tables[need] = result.by_id, result.table
        ctx.log_metrics(run_id, {f"{need}.{k}": v for k, v in result.stats.items()})
        for table, version in result.versions.items():
            ctx.client.set_tag(ctx.parent_run_id, f"lancedb.{table}.version", str(version))
            ctx.client.set_tag(run_id, f"lancedb.{table}.version", str(version))
    ctx.client.set_terminated(run_id)
    return MethodContext(ctx.cfg, outputs, tables)


def _train_once(job: TrainJob, recipe: Recipe):
    """The common schedule: one Ray Train run on the recipe's rows."""
    from .train.trainer import run_training

    rows = [r.as_dict() for r in recipe.train_rows(job.examples, job.ctx)]
    if not rows:
        raise RuntimeError(f"train: method {recipe.name!r} built no training rows from the teacher's outputs")
    result = run_training(job.ctx.cfg, rows, output_dir=job.output_dir, name=recipe.name, mlflow_target=job.mlflow_target)
    result.metrics["train_rows"] = len(rows)
    return result


def stage_train(ctx: RunContext, method_ctx: MethodContext):
    run_id = ctx.child_run("train")
    job = TrainJob(method_ctx, ctx.train, str(Path(ctx.cfg.run_dir).resolve() / "train"), (ctx.tracking.uri, run_id))
    result = ctx.recipe.train(job) if ctx.recipe.train else _train_once(job, ctx.recipe)
    ctx.log_metrics(run_id, {f"final_{k}": v for k, v in result.metrics.items()})
    ctx.client.set_tag(run_id, "model_dir", result.model_dir)
    ctx.client.set_terminated(run_id)
    ctx.summary["train"] = {"rows": int(result.metrics.get("train_rows", 0)), "steps": result.steps, **result.metrics}
    Path(ctx.cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(ctx.cfg.run_dir) / STUDENT_POINTER).write_text(json.dumps({"model_dir": result.model_dir}))
    return result


def trained_model_dir(cfg: Config) -> str:
    """The student the last `train` of this run produced (stages meet through storage)."""
    pointer = Path(cfg.run_dir) / STUDENT_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"no trained student for run {cfg.run_name!r}: run `distill-ray train` first ({pointer} missing)")
    return json.loads(pointer.read_text())["model_dir"]


def stage_eval(ctx: RunContext, model_dir: str, method_ctx: MethodContext):
    from .evaluate.stage import evaluate_endpoint, log_evaluation
    from .serve.deploy import deploy_student, remove_student

    run_id = ctx.child_run("eval")
    for key, value in (ctx.recipe.lineage(ctx.cfg) if ctx.recipe.lineage else {}).items():
        ctx.client.set_tag(run_id, key, value)  # e.g. the KB version the served method reads
    started = time.monotonic()
    base_url = deploy_student(ctx.cfg, model_dir, app=ctx.recipe.serve_app)
    try:
        report = evaluate_endpoint(ctx.cfg, ctx.test, ctx.recipe, base_url, model_dir, method_ctx)
    finally:
        remove_student()
    log_evaluation(ctx.client, run_id, report)
    # Beside the MLflow artifact, in the run dir, for scripts that slice results their own way.
    Path(ctx.cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(ctx.cfg.run_dir) / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in report.predictions))
    ctx.log_metrics(ctx.parent_run_id, report.metrics)
    ctx.client.log_metric(run_id, "eval_wall_s", time.monotonic() - started)
    ctx.client.set_terminated(run_id)
    ctx.summary["eval"] = report
    return report


def run_pipeline(cfg: Config) -> dict:
    """All stages; returns the summary the CLI prints."""
    started = time.monotonic()
    with run_context(cfg) as ctx:
        print(f"[distill-ray] run {cfg.run_name}: method {cfg.method.name}, "
              f"{len(ctx.train)} train / {len(ctx.test)} test examples, MLflow at {ctx.tracking.uri}", flush=True)
        method_ctx = stage_collect(ctx)
        result = stage_train(ctx, method_ctx)
        stage_eval(ctx, result.model_dir, method_ctx)
        ctx.summary.update(
            wall_s=time.monotonic() - started, mlflow_uri=ctx.tracking.uri, ui_command=ctx.tracking.ui_command,
            parent_run_id=ctx.parent_run_id, experiment=cfg.tracking.experiment,
        )
        ctx.client.log_metric(ctx.parent_run_id, "wall_s", ctx.summary["wall_s"])
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(_jsonable(ctx.summary), indent=2))
        return ctx.summary


def _jsonable(summary: dict) -> dict:
    out = dict(summary)
    if "eval" in out:
        out["eval"] = out["eval"].metrics
    return out
