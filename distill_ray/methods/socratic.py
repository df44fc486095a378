"""Socratic CoT: the teacher's decompositions train a decomposer and a solver (METHODS.md),
two LoRA adapters on one base, served together and asked through a dialogue endpoint.

Rows, from every decomposition the teacher got right (`decompositions` need), one per step:
  decomposer   Q + steps 1..k-1 -> sub-question k, and Q + all steps -> "[done]"
  solver       Q + steps 1..k-1 + sub-question k -> sub-answer k
(layouts in `socratic_format.py`).

Where the base comes from. Two adapters need a base that already reads the task's
language; the embedded default student is a tiny Llama with no pretrained weights (none
exists offline), and LoRA on random weights learns next to nothing. So with
`method.socratic.base_training: auto` (the default) a from-scratch student first gets a
base: one full fine-tune on the union of both roles' rows, `base_fraction` of the step
budget. The union rather than a Std-CoT run because it is exactly the text both students
will read and write, and the prompts' last line ("Sub-question k:" / "Sub-answer k:")
already tells the roles apart, so the base alone is a (shared-weights) Socratic pair; the
two adapters then specialise it per role with the rest of the budget, half each, from the
same base. With a pretrained `student.model` the base is that model unchanged (`auto` ->
`none`) and the whole budget goes to the adapters. The budget is the step count a plain
run on the union would take (`train.max_steps`, or `train.epochs` over the union rows).

Three Ray Train runs (base, decomposer, solver) rather than one: `run_training` trains one
model per run; each run logs to its own MLflow child run of the train stage.
Output: `<train>/socratic-pair/`, the base as a plain HF dir with both adapters inside
(`adapters.json`, `adapters/<role>/`), which `serve_app` deploys as one multiplexed
replica behind the dialogue endpoint (`serve/socratic_app.py`).

Inference cost: the endpoint reports every call it made (`usage.calls`), and the eval
stage prices each one on the base's config at its own context (prefill + decode), per
model (decomposer, solver); adapters are priced as merged into the base.
"""
from __future__ import annotations

import os
import shutil

from ..tasks.record import Example, Step
from ..tracking import end_run, nested_run
from .recipe import MethodContext, Recipe, TrainJob, TrainRow, question_only
from .socratic_format import DECOMPOSER, DONE, SOLVER, count_steps, decomposer_prompt, solver_prompt

PAIR_DIR = "socratic-pair"


def role_rows(examples: list[Example], ctx: MethodContext) -> tuple[list[TrainRow], list[TrainRow]]:
    """(decomposer rows, solver rows) from the kept decompositions of `examples`."""
    from ..teacher.decompose_plan import steps_of

    kept = ctx.teacher["decompositions"]
    decomposer, solver = [], []
    for ex in examples:
        if ex.id not in kept:
            continue
        steps: tuple[Step, ...] = steps_of(kept[ex.id])
        for k, step in enumerate(steps):
            decomposer.append(TrainRow(decomposer_prompt(ex.question, steps[:k]), f" {' '.join(step.question.split())}"))
            solver.append(TrainRow(solver_prompt(ex.question, steps[:k], step.question), f" {' '.join(step.answer.split())}"))
        decomposer.append(TrainRow(decomposer_prompt(ex.question, steps), f" {DONE}"))
    return decomposer, solver


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    """Both roles' rows: what the base is trained on."""
    decomposer, solver = role_rows(examples, ctx)
    return decomposer + solver


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the base's weights once on disk, whatever the number of pair dirs
    except OSError:
        shutil.copy2(src, dst)


def assemble_pair(out_dir: str, base_dir: str | None, base_model: str | None, adapters: dict[str, str]) -> str:
    """`out_dir` = the base (a trained dir, or the pretrained `base_model` saved) + the adapters."""
    from ..serve.multiplex import write_adapters

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if base_dir is not None:
        shutil.copytree(base_dir, out_dir, copy_function=_link_or_copy)
    else:
        from ..train.student import load_pretrained

        model, tokenizer = load_pretrained(base_model)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    placed = {}
    for role, src in adapters.items():
        dst = os.path.join(out_dir, "adapters", role)
        shutil.copytree(src, dst)
        placed[role] = dst
    write_adapters(out_dir, placed)
    return out_dir


