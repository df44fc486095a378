"""Loaders for GSM8K, StrategyQA and ARC, and a deterministic train/test split.

BBH lives in loaders_bbh.py, any other JSON/JSONL benchmark in loaders_generic.py.
Every gold rationale a loader produces ends with the answer sentence
("Therefore, the answer is N."), the same shape as the synthetic suite's, so training
targets are formatted alike whatever the source.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from distill_ray.tasks.answers import ANSWER_TRIGGER, normalize_answer
from distill_ray.tasks.loaders_bbh import bbh_tasks, load_bbh, load_bbh_cot_prompt
from distill_ray.tasks.loaders_generic import load_generic
from distill_ray.tasks.loaders_io import letters, parse_options, read_json, read_jsonl, require_str
from distill_ray.tasks.record import Example

__all__ = [
    "bbh_tasks",
    "load_arc",
    "load_bbh",
    "load_bbh_cot_prompt",
    "load_generic",
    "load_gsm8k",
    "load_strategyqa",
    "split_examples",
]

_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


def split_final_answer(solution: str, where: str) -> tuple[str, str]:
    """A GSM8K answer field as (the worked solution, the canonical number after '####')."""
    if solution.count("####") != 1:
        raise ValueError(f"{where}: answer must contain exactly one '#### N' line")
    body, final = solution.split("####")
    try:
        return body, normalize_answer(final, "number")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def remove_calculator_notes(text: str) -> str:
    # <<48/2=24>> are calculator annotations for the original annotators' tool, not prose.
    return _CALCULATOR_RE.sub("", text)


def load_gsm8k(path: str | Path, split: str | None = None) -> list[Example]:
    """GSM8K jsonl {question, answer}; ids gsm8k/<split>/<row>, split defaults to the file stem."""
    path = Path(path)
    split = split or path.stem
    out = []
    for i, (lineno, row) in enumerate(read_jsonl(path, "GSM8K")):
        where = f"{path}: line {lineno}"
        question = require_str(row, "question", where)
        solution = require_str(row, "answer", where)
        body, answer = split_final_answer(solution, where)
        rationale = remove_calculator_notes(body).strip()
        out.append(
            Example(
                id=f"gsm8k/{split}/{i}",
                task="gsm8k",
                question=question.strip(),
                answer=answer,
                answer_type="number",
                rationale=f"{rationale}\n{ANSWER_TRIGGER} {answer}.",
            )
        )
    return out


def load_strategyqa(path: str | Path) -> list[Example]:
    """BIG-bench StrategyQA task.json; the explanation after "Yes."/"No." becomes knowledge."""
    path = Path(path)
    data = read_json(path, "StrategyQA")
    rows = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a BIG-bench task with an 'examples' list")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: example {i}"
        question = require_str(row, "input", where)
        target = require_str(row, "target", where).strip()
        m = re.match(r"(Yes|No)\b\.?\s*(.*)", target, re.DOTALL)
        if not m:
            raise ValueError(f"{where}: target must start with 'Yes.' or 'No.', got {target[:40]!r}")
        answer = m.group(1).lower()
        scores = row.get("target_scores")
        if isinstance(scores, dict) and scores.get(m.group(1)) != 1:
            raise ValueError(f"{where}: target says {m.group(1)!r} but target_scores say {scores}")
        explanation = m.group(2).strip()
        out.append(
            Example(
                id=f"strategyqa/{i}",
                task="strategyqa",
                question=question.strip(),
                answer=answer,
                answer_type="yes_no",
                knowledge=(explanation,) if explanation else None,
            )
        )
    return out


def _relabel_numeric_options(text: str, labels: list[str]) -> str:
    """A few ARC items number their options (1)-(4); letters keep one answer format."""
    head, sep, block = text.partition("Options:")
    for label, letter in zip(labels, letters(len(labels))):
        block = re.sub(rf"(?m)^(\s*)\({label}\)", rf"\1({letter})", block, count=1)
    return head + sep + block


def load_arc(path: str | Path, name: str) -> list[Example]:
    """ARC as reformatted by CasCoD: [{"input": "Question: ...\\nOptions:\\n(A) ...", "target": "(C)"}]."""
    path = Path(path)
    if not name or "/" in name:
        raise ValueError(f"ARC name must be a non-empty name without '/', got {name!r}")
    rows = read_json(path, "ARC")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of examples")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: example {i}"
        text = require_str(row, "input", where).strip()
        target = require_str(row, "target", where).strip()
        options = parse_options(text)
        if options is None:
            raise ValueError(f"{where}: no '(A) ...' lines after 'Options:'")
        labels, choices = options
        m = re.fullmatch(r"\((\w)\)", target)
        if not m or m.group(1) not in labels:
            raise ValueError(f"{where}: target {target!r} is not one of the options {labels}")
        answer = letters(len(labels))[labels.index(m.group(1))]
        if labels != letters(len(labels)):
            text = _relabel_numeric_options(text, labels)
        question = text.removeprefix("Question:").strip()
        out.append(
            Example(
                id=f"{name}/{i}",
                task=name,
                question=question,
                answer=answer,
                answer_type="choice",
                choices=tuple(choices),
            )
        )
    return out


def split_examples(
    examples: Sequence[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, test) split by a seeded hash of each id.

    Depends only on the ids, not on their order, so a reordered or extended input keeps
    most assignments; each split keeps the input order. The test split holds
    round(len * test_fraction) examples.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction!r}")
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"split_examples needs unique ids; repeated: {dupes}")

    def key(ex_id: str) -> str:
        return hashlib.sha256(f"{seed}/{ex_id}".encode()).hexdigest()

    n_test = round(len(examples) * test_fraction)
    test_ids = set(sorted(ids, key=key)[:n_test])
    train = [ex for ex in examples if ex.id not in test_ids]
    test = [ex for ex in examples if ex.id in test_ids]
    return train, test
