"""Per-question demonstrations: the k most similar training examples (SKIntern's E_t).

Similarity is LanceDB vector search over the knowledge table's `question_vector`, all
questions in one batched search. A question never gets itself (by id or by identical
text) nor the same demonstration twice, and only examples whose teacher rationale was
kept can be shown, since a demonstration is that question with its full rationale.
Neighbours are found once for k_0; stage t takes the first k_t of them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from distill_ray.curriculum.format import Demo
from distill_ray.knowledge.search import nearest_neighbours
from distill_ray.store import open_db, read_table, sql_string

VECTOR_COLUMN = "question_vector"


def select_neighbours(
    db_uri: str,
    table: str,
    example_ids: Sequence[str],
    questions: Mapping[str, str],
    k: int,
    eligible: set[str],
    *,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    vector_column: str = VECTOR_COLUMN,
) -> dict[str, list[str]]:
    """{example id: up to k demonstration ids, most similar first}.

    `questions` maps every example id to its question; `eligible` holds the ids that may
    be shown. An example absent from `table` is embedded with `embed` (if given; else it
    gets no demonstrations).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"demonstrations: k must be an int >= 0, got {k!r}")
    ids = list(dict.fromkeys(example_ids))
    missing_q = [i for i in ids if i not in questions]
    if missing_q:
        raise ValueError(f"demonstrations: no question for example id(s) {missing_q[:5]}")
    if k == 0 or not ids:
        return {i: [] for i in ids}
    db = open_db(db_uri)
    rows = read_table(db, table, columns=["id", "question", vector_column])
    table_ids = rows.column("id").to_pylist()
    vectors = rows.column(vector_column).combine_chunks()
    dim = vectors.type.list_size
    matrix = vectors.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    row_of = {rid: n for n, rid in enumerate(table_ids)}
    by_text: dict[str, set[str]] = {}
    for rid, q in zip(table_ids, rows.column("question").to_pylist()):
        by_text.setdefault(_norm(q), set()).add(rid)

    queries = np.zeros((len(ids), dim), dtype=np.float32)
    outside = [n for n, i in enumerate(ids) if i not in row_of]
    for n, i in enumerate(ids):
        if i in row_of:
            queries[n] = matrix[row_of[i]]
    if outside and embed is not None:
        queries[outside] = embed([questions[ids[n]] for n in outside])
    searchable = [n for n, i in enumerate(ids) if i in row_of or embed is not None]

    # Rows that may never be shown are filtered inside the search, so no query wastes its k on them.
    never = sorted(set(table_ids) - eligible)
    where = f"id NOT IN ({', '.join(sql_string(i) for i in never)})" if never else None
    exclude = [{ids[n]} | by_text.get(_norm(questions[ids[n]]), set()) for n in searchable]
    # A little more than k: two rows with the same question text count once below.
    found = nearest_neighbours(db, table, queries[searchable], k + 2, vector_column=vector_column,
                               exclude_ids=exclude, columns=["question"], where=where)
    out = {i: [] for i in ids}
    for n, hits in zip(searchable, found):
        seen = {_norm(questions[ids[n]])}
        chosen = []
        for h in hits:
            text = _norm(h["question"])
            if text in seen:
                continue
            seen.add(text)
            chosen.append(h["id"])
            if len(chosen) == k:
                break
        out[ids[n]] = chosen
    return out


def _norm(question: str | None) -> str:
    return " ".join((question or "").split()).lower()


def stage_demos(
    neighbours: Sequence[str], k_t: int, questions: Mapping[str, str], rationales: Mapping[str, str]
) -> list[Demo]:
    """The first k_t neighbours as demonstrations with their full teacher rationales."""
    if k_t < 0:
        raise ValueError(f"demonstrations: k_t must be >= 0, got {k_t}")
    return [Demo(questions[i], rationales[i]) for i in list(neighbours)[:k_t]]
