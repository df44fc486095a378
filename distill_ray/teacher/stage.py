"""The teacher stage: any query plan over the training examples, into LanceDB.

`run_plan` is the stage; `collect_rationales` (Std-CoT) and `collect_knowledge`
(SKIntern's K) are its two uses today. Examples whose outcome the cache already holds
are settled on the driver (`client/replay.py`: a finished stage reruns without starting
an actor or the oracle); Ray Data streams the rest through a pool of `QueryActor`s. The
driver consumes the results as they come and
  - appends the new teacher calls to `teacher_calls` in bulk, one commit per chunk from
    a writer thread, so a driver killed mid-stage keeps (and a rerun reuses) everything
    already committed;
  - at the end overwrites the output table (kept, e.g. `rationales`) and its failures
    table (e.g. `teacher_failures`) in one commit each. Overwrite rather than merge: a
    table then holds exactly one run's outcome for exactly its examples, and its version
    number pins that outcome for the stages downstream (recorded as lineage). Reruns are cheap because of the cache.
Every example ends exactly once, kept or failed; a failure is never stored as output.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain

import pyarrow as pa

from distill_ray.client.actor import Plan, QueryOptions, query_rows
from distill_ray.client.cache import CALLS_TABLE, CallWriter, decode_calls
from distill_ray.client.openai_client import ClientSettings, Secret
from distill_ray.client.ratelimit import get_limiter, limiter_name
from distill_ray.client.replay import replay_cached
from distill_ray.config import Config
from distill_ray.ray_session import ensure_ray
from distill_ray.store import open_db, table_version, write_table
from distill_ray.tasks.record import Example
from distill_ray.teacher.cot_plan import FewShot, build_plan
from distill_ray.teacher.knowledge_plan import KnowledgeShots, build_knowledge_plan
from distill_ray.teacher.prompts import Exemplar, KnowledgeExemplar
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


@dataclass(frozen=True)
class StageOutput:
    """Where a plan's outcomes land. Table names are base names; the run tag is appended."""

    kind: str  # what the stage collects ("rationales", "knowledge"), for progress lines
    table: str
    schema: pa.Schema
    row: Callable[[dict, str], dict]  # (kept query-stage row, teacher model) -> output row
    failures: str = FAILURES
    # Kept rows -> the table to write (e.g. with embeddings added), timed as `finish_stat`.
    finish: Callable[[list[dict]], pa.Table] | None = None
    finish_stat: str = "finish_s"


@dataclass
class TeacherStageResult:
    table: str  # the output table (kept rows)
    failures_table: str
    calls_table: str
    table_versions: dict[str, int | None]  # lineage: the versions this run wrote
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def rationales_table(self) -> str:
        """`table`, under the name the Std-CoT stage has always used."""
        return self.table


RATIONALES_OUTPUT = StageOutput("rationales", RATIONALES, RATIONALES_SCHEMA, rationale_row)


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


def check_pool_fits(cfg: Config, keys: tuple[str, str], actors: int, cpus: float) -> None:
    """A local cluster never grows: a pool bigger than it would wait for CPUs that never come.

    `keys` names the two config keys that sized the pool, for the error.
    """
    import ray

    need, have = actors * cpus, ray.cluster_resources().get("CPU", 0.0)
    if cfg.cluster.address is None and need > have:
        raise ValueError(
            f"{keys[0]} x {keys[1]} = {actors} x {cpus} = {need:g} CPUs, but the local Ray cluster has {have:g}"
        )


def _ensure_ray(cfg: Config) -> None:
    ensure_ray(cfg)
    check_pool_fits(cfg, ("teacher.num_actors", "teacher.actor_cpus"), cfg.teacher.num_actors, cfg.teacher.actor_cpus)


