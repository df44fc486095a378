"""The teacher stage: Std-CoT rationales for every training example, into LanceDB.

Ray Data streams the examples through a pool of `QueryActor`s; the driver consumes the
results as they come and
  - appends the new teacher calls to `teacher_calls` in bulk, one commit per chunk from
    a writer thread, so a driver killed mid-stage keeps (and a rerun reuses) everything
    already committed;
  - at the end overwrites `rationales` (kept) and `teacher_failures` (failed) in one
    commit each. Overwrite rather than merge: a table then holds exactly one run's
    outcome for exactly its examples, and its version number pins that outcome for the
    stages downstream (recorded as lineage). Reruns are cheap because of the cache.
Every example ends exactly once, kept or failed; a failure is never a rationale.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from distill_ray.client.actor import QueryOptions, query_rows
from distill_ray.client.cache import CALLS_TABLE, CallWriter, decode_calls
from distill_ray.client.openai_client import ClientSettings, Secret
from distill_ray.client.ratelimit import get_limiter, limiter_name
from distill_ray.config import Config
from distill_ray.ray_session import ensure_ray
from distill_ray.store import open_db, table_version, write_table
from distill_ray.tasks.record import Example
from distill_ray.teacher.cot_plan import FewShot, build_plan
from distill_ray.teacher.prompts import Exemplar
from distill_ray.teacher.tables import (
    FAILURES,
    FAILURES_SCHEMA,
    RATIONALES,
    RATIONALES_SCHEMA,
    failure_row,
    rationale_row,
    reason_key,
    table_name,
)

CALL_FLUSH_RECORDS = 2000  # records per cache commit ...
CALL_FLUSH_S = 10.0  # ... or this often, whichever comes first
PROGRESS_EVERY_S = 5.0
_COUNTERS = ("n_calls", "n_http", "n_cache_hits", "n_retries", "n_malformed", "prompt_tokens", "completion_tokens")


@dataclass
class TeacherStageResult:
    rationales_table: str
    failures_table: str
    calls_table: str
    table_versions: dict[str, int | None]  # lineage: the versions this run wrote
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Outcome:
    kept: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    totals: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)


def _check_examples(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("teacher stage: no examples to ask the teacher about")
    bad = next((i for i, ex in enumerate(examples) if not isinstance(ex, Example)), None)
    if bad is not None:
        raise TypeError(f"teacher stage: item {bad} is {type(examples[bad]).__name__}, expected Example")
    counts = Counter(ex.id for ex in examples)
    dups = sorted(i for i, n in counts.items() if n > 1)
    if dups:
        raise ValueError(f"teacher stage: duplicate example ids {dups[:5]}{' ...' if len(dups) > 5 else ''}")


def _input_row(ex: Example) -> dict:
    # Only what the plan reads: gold rationales/knowledge of the source never reach the teacher.
    row = ex.to_row()
    return {k: row[k] for k in ("id", "task", "question", "answer", "answer_type", "choices", "meta")}


def _ensure_ray(cfg: Config) -> None:
    import ray

    ensure_ray(cfg)
    t = cfg.teacher
    need, have = t.num_actors * t.actor_cpus, ray.cluster_resources().get("CPU", 0.0)
    if cfg.cluster.address is None and need > have:
        # A local cluster never grows: the actor pool would wait for CPUs that never come.
        raise ValueError(
            f"teacher.num_actors x teacher.actor_cpus = {t.num_actors} x {t.actor_cpus} = {need:g} CPUs, "
            f"but the local Ray cluster has {have:g}"
        )


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = self.last = time.monotonic()

    def maybe_print(self, o: _Outcome, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        rate = o.totals["n_http"] / max(now - self.start, 1e-9)
        print(f"[teacher] {len(o.seen)}/{self.total} done, {len(o.kept)} kept, {len(o.failed)} failed, "
              f"{rate:.1f} req/s", file=sys.stderr, flush=True)


def _consume(out, writer: CallWriter, bar: _Progress, model: str) -> _Outcome:
    """Fold the stage's output rows into outcomes; hand call records to the writer in chunks."""
    o = _Outcome()
    pending: list[dict] = []
    last_flush = time.monotonic()
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["id"] in o.seen:  # a re-executed Ray task may emit a row again
                    o.totals["duplicates_dropped"] += 1
                    continue
                o.seen.add(row["id"])
                for c in _COUNTERS:
                    o.totals[c] += int(row[c] or 0)
                o.totals["reasks"] += max(0, int(row["attempts"]) - 1)
                pending.extend(decode_calls(row["calls"]))
                if row["status"] == "kept":
                    o.kept.append(rationale_row(row, model))
                else:
                    o.failed.append(failure_row(row, model))
                    o.reasons[reason_key(row["reason"])] += 1
            if len(pending) >= CALL_FLUSH_RECORDS or time.monotonic() - last_flush >= CALL_FLUSH_S:
                writer.submit(pending)
                pending, last_flush = [], time.monotonic()
            bar.maybe_print(o)
    finally:
        # Whatever stopped the loop, the answers already paid for reach the cache.
        writer.submit(pending)
    bar.maybe_print(o, final=True)
    return o


