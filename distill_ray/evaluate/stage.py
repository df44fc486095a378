"""The eval stage: the test split through Ray Data against the served student.

It reuses the teacher stage's query actor (same client, retries, in-flight bounds), with
a one-shot plan that scores each reply. Tokens come from the endpoint's `usage`; FLOPs
from the student's config (prefill + decode, `flops.py`), priced call by call: a composed
endpoint (Socratic CoT's dialogue) lists its model calls in `usage.calls`, and each is
priced at its own context length, with calls and FLOPs also kept per model. A recipe's
`reply_stats` adds numbers read off each reply (the dialogue's step count).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import mlflow

from ..client.actor import QueryOptions, query_dataset
from ..client.openai_client import ClientSettings, Secret
from ..config import Config
from ..methods.recipe import MethodContext, Recipe
from ..tasks.record import Example
from ..tracking import log_metrics
from .flops import flops_model
from .plan import EvalPlan, FollowUp


@dataclass
class EvalReport:
    metrics: dict[str, float]
    per_task: dict[str, dict[str, float]]
    predictions: list[dict] = field(repr=False)


def _options(cfg: Config, base_url: str) -> QueryOptions:
    return QueryOptions(
        client=ClientSettings(base_url=base_url, api_key=Secret("unused"), max_retries=3, timeout_s=120.0),
        max_in_flight=cfg.eval.max_in_flight,
        cache_uri=None,  # a student's answers are what is being measured: never served from a cache
    )


def evaluate_endpoint(cfg: Config, examples: list[Example], recipe: Recipe, base_url: str, model_dir: str,
                      method_ctx: MethodContext | None = None, *, progress: bool = True) -> EvalReport:
    """Score the served student on `examples`, prompted the way `recipe` says.

    A recipe with `follow_up` makes two calls per example (the second built from the
    first reply); tokens and FLOPs then add up over both calls.
    """
    import ray

    if cfg.eval.limit:
        examples = examples[: cfg.eval.limit]
    if not examples:
        raise ValueError("eval: the test split is empty")
    extras = recipe.annotate(examples, method_ctx) if recipe.annotate and method_ctx else {}
    rows = [{**ex.to_row(), "prompt": recipe.prompt(ex, extras.get(ex.id, {}))} for ex in examples]
    options = _options(cfg, base_url)
    final = EvalPlan(model=cfg.serve.model_name, max_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature)
    ds = ray.data.from_items(rows)
    if recipe.follow_up is not None:
        first = EvalPlan(final.model, final.max_tokens, final.temperature, score=False, payload_fields=())
        ds = query_dataset(ds, first, options, num_actors=cfg.eval.num_actors, actor_cpus=0.25)
        # A light task between the two pools: with the default 1 CPU it would wait forever
        # on a small node whose CPUs the replica and both actor pools already hold.
        ds = ds.map(FollowUp(recipe, extras), num_cpus=0.1)
    ds = query_dataset(ds, final, options, num_actors=cfg.eval.num_actors, actor_cpus=0.25)
    fm = flops_model(model_dir)
    started, last = time.monotonic(), 0.0
    predictions: list[dict] = []
    for batch in ds.iter_batches(batch_size=64, batch_format="pyarrow"):
        for r in batch.to_pylist():
            p = _prediction(r, fm, final.model)
            if recipe.reply_stats is not None:
                p.update(recipe.reply_stats(p["output"] if p["status"] == "kept" else ""))
            predictions.append(p)
        now = time.monotonic()
        if progress and now - last > 5:
            last = now
            acc = sum(p["correct"] for p in predictions) / len(predictions)
            print(f"[eval] {len(predictions)}/{len(rows)} scored, accuracy so far {acc:.1%}, "
                  f"{len(predictions) / (now - started):.1f} ex/s", flush=True)
    return summarize(predictions)


def _calls(r: dict, prefix: str = "") -> list[tuple[str, int, int]]:
    """(model, prompt, completion tokens) of every model call behind one reply."""
    reported = json.loads(r.get(f"{prefix}call_usage") or "[]")
    if reported:
        return [(m, int(p), int(c)) for m, p, c in reported]
    return [("", r[f"{prefix}prompt_tokens"], r[f"{prefix}completion_tokens"])]


def _prediction(r: dict, fm, served: str) -> dict:
    """One scored example; FLOPs priced call by call (attention cost grows with each call's
    own context, so summed tokens would overprice a many-call reply)."""
    calls = _calls(r)
    status = r["status"]
    if "first_status" in r:  # two-call inference: both calls cost, both must have succeeded
        calls = _calls(r, "first_") + calls
        status = r["first_status"] if r["first_status"] != "kept" else status
    costs = [fm.example(p, c) for _, p, c in calls]
    flops = {k: sum(c[k] for c in costs) for k in costs[0]}
    by_model: dict[str, float] = {}
    if any(m not in ("", served) for m, _, _ in calls):
        # A composed endpoint said which model made each call (Socratic CoT: decomposer, solver).
        for (m, _, _), cost in zip(calls, costs):
            by_model[f"calls.{m}"] = by_model.get(f"calls.{m}", 0) + 1
            by_model[f"flops_total.{m}"] = by_model.get(f"flops_total.{m}", 0.0) + cost["flops_total"]
    output = r["output"] if "first_output" not in r else f"{r['first_output']}\n--\n{r['output']}"
    return {
        "id": r["id"], "task": r["task"], "question": r["question"], "gold": r["answer"],
        "prediction": r["prediction"], "correct": bool(r["correct"]) and status == "kept",
        "status": status, "reason": r["reason"], "output": output, "calls": len(calls),
        "prompt_tokens": sum(p for _, p, _ in calls), "completion_tokens": sum(c for _, _, c in calls), **flops,
        **by_model,
    }


def _means(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / n,
        "completion_tokens_mean": sum(r["completion_tokens"] for r in rows) / n,
        "flops_prefill_mean": sum(r["flops_prefill"] for r in rows) / n,
        "flops_decode_mean": sum(r["flops_decode"] for r in rows) / n,
        "flops_total_mean": sum(r["flops_total"] for r in rows) / n,
        "failed": sum(r["status"] != "kept" for r in rows),
        **_extra_means(rows),
    }


_SUMMED = {"correct", "calls", "prompt_tokens", "completion_tokens", "flops_prefill", "flops_decode", "flops_total"}


def _extra_means(rows: list[dict]) -> dict[str, float]:
    """`<key>_mean` of the numbers some methods add per example (steps, calls and FLOPs by model)."""
    keys = set().union(*rows) - _SUMMED
    out = {}
    for k in sorted(keys):
        values = [r.get(k, 0) for r in rows]  # a model a reply never called cost it nothing
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[f"{k}_mean"] = sum(values) / len(rows)
    return out


def summarize(predictions: list[dict]) -> EvalReport:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_task[p["task"]].append(p)
    per_task = {}
    for task, rows in by_task.items():
        m = _means(rows)
        per_task[task] = {**m, "flops_mean": m["flops_total_mean"]}
    metrics = _means(predictions)
    for task, m in per_task.items():
        metrics[f"accuracy.{task.replace('/', '.')}"] = m["accuracy"]
    return EvalReport(metrics=metrics, per_task=per_task, predictions=predictions)


def log_evaluation(client: mlflow.MlflowClient, run_id: str, report: EvalReport) -> None:
    log_metrics(client, run_id, report.metrics)
    client.log_text(run_id, "\n".join(json.dumps(p) for p in report.predictions), "predictions.jsonl")
    client.log_dict(run_id, report.per_task, "per_task.json")
