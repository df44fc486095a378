"""The shape every method fills in. Plain data + functions: no base class to inherit."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..tasks.record import Example

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "\nAnswer:"
# A student that rambles on into a new question is cut there (evaluation convention).
STOP = ["\nQuestion:"]


def question_prompt(question: str) -> str:
    return f"{QUESTION_PREFIX}{question}{ANSWER_PREFIX}"


@dataclass(frozen=True)
class TrainRow:
    prompt: str
    target: str
    weight: float = 1.0

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "target": self.target, "weight": self.weight}


@dataclass(frozen=True)
class Recipe:
    """name; which teacher outputs it needs; its training rows; its inference prompt.

    `needs` names teacher-stage outputs (e.g. "rationales"); the runner collects them and
    hands `train_rows` a mapping example id -> teacher output for each.
    """

    name: str
    needs: tuple[str, ...]
    train_rows: Callable[[list[Example], dict[str, dict[str, dict]]], list[TrainRow]]
    prompt: Callable[[Example], str] = field(default=lambda ex: question_prompt(ex.question))
    description: str = ""