def _stats(o: _Outcome, n: int, wall: float) -> dict[str, float]:
    t = o.totals
    stats: dict[str, float] = {
        "examples": n,
        "kept": len(o.kept),
        "failed": len(o.failed),
        "teacher_calls": t["n_calls"],
        "http_requests": t["n_http"],
        "transport_retries": t["n_retries"],
        "malformed_retries": t["n_malformed"],
        "cache_hits": t["n_cache_hits"],
        "reasks": t["reasks"],
        "prompt_tokens": t["prompt_tokens"],
        "completion_tokens": t["completion_tokens"],
        "duplicates_dropped": t["duplicates_dropped"],
        "wall_s": round(wall, 3),
        "requests_per_s": round(t["n_http"] / wall, 3) if wall > 0 else 0.0,
    }
    stats.update({f"failed_{r}": c for r, c in sorted(o.reasons.items())})
    return stats


def collect_rationales(
    cfg: Config,
    examples: Sequence[Example],
    *,
    run_tag: str = "",
    progress: bool = True,
    exemplars: Mapping[str, Sequence[Exemplar] | FewShot] | None = None,
) -> TeacherStageResult:
    """Ask the teacher for a rationale per example; keep the right ones; record the rest.

    `exemplars` (by task name) gives few-shot (question, rationale) pairs for real tasks,
    e.g. from `prompts.pairs_from_qa_prompt(load_bbh_cot_prompt(...))`; synthetic tasks
    default to the suite's fixed demonstrations. With `teacher.kind: oracle` and no
    base_url, the oracle teacher is started for the duration of the stage.
    """
    _check_examples(examples)
    rationales_name, failures_name = table_name(RATIONALES, run_tag), table_name(FAILURES, run_tag)
    api_key = cfg.teacher_api_key()  # fail before any work when the key is missing
    plan = build_plan(cfg.teacher, examples, exemplars)
    _ensure_ray(cfg)
    t0 = time.monotonic()
    t = cfg.teacher
    with ExitStack() as stack:
        base_url = t.base_url
        if base_url is None:
            if t.kind != "oracle":
                raise ValueError("teacher.base_url: required for a non-oracle teacher")
            from distill_ray.teacher.endpoint import local_oracle

            base_url = stack.enter_context(local_oracle(cfg))
        options = QueryOptions(
            client=ClientSettings(base_url, Secret(api_key), t.max_retries, t.timeout_s, max(100, 2 * t.max_in_flight)),
            max_in_flight=t.max_in_flight,
            malformed_retries=t.max_retries,
            cache_uri=cfg.lancedb_uri if t.cache else None,
            limiter=get_limiter(limiter_name(base_url, t.model), t.qps),
            qps=t.qps,
        )
        db = open_db(cfg.lancedb_uri)
        out = query_rows([_input_row(ex) for ex in examples], plan, options,
                         num_actors=t.num_actors, actor_cpus=t.actor_cpus)
        writer = CallWriter(db)
        try:
            outcome = _consume(out, writer, _Progress(len(examples), progress), t.model)
        finally:
            calls_version = writer.close()
    versions = {
        rationales_name: write_table(db, rationales_name, outcome.kept, "overwrite", schema=RATIONALES_SCHEMA),
        failures_name: write_table(db, failures_name, outcome.failed, "overwrite", schema=FAILURES_SCHEMA),
        CALLS_TABLE: calls_version or table_version(db, CALLS_TABLE),
    }
    missing = len(examples) - len(outcome.seen)
    if missing:
        raise RuntimeError(f"teacher stage: {missing} examples produced no outcome (the ones seen were written)")
    return TeacherStageResult(rationales_name, failures_name, CALLS_TABLE, versions,
                              _stats(outcome, len(examples), time.monotonic() - t0))
