"""The shape every method fills in. Plain data + functions: no base class to inherit.

The runner (pipeline.py) composes the shared stages from a recipe:
  collect   each name in `needs` from the teacher stage (teacher/needs.py);
  train     one Ray Train run on `train_rows`, or the recipe's own `train` schedule
            (SKIntern's curriculum chains several runs);
  eval      `annotate` the test examples once (e.g. KARD retrieves knowledge), send
            `prompt(example, extras)`; with `follow_up`, send a second prompt built
            from the first reply (CasCoD: Q -> R, then Q + R -> A) and score that.
  serve     `serve_app(cfg, model_dir)` builds the Ray Serve application the eval stage
            queries; default the plain student (NesyCD puts knowledge retrieval in
            front of it, Socratic CoT pairs two adapters). Whatever it builds speaks the
            OpenAI API, so evaluation and users need not know which method is behind it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..tasks.record import Example

if TYPE_CHECKING:
    from ..config import Config

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "\nAnswer:"
# A student that rambles on into a new question is cut there (evaluation convention).
STOP = ["\nQuestion:"]

Teacher = dict[str, dict[str, dict]]  # need -> example id -> teacher output row


def question_prompt(question: str) -> str:
    return f"{QUESTION_PREFIX}{question}{ANSWER_PREFIX}"


def question_only(ex: Example, extras: dict) -> str:
    return question_prompt(ex.question)


@dataclass(frozen=True)
class TrainRow:
    prompt: str
    target: str
    weight: float = 1.0

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "target": self.target, "weight": self.weight}


@dataclass(frozen=True)
class MethodContext:
    """What a recipe may read: the config, the teacher's outputs and where they are stored."""

    cfg: "Config"
    teacher: Teacher
    tables: dict[str, str] = field(default_factory=dict)  # need -> LanceDB table name


@dataclass(frozen=True)
class TrainJob:
    """Everything a recipe's own training schedule gets from the runner."""

    ctx: MethodContext
    examples: list[Example]
    output_dir: str
    mlflow_target: tuple[str, str] | None = None  # (tracking uri, run id) of the train stage's run


@dataclass(frozen=True)
class Recipe:
    """name; teacher outputs it needs; training rows; how it is asked at inference."""

    name: str
    needs: tuple[str, ...]
    train_rows: Callable[[list[Example], MethodContext], list[TrainRow]]
    prompt: Callable[[Example, dict], str] = question_only
    annotate: Callable[[list[Example], MethodContext], dict[str, dict]] | None = None
    follow_up: Callable[[Example, dict, str], str] | None = None
    train: Callable[[TrainJob], Any] | None = None  # returns a train.trainer.TrainResult
    serve_app: Callable[["Config", str], Any] | None = None  # returns a ray.serve Application
    # Numbers read off a final reply, kept per prediction and averaged by the eval stage
    # (Socratic CoT: the sub-questions its dialogue asked).
    reply_stats: Callable[[str], dict[str, float]] | None = None
    lineage: Callable[["Config"], dict[str, str]] | None = None  # tags for the eval run: store versions it reads
    description: str = ""
