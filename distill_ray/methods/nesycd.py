"""NesyCD: a neural student plus a symbolic knowledge base built from the student's errors.

The recipe's training schedule (METHODS.md), each step a shared stage:
1. a general Std-CoT student, on `method.nesycd.general_fraction` of the step budget;
2. that student, served, answers `probe_size` training questions (evaluate/errors.py);
3. the teacher analyses each wrong answer into a learning summary and supplementary
   knowledge (teacher/error_plan.py), cached, failures kept apart;
4. the analyses become the KB, LanceDB `kb_<run>` (knowledge/kb.py): embedded,
   near-duplicates merged, full-text and vector indexed, versioned;
5. fine-tuning goes on from the general student's checkpoint on KB-augmented rows:
   question + the best retrieved entry (if one clears `min_similarity`; a training
   question never retrieves an entry written about its own error alone) -> teacher
   rationale + answer.

At inference the student sits behind `serve/kb_front.py`, which retrieves before it
answers, so edits to the KB act at once, with no retraining.
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence

from ..config import Config
from ..tasks.record import Example
from . import std_cot
from .recipe import MethodContext, Recipe, TrainJob, TrainRow, question_prompt

# The paper's instruction, kept short: it is prefixed to every augmented input.
INSTRUCTION = "Use the expert teacher's learning summary and supplementary knowledge if they help."


def kb_prompt(question: str, entries: Sequence[str]) -> str:
    """The student's input: the question alone when no entry is relevant."""
    if not entries:
        return question_prompt(question)
    return "\n".join([INSTRUCTION, *(f"Expert: {e}" for e in entries), question_prompt(question)])


def kb_table(cfg: Config) -> str:
    from ..teacher.needs import run_tag

    return f"kb_{run_tag(cfg)}"


def knowledge_base(cfg: Config):
    from ..knowledge.kb import KnowledgeBase

    n = cfg.method.nesycd
    return KnowledgeBase(cfg.lancedb_uri, kb_table(cfg), cfg.knowledge.embedding_model,
                         dedup_threshold=n.dedup_threshold, batch_size=cfg.knowledge.batch_size)


def say(message: str) -> None:
    print(f"[nesycd] {message}", flush=True)


def kb_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    """Question + retrieved entry (or none) -> teacher rationale, for every kept rationale."""
    from ..knowledge.kb_search import search

    kept = ctx.teacher["rationales"]
    chosen = [ex for ex in examples if ex.id in kept]
    kb = knowledge_base(ctx.cfg)
    if not chosen or not kb.exists():
        return std_cot.train_rows(examples, ctx)
    n = ctx.cfg.method.nesycd
    hits = search(kb, [ex.question for ex in chosen], mode=n.retrieval, k=n.top_k,
                  exclude_sources=[{ex.id} for ex in chosen], cache_queries=True)
    rows = []
    for ex, found in zip(chosen, hits):
        entries = [h.text for h in found if h.similarity >= n.min_similarity][: n.use]
        rows.append(TrainRow(kb_prompt(ex.question, entries), " " + kept[ex.id]["rationale"]))
    return rows


def _budget(cfg: Config, rows: int) -> tuple[list[int], list[float | None]]:
    from ..train.data import planned_steps

    total = planned_steps(rows, cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps)
    if total < 2:
        raise ValueError(f"nesycd: a budget of {total} step(s) cannot train a general and a KB-augmented student")
    general = min(total - 1, max(1, round(total * cfg.method.nesycd.general_fraction)))
    budget = cfg.train.time_budget_s
    shares = [None, None] if budget is None else [budget * general / total, budget * (total - general) / total]
    return [general, total - general], shares


def _probe_examples(examples: list[Example], kept: dict, cfg: Config) -> list[Example]:
    pool = sorted((ex for ex in examples if ex.id in kept), key=lambda ex: ex.id)
    size = cfg.method.nesycd.probe_size
    if size is None or size >= len(pool):
        return pool
    return random.Random(cfg.seed).sample(pool, size)


def build_kb(cfg: Config, analyses: list[dict]):
    """The analyses as KB entries (merging near-duplicates), indexed; returns the AddReport."""
    from ..knowledge.kb import Entry

    kb = knowledge_base(cfg)
    entries = [Entry(a["text"], a["task"], tuple(a["summary"]), tuple(a["supplementary"]), (a["id"],), "teacher")
               for a in sorted(analyses, key=lambda a: a["id"])]
    if kb.exists():
        # A rerun rebuilds the KB from this run's analyses; people's own entries stay.
        stale = [r["id"] for r in kb.rows() if r["origin"] == "teacher"]
        if stale:
            kb.remove(stale)
    report = kb.add(entries)
    kb.build_indices()
    report.version = kb.version
    return report


