"""Answer-only ablation: the same examples as Std-CoT, trained Q -> A with no rationale.

It trains on exactly the rows Std-CoT keeps, so the two differ only in the target.
"""
from __future__ import annotations

from ..tasks.answers import ANSWER_TRIGGER
from ..tasks.record import Example
from .recipe import MethodContext, Recipe, TrainRow, question_prompt


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    kept = ctx.teacher["rationales"]
    return [TrainRow(question_prompt(ex.question), f" {ANSWER_TRIGGER} {ex.answer}.") for ex in examples if ex.id in kept]


RECIPE = Recipe(
    name="answer_only",
    needs=("rationales",),
    train_rows=train_rows,
    description="question -> answer (ablation of Std-CoT)",
)
