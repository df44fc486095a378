"""What the eval stage's query actors and tasks run, per row.

Kept apart from `stage.py` on purpose: Ray ships these objects to actor and task
processes, and unpickling one imports its module there. `stage.py` imports torch,
transformers (FLOPs) and mlflow; this module needs neither, so an eval actor starts
without them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..client.actor import OUTPUT_COLUMNS
from ..client.requests import LLMRequest
from ..methods.recipe import STOP, Recipe
from ..tasks.answers import score
from ..tasks.record import Example


@dataclass(frozen=True)
class EvalPlan:
    """Ask once, greedy; every reply is accepted (a wrong answer is data, not an error).

    With `score` the reply is the final one and is scored; without, it is an
    intermediate reply (CasCoD's rationale) that the next call builds on.
    """

    model: str
    max_tokens: int
    temperature: float = 0.0
    score: bool = True
    max_tries: int = 1
    payload_fields: tuple[str, ...] = ("prediction", "correct")

    def requests(self, row: dict, attempt: int) -> LLMRequest:
        return LLMRequest(kind="completion", model=self.model, prompt=row["prompt"], temperature=self.temperature,
                          max_tokens=self.max_tokens, stop=tuple(STOP))

    def check(self, row: dict, response_text: str) -> tuple[bool, str, dict]:
        if not self.score:
            return True, "", {}
        prediction, correct = score(response_text, Example.from_row(row))
        return True, "", {"prediction": prediction, "correct": bool(correct)}


class FollowUp:
    """Between two inference calls: keep the first call's reply and usage, build the next prompt."""

    def __init__(self, recipe: Recipe, extras: dict[str, dict]) -> None:
        self.follow_up, self.extras = recipe.follow_up, extras

    def __call__(self, row: dict) -> dict:
        first = {f"first_{k}": row[k] for k in ("status", "output", "prompt_tokens", "completion_tokens", "call_usage")}
        out = {k: v for k, v in row.items() if k not in OUTPUT_COLUMNS}
        ex = Example.from_row(row)
        out["prompt"] = self.follow_up(ex, self.extras.get(ex.id, {}), row["output"] or "")
        return {**out, **first}
