"""What one curriculum row looks like at stage t.

    prompt:  k_t demonstrations, each "Question: <q>\\nAnswer: <teacher rationale>" and a
             blank line, most similar first; then "Knowledge: <K compressed to r_t>" on
             its own line (left out when nothing of K is kept); then the question exactly
             as inference asks it, `question_prompt(q)`.
    target:  " " + the teacher's rationale, which ends in the answer sentence.

At the last stage (r = 0, k = 0) the prompt is `question_prompt(q)` alone: the rows are
then the Std-CoT rows, and the student is trained on what it will be asked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distill_ray.methods.recipe import question_prompt

KNOWLEDGE_PREFIX = "Knowledge: "
DEMO_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Demo:
    question: str
    rationale: str


def demo_block(demos: Sequence[Demo]) -> str:
    return "".join(f"{question_prompt(d.question)} {d.rationale.strip()}{DEMO_SEPARATOR}" for d in demos)


def stage_prompt(question: str, knowledge: str = "", demos: Sequence[Demo] = ()) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"curriculum row: the question must be non-empty text, got {question!r}")
    k = (knowledge or "").strip()
    return demo_block(demos) + (f"{KNOWLEDGE_PREFIX}{k}\n" if k else "") + question_prompt(question)


def target(rationale: str) -> str:
    if not isinstance(rationale, str) or not rationale.strip():
        raise ValueError(f"curriculum row: the teacher rationale must be non-empty text, got {rationale!r}")
    return " " + rationale  # as Std-CoT writes it, so the last stage's rows are Std-CoT's
