"""The teacher stage's output tables: kept rationales and failures, with fixed schemas.

Fixed schemas (not inferred) so a run whose every row has, say, no choices still writes
the same column types as any other run, and readers can rely on them.
"""
from __future__ import annotations

import re

import pyarrow as pa

RATIONALES = "rationales"
FAILURES = "teacher_failures"

RATIONALES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("answer_type", pa.string()),
        pa.field("choices", pa.string()),  # JSON list, as in Example.to_row
        pa.field("rationale", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("teacher_model", pa.string()),
    ]
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("teacher_model", pa.string()),
    ]
)

_TAG_RE = re.compile(r"[A-Za-z0-9_-]*")


def table_name(base: str, run_tag: str) -> str:
    """`rationales` or `rationales_<run_tag>`: runs sharing a database keep separate outputs."""
    if not _TAG_RE.fullmatch(run_tag):
        raise ValueError(f"run_tag {run_tag!r}: use only letters, digits, '_' and '-'")
    return f"{base}_{run_tag}" if run_tag else base


def rationale_row(row: dict, model: str) -> dict:
    return {
        "id": row["id"],
        "task": row["task"],
        "question": row["question"],
        "answer": row["answer"],
        "answer_type": row["answer_type"],
        "choices": row.get("choices"),
        "rationale": row["rationale"],
        "attempts": int(row["attempts"]),
        "teacher_model": model,
    }


def failure_row(row: dict, model: str) -> dict:
    return {
        "id": row["id"],
        "task": row["task"],
        "question": row["question"],
        "answer": row["answer"],
        "status": row["status"],
        "reason": row["reason"],
        "attempts": int(row["attempts"]),
        "teacher_model": model,
    }


def reason_key(reason: str) -> str:
    """The short word before any detail ("bad_example: ..." -> "bad_example"), for stats."""
    word = reason.split(":", 1)[0].strip() or "unknown"
    return re.sub(r"[^A-Za-z0-9_]", "_", word)