def _budget(cfg, n_rows: int, train_base: bool) -> tuple[int, int]:
    """(base steps, steps per adapter) out of the budget a plain run on the union would take."""
    from ..train.data import planned_steps

    total = planned_steps(n_rows, cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps)
    if not train_base:
        return 0, max(1, total // 2)
    base = max(1, round(total * cfg.method.socratic.base_fraction))
    return base, max(1, (total - base) // 2)


def train_pair(job: TrainJob):
    """Base (when it needs one) then the two adapters from it; returns the pair's TrainResult."""
    from ..config import LoraConfig
    from ..train.trainer import TrainResult, run_training

    cfg = job.ctx.cfg
    s = cfg.method.socratic
    decomposer, solver = role_rows(job.examples, job.ctx)
    if not decomposer or not solver:
        raise RuntimeError("train: method 'socratic' built no training rows: the teacher kept no decomposition")
    train_base = s.base_training == "union" or (s.base_training == "auto" and cfg.student.model is None)
    if not train_base and cfg.student.model is None:
        raise ValueError("method.socratic.base_training: 'none' needs a pretrained student.model to put the adapters on")
    base_steps, adapter_steps = _budget(cfg, len(decomposer) + len(solver), train_base)
    results, base_dir = {}, None
    if train_base:
        base_cfg = cfg.model_copy(deep=True)
        base_cfg.train.max_steps = base_steps
        base_cfg.student.lora = LoraConfig(enabled=False)
        target = nested_run(job.mlflow_target, "base", {"socratic_part": "base"})
        rows = [r.as_dict() for r in decomposer + solver]
        results["base"] = run_training(base_cfg, rows, output_dir=job.output_dir, name="socratic-base", mlflow_target=target)
        end_run(target)
        base_dir = results["base"].model_dir
    adapter_cfg = cfg.model_copy(deep=True)
    adapter_cfg.train.max_steps = adapter_steps
    adapter_cfg.train.lr = s.adapter_lr or cfg.train.lr
    adapter_cfg.student.lora = LoraConfig(enabled=True, r=s.adapter_rank, alpha=s.adapter_alpha,
                                          target_modules=list(s.adapter_modules))
    for role, rows in ((DECOMPOSER, decomposer), (SOLVER, solver)):
        target = nested_run(job.mlflow_target, role, {"socratic_part": role})
        results[role] = run_training(adapter_cfg, [r.as_dict() for r in rows], output_dir=job.output_dir,
                                     name=f"socratic-{role}", mlflow_target=target, init_from=base_dir)
        end_run(target)
        if results[role].adapter_dir is None:
            raise RuntimeError(f"socratic {role}: the LoRA run exported no adapter")
    pair = assemble_pair(os.path.join(job.output_dir, PAIR_DIR), base_dir, cfg.student.model,
                         {role: results[role].adapter_dir for role in (DECOMPOSER, SOLVER)})
    metrics = {f"{part}_{k}": v for part, r in results.items() for k, v in r.metrics.items()}
    parts = results.values()
    seconds = sum(r.metrics.get("train_time_s", 0.0) for r in parts)
    metrics.update(train_rows=len(decomposer) + len(solver), decomposer_rows=len(decomposer), solver_rows=len(solver),
                   base_steps=results["base"].steps if "base" in results else 0, adapter_steps=adapter_steps,
                   # Totals over the three runs, under the names a single run reports.
                   fit_wall_s=sum(r.metrics.get("fit_wall_s", 0.0) for r in parts),
                   tokens_per_s=sum(r.metrics.get("train_tokens", 0.0) for r in parts) / seconds if seconds else 0.0)
    return TrainResult(model_dir=pair, checkpoint_path=results[SOLVER].checkpoint_path,
                       steps=sum(r.steps for r in results.values()), metrics=metrics)


def serve_app(cfg, model_dir: str):
    from ..serve.socratic_app import build_socratic_app

    return build_socratic_app(cfg, model_dir)


def reply_stats(reply: str) -> dict[str, float]:
    return {"steps": float(count_steps(reply))}


RECIPE = Recipe(
    name="socratic",
    needs=("decompositions",),
    train_rows=train_rows,
    prompt=question_only,
    train=train_pair,
    serve_app=serve_app,
    reply_stats=reply_stats,
    description="decomposer (next sub-question) and solver (sub-answer), two LoRA adapters on one base, in dialogue",
)
