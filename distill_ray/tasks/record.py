"""The one example record every loader produces and every stage consumes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

ANSWER_TYPES = ("number", "yes_no", "choice", "text")


@dataclass(frozen=True)
class Step:
    """One (sub-question, sub-answer) pair of a decomposition."""

    question: str
    answer: str


@dataclass(frozen=True)
class Example:
    """A benchmark item, uniform across task families.

    `task` names the family ("synthetic/unit_conversion", "gsm8k", "bbh/navigate").
    `answer` is the gold answer in canonical form for `answer_type`.
    The optional fields are gold material some sources carry; stages never require them.
    """

    id: str
    task: str
    question: str
    answer: str
    answer_type: str
    choices: tuple[str, ...] | None = None
    rationale: str | None = None
    knowledge: tuple[str, ...] | None = None
    decomposition: tuple[Step, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"example {self.id!r}: answer_type {self.answer_type!r} not in {ANSWER_TYPES}")
        if not self.id or not self.question.strip():
            raise ValueError(f"example {self.id!r}: id and question must be non-empty")

    def to_row(self) -> dict:
        """Flat, Arrow-friendly dict (nested parts as JSON strings)."""
        d = asdict(self)
        return {
            "id": self.id,
            "task": self.task,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "choices": json.dumps(list(self.choices)) if self.choices is not None else None,
            "rationale": self.rationale,
            "knowledge": json.dumps(list(self.knowledge)) if self.knowledge is not None else None,
            "decomposition": json.dumps(d["decomposition"]) if self.decomposition is not None else None,
            "meta": json.dumps(self.meta),
        }

    @classmethod
    def from_row(cls, row: dict) -> "Example":
        def _load(key):
            v = row.get(key)
            return json.loads(v) if isinstance(v, str) else v

        choices = _load("choices")
        knowledge = _load("knowledge")
        decomposition = _load("decomposition")
        return cls(
            id=row["id"],
            task=row["task"],
            question=row["question"],
            answer=row["answer"],
            answer_type=row["answer_type"],
            choices=tuple(choices) if choices is not None else None,
            rationale=row.get("rationale"),
            knowledge=tuple(knowledge) if knowledge is not None else None,
            decomposition=tuple(Step(**s) for s in decomposition) if decomposition is not None else None,
            meta=_load("meta") or {},
        )
