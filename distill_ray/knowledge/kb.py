"""NesyCD's symbolic knowledge base: one LanceDB table of entries people can read and edit.

An entry is what the teacher wrote about one of the student's errors (a learning summary
and supplementary knowledge), or what a person added. Rows carry the text the student
reads, its task, the errors it came from (`sources`), where it came from (`origin`) and
an embedding of the text. The table has a full-text index (BM25) on `text` and, once it
is large enough to train one, a vector index; rows added after an index was built are
still searched (LanceDB scans what the index does not cover), so an edit is visible to
the very next query.

Every change is one LanceDB commit, hence one table version: runs record the version
they used, and `at_version` reads the KB as it was. Near-duplicates are merged on the
way in: an entry whose embedding is within `dedup_threshold` (cosine) of one already
there, same task, and that states nothing the other does not (`knowledge_items`), adds
its sources to that entry instead of becoming a second row. The second condition is
what keeps facts: analyses that share a long learning summary embed almost alike even
when their supplementary knowledge defines different units.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from distill_ray.knowledge.embed import EMBED_DIM, embed_texts
from distill_ray.teacher.knowledge_plan import KnowledgeFormatError, parse_knowledge

ORIGINS = ("teacher", "user")
ENTRY_FIELDS = ("id", "task", "text", "summary", "supplementary", "sources", "origin", "created_at")
# Below this many rows an IVF index has too few vectors to train its partitions, and an
# exact scan of a few hundred rows takes well under a millisecond anyway.
VECTOR_INDEX_MIN_ROWS = 256


def knowledge_items(text: str, summary: Sequence[str] = (), supplementary: Sequence[str] = ()) -> frozenset[str]:
    """What an entry states, item by item, case and spacing aside: its summary and
    supplementary items; for an entry without them, its text read as teacher K, or else
    the whole text as one item."""
    items = [*summary, *supplementary]
    if not items:
        try:
            k = parse_knowledge(text)
            items = [*k.summary, *k.supplementary]
        except KnowledgeFormatError:
            items = [text]
    return frozenset(norm for norm in (" ".join(item.lower().split()) for item in items) if norm)


def kb_schema(dim: int = EMBED_DIM) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("text", pa.string(), nullable=False),  # what the student reads
        pa.field("summary", pa.list_(pa.string())),
        pa.field("supplementary", pa.list_(pa.string())),
        pa.field("sources", pa.list_(pa.string())),  # ids of the errors this entry explains
        pa.field("origin", pa.string()),  # teacher | user
        pa.field("created_at", pa.float64()),  # unix seconds
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ])


class _DedupPool:
    """The entries an incoming one may be merged into: same task, cosine >= threshold, and
    stating nothing new (its items a subset of the other's). Vectors sit in one matrix, so
    checking an entry against thousands is one matrix-vector product."""

    def __init__(self, capacity: int, dim: int, threshold: float) -> None:
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.ids: list[str] = []
        self.tasks: list[str] = []
        self.items: list[frozenset[str]] = []
        self.threshold = threshold

    def put(self, id_: str, task: str, vector: np.ndarray, items: frozenset[str]) -> None:
        self.vectors[len(self.ids)] = vector
        self.ids.append(id_)
        self.tasks.append(task)
        self.items.append(items)

    def duplicate_of(self, task: str, vector: np.ndarray, items: frozenset[str]) -> str | None:
        sims = self.vectors[: len(self.ids)] @ vector
        near = np.flatnonzero(sims >= self.threshold)
        for i in near[np.argsort(-sims[near])]:
            if self.tasks[i] == task and items <= self.items[i]:
                return self.ids[i]
        return None


class KBError(ValueError):
    """Bad input for the knowledge base; the message names what is wrong."""


@dataclass(frozen=True)
class Entry:
    text: str
    task: str = ""
    summary: tuple[str, ...] = ()
    supplementary: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    origin: str = "user"
    id: str = ""
    created_at: float = 0.0

    @staticmethod
    def from_dict(d: dict, where: str = "entry") -> "Entry":
        """Validated; `where` (e.g. "line 7") goes into every error message."""
        if not isinstance(d, dict):
            raise KBError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(ENTRY_FIELDS) - {"vector"}
        if unknown:
            raise KBError(f"{where}: unknown field(s) {sorted(unknown)} (fields: {', '.join(ENTRY_FIELDS)})")
        text = d.get("text")
        if not isinstance(text, str) or not text.strip():
            raise KBError(f"{where}: 'text' must be non-empty text, got {text!r}")
        for name in ("id", "task", "origin"):
            if d.get(name) is not None and not isinstance(d[name], str):
                raise KBError(f"{where}: {name!r} must be text, got {d[name]!r}")
        lists = {}
        for name in ("summary", "supplementary", "sources"):
            value = d.get(name) or []
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise KBError(f"{where}: {name!r} must be a list of non-empty texts, got {value!r}")
            lists[name] = tuple(v.strip() for v in value)
        origin = d.get("origin") or "user"
        if origin not in ORIGINS:
            raise KBError(f"{where}: 'origin' must be one of {ORIGINS}, got {origin!r}")
        created = d.get("created_at") or 0.0
        if not isinstance(created, (int, float)):
            raise KBError(f"{where}: 'created_at' must be a number, got {created!r}")
        return Entry(" ".join(text.split()), (d.get("task") or "").strip(), lists["summary"], lists["supplementary"],
                     lists["sources"], origin, (d.get("id") or "").strip(), float(created))

    def as_row(self, vector: np.ndarray | None = None) -> dict:
        row = {"id": self.id or new_id(self.origin), "task": self.task, "text": self.text,
               "summary": list(self.summary), "supplementary": list(self.supplementary),
               "sources": list(self.sources), "origin": self.origin, "created_at": self.created_at or time.time()}
        if vector is not None:
            row["vector"] = vector
        return row


def new_id(origin: str) -> str:
    return f"{origin}-{uuid.uuid4().hex[:12]}"


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)  # ids of new rows
    # (incoming entry's id or text, id it was merged into), one per incoming entry: two
    # identical texts are two merges
    merged: list[tuple[str, str]] = field(default_factory=list)
    version: int | None = None


def _unit(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms == 0, 1.0, norms)


class KnowledgeBase:
    """One KB table. Cheap to construct; every read sees the latest committed version."""

    def __init__(self, uri: str, table: str, embedding_model: str, *, dedup_threshold: float = 0.95,
                 batch_size: int = 128) -> None:
        if not 0 < dedup_threshold <= 1:
            raise KBError(f"dedup_threshold must be in (0, 1], got {dedup_threshold}")
        self.uri, self.name, self.model = uri, table, embedding_model
        self.dedup_threshold, self.batch_size = dedup_threshold, batch_size

    # -- reading -------------------------------------------------------------------------
    def _db(self):
        from distill_ray.store import open_db

        return open_db(self.uri)

    def exists(self) -> bool:
        from distill_ray.store import table_exists

        return table_exists(self._db(), self.name)

    def table(self):
        if not self.exists():
            raise KBError(f"knowledge base {self.name!r} does not exist in {self.uri} (build it with a nesycd run, "
                          "or add an entry with `distill-ray kb add`)")
        return self._db().open_table(self.name)

    @property
    def version(self) -> int:
        return int(self.table().version)

    def rows(self, *, with_vectors: bool = False, version: int | None = None) -> list[dict]:
        t = self.table()
        if version is not None:
            t.checkout(version)
        columns = [c for c in kb_schema().names if with_vectors or c != "vector"]
        return t.to_arrow().select(columns).to_pylist()

    def get(self, entry_id: str) -> dict:
        from distill_ray.store import sql_string

        found = self.table().search().where(f"id = {sql_string(entry_id)}").limit(1).to_list()
        if not found:
            raise KBError(f"no entry with id {entry_id!r} in knowledge base {self.name!r}")
        return {k: v for k, v in found[0].items() if k != "vector" and not k.startswith("_")}

    def stats(self) -> dict:
        rows = self.rows()
        t = self.table()
        by_task: dict[str, int] = {}
        by_origin: dict[str, int] = {}
        for r in rows:
            by_task[r["task"] or "-"] = by_task.get(r["task"] or "-", 0) + 1
            by_origin[r["origin"]] = by_origin.get(r["origin"], 0) + 1
        return {"table": self.name, "uri": self.uri, "version": int(t.version), "entries": len(rows),
                "sources": sum(len(r["sources"]) for r in rows), "by_task": by_task, "by_origin": by_origin,
                "indices": sorted(i.index_type for i in t.list_indices())}

    # -- writing -------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str], *, cached: bool = True) -> np.ndarray:
        cache = self.uri if cached else None
        return _unit(embed_texts(list(texts), self.model, batch_size=self.batch_size, cache=cache))

    def add(self, entries: Sequence[Entry], *, dedup: bool = True) -> AddReport:
        """Add entries in one commit, merging near-duplicates (of the KB and of each other)."""
        report = AddReport()
        if not entries:
            return report
        vectors = self._embed([e.text for e in entries])
        existing = self.rows(with_vectors=True) if self.exists() else []
        taken = {r["id"] for r in existing}
        clash = [e.id for e in entries if e.id and e.id in taken]
        if clash:
            raise KBError(f"entry id {clash[0]!r} is already in knowledge base {self.name!r} (remove it first)")
        pool = _DedupPool(len(existing) + len(entries), vectors.shape[1], self.dedup_threshold)
        for r in existing:
            pool.put(r["id"], r["task"], np.asarray(r["vector"], dtype=np.float32),
                     knowledge_items(r["text"], r["summary"] or (), r["supplementary"] or ()))
        new_rows: list[dict] = []
        merge_into: dict[str, list[str]] = {}  # existing or new id -> sources to add
        for entry, vec in zip(entries, vectors):
            items = knowledge_items(entry.text, entry.summary, entry.supplementary)
            target = pool.duplicate_of(entry.task, vec, items) if dedup else None
            if target is not None:
                merge_into.setdefault(target, []).extend(entry.sources)
                report.merged.append((entry.id or entry.text[:40], target))
                continue
            row = entry.as_row(vec.tolist())
            new_rows.append(row)
            pool.put(row["id"], row["task"], vec, items)
            report.added.append(row["id"])
        report.version = self._commit(existing, new_rows, merge_into)
        return report

    def _commit(self, existing: list[dict], new_rows: list[dict], merge_into: dict[str, list[str]]) -> int:
        by_id = {r["id"]: r for r in existing}
        merged_existing = {i: s for i, s in merge_into.items() if i in by_id}
        for row in new_rows:  # merges into entries of this same batch land before the write
            row["sources"] = list(dict.fromkeys(row["sources"] + merge_into.get(row["id"], [])))
        schema = kb_schema(len(new_rows[0]["vector"]) if new_rows else EMBED_DIM)
        if not self.exists():
            self._db().create_table(self.name, pa.Table.from_pylist(new_rows, schema=schema))
            self.build_indices()  # bm25 retrieval needs the full-text index from the first entry on
            return self.version
        table = self.table()
        if merged_existing:
            # One merge_insert commit: updated sources of merged entries plus the new rows.
            updates = []
            for i, sources in merged_existing.items():
                row = dict(by_id[i])
                row["sources"] = list(dict.fromkeys(list(row["sources"]) + sources))
                updates.append(row)
            data = pa.Table.from_pylist(updates + new_rows, schema=schema)
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        elif new_rows:
            table.add(pa.Table.from_pylist(new_rows, schema=schema))
        return int(table.version)

    def remove(self, ids: Iterable[str]) -> int:
        """Delete entries by id, in one commit; an unknown id is an error and deletes nothing."""
        from distill_ray.store import sql_string

        ids = list(dict.fromkeys(ids))
        if not ids:
            raise KBError("rm: name at least one entry id")
        table = self.table()
        present = {r["id"] for r in table.to_arrow().select(["id"]).to_pylist()}
        missing = [i for i in ids if i not in present]
        if missing:
            raise KBError(f"rm: no entry with id {missing[0]!r} in knowledge base {self.name!r}; nothing deleted")
        table.delete("id IN (" + ", ".join(sql_string(i) for i in ids) + ")")
        return int(table.version)

    def build_indices(self) -> None:
        """Full-text index on `text`; a vector index once there are enough rows to train one."""
        from lancedb.index import FTS

        table = self.table()
        table.create_index("text", config=FTS(), replace=True)
        if table.count_rows() >= VECTOR_INDEX_MIN_ROWS:
            table.create_index(metric="cosine", vector_column_name="vector", index_type="IVF_FLAT",
                               num_partitions=max(1, int(np.sqrt(table.count_rows()) // 4)), replace=True)

    # -- files ---------------------------------------------------------------------------
    def export_jsonl(self, path: str | Path) -> int:
        rows = sorted(self.rows(), key=lambda r: (r["task"], r["created_at"], r["id"]))
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return len(rows)

    def import_jsonl(self, path: str | Path) -> AddReport:
        """Every line is checked before anything is written: a bad file changes nothing."""
        entries = read_entries(path)
        return self.add(entries)


def read_entries(path: str | Path) -> list[Entry]:
    p = Path(path)
    if not p.is_file():
        raise KBError(f"import: no such file {str(p)!r}")
    entries, seen = [], set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise KBError(f"import {p.name}: line {n}: not JSON ({e.msg} at column {e.colno})") from None
        entry = Entry.from_dict(data, where=f"import {p.name}: line {n}")
        if entry.id and entry.id in seen:
            raise KBError(f"import {p.name}: line {n}: id {entry.id!r} appears twice in the file")
        seen.add(entry.id)
        entries.append(entry)
    if not entries:
        raise KBError(f"import {p.name}: no entries in the file")
    return entries
