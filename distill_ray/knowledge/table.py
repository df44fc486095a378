"""The `knowledge_<run_tag>` table: the teacher's K per question, with two embeddings.

`question_vector` embeds the question (to pick similar training examples as
demonstrations); `vector` embeds the rendered K in `text` (for retrieval; LanceDB's
default vector column name). Fixed schema, as for rationales, so every run writes the
same column types whatever its rows hold.
"""
from __future__ import annotations

import json

import pyarrow as pa

from distill_ray.knowledge.embed import EMBED_DIM

KNOWLEDGE = "knowledge"
KNOWLEDGE_FAILURES = "knowledge_failures"  # apart from `teacher_failures`: rationale failures never mix in
VECTOR_COLUMNS = ("question_vector", "vector")
TEXT_OF_VECTOR = {"question": "question_vector", "text": "vector"}  # what each vector embeds


def knowledge_schema(dim: int = EMBED_DIM, *, vectors: bool = True) -> pa.Schema:
    """The table's schema; `vectors=False` is the shape of a row before embedding."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"embedding dimension must be a positive int, got {dim!r}")
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("summary", pa.list_(pa.string())),
        pa.field("supplementary", pa.list_(pa.string())),
        pa.field("text", pa.string()),  # "Learning Summary: 1. ... Supplementary Knowledge: 1. ..."
        pa.field("attempts", pa.int32()),
        pa.field("teacher_model", pa.string()),
    ]
    if vectors:
        fields += [pa.field(name, pa.list_(pa.float32(), dim)) for name in VECTOR_COLUMNS]
    return pa.schema(fields)


KNOWLEDGE_SCHEMA = knowledge_schema()
ROW_COLUMNS = tuple(f.name for f in knowledge_schema(vectors=False))  # what `by_id` rows carry


def knowledge_row(row: dict, model: str) -> dict:
    """A kept query-stage row (payload from the knowledge plan) as a table row, vectors to come."""
    return {
        "id": row["id"],
        "task": row["task"],
        "question": row["question"],
        "answer": row["answer"],
        "summary": json.loads(row["summary"]),
        "supplementary": json.loads(row["supplementary"]),
        "text": row["knowledge"],
        "attempts": int(row["attempts"]),
        "teacher_model": model,
    }
