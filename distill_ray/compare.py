"""`distill-ray compare`: several methods on the same data, student and step budget.

One teacher endpoint, one Ray session and one MLflow server serve every method's run
(the teacher answers come from the shared LanceDB cache after the first method asks).
Every method gets exactly the same number of optimizer steps — `train.max_steps`, or
what one pass of `train.epochs` over the training examples takes — and no time budget,
so differences come from the method, not from how many steps fit into a deadline.
Ends with one table (accuracy per family and overall, prompt tokens, FLOPs per example,
training wall time) and an accuracy-vs-FLOPs plot, both logged to a `compare` MLflow run.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import mlflow

from .config import Config
from .methods import get_recipe
from .pipeline import run_pipeline, serve_session
from .ray_session import ray_session
from .teacher.endpoint import teacher_endpoint
from .tracking import log_metrics, log_params, tracking_for

DEFAULT_METHODS = ("std_cot", "mt_cot", "kard", "cascod", "skintern")


def step_budget(cfg: Config) -> int:
    """The steps every method trains for: max_steps, else epochs over the training examples."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from .tasks.sources import load_tasks

    train, _ = load_tasks(cfg)
    return max(1, math.ceil(len(train) * cfg.train.epochs / cfg.train.batch_size))


def method_config(cfg: Config, method: str, steps: int, tracking_uri: str) -> Config:
    data = cfg.model_dump()
    data["method"]["name"] = method
    data["run_name"] = f"{cfg.run_name}-{method}"
    data["train"].update(max_steps=steps, time_budget_s=None)
    data["tracking"]["uri"] = tracking_uri
    return Config.model_validate(data)


def comparison_rows(summaries: dict[str, dict]) -> list[dict]:
    rows = []
    for method, s in summaries.items():
        m, per_task = s["eval"].metrics, s["eval"].per_task
        rows.append({
            "method": method,
            **{f"accuracy.{t}": r["accuracy"] for t, r in sorted(per_task.items())},
            "accuracy": m["accuracy"],
            "prompt_tokens_mean": m["prompt_tokens_mean"],
            "completion_tokens_mean": m["completion_tokens_mean"],
            "flops_mean": m["flops_total_mean"],
            "steps": s["train"]["steps"],
            "train_wall_s": s["train"].get("fit_wall_s", float("nan")),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    tasks = sorted({k.removeprefix("accuracy.") for r in rows for k in r if k.startswith("accuracy.")})
    short = [t.split("/")[-1][:12] for t in tasks]
    head = f"{'method':<12}" + "".join(f"{s:>13}" for s in short)
    head += f"{'overall':>9}{'prompt tok':>11}{'FLOPs/ex':>11}{'steps':>7}{'train s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['method']:<12}" + "".join(f"{r.get('accuracy.' + t, float('nan')):>12.1%} " for t in tasks)
        line += (f"{r['accuracy']:>8.1%} {r['prompt_tokens_mean']:>10.1f} {r['flops_mean']:>11.3g}"
                 f"{r['steps']:>7}{r['train_wall_s']:>9.0f}")
        lines.append(line)
    return "\n".join(lines)


def plot_accuracy_vs_flops(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["flops_mean"], 100 * r["accuracy"], s=40)
        ax.annotate(r["method"], (r["flops_mean"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per example (prefill + decode)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs inference cost")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_compare(cfg: Config, methods: tuple[str, ...] = DEFAULT_METHODS) -> list[dict]:
    for m in methods:
        get_recipe(m)  # unknown names fail before anything starts
    if len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"compare: methods must be distinct and non-empty, got {list(methods)}")
    started = time.monotonic()
    steps = step_budget(cfg)
    print(f"[compare] {', '.join(methods)}: {steps} optimizer steps each", flush=True)
    with ExitStack() as stack:
        stack.enter_context(teacher_endpoint(cfg))
        stack.enter_context(ray_session(cfg))
        stack.enter_context(serve_session())  # one Serve start for every method's evaluation
        server = stack.enter_context(tracking_for(cfg))
        summaries, failed = {}, {}
        for m in methods:
            print(f"[compare] ---- {m} ----", flush=True)
            try:
                summaries[m] = run_pipeline(method_config(cfg, m, steps, server.uri))
            except Exception as e:  # noqa: BLE001 -- one method's failure must not discard the others' hours
                failed[m] = f"{type(e).__name__}: {e}"
                print(f"[compare] {m} failed: {failed[m]}", file=sys.stderr, flush=True)
        if not summaries:
            raise RuntimeError(f"compare: every method failed: {failed}")
        rows = comparison_rows(summaries)
        out_dir = Path(cfg.run_dir) / "compare"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "comparison.json").write_text(json.dumps(rows, indent=2))
        plot = plot_accuracy_vs_flops(rows, out_dir / "accuracy_vs_flops.png")
        client = mlflow.MlflowClient(server.uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        run = client.create_run(exp.experiment_id, run_name=f"{cfg.run_name}/compare", tags={"stage": "compare"})
        log_params(client, run.info.run_id, {"methods": ",".join(methods), "steps": steps})
        log_metrics(client, run.info.run_id, {f"{r['method']}.{k}": float(r[k]) for r in rows
                                              for k in ("accuracy", "flops_mean", "prompt_tokens_mean", "train_wall_s")})
        client.log_artifact(run.info.run_id, str(plot))
        client.log_artifact(run.info.run_id, str(out_dir / "comparison.json"))
        client.set_terminated(run.info.run_id)
        print("\n" + format_table(rows), flush=True)
        print(f"\n[compare] {time.monotonic() - started:.0f} s; plot {plot}; MLflow run {run.info.run_id} at {server.uri}")
        if failed:
            client.set_tag(run.info.run_id, "failed_methods", ",".join(failed))
            raise RuntimeError("compare: " + "; ".join(f"{m} failed ({why})" for m, why in failed.items()))
        return rows
