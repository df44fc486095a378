"""MT-CoT: two tasks on one question, told apart by a tag; the loss weighs them 0.7 / 0.3.

`[Explanation Generation]` Q -> the teacher rationale, `[Answer Prediction]` Q -> the
answer sentence alone. At inference the student is asked for the answer only: the
rationale task shapes what it learns, not what it pays per question.
"""
from __future__ import annotations

from ..tasks.answers import ANSWER_TRIGGER
from ..tasks.record import Example
from .recipe import MethodContext, Recipe, TrainRow, question_prompt

EXPLAIN = "[Explanation Generation] "
PREDICT = "[Answer Prediction] "


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    kept, w = ctx.teacher["rationales"], ctx.cfg.method.mt_cot
    rows = []
    for ex in examples:
        if ex.id in kept:
            rows.append(TrainRow(EXPLAIN + question_prompt(ex.question), " " + kept[ex.id]["rationale"], w.rationale_weight))
            rows.append(TrainRow(PREDICT + question_prompt(ex.question), f" {ANSWER_TRIGGER} {ex.answer}.", w.answer_weight))
    return rows


def prompt(ex: Example, extras: dict) -> str:
    return PREDICT + question_prompt(ex.question)


RECIPE = Recipe(
    name="mt_cot",
    needs=("rationales",),
    train_rows=train_rows,
    prompt=prompt,
    description="[Explanation Generation] Q -> R (0.7) + [Answer Prediction] Q -> A (0.3); answers directly",
)
