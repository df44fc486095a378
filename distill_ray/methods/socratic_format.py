"""The texts the Socratic pair reads and writes, shared by training rows and the endpoint.

Both students see the question and the steps so far in one layout; the prompt's last
line says whose turn it is, so one base trained on both roles can already tell them apart:

    Question: <q>
    Sub-question 1: <sq 1>
    Sub-answer 1: <sa 1>
    Sub-question 2:             <- the decomposer continues: " <sq 2>" or " [done]"

    ... Sub-question 2: <sq 2>
    Sub-answer 2:               <- the solver continues: " <sa 2>"

The endpoint's reply is the same trail followed by the answer sentence the scorer reads:
every sub-question and sub-answer on its own line, then "Therefore, the answer is N.".
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from ..tasks.answers import ANSWER_TRIGGER, extract_answer
from ..tasks.record import Step
from .recipe import QUESTION_PREFIX

DONE = "[done]"
# The two students' names: their adapter dirs, and the `model` a request names to reach one.
DECOMPOSER, SOLVER = "decomposer", "solver"
SUB_QUESTION = "Sub-question"
SUB_ANSWER = "Sub-answer"
STEP_LIMIT_NOTE = "Step limit reached."

_SUB_QUESTION_LINE_RE = re.compile(rf"(?m)^{SUB_QUESTION} \d+:")


def one_line(text: str) -> str:
    """A step as it sits in a prompt: one line, inner whitespace collapsed."""
    return " ".join(str(text).split())


def _trail(question: str, steps: Sequence[Step]) -> list[str]:
    lines = [f"{QUESTION_PREFIX}{one_line(question)}"]
    for i, step in enumerate(steps, start=1):
        lines += [f"{SUB_QUESTION} {i}: {one_line(step.question)}", f"{SUB_ANSWER} {i}: {one_line(step.answer)}"]
    return lines


def decomposer_prompt(question: str, steps: Sequence[Step]) -> str:
    """Q + steps so far; the model writes the next sub-question or DONE."""
    return "\n".join([*_trail(question, steps), f"{SUB_QUESTION} {len(steps) + 1}:"])


def solver_prompt(question: str, steps: Sequence[Step], sub_question: str) -> str:
    """Q + previous steps + the new sub-question; the model writes its answer."""
    n = len(steps) + 1
    return "\n".join([*_trail(question, steps), f"{SUB_QUESTION} {n}: {one_line(sub_question)}", f"{SUB_ANSWER} {n}:"])


def is_done(sub_question: str) -> bool:
    return one_line(sub_question).lower() == DONE


def step_value(sub_answer: str) -> str | None:
    """What a sub-answer concludes: the first number after its last '=', else its last number.

    "15 - 4 = 11" -> "11"; "She makes 9 * 2 = $18 every day" -> "18"; None without a number.
    """
    text = one_line(sub_answer)
    head, eq, tail = text.rpartition("=")
    if eq:
        after = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?", tail)
        if after:
            return extract_answer(f"{ANSWER_TRIGGER} {after[0]}.", "number")
    return extract_answer(text, "number")


def final_answer(steps: Sequence[Step]) -> str | None:
    """The pair's answer: what the last sub-answer concludes (its text if it holds no number)."""
    if not steps:
        return None
    last = steps[-1].answer
    value = step_value(last)
    if value is not None:
        return value
    text = one_line(last).rstrip(".").strip()
    return text or None


def reply_text(steps: Sequence[Step], *, limit_hit: bool) -> str:
    """The endpoint's reply: the trail, then the answer sentence (none without a step)."""
    lines = []
    for i, step in enumerate(steps, start=1):
        lines += [f"{SUB_QUESTION} {i}: {one_line(step.question)}", f"{SUB_ANSWER} {i}: {one_line(step.answer)}"]
    if limit_hit:
        lines.append(STEP_LIMIT_NOTE)
    answer = final_answer(steps)
    if answer is not None:
        lines.append(f"{ANSWER_TRIGGER} {answer}.")
    return "\n".join(lines)


def count_steps(reply: str) -> int:
    """Sub-questions answered in an endpoint reply."""
    return len(_SUB_QUESTION_LINE_RE.findall(reply or ""))