class _Progress:
    def __init__(self, total: int, enabled: bool, kind: str = "rationales") -> None:
        self.total, self.enabled, self.kind = total, enabled, kind
        self.start = self.last = time.monotonic()

    def maybe_print(self, o: _Outcome, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        rate = o.totals["n_http"] / max(now - self.start, 1e-9)
        print(f"[teacher] {self.kind}: {len(o.seen)}/{self.total} done, {len(o.kept)} kept, {len(o.failed)} failed, "
              f"{rate:.1f} req/s", file=sys.stderr, flush=True)


def _consume(batches: Iterable[list[dict]], writer: CallWriter, bar: _Progress, model: str,
             output: StageOutput) -> _Outcome:
    """Fold the stage's output rows into outcomes; hand call records to the writer in chunks."""
    o = _Outcome()
    pending: list[dict] = []
    last_flush = time.monotonic()
    try:
        for batch in batches:
            for row in batch:
                if row["id"] in o.seen:  # a re-executed Ray task may emit a row again
                    o.totals["duplicates_dropped"] += 1
                    continue
                o.seen.add(row["id"])
                for c in _COUNTERS:
                    o.totals[c] += int(row[c] or 0)
                o.totals["reasks"] += max(0, int(row["attempts"]) - 1)
                pending.extend(decode_calls(row["calls"]))
                if row["status"] == "kept":
                    o.kept.append(output.row(row, model))
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


def _ask_teacher(cfg: Config, api_key: str, rows: list[dict], plan: Plan, stack: ExitStack) -> Iterator[list[dict]]:
    """The actor pool over `rows`, its output batches as they come; the oracle starts here when it is needed."""
    t = cfg.teacher
    base_url = t.base_url
    if base_url is None:
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
    out = query_rows(rows, plan, options, num_actors=t.num_actors, actor_cpus=t.actor_cpus)
    return (b.to_pylist() for b in out.iter_batches(batch_size=None, batch_format="pyarrow"))


def run_plan(
    cfg: Config,
    examples: Sequence[Example],
    plan: Plan,
    output: StageOutput,
    *,
    run_tag: str = "",
    progress: bool = True,
) -> TeacherStageResult:
    """Ask the teacher what `plan` asks about every example; keep what it accepts; record the rest.

    Kept rows go to `output.table`, failures to `output.failures` (both tagged with
    `run_tag`), each in one overwrite commit. With `teacher.kind: oracle` and no
    base_url, the oracle teacher is started for the duration of the stage.
    """
    _check_examples(examples)
    out_name, failures_name = table_name(output.table, run_tag), table_name(output.failures, run_tag)
    if out_name == failures_name:
        raise ValueError(f"teacher stage: output and failures would share the table {out_name!r}")
    api_key = cfg.teacher_api_key()  # fail before any work when the key is missing
    _ensure_ray(cfg)
    t0 = time.monotonic()
    t = cfg.teacher
    if t.base_url is None and t.kind != "oracle":
        raise ValueError("teacher.base_url: required for a non-oracle teacher")
    rows = [_input_row(ex) for ex in examples]
    settled, to_ask = replay_cached(rows, plan, cfg.lancedb_uri) if t.cache else ([], rows)
    if progress and settled:
        print(f"[teacher] {output.kind}: {len(settled)}/{len(rows)} settled from the cache, "
              f"{len(to_ask)} to ask", file=sys.stderr, flush=True)
    db = open_db(cfg.lancedb_uri)
    with ExitStack() as stack:
        batches: Iterable[list[dict]] = [settled]
        if to_ask:
            batches = chain(batches, _ask_teacher(cfg, api_key, to_ask, plan, stack))
        writer = CallWriter(db)
        try:
            outcome = _consume(batches, writer, _Progress(len(examples), progress, output.kind), t.model, output)
        finally:
            calls_version = writer.close()
    finish_s = None
    kept: pa.Table | list[dict] = outcome.kept
    if output.finish is not None:
        t_finish = time.monotonic()
        kept = output.finish(outcome.kept)
        finish_s = time.monotonic() - t_finish
    versions = {
        out_name: write_table(db, out_name, kept, "overwrite", schema=output.schema),
        failures_name: write_table(db, failures_name, outcome.failed, "overwrite", schema=FAILURES_SCHEMA),
        CALLS_TABLE: calls_version or table_version(db, CALLS_TABLE),
    }
    missing = len(examples) - len(outcome.seen)
    if missing:
        raise RuntimeError(f"teacher stage: {missing} examples produced no outcome (the ones seen were written)")
    stats = _stats(outcome, len(examples), time.monotonic() - t0)
    stats["settled_from_cache"] = len(settled)
    if finish_s is not None:
        stats[output.finish_stat] = round(finish_s, 3)
    return TeacherStageResult(out_name, failures_name, CALLS_TABLE, versions, stats)


def collect_rationales(
    cfg: Config,
    examples: Sequence[Example],
    *,
    run_tag: str = "",
    progress: bool = True,
    exemplars: Mapping[str, Sequence[Exemplar] | FewShot] | None = None,
) -> TeacherStageResult:
    """Std-CoT: a rationale per example, kept when its answer is right (`rationales`, `teacher_failures`).

    `exemplars` (by task name) gives few-shot (question, rationale) pairs for real tasks,
    e.g. from `prompts.pairs_from_qa_prompt(load_bbh_cot_prompt(...))`; synthetic tasks
    default to the suite's fixed demonstrations.
    """
    _check_examples(examples)
    plan = build_plan(cfg.teacher, examples, exemplars)
    return run_plan(cfg, examples, plan, RATIONALES_OUTPUT, run_tag=run_tag, progress=progress)


def collect_knowledge(
    cfg: Config,
    examples: Sequence[Example],
    *,
    run_tag: str = "",
    progress: bool = True,
    exemplars: Mapping[str, Sequence[KnowledgeExemplar] | KnowledgeShots] | None = None,
) -> TeacherStageResult:
    """SKIntern's K per example into `knowledge` (with question and K embeddings); failures
    into `knowledge_failures`.

    `exemplars` (by task name) gives few-shot (question, gold answer, knowledge text)
    triples for real tasks; synthetic tasks default to the suite's demonstrations with
    the oracle's knowledge. Embedding runs after the teacher's pool has finished, for the
    texts not yet in the embedding cache (`embeddings`, shared by every run on this
    LanceDB): on a Ray Data actor pool (`knowledge.*`), or in this process when they are
    fewer than `knowledge.pool_min_texts`. Its time is `stats["embed_s"]`, texts served
    by the cache `embed_cache_hits`, distinct texts embedded `embed_new`, and of those
    embedded on the pool `embed_pool_texts`.
    """
    from distill_ray.knowledge.embed import embed_table, model_dim, resolve_model, uses_pool
    from distill_ray.knowledge.embed_cache import EmbeddingCache
    from distill_ray.knowledge.table import (
        KNOWLEDGE,
        KNOWLEDGE_FAILURES,
        TEXT_OF_VECTOR,
        knowledge_row,
        knowledge_schema,
    )

    _check_examples(examples)
    table_name(KNOWLEDGE, run_tag)
    cfg.teacher_api_key()
    k = cfg.knowledge
    resolve_model(k.embedding_model)  # a bad model path fails before any teacher work
    plan = build_knowledge_plan(cfg.teacher, examples, exemplars)
    _ensure_ray(cfg)
    check_pool_fits(cfg, ("knowledge.embed_actors", "knowledge.embed_cpus"), k.embed_actors, k.embed_cpus)
    dim = model_dim(k.embedding_model)
    schema = knowledge_schema(dim)
    cache = EmbeddingCache(cfg.lancedb_uri, k.embedding_model)  # a bad uri fails before any teacher work

    def embed(rows: list[dict]) -> pa.Table:
        # `finish` runs once the teacher's Ray Data pool is exhausted, so both pools never compete for CPUs.
        if not rows:
            return schema.empty_table()
        table = pa.Table.from_pylist(rows, schema=knowledge_schema(dim, vectors=False))
        return embed_table(table, k, TEXT_OF_VECTOR, cache=cache).select(schema.names).cast(schema)

    output = StageOutput("knowledge", KNOWLEDGE, schema, knowledge_row, KNOWLEDGE_FAILURES, embed, "embed_s")
    result = run_plan(cfg, examples, plan, output, run_tag=run_tag, progress=progress)
    result.stats.update(cache.stats())
    result.stats["embed_pool_texts"] = cache.new if uses_pool(cache.new, k) else 0
    return result
