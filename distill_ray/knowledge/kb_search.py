"""Retrieval from the knowledge base: BM25, dense, or both fused by reciprocal rank.

The query is the task description (when there is one) followed by the question, as in
NesyCD. `bm25` is LanceDB's full-text search (stemmed, so "plims" finds "plim"), `dense`
a cosine search over MiniLM embeddings, `hybrid` merges the two ranked lists with
reciprocal-rank fusion (score = sum of 1 / (RRF_K + rank)), which needs no calibration
between BM25 scores and cosine similarities.

Every hit carries its cosine similarity to the query (`similarity`), whatever the mode:
the caller's "is this entry relevant at all" test uses it, in training and at inference
alike, so the student learns to answer without an entry exactly when it will get none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from distill_ray.knowledge.kb import KBError, KnowledgeBase

Mode = Literal["bm25", "dense", "hybrid"]
MODES: tuple[str, ...] = ("bm25", "dense", "hybrid")
RRF_K = 60  # the constant of Cormack et al.; damps the head of each list


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    task: str
    score: float  # the mode's own score: BM25, cosine, or fused RRF
    similarity: float  # cosine(query, entry), for the relevance floor

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "task": self.task, "score": round(self.score, 6),
                "similarity": round(self.similarity, 6)}


def query_text(question: str, task_description: str = "") -> str:
    return f"{task_description.strip()} {question.strip()}".strip()


def _fts(table, query: str, k: int) -> list[dict]:
    try:
        return table.search(query, query_type="fts").limit(k).with_row_id(False).to_list()
    except Exception as e:  # no FTS index yet (a KB only people have added to): say how to get one
        if "index" in str(e).lower():
            raise KBError(f"bm25 retrieval: knowledge base has no full-text index ({e}); "
                          "run `distill-ray kb reindex` or use mode dense") from None
        raise


def _dense(table, vector: np.ndarray, k: int) -> list[dict]:
    return table.search(vector, vector_column_name="vector").metric("cosine").limit(k).to_list()


def search(kb: KnowledgeBase, questions: list[str], *, mode: Mode = "hybrid", k: int = 3,
           task_descriptions: list[str] | None = None, vectors: np.ndarray | None = None,
           exclude_sources: list[set[str]] | None = None, cache_queries: bool = False) -> list[list[Hit]]:
    """The top-k entries for each question, best first.

    `vectors` are the queries' embeddings when the caller has them (else computed here,
    through the LanceDB embedding cache only with `cache_queries`: worth it for a bulk
    search a rerun repeats, not for one question, where a cache lookup scans the table
    and a miss writes a table version: one per served request);
    `exclude_sources[i]` drops the entries written about those example ids alone: a
    training question must not retrieve the analysis of its own error, but an entry that
    other errors' analyses also state (merged near-duplicates) is in the KB without it.
    """
    if mode not in MODES:
        raise KBError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1:
        raise KBError(f"retrieval top-k must be >= 1, got {k}")
    descriptions = task_descriptions or [""] * len(questions)
    queries = [query_text(q, d) for q, d in zip(questions, descriptions)]
    if not queries:
        return []
    if vectors is None:
        vectors = kb._embed(queries, cached=cache_queries)
    table = kb.table()
    excluded = exclude_sources or [set() for _ in queries]
    # Over-fetch by what may be excluded, then cut back to k.
    out = []
    for query, vec, skip in zip(queries, vectors, excluded):
        fetch = k + 4 * len(skip) + 4
        lists = []
        if mode in ("bm25", "hybrid"):
            lists.append(_fts(table, query, fetch))
        if mode in ("dense", "hybrid"):
            lists.append(_dense(table, vec, fetch))
        out.append(_fuse(lists, mode, vec, skip)[:k])
    return out


def _only_from(sources, skip: set[str]) -> bool:
    """Whether an entry was written about the `skip` examples and nothing else."""
    return bool(skip) and bool(sources) and set(sources) <= skip


def _fuse(lists: list[list[dict]], mode: str, query_vec: np.ndarray, skip: set[str]) -> list[Hit]:
    rows: dict[str, dict] = {}
    scores: dict[str, float] = {}
    for ranked in lists:
        ranked = [r for r in ranked if not _only_from(r.get("sources"), skip)]
        for rank, r in enumerate(ranked, start=1):
            rows.setdefault(r["id"], r)
            if mode == "hybrid":
                scores[r["id"]] = scores.get(r["id"], 0.0) + 1.0 / (RRF_K + rank)
            elif mode == "bm25":
                scores[r["id"]] = float(r["_score"])
            else:
                scores[r["id"]] = 1.0 - float(r["_distance"])
    hits = []
    for entry_id, score in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        r = rows[entry_id]
        vec = np.asarray(r["vector"], dtype=np.float32)
        norm = float(np.linalg.norm(vec) * np.linalg.norm(query_vec)) or 1.0
        hits.append(Hit(entry_id, r["text"], r.get("task") or "", score, float(vec @ query_vec) / norm))
    return hits