def train(job: TrainJob):
    from ..curriculum.actor import stage_config
    from ..evaluate.errors import find_errors
    from ..store import open_db, read_rows
    from ..teacher.error_plan import collect_error_analyses
    from ..teacher.needs import run_tag
    from ..tracking import end_run, nested_run
    from ..train.trainer import run_training

    cfg, ctx = job.ctx.cfg, job.ctx
    general_rows = [r.as_dict() for r in std_cot.train_rows(job.examples, ctx)]
    if not general_rows:
        raise RuntimeError("nesycd: the teacher stage kept no rationales to train on")
    steps, budgets = _budget(cfg, len(general_rows))
    say(f"1/4 general student: {len(general_rows)} rows, {steps[0]} steps")
    target = nested_run(job.mlflow_target, "general")
    general = run_training(stage_config(cfg, steps[0], budgets[0]), general_rows, output_dir=job.output_dir,
                           name="general", mlflow_target=target)
    end_run(target)

    probe = find_errors(cfg, general.model_dir, _probe_examples(job.examples, ctx.teacher["rationales"], cfg),
                        std_cot.RECIPE)
    say(f"2/4 probe: the general student answered {probe.asked} training questions, "
        f"accuracy {probe.accuracy:.1%}, {len(probe.errors)} errors")
    metrics = {"probe_accuracy": probe.accuracy, "probe_errors": float(len(probe.errors)),
               "general_steps": float(general.steps)}
    if probe.errors:
        analysed = collect_error_analyses(cfg, probe.errors, run_tag=run_tag(cfg))
        analyses = read_rows(open_db(cfg.lancedb_uri), analysed.table)
        report = build_kb(cfg, analyses)
        say(f"3/4 knowledge base {kb_table(cfg)}: {len(analyses)} analyses -> {len(report.added)} entries "
            f"({len(report.merged)} near-duplicates merged), version {report.version}")
        metrics.update({f"analysis_{k}": v for k, v in analysed.stats.items() if isinstance(v, (int, float))})
        metrics.update(kb_entries=float(len(report.added)), kb_merged=float(len(report.merged)),
                       kb_version=float(report.version))
    else:
        say("3/4 the general student made no errors on the probe: the knowledge base stays as it is")

    rows = [r.as_dict() for r in kb_rows(job.examples, ctx)]
    with_entry = sum(r["prompt"].startswith(INSTRUCTION) for r in rows)
    say(f"4/4 KB-augmented fine-tuning: {len(rows)} rows ({with_entry} with an entry), {steps[1]} steps")
    target = nested_run(job.mlflow_target, "kb")
    final = run_training(stage_config(cfg, steps[1], budgets[1]), rows, output_dir=job.output_dir, name="kb",
                         mlflow_target=target, init_from=general.checkpoint_path)
    end_run(target)
    final.metrics.update(metrics, rows_with_entry=float(with_entry), train_rows=float(len(rows)))
    final.metrics["fit_wall_s"] = general.metrics.get("fit_wall_s", 0.0) + final.metrics.get("fit_wall_s", 0.0)
    final.steps += general.steps
    return final


def serve_app(cfg: Config, model_dir: str):
    from transformers import AutoConfig

    from ..serve.kb_front import FrontSettings, build_front_app

    n = cfg.method.nesycd
    model_cfg = AutoConfig.from_pretrained(model_dir)
    uri = cfg.lancedb_uri
    settings = FrontSettings(
        uri=uri if "://" in uri else os.path.abspath(uri),  # replicas do not share our working dir
        table=kb_table(cfg), embedding_model=cfg.knowledge.embedding_model,
        mode=n.retrieval, top_k=n.top_k, use=n.use, min_similarity=n.min_similarity,
        gate_confidence=n.gate_confidence, context_length=int(getattr(model_cfg, "max_position_embeddings", 0) or 0),
    )
    return build_front_app(cfg, model_dir, settings)


def lineage(cfg: Config) -> dict[str, str]:
    kb = knowledge_base(cfg)
    return {"kb.table": kb.name, "kb.version": str(kb.version) if kb.exists() else "none"}


RECIPE = Recipe(
    name="nesycd",
    needs=("rationales",),
    train_rows=kb_rows,
    train=train,
    serve_app=serve_app,
    lineage=lineage,
    description="Std-CoT student + knowledge base from its errors, retrieved into the prompt behind the endpoint",
)
