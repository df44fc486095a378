"""`run_curriculum`: SKIntern's chained stage training, driven through the curriculum actor.

For each stage not yet done: the actor builds the stage's rows, the driver trains them
with `run_training(name="stage<t>")` starting from the previous stage's final checkpoint
(weights, LoRA adapter, optimizer state), and the actor advances. By default the stages
are segments of one LR schedule (`method.skintern.lr_schedule: continuous`): stage t
starts where stage t-1 left the learning rate, instead of warming up again.
Killing the driver and rerunning the same command resumes at the same stage, and Ray
Train resumes that stage at its last checkpoint (same storage path + name).

Budget: the whole curriculum gets the steps (and time) a single run on the last stage's
rows would get, split evenly over the stages, so it compares with single-run methods
at equal steps.
"""
from __future__ import annotations

from distill_ray.curriculum.actor import CurriculumInputs, curriculum_actor, inputs_from, stage_config
from distill_ray.methods.recipe import TrainJob
from distill_ray.train.checkpoint import read_state
from distill_ray.tracking import end_run, log_metrics, nested_run
from distill_ray.train.trainer import TrainResult, run_training


def say(message: str) -> None:
    print(f"[curriculum] {message}", flush=True)


def curriculum_inputs(job: TrainJob) -> CurriculumInputs:
    """The stages' material from the teacher: kept rationales, and K with its table."""
    teacher = job.ctx.teacher
    if "rationales" not in teacher:
        raise ValueError("skintern: the teacher stage produced no 'rationales'")
    knowledge = teacher.get("knowledge", {})
    return inputs_from(
        questions={ex.id: ex.question for ex in job.examples},
        rationales={i: r["rationale"] for i, r in teacher["rationales"].items()},
        knowledge={i: r.get("text") or "" for i, r in knowledge.items()},
        knowledge_table=job.ctx.tables.get("knowledge"),
        lancedb_uri=job.ctx.cfg.lancedb_uri,
        ids=[ex.id for ex in job.examples],
    )


class _Tracking:
    """The driver's MLflow side: stage, r_t, k_t on the train run; one child run per stage."""

    def __init__(self, target: tuple[str, str] | None):
        self.client = self.run_id = None
        if target:
            import mlflow

            uri, self.run_id = target
            self.uri = uri
            self.client = mlflow.MlflowClient(tracking_uri=uri)

    def stage_run(self, t: int, existing: str | None) -> tuple[str, str] | None:
        if self.client is None:
            return None
        if existing:
            return self.uri, existing  # a resumed stage goes on logging where it left off
        return nested_run((self.uri, self.run_id), f"stage{t}", {"curriculum_stage": str(t)})

    def log_stage(self, t: int, info: dict) -> None:
        if self.client is None:
            return
        values = {"curriculum_stage": t, "curriculum_keep_ratio": info["keep_ratio"],
                  "curriculum_keep_ratio_achieved": info["keep_ratio_achieved"],
                  "curriculum_examples": info["examples"], "curriculum_rows": info["rows"]}
        log_metrics(self.client, self.run_id, values, step=t)

    def end_stage(self, target: tuple[str, str] | None) -> None:
        if self.client is not None:
            end_run(target)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run_curriculum(job: TrainJob) -> TrainResult:
    """Train every remaining stage; returns the last stage's result with curriculum totals."""
    import ray
    import ray.data

    cfg = job.ctx.cfg
    actor = curriculum_actor(cfg, curriculum_inputs(job), job.output_dir)
    state = ray.get(actor.get_state.remote())
    T = len(state["schedule"]["stages"])
    start = state["stage"]
    if 0 < start < T:
        say(f"resuming at stage {start + 1}/{T} (state from {state['restored_from']})")
    tracking = _Tracking(job.mlflow_target)
    for t in range(start, T):
        info = ray.get(actor.build_stage.remote(t))
        plan = ray.get(actor.plan.remote(t))
        say(f"stage {t + 1}/{T}: keep {info['keep_ratio']:.2f} of K (achieved {info['keep_ratio_achieved']:.2f}), "
            f"{_plural(info['examples'], 'demo')}, {info['rows']} rows, {plan['steps']} steps")
        target = tracking.stage_run(t, info.get("mlflow_run_id"))
        carried = ray.get(actor.start_stage.remote(t, target[1] if target else None))
        tracking.log_stage(t, info)
        rows = ray.data.read_parquet(info["rows_path"]).select_columns(["prompt", "target", "weight"])
        result = run_training(
            stage_config(cfg, plan["steps"], plan["time_budget_s"]), rows, output_dir=job.output_dir,
            name=f"stage{t}", mlflow_target=target, init_from=plan["init_from"], checkpoint_state=carried,
            lr_window=plan["lr_window"],
        )
        resumed_from = int(read_state(result.checkpoint_path).get("resumed_from", 0))
        ray.get(actor.finish_stage.remote(t, {
            "checkpoint_path": result.checkpoint_path, "model_dir": result.model_dir,
            "adapter_dir": result.adapter_dir, "steps": result.steps, "resumed_from": resumed_from,
            "metrics": result.metrics,
        }))
        tracking.end_stage(target)
        loss = result.metrics.get("loss")
        say(f"stage {t + 1}/{T} done: {result.steps} steps" + (f", loss {loss:.4f}" if loss is not None else "")
            + (f" (resumed at step {resumed_from})" if resumed_from else ""))
    state = ray.get(actor.get_state.remote())
    ray.kill(actor)  # its work is done; the state stays in storage
    return _result(state)


def _result(state: dict) -> TrainResult:
    stages = [state["stages"][str(t)] for t in range(len(state["schedule"]["stages"]))]
    last = stages[-1]["result"]
    metrics = {k: float(v) for k, v in last["metrics"].items() if isinstance(v, (int, float))}
    metrics.update(
        train_rows=float(stages[-1]["rows"]),
        curriculum_stages=float(len(stages)),
        fit_wall_s=sum(float(s["result"]["metrics"].get("fit_wall_s", 0.0)) for s in stages),
        train_tokens=sum(float(s["result"]["metrics"].get("train_tokens", 0.0)) for s in stages),
    )
    for t, s in enumerate(stages):
        metrics[f"stage{t}_steps"] = float(s["result"]["steps"])
    return TrainResult(
        model_dir=last["model_dir"],
        checkpoint_path=last["checkpoint_path"],
        steps=sum(int(s["result"]["steps"]) for s in stages),
        metrics=metrics,
        adapter_dir=last.get("adapter_dir"),
    )
