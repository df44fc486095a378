"""Any JSON / JSONL benchmark (SVAMP, AGIEval, MMLU, custom) by mapping its keys to ours.

`fields` maps our names to the file's keys, e.g. SVAMP
    {"question": ["Body", "Question"], "answer": "Answer"}
or MMLU (Hugging Face layout) {"choices": "choices", "answer": "answer"} with an integer
answer index. A list of keys is joined with a space (SVAMP splits body and question).
A key mapped explicitly must be on every row; unmapped optional names are used when the
file happens to have them.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill_ray.tasks.answers import normalize_answer
from distill_ray.tasks.loaders_io import format_options, letters, read_json, read_jsonl
from distill_ray.tasks.record import ANSWER_TYPES, Example

FIELD_NAMES = ("id", "question", "answer", "choices", "rationale")
_REQUIRED = ("question", "answer")
_LABEL_PREFIX_RE = re.compile(r"^\(?[A-Z]\)\s*")


def _rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs; `where` names the file and the row for error messages."""
    if path.suffix == ".jsonl":
        return [(f"{path}: line {lineno}", row) for lineno, row in read_jsonl(path, "benchmark")]
    data = read_json(path, "benchmark")
    if isinstance(data, dict) and isinstance(data.get("examples"), list):
        data = data["examples"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows or an object with an 'examples' list")
    return [(f"{path}: row {i}", row) for i, row in enumerate(data)]


def _check_fields(fields: Mapping[str, str | Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    mapping: dict[str, tuple[str, ...]] = {}
    for ours, theirs in (fields or {}).items():
        if ours not in FIELD_NAMES:
            raise ValueError(f"fields: unknown name {ours!r}; expected some of {FIELD_NAMES}")
        keys = (theirs,) if isinstance(theirs, str) else tuple(theirs)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"fields[{ours!r}] must be a key or a list of keys, got {theirs!r}")
        mapping[ours] = keys
    return mapping


def _get(row: dict, ours: str, mapping: dict[str, tuple[str, ...]], where: str) -> Any:
    """The row's value for one of our names; None when optional and absent."""
    keys = mapping.get(ours, (ours,))
    explicit = ours in mapping or ours in _REQUIRED
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        if explicit:
            raise ValueError(f"{where}: missing key {missing[0]!r} (mapped from {ours!r})")
        return None
    if len(keys) == 1:
        return row[keys[0]]
    return " ".join(str(row[k]).strip() for k in keys)


def _choices(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, Mapping):
        value = [value[k] for k in sorted(value)]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{where}: choices must be a non-empty list of strings, got {value!r}")
    if len(value) > 26:
        raise ValueError(f"{where}: {len(value)} choices, more than letters A-Z")
    # AGIEval writes "(A)text"; the label is ours to add.
    return tuple(_LABEL_PREFIX_RE.sub("", c).strip() for c in value)


def _answer(value: Any, answer_type: str, choices: tuple[str, ...] | None, where: str) -> str:
    if answer_type == "choice" and isinstance(value, int) and not isinstance(value, bool):
        if choices is None or not 0 <= value < len(choices):
            raise ValueError(f"{where}: answer index {value} does not name one of the choices")
        return letters(len(choices))[value]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: answer must be a string or number, got {value!r}")
    try:
        answer = normalize_answer(str(value), answer_type)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if answer_type == "choice" and choices is not None and answer not in letters(len(choices)):
        raise ValueError(f"{where}: answer {answer!r} is outside the {len(choices)} choices")
    return answer


def load_generic(
    path: str | Path,
    *,
    task: str,
    answer_type: str,
    fields: Mapping[str, str | Sequence[str]] | None = None,
) -> list[Example]:
    """Rows of a JSON list, {"examples": [...]} object or JSONL file as Examples of `task`.

    Ids come from the mapped id key when there is one, else <task>/<row>. Choice
    questions whose text has no "Options:" block get one appended, so the model sees
    the options the way BBH and ARC show them.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type {answer_type!r} not in {ANSWER_TYPES}")
    if not task:
        raise ValueError("task must be a non-empty name")
    path = Path(path)
    mapping = _check_fields(fields)
    out = []
    for i, (where, row) in enumerate(_rows(path)):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question = _get(row, "question", mapping, where)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: question must be a non-empty string, got {question!r}")
        raw_choices = _get(row, "choices", mapping, where)
        choices = _choices(raw_choices, where) if raw_choices is not None else None
        if answer_type != "choice" and choices is not None and "choices" in mapping:
            raise ValueError(f"{where}: choices mapped for a {answer_type!r} task")
        answer = _answer(_get(row, "answer", mapping, where), answer_type, choices, where)
        rationale = _get(row, "rationale", mapping, where)
        raw_id = _get(row, "id", mapping, where)
        question = question.strip()
        if answer_type == "choice" and choices is not None and "Options:" not in question:
            question = f"{question}\n{format_options(choices)}"
        out.append(
            Example(
                id=f"{task}/{raw_id}" if raw_id is not None else f"{task}/{i}",
                task=task,
                question=question,
                answer=answer,
                answer_type=answer_type,
                choices=choices if answer_type == "choice" else None,
                rationale=str(rationale).strip() if rationale is not None else None,
            )
        )
    ids = [ex.id for ex in out]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"{path}: repeated ids {dupes}")
    return out
